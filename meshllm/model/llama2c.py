"""Reader and writer for llama2.c checkpoints (``run.c``'s legacy "version 0" format).

These tiny models are the project's ground truth: ``run.c`` is short enough to
transcribe, so every layer of meshllm can be checked against it.  The format is
a header of seven int32 followed by raw float32 arrays in a fixed order; the
reader memory-maps the file so that even the 110M model costs no copy.

Layout (little-endian)::

    int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    float32 token_embedding_table [vocab, dim]
            rms_att_weight [L, dim]
            wq [L, n_heads*hs, dim]   wk [L, kv_dim, dim]   wv [L, kv_dim, dim]
            wo [L, dim, n_heads*hs]
            rms_ffn_weight [L, dim]
            w1 [L, hidden, dim]   w2 [L, dim, hidden]   w3 [L, hidden, dim]
            rms_final_weight [dim]
            freq_cis_real [seq_len, hs/2]   freq_cis_imag [seq_len, hs/2]   (unused)
            wcls [vocab, dim]   only when the header's vocab_size is negative
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from meshllm.errors import ModelError, UnsupportedModelError
from meshllm.model.config import ModelConfig

HEADER_INTS = 7
HEADER_BYTES = HEADER_INTS * 4
_F32 = np.dtype("<f4")
_I32 = np.dtype("<i4")

# Per-layer tensors in file order: (file name, canonical suffix).
_LAYER_TENSORS = (
    ("rms_att_weight", "attention_norm"),
    ("wq", "wq"),
    ("wk", "wk"),
    ("wv", "wv"),
    ("wo", "wo"),
    ("rms_ffn_weight", "ffn_norm"),
    ("w1", "w1"),
    ("w2", "w2"),
    ("w3", "w3"),
)


def make_llama2c_config(
    dim: int,
    hidden_dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    seq_len: int,
    *,
    shared_classifier: bool = True,
) -> ModelConfig:
    """The :class:`ModelConfig` that ``run.c`` implies for these header values."""
    return ModelConfig(
        arch="llama",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        ffn_dim=hidden_dim,
        vocab_size=vocab_size,
        max_seq_len=seq_len,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_interleaved=True,
        tied_embeddings=shared_classifier,
        bos_id=1,
        eos_ids=(2,),
        stop_on_bos=True,
    )


def _tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for every weight the checkpoint stores."""
    d, hd, q, kv = config.dim, config.ffn_dim, config.q_dim, config.kv_dim
    per_layer = {
        "attention_norm": (d,),
        "wq": (q, d),
        "wk": (kv, d),
        "wv": (kv, d),
        "wo": (d, q),
        "ffn_norm": (d,),
        "w1": (hd, d),
        "w2": (d, hd),
        "w3": (hd, d),
    }
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings": (config.vocab_size, d)}
    for i in range(config.n_layers):
        for suffix, shape in per_layer.items():
            shapes[f"layers.{i}.{suffix}"] = shape
    shapes["norm"] = (d,)
    if not config.tied_embeddings:
        shapes["output"] = (config.vocab_size, d)
    return shapes


def _freq_cis_floats(config: ModelConfig) -> int:
    """Floats in each of the two unused RoPE tables (C integer arithmetic)."""
    return config.max_seq_len * config.head_dim // 2


def _file_floats(config: ModelConfig) -> int:
    return sum(int(np.prod(s)) for s in _tensor_shapes(config).values()) + 2 * _freq_cis_floats(config)


def _validate_header(path: Path, header: tuple[int, ...]) -> None:
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for name, value in zip(names, header):
        if (abs(value) if name == "vocab_size" else value) <= 0:
            raise ModelError(f"{path}: llama2.c header field {name}={value} must be positive")
    dim, _, _, n_heads, n_kv_heads, _, _ = header
    if dim % n_heads:
        raise ModelError(f"{path}: llama2.c header dim={dim} is not divisible by n_heads={n_heads}")
    if n_heads % n_kv_heads:
        raise ModelError(
            f"{path}: llama2.c header n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}"
        )
    if (dim // n_heads) % 2:
        raise ModelError(f"{path}: llama2.c head size {dim // n_heads} is odd; RoPE needs pairs")


def read_llama2c(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Memory-map a llama2.c checkpoint into a config and canonical (read-only) weights."""
    path = Path(path)
    try:
        actual = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ModelError(f"{path}: cannot read llama2.c checkpoint: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise ModelError(
            f"{path}: {actual} bytes is too short for a llama2.c header ({HEADER_BYTES} bytes)"
        )
    header = tuple(int(v) for v in np.frombuffer(raw, dtype=_I32))
    _validate_header(path, header)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    config = make_llama2c_config(
        dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0
    )
    expected = HEADER_BYTES + 4 * _file_floats(config)
    if actual != expected:
        raise ModelError(
            f"{path}: llama2.c header {header} implies {expected} bytes but the file has {actual} "
            f"({'truncated' if actual < expected else 'trailing data'}; not a legacy version-0 checkpoint?)"
        )
    flat = np.asarray(np.memmap(path, dtype=_F32, mode="r", offset=HEADER_BYTES))
    return config, dict(_split_weights(config, flat))


def _split_weights(config: ModelConfig, flat: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Yield canonical (name, view) pairs from the float array after the header."""
    shapes = _tensor_shapes(config)
    off = 0

    def take(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal off
        n = int(np.prod(shape))
        arr = flat[off : off + n].reshape(shape)
        off += n
        return arr

    yield "tok_embeddings", take(shapes["tok_embeddings"])
    for _, suffix in _LAYER_TENSORS:
        stacked = take((config.n_layers, *shapes[f"layers.0.{suffix}"]))
        for i in range(config.n_layers):
            yield f"layers.{i}.{suffix}", stacked[i]
    yield "norm", take(shapes["norm"])
    take((2 * _freq_cis_floats(config),))
    if not config.tied_embeddings:
        yield "output", take(shapes["output"])


def _check_writable(config: ModelConfig) -> None:
    problems = []
    if config.head_dim * config.n_heads != config.dim:
        problems.append(f"head_dim*n_heads={config.q_dim} != dim={config.dim}")
    if not config.rope_interleaved:
        problems.append("RoPE must rotate adjacent pairs (rope_interleaved=True)")
    if config.rope_theta != 10000.0 or config.rope_scaling is not None:
        problems.append("RoPE must be plain theta=10000")
    if config.norm_eps != 1e-5:
        problems.append(f"norm_eps must be 1e-5, not {config.norm_eps}")
    if config.qkv_bias:
        problems.append("the format has no attention biases")
    if config.head_dim % 2 or config.n_heads % config.n_kv_heads:
        problems.append("head_dim must be even and n_heads a multiple of n_kv_heads")
    if problems:
        raise UnsupportedModelError("cannot write as llama2.c: " + "; ".join(problems))


def _freq_cis(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin tables llama2.c's export.py wrote (run.c ignores them)."""
    hs = config.head_dim
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hs, 2, dtype=np.float32)[: hs // 2] / np.float32(hs)))
    angles = np.outer(np.arange(config.max_seq_len, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(angles).astype(_F32), np.sin(angles).astype(_F32)


def write_llama2c(
    path: str | os.PathLike[str], config: ModelConfig, weights: Mapping[str, np.ndarray]
) -> None:
    """Write canonical weights as a llama2.c checkpoint (the inverse of :func:`read_llama2c`)."""
    _check_writable(config)
    shapes = _tensor_shapes(config)
    extra = set(weights) - set(shapes)
    if extra:
        raise ModelError(f"{path}: weights not representable in llama2.c: {sorted(extra)}")
    for name, shape in shapes.items():
        if name not in weights:
            raise ModelError(f"{path}: missing weight {name!r} for llama2.c export")
        if tuple(weights[name].shape) != shape:
            raise ModelError(f"{path}: weight {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
    vocab = config.vocab_size if config.tied_embeddings else -config.vocab_size
    header = np.array(
        [config.dim, config.ffn_dim, config.n_layers, config.n_heads, config.n_kv_heads, vocab, config.max_seq_len],
        dtype=_I32,
    )

    def put(f: BinaryIO, arr: np.ndarray) -> None:
        np.ascontiguousarray(arr, dtype=_F32).tofile(f)

    with open(path, "wb") as f:
        header.tofile(f)
        put(f, weights["tok_embeddings"])
        for _, suffix in _LAYER_TENSORS:
            for i in range(config.n_layers):
                put(f, weights[f"layers.{i}.{suffix}"])
        put(f, weights["norm"])
        for table in _freq_cis(config):
            put(f, table)
        if not config.tied_embeddings:
            put(f, weights["output"])


def random_llama2c_weights(config: ModelConfig, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random float32 weights under canonical names, for tests and benchmarks.

    Embeddings and the classifier have std ``scale``; projections have std
    ``1/sqrt(fan_in)`` so the residual stream is dominated by the layers rather
    than by the token's own embedding (which would make greedy decoding repeat
    one token).  Norm weights are ``1 + 0.1 * N(0, 1)``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in _tensor_shapes(config).items():
        if len(shape) == 1:
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("tok_embeddings", "output"):
            arr = scale * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = arr.astype(np.float32)
    return out
