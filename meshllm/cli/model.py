"""``meshllm export``, ``pull``, ``quantize`` and ``generate``: a model on this device, no mesh."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshllm.cli.common import add_sampling_options


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {s!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from meshllm.model.export import export

    m = export(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
               max_seq_len=args.max_seq_len, overwrite=args.overwrite, name=args.name,
               block_size=args.block_size, accuracy_level=args.accuracy_level, kv_dtype=args.kv_dtype)
    size = sum(f.size for f in m.files.values())
    c = m.config
    print(f"exported {m.name}: {c.arch}, {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}, {_dtype_text(m)}, {size / 1e6:.1f} MB -> {args.out}")
    return 0


def _dtype_text(m: Any) -> str:
    qz = m.quantization
    if not qz:
        return str(m.dtype)
    return f"{m.dtype} (block {qz['block_size']}, accuracy level {qz['accuracy_level']})"


def cmd_quantize(args: argparse.Namespace) -> int:
    from meshllm.model.export import quantize_model_dir

    m = quantize_model_dir(args.model_dir, args.out, dtype=args.dtype, block_size=args.block_size,
                           accuracy_level=args.accuracy_level, overwrite=args.overwrite, kv_dtype=args.kv_dtype)
    size = sum(f.size for f in m.files.values())
    held = sum(int(p.runtime_bytes or 0) for p in m.parts)
    print(f"quantized {m.name}: {_dtype_text(m)}, {size / 1e6:.1f} MB of files, {held / 1e6:.1f} MB of weights "
          f"at run time -> {args.out}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from meshllm.model.pull import pull

    m, out = pull(args.model_id, args.out, dtype=args.dtype, revision=args.revision,
                  max_seq_len=args.max_seq_len, overwrite=args.overwrite, block_size=args.block_size,
                  accuracy_level=args.accuracy_level)
    size = sum(f.size for f in m.files.values())
    print(f"pulled {args.model_id}: {m.config.n_layers} layers, {_dtype_text(m)}, {size / 1e6:.0f} MB -> {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "seed": args.seed, "stop": tuple(args.stop or ())}
    params = SamplingParams(**{k: v for k, v in given.items() if v is not None})  # else the mesh's defaults
    model = LocalModel(args.model, split=args.split or (), threads=args.threads, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps(model.generate(args.prompt, params).to_json()))
        return 0
    for text, _ in model.stream(args.prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _dtype_options(p: argparse.ArgumentParser, quantized_only: bool = False) -> None:
    # no argparse choices: the library checks the value and fails with one line
    if quantized_only:
        p.add_argument("--dtype", required=True, metavar="{int4,int8}", help="weight type")
    else:
        p.add_argument("--dtype", default="fp32", metavar="{fp32,fp16,int4,int8}",
                       help="weight storage type (int4/int8: block-quantized, see docs/inference.md)")
    p.add_argument("--block-size", type=int, help="int4/int8: weights per quantization block, a power of two "
                   ">= 16 dividing every weight's rows (default 64 where it divides them, else 32)")
    p.add_argument("--accuracy-level", type=int, help="int4/int8: 4 = int8 activations, the fast CPU kernels "
                   "(default); 1 = float32 compute")


def add_parsers(sub: Any) -> None:
    """Registers export, pull, quantize and generate."""
    e = sub.add_parser("export", help="turn a llama2.c or Hugging Face checkpoint into a meshllm model directory")
    e.add_argument("checkpoint", help="llama2.c .bin file or Hugging Face model directory")
    e.add_argument("out", help="output model directory")
    e.add_argument("--tokenizer", help="tokenizer file (llama2.c tokenizer.bin, or tokenizer.json)")
    _dtype_options(e)
    e.add_argument("--max-seq-len", type=int, help="cap the context length (default: the checkpoint's)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--name", help="model name recorded in the manifest (default: the checkpoint's name)")
    e.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="the model's default KV cache dtype (fp16: half "
                   "the memory per sequence and half the bytes per KV hand-off; a node may override it)")
    e.set_defaults(func=cmd_export)
    pu = sub.add_parser("pull", help="download a Hugging Face checkpoint (online devices) and export it")
    pu.add_argument("model_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct (see README for known models)")
    pu.add_argument("--out", help="model directory to write (default: models/<name>-<dtype>)")
    _dtype_options(pu)
    pu.add_argument("--revision", help="branch, tag or commit on the hub")
    pu.add_argument("--max-seq-len", type=int, help="cap the context length (KV memory grows with it)")
    pu.add_argument("--overwrite", action="store_true")
    pu.set_defaults(func=cmd_pull)
    qz = sub.add_parser("quantize", help="make an int4 or int8 copy of an exported fp32/fp16 model directory")
    qz.add_argument("model_dir", help="meshllm model directory (fp32 or fp16)")
    qz.add_argument("out", help="output model directory")
    _dtype_options(qz, quantized_only=True)
    qz.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    qz.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="the model's default KV cache dtype (fp16: half "
                   "the memory per sequence and half the bytes per KV hand-off; a node may override it)")
    qz.set_defaults(func=cmd_quantize)
    g = sub.add_parser("generate", help="generate text from a prompt in this process")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="meshllm model directory")
    add_sampling_options(g)
    g.add_argument("--split", type=_int_list, help="run as segments cut before these layers, e.g. 2,4")
    g.add_argument("--threads", type=int, help="onnxruntime threads per segment (default: all cores)")
    g.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="dtype of the KV cache (default: the model's)")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    g.set_defaults(func=cmd_generate)
