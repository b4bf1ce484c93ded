"""``meshllm export``: a checkpoint becomes a meshllm model directory.

Reads a llama2.c ``.bin`` or a Hugging Face directory, builds one ONNX graph
per part (embedding, each decoder layer, head) with its weights in a sidecar
``.data`` file, copies the tokenizer, and writes the manifest with per-part
costs and the sha256 of every file. Output is written to a temporary sibling
directory and renamed into place, so a failed export never leaves a
half-written model behind.
"""

from __future__ import annotations

import dataclasses

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import onnx

from meshllm.errors import ModelError
from meshllm.model import graphs
from meshllm.model import quantize as q
from meshllm.model.config import ModelConfig
from meshllm.model.manifest import DTYPES, Manifest, Part, PartCost, file_entry, load_manifest, verify_files

log = logging.getLogger(__name__)

F32 = 4


def read_checkpoint(
    checkpoint: str | Path, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray], str]:
    """Returns (config, canonical weights, kind) for a llama2.c file or an HF directory."""
    path = Path(checkpoint)
    if path.is_dir():
        from meshllm.model.hf import read_hf

        cfg, weights = read_hf(path, max_seq_len)
        return cfg, weights, "hf"
    if path.is_file():
        from meshllm.model.llama2c import read_llama2c

        cfg, weights = read_llama2c(path)
        return cfg, weights, "llama2c"
    raise ModelError(f"checkpoint {path} does not exist (give a llama2.c .bin file or a Hugging Face model directory)")


def part_costs(cfg: ModelConfig, dtype: str) -> dict[str, PartCost]:
    """Analytic costs; for quantized dtypes the byte counts are replaced by the measured ones."""
    store = np.dtype(graphs.WEIGHT_DTYPES.get(dtype, np.float32)).itemsize
    layer_params = cfg.dim * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    layer_params += 2 * cfg.dim + ((cfg.q_dim + 2 * cfg.kv_dim) if cfg.qkv_bias else 0)
    embed_params = cfg.vocab_size * cfg.dim
    head_params = cfg.vocab_size * cfg.dim + cfg.dim
    return {
        "embed": PartCost(0, 0, embed_params * store, embed_params * F32, 0, cfg.dim * F32),
        "layer": PartCost(
            flops_per_token=2 * layer_params,
            attn_flops_per_token_per_ctx=4 * cfg.q_dim,
            weight_bytes=layer_params * store,
            runtime_weight_bytes=layer_params * F32,
            kv_bytes_per_token=2 * cfg.kv_dim * F32,
            activation_bytes_per_token=cfg.dim * F32,
        ),
        "head": PartCost(2 * cfg.vocab_size * cfg.dim, 0, head_params * store, head_params * F32, 0,
                         cfg.vocab_size * F32),
    }


def _save_part(model: onnx.ModelProto, out: Path, stem: str,
               shared: tuple[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """Writes ``stem.onnx`` (+ ``stem.onnx.data``); returns the part's files.

    ``shared`` = (part file stem, initializer names): those initializers are not written
    again but refer to the bytes already in that part's data file (a tied head reads the
    embedding's table)."""
    onnx_name, data_name = f"{stem}.onnx", f"{stem}.onnx.data"
    refs: list[onnx.TensorProto] = []
    if shared is not None:
        other, names = shared
        saved = {t.name: t for t in onnx.load(str(out / f"{other}.onnx"), load_external_data=False).graph.initializer}
        refs = [saved[n] for n in names]
        keep = [t for t in model.graph.initializer if t.name not in names]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    onnx.save_model(model, out / onnx_name, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    files = (onnx_name, data_name) if (out / data_name).exists() else (onnx_name,)
    if refs:
        saved_model = onnx.load(str(out / onnx_name), load_external_data=False)
        saved_model.graph.initializer.extend(refs)
        onnx.save_model(saved_model, out / onnx_name)
        files += tuple(sorted({e.value for t in refs for e in t.external_data if e.key == "location"} - set(files)))
    return files


def part_stem(name: str) -> str:
    return f"layer_{int(name.split('.')[1]):03d}" if name.startswith("layer.") else name


def write_parts(cfg: ModelConfig, models: Iterable[tuple[str, onnx.ModelProto]], out: Path, dtype: str,
                spec: q.QuantSpec | None) -> list[Part]:
    """Saves part graphs into ``out``, quantized first when ``spec`` is given."""
    costs = part_costs(cfg, dtype)
    parts: list[Part] = []
    table: q.SharedTable | None = None
    for name, model in models:
        kind = name.split(".")[0]
        cost = costs[kind]
        shared = None
        if spec is not None:
            model, made = q.quantize_part(model, spec, name, table)
            if kind == "embed":
                table = made
            elif made is not None:  # the head reads the embedding's table
                shared = ("embed", made.names)
            nbytes = q.initializer_bytes(model)
            cost = PartCost(cost.flops_per_token, cost.attn_flops_per_token_per_ctx, nbytes, nbytes,
                            cost.kv_bytes_per_token, cost.activation_bytes_per_token)
        parts.append(Part(name, _save_part(model, out, part_stem(name), shared), cost))
    return parts


def check_block_size_fits(cfg: ModelConfig, block_size: int) -> None:
    """Every weight's input dimension must be a multiple of the block size."""
    q.check_block_size(block_size)
    for what, k in (("dim", cfg.dim), ("attention width (heads x head_dim)", cfg.q_dim), ("ffn_dim", cfg.ffn_dim)):
        if k % block_size:
            fits = [b for b in (16, 32, 64, 128, 256) if all(x % b == 0 for x in (cfg.dim, cfg.q_dim, cfg.ffn_dim))]
            hint = (f"use --block-size {max(fits)}" if fits
                    else "no block size from 16 to 256 divides every weight: quantization is not possible")
            raise q.QuantizeError(f"block size {block_size} does not divide the model's {what} {k} "
                                  f"(the rows of its weight matrices); {hint}")


def quant_spec(dtype: str, block_size: int | None, accuracy_level: int | None,
               cfg: ModelConfig | None = None) -> q.QuantSpec | None:
    """The quantization of ``dtype`` (None for fp32/fp16), checking the options first. Without a
    ``block_size``, the model's default (:func:`meshllm.model.quantize.default_block_size`) when
    ``cfg`` is known, else ``DEFAULT_BLOCK_SIZE`` (for checking the options only)."""
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    if dtype not in q.QUANT_DTYPES:
        if block_size is not None or accuracy_level is not None:
            raise ModelError(f"--block-size and --accuracy-level apply to int4/int8, not to {dtype}")
        return None
    if block_size is None:
        block_size = (q.default_block_size((cfg.dim, cfg.q_dim, cfg.ffn_dim)) if cfg is not None
                      else q.DEFAULT_BLOCK_SIZE)
    return q.QuantSpec.for_dtype(dtype, block_size, 4 if accuracy_level is None else accuracy_level)


def _copy_tokenizer(kind: str, checkpoint: Path, tokenizer: Path | None, out: Path, cfg: ModelConfig) -> dict[str, Any]:
    if kind == "llama2c":
        src = tokenizer or checkpoint.with_name("tokenizer.bin")
        if not src.is_file():
            raise ModelError(f"llama2.c tokenizer {src} not found; pass --tokenizer path/to/tokenizer.bin")
        shutil.copyfile(src, out / "tokenizer.bin")
        return {"kind": "llama2c", "file": "tokenizer.bin", "vocab_size": cfg.vocab_size}
    src = tokenizer or checkpoint / "tokenizer.json"
    if not src.is_file():
        raise ModelError(f"tokenizer {src} not found; the checkpoint needs a tokenizer.json (or pass --tokenizer)")
    shutil.copyfile(src, out / "tokenizer.json")
    info: dict[str, Any] = {"kind": "hf", "file": "tokenizer.json", "config": None}
    tok_cfg = src.with_name("tokenizer_config.json")
    if tok_cfg.is_file():
        shutil.copyfile(tok_cfg, out / "tokenizer_config.json")
        info["config"] = "tokenizer_config.json"
    template = src.with_name("chat_template.jinja")  # takes priority over the config's, as in transformers
    if template.is_file():
        shutil.copyfile(template, out / "chat_template.jinja")
        info["chat_template"] = "chat_template.jinja"
    return info


def build_model_dir(
    cfg: ModelConfig,
    weights: Mapping[str, np.ndarray],
    out: Path,
    *,
    dtype: str,
    tokenizer_info: dict[str, Any],
    name: str,
    source: dict[str, Any],
    spec: q.QuantSpec | None = None,
) -> Manifest:
    """Writes every part graph into ``out`` (which already holds the tokenizer) and the manifest.

    A quantized model is built as float32 graphs in memory, one part at a time, then rewritten."""
    build_dtype = "fp32" if spec is not None else dtype

    def models() -> Iterator[tuple[str, onnx.ModelProto]]:
        yield "embed", graphs.build_embed(cfg, weights, build_dtype)
        for i in range(cfg.n_layers):
            yield f"layer.{i}", graphs.build_layer(cfg, weights, i, build_dtype)
        yield "head", graphs.build_head(cfg, weights, build_dtype)

    parts = write_parts(cfg, models(), out, dtype, spec)
    return _write_manifest(out, cfg, dtype, tokenizer_info, name, source, parts, spec)


def _write_manifest(out: Path, cfg: ModelConfig, dtype: str, tokenizer_info: dict[str, Any], name: str,
                    source: dict[str, Any], parts: list[Part], spec: q.QuantSpec | None) -> Manifest:
    files = list(dict.fromkeys(f for p in parts for f in p.files))
    files += [tokenizer_info[k] for k in ("file", "config", "chat_template") if tokenizer_info.get(k)]
    manifest = Manifest(
        name=name,
        config=cfg,
        dtype=dtype,
        tokenizer=tokenizer_info,
        parts=tuple(parts),
        files={f: file_entry(out / f) for f in files},
        source=source,
        quantization=spec.to_json() if spec is not None else None,
    )
    manifest.save(out)
    return manifest


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "fp32",
    max_seq_len: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    kv_dtype: str | None = None,
) -> Manifest:
    spec = quant_spec(dtype, block_size, accuracy_level)
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"output directory {out} already exists (remove it or pass --overwrite)")
    cfg, weights, kind = read_checkpoint(checkpoint, max_seq_len)
    if kv_dtype is not None:  # the model's default KV cache dtype (a node may override it)
        cfg = dataclasses.replace(cfg, kv_dtype=kv_dtype)
    graphs.check_supported(cfg)
    spec = quant_spec(dtype, block_size, accuracy_level, cfg)
    if spec is not None:
        check_block_size_fits(cfg, spec.block_size)
    log.info("exporting %s checkpoint %s: %d layers, dim %d, vocab %d, %s", kind, checkpoint,
             cfg.n_layers, cfg.dim, cfg.vocab_size, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = _copy_tokenizer(kind, checkpoint, Path(tokenizer) if tokenizer else None, tmp, cfg)
        manifest = build_model_dir(
            cfg, weights, tmp, dtype=dtype, tokenizer_info=tok,
            name=name or (checkpoint.stem if checkpoint.is_file() else checkpoint.name),
            source={"kind": kind, "checkpoint": checkpoint.name}, spec=spec,
        )
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def quantize_model_dir(
    model_dir: str | Path,
    out: str | Path,
    *,
    dtype: str,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    overwrite: bool = False,
    kv_dtype: str | None = None,
) -> Manifest:
    """``meshllm quantize``: an exported fp32/fp16 model directory becomes an int4/int8 one in ``out``.

    For models that have no other source (the bundled one). Checks everything before
    writing; ``out`` appears only when complete."""
    model_dir, out = Path(model_dir), Path(out)
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported (choose from {', '.join(q.QUANT_DTYPES)})")
    if dtype not in q.QUANT_DTYPES:
        raise ModelError(f"meshllm quantize makes int4 or int8 models, not {dtype} (use meshllm export for that)")
    spec = quant_spec(dtype, block_size, accuracy_level)
    assert spec is not None
    src = load_manifest(model_dir)
    if src.dtype in q.QUANT_DTYPES or src.quantization is not None:
        raise q.QuantizeError(f"{model_dir} is already quantized ({src.dtype}); quantize the fp32 or fp16 "
                              f"model it came from, or export the checkpoint again with --dtype {dtype}")
    cfg = src.config if kv_dtype is None else dataclasses.replace(src.config, kv_dtype=kv_dtype)
    graphs.check_supported(cfg)
    spec = quant_spec(dtype, block_size, accuracy_level, cfg)
    assert spec is not None
    check_block_size_fits(cfg, spec.block_size)
    if out.resolve() == model_dir.resolve():
        raise ModelError(f"output directory {out} is the model directory itself; choose another")
    if out.exists() and not overwrite:
        raise ModelError(f"output directory {out} already exists (remove it or pass --overwrite)")
    verify_files(model_dir, src)

    def models() -> Iterator[tuple[str, onnx.ModelProto]]:
        for part in src.parts:
            try:
                model = onnx.load(str(model_dir / part.files[0]), load_external_data=False)
                onnx.load_external_data_for_model(model, str(model_dir))
            except Exception as e:  # protobuf decode errors have no common base
                raise ModelError(f"{model_dir / part.files[0]}: not a readable ONNX graph ({e})") from None
            yield part.name, model

    log.info("quantizing %s (%s) to %s, block size %d", model_dir, src.dtype, dtype, spec.block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in src.tokenizer_files():
            shutil.copyfile(model_dir / f, tmp / f)
        parts = write_parts(cfg, models(), tmp, dtype, spec)
        source = {**src.source, "quantized_from": src.dtype}
        manifest = _write_manifest(tmp, cfg, dtype, src.tokenizer, src.name, source, parts, spec)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
