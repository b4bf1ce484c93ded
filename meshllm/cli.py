"""The ``meshllm`` command line. Parses arguments, calls the library, prints.

Errors that meshllm raises on purpose (:class:`~meshllm.errors.MeshError`) are
printed as one line and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from meshllm.errors import MeshError


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {s!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from meshllm.model.export import export

    m = export(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
               max_seq_len=args.max_seq_len, overwrite=args.overwrite)
    size = sum(f.size for f in m.files.values())
    c = m.config
    print(f"exported {m.name}: {c.arch}, {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}, {m.dtype}, {size / 1e6:.1f} MB -> {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()))
    model = LocalModel(args.model, split=args.split or (), threads=args.threads)
    if args.json:
        print(json.dumps(model.generate(args.prompt, params).to_json()))
        return 0
    for text, _ in model.stream(args.prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm", description="Serve an LLM on a mesh of small devices.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="turn a llama2.c or Hugging Face checkpoint into a meshllm model directory")
    e.add_argument("checkpoint", help="llama2.c .bin file or Hugging Face model directory")
    e.add_argument("out", help="output model directory")
    e.add_argument("--tokenizer", help="tokenizer file (llama2.c tokenizer.bin, or tokenizer.json)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weight storage type")
    e.add_argument("--max-seq-len", type=int, help="cap the context length (default: the checkpoint's)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate text from a prompt in this process")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="meshllm model directory")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--split", type=_int_list, help="run as segments cut before these layers, e.g. 2,4")
    g.add_argument("--threads", type=int, help="onnxruntime threads per segment (default: all cores)")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MeshError as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
