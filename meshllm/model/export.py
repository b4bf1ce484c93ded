"""``meshllm export``: a checkpoint becomes a meshllm model directory.

Reads a llama2.c ``.bin`` or a Hugging Face directory, builds one ONNX graph
per part (embedding, each decoder layer, head) with its weights in a sidecar
``.data`` file, copies the tokenizer, and writes the manifest with per-part
costs and the sha256 of every file. Output is written to a temporary sibling
directory and renamed into place, so a failed export never leaves a
half-written model behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from meshllm.errors import ModelError
from meshllm.model import graphs
from meshllm.model.config import ModelConfig
from meshllm.model.manifest import Manifest, Part, PartCost, file_entry

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
    store = np.dtype(graphs.WEIGHT_DTYPES[dtype]).itemsize
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


def _save_part(model: onnx.ModelProto, out: Path, stem: str) -> tuple[str, ...]:
    onnx_name, data_name = f"{stem}.onnx", f"{stem}.onnx.data"
    onnx.save_model(model, out / onnx_name, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return (onnx_name, data_name) if (out / data_name).exists() else (onnx_name,)


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
) -> Manifest:
    """Writes every part graph into ``out`` (which already holds the tokenizer) and the manifest."""
    costs = part_costs(cfg, dtype)
    parts = [Part("embed", _save_part(graphs.build_embed(cfg, weights, dtype), out, "embed"), costs["embed"])]
    for i in range(cfg.n_layers):
        model = graphs.build_layer(cfg, weights, i, dtype)
        parts.append(Part(f"layer.{i}", _save_part(model, out, f"layer_{i:03d}"), costs["layer"]))
    parts.append(Part("head", _save_part(graphs.build_head(cfg, weights, dtype), out, "head"), costs["head"]))
    files = [f for p in parts for f in p.files]
    files += [tokenizer_info[k] for k in ("file", "config", "chat_template") if tokenizer_info.get(k)]
    manifest = Manifest(
        name=name,
        config=cfg,
        dtype=dtype,
        tokenizer=tokenizer_info,
        parts=tuple(parts),
        files={f: file_entry(out / f) for f in files},
        source=source,
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
) -> Manifest:
    if dtype not in graphs.WEIGHT_DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported (choose from {', '.join(graphs.WEIGHT_DTYPES)})")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"output directory {out} already exists (remove it or pass --overwrite)")
    cfg, weights, kind = read_checkpoint(checkpoint, max_seq_len)
    graphs.check_supported(cfg)
    log.info("exporting %s checkpoint %s: %d layers, dim %d, vocab %d, %s", kind, checkpoint,
             cfg.n_layers, cfg.dim, cfg.vocab_size, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = _copy_tokenizer(kind, checkpoint, Path(tokenizer) if tokenizer else None, tmp, cfg)
        manifest = build_model_dir(
            cfg, weights, tmp, dtype=dtype, tokenizer_info=tok,
            name=name or (checkpoint.stem if checkpoint.is_file() else checkpoint.name),
            source={"kind": kind, "checkpoint": checkpoint.name},
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
