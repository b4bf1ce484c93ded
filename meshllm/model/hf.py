"""Reads Hugging Face Llama-family checkpoints (Llama 2/3, Mistral, Qwen2, TinyLlama, SmolLM).

``config.json`` + ``*.safetensors`` (one file, or shards with
``model.safetensors.index.json``) become a :class:`ModelConfig` and canonical
numpy weights. No torch and no transformers: safetensors' numpy loader only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import ModelError, UnsupportedModelError
from meshllm.model.config import ModelConfig, RopeScaling

SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w1",
    "mlp.up_proj.weight": "w3",
    "mlp.down_proj.weight": "w2",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _eos_ids(model_dir: Path, cfg: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (model_dir / "generation_config.json", None):
        d = _read_json(source) if source is not None and source.is_file() else cfg
        eos = d.get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return tuple(ids)


def read_hf_config(model_dir: Path, max_seq_len: int | None = None) -> ModelConfig:
    cfg = _read_json(model_dir / "config.json")
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{model_dir}: model_type {mtype!r} is not supported; meshllm runs Llama-family "
            f"decoders ({', '.join(sorted(SUPPORTED_TYPES))})"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{model_dir}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias") or (mtype == "llama" and cfg.get("attention_bias")):
        raise UnsupportedModelError(f"{model_dir}: biases in the MLP or a Llama attention are not supported")
    # transformers 5 writes "rope_parameters" (theta and scaling together); older
    # configs have "rope_theta" and "rope_scaling".
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = None
    rs = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif kind != "default":
            raise UnsupportedModelError(f"{model_dir}: rope_scaling of type {kind!r} is not supported (llama3 is)")
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    ctx = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", mtype == "mistral") else None
    if isinstance(window, int) and window > 0:
        ctx = min(ctx, window)  # within the window, sliding attention is full attention
    if max_seq_len is not None:
        ctx = min(ctx, max_seq_len)
    bos = cfg.get("bos_token_id")
    return ModelConfig(
        arch=mtype,
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_seq_len=ctx,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_interleaved=False,
        rope_scaling=scaling,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mtype == "qwen2",
        bos_id=bos if isinstance(bos, int) else None,
        eos_ids=_eos_ids(model_dir, cfg),
    )


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights found (PyTorch .bin checkpoints are not read: "
                         f"they are pickles; convert them to safetensors first)")
    for f in files:
        if not f.is_file():
            raise ModelError(f"{model_dir}: shard {f.name} named in the index is missing")
    return files


def _load_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():
                    out[key] = st.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{f}: cannot read safetensors file ({e})") from None
    return out


def read_hf(model_dir: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    model_dir = Path(model_dir)
    cfg = read_hf_config(model_dir, max_seq_len)
    tensors = _load_tensors(_safetensors_files(model_dir))
    w: dict[str, np.ndarray] = {}

    def take(key: str) -> np.ndarray:
        if key not in tensors:
            raise ModelError(f"{model_dir}: tensor {key!r} is missing from the checkpoint")
        return np.asarray(tensors[key], dtype=np.float32)

    w["tok_embeddings"] = take("model.embed_tokens.weight")
    w["norm"] = take("model.norm.weight")
    if not cfg.tied_embeddings:
        w["output"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        for hf_name, name in _LAYER_NAMES.items():
            key = f"model.layers.{i}.{hf_name}"
            if name.startswith("b") and not cfg.qkv_bias:
                continue
            w[f"layers.{i}.{name}"] = take(key)
    expect = {
        "tok_embeddings": (cfg.vocab_size, cfg.dim),
        "layers.0.wq": (cfg.q_dim, cfg.dim),
        "layers.0.wk": (cfg.kv_dim, cfg.dim),
        "layers.0.w1": (cfg.ffn_dim, cfg.dim),
    }
    for key, shape in expect.items():
        if w[key].shape != shape:
            raise ModelError(f"{model_dir}: {key} has shape {w[key].shape}, config implies {shape}")
    return cfg, w
