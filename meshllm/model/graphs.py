"""ONNX graphs for the three kinds of model part: embedding, one decoder layer, head.

Graphs are built straight from numpy weights with ``onnx.helper``; no torch.
Each function reads like the block it builds (shapes in comments). The layer
graph is the unit of placement: the runtime concatenates consecutive layer
graphs into one segment graph (see :mod:`meshllm.runtime.segment`).

The tensor interface between parts (names, shapes) is in :mod:`meshllm.model.interface`.

Attention is ``com.microsoft.GroupQueryAttention`` with RoPE inside
(``do_rotary``) and a packed QKV input. The fused rotary needs a head size that
is a multiple of 16; for any other head size RoPE runs before the operator
(``com.microsoft.RotaryEmbedding`` on q and k, positions from ``seqlens_k``)
and the operator gets ``do_rotary=0``. When the runtime binds ``past_*`` and
``present_*`` to one buffer, onnxruntime writes the new keys/values in place
(no per-step copy of the cache); see ``shared/ORT-NOTES.md``.

Exported graphs always hold a float32 KV cache; the runtime turns a (merged)
graph's caches into float16 at load (:func:`meshllm.runtime.onnx_wire.with_float16_kv`),
so the KV dtype is a run-time choice (per model in its config, per node on the
command line) and never changes the model files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import UnsupportedModelError
from meshllm.model.config import ModelConfig
from meshllm.model.interface import (  # noqa: F401 (the part interface, re-exported)
    FUSED_ROTARY_MULTIPLE,
    HEAD_LAST_INDEX,
    HIDDEN,
    INPUT_IDS,
    KV_DTYPES,
    LOGITS,
    SEQLENS_K,
    TOTAL_SEQ_LEN,
    fused_rotary,
    hidden_out,
    past_key,
    past_value,
    present_key,
    present_value,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
IR_VERSION = 9

#: Storage dtypes of weights. Compute is always float32 on CPU; half-precision
#: weights are upcast inside the graph (a Cast that onnxruntime folds at load).
WEIGHT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class _Builder:
    """Accumulates nodes and initializers; names are prefixed to stay unique."""

    prefix: str
    dtype: str
    nodes: list[onnx.NodeProto]
    inits: list[onnx.TensorProto]

    def name(self, s: str) -> str:
        return f"{self.prefix}{s}"

    def weight(self, key: str, arr: np.ndarray) -> str:
        """Adds a weight as an initializer, stored in ``dtype``, used as float32."""
        store = np.ascontiguousarray(arr, dtype=WEIGHT_DTYPES[self.dtype])
        raw = self.name(key)
        self.inits.append(numpy_helper.from_array(store, raw))
        if store.dtype == np.float32:
            return raw
        return self.node("Cast", [raw], key + ".f32", to=TensorProto.FLOAT)

    def const(self, key: str, arr: np.ndarray) -> str:
        """An exact constant (never down-cast). "@name" constants are shared by
        every layer (the RoPE tables) and kept once when layers are merged."""
        name = key[1:] if key.startswith("@") else self.name(key)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, domain: str = "", **attrs: object) -> str:
        outs = self.nodes_multi(op, inputs, [out], domain, **attrs)
        return outs[0]

    def nodes_multi(
        self, op: str, inputs: list[str], outs: list[str], domain: str = "", **attrs: object
    ) -> list[str]:
        # "@name" marks an interface tensor, which keeps its name unprefixed.
        names = [o[1:] if o.startswith("@") else self.name(o) for o in outs]
        self.nodes.append(
            helper.make_node(op, inputs, names, name=self.name(op + "." + outs[0]), domain=domain, **attrs)
        )
        return names


def check_supported(cfg: ModelConfig) -> None:
    """Rejects shapes the graphs cannot run, before any work is done."""
    if cfg.head_dim % 2:
        raise UnsupportedModelError(f"head_dim {cfg.head_dim} is odd: RoPE rotates pairs of dimensions")
    if cfg.kv_dtype not in KV_DTYPES:
        raise UnsupportedModelError(f"kv_dtype {cfg.kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise UnsupportedModelError(f"n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")


# --- blocks ---------------------------------------------------------------


def rms_norm(b: _Builder, x: str, weight: np.ndarray, eps: float, key: str) -> str:
    """y = x / sqrt(mean(x^2) + eps) * w   (float32 throughout, like HF)."""
    w = b.weight(key, weight)
    return b.node("SimplifiedLayerNormalization", [x, w], key + ".out", axis=-1, epsilon=eps)


def rope_cache(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_seq_len, head_dim/2), with Llama-3 scaling when set."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling
    if rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    # float32 inv_freq first, as HF and llama2.c compute it, then the angle.
    inv_freq32 = inv_freq.astype(np.float32)
    pos = np.arange(cfg.max_seq_len, dtype=np.float32)
    ang = np.outer(pos, inv_freq32).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def positions(b: _Builder, x: str) -> str:
    """Positions of the new tokens, (B, S) int64: ``seqlens_k[b] + 1 - S + arange(S)``.

    The runtime sets ``seqlens_k[b]`` to the sequence's length after the step minus one (what
    GroupQueryAttention expects), for a prefill chunk (B = 1) and a batched decode step (S = 1) alike."""
    s = b.node("Gather", [b.node("Shape", [x], "shape"), b.const("axis1", np.array(1, np.int64))], "S", axis=0)
    last = b.node("Unsqueeze", [b.node("Cast", [SEQLENS_K], "seqlens64", to=TensorProto.INT64),
                                b.const("ax1", np.array([1], np.int64))], "last")  # (B, 1)
    first = b.node("Sub", [b.node("Add", [last, b.const("one", np.array(1, np.int64))], "len"), s], "first")
    steps = b.node("Range", [b.const("zero", np.array(0, np.int64)), s, b.const("step", np.array(1, np.int64))],
                   "steps")  # (S,)
    return b.node("Add", [first, steps], "pos")  # (B, S)


def rotary(b: _Builder, cfg: ModelConfig, t: str, pos: str, heads: int, key: str) -> str:
    """RoPE on (B, S, heads * head_dim) at ``pos``, halves or adjacent pairs as the checkpoint wants."""
    cos, sin = rope_cache(cfg)
    return b.node("RotaryEmbedding", [t, pos, b.const("@rope.cos", cos), b.const("@rope.sin", sin)], key,
                  domain=MS_DOMAIN, interleaved=int(cfg.rope_interleaved), num_heads=heads)


def attention(b: _Builder, cfg: ModelConfig, x: str, w: Mapping[str, np.ndarray], layer: int) -> str:
    """Packed QKV projection + RoPE + GroupQueryAttention + output projection.

    RoPE is fused into the operator when the head size allows (:func:`fused_rotary`); otherwise
    q and k are rotated first and the operator gets them apart from v, with ``do_rotary=0``."""
    p = f"layers.{layer}."
    # (B, S, D) @ (D, q_dim + 2 kv_dim) -> packed QKV
    wqkv = np.concatenate([w[p + "wq"], w[p + "wk"], w[p + "wv"]], axis=0).T
    qkv = b.node("MatMul", [x, b.weight("wqkv", wqkv)], "qkv")
    if cfg.qkv_bias:
        bias = np.concatenate([w[p + "bq"], w[p + "bk"], w[p + "bv"]])
        qkv = b.node("Add", [qkv, b.weight("bqkv", bias)], "qkv_b")
    if fused_rotary(cfg):
        cos, sin = rope_cache(cfg)
        qkv_in = [qkv, "", "", past_key(layer), past_value(layer), SEQLENS_K, TOTAL_SEQ_LEN,
                  b.const("@rope.cos", cos), b.const("@rope.sin", sin)]
    else:
        split = np.array([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], np.int64)
        q, k, v = b.nodes_multi("Split", [qkv, b.const("qkv_split", split)], ["q", "k", "v"], axis=-1)
        pos = positions(b, x)
        q = rotary(b, cfg, q, pos, cfg.n_heads, "q_rot")  # (B, S, q_dim)
        k = rotary(b, cfg, k, pos, cfg.n_kv_heads, "k_rot")  # (B, S, kv_dim)
        qkv_in = [q, k, v, past_key(layer), past_value(layer), SEQLENS_K, TOTAL_SEQ_LEN]
    attn, _, _ = b.nodes_multi(
        "GroupQueryAttention",
        qkv_in,
        ["attn", "@" + present_key(layer), "@" + present_value(layer)],
        domain=MS_DOMAIN,
        num_heads=cfg.n_heads,
        kv_num_heads=cfg.n_kv_heads,
        do_rotary=int(fused_rotary(cfg)),
        rotary_interleaved=int(cfg.rope_interleaved),
        scale=float(1.0 / np.sqrt(cfg.head_dim)),
    )
    # (B, S, q_dim) @ (q_dim, D)
    return b.node("MatMul", [attn, b.weight("wo", w[p + "wo"].T)], "attn_out")


def swiglu(b: _Builder, x: str, w: Mapping[str, np.ndarray], layer: int) -> str:
    """w2(silu(w1 x) * w3 x) with w1 and w3 fused into one MatMul."""
    p = f"layers.{layer}."
    ffn = w[p + "w1"].shape[0]
    w13 = np.concatenate([w[p + "w1"], w[p + "w3"]], axis=0).T  # (D, 2F)
    gu = b.node("MatMul", [x, b.weight("w13", w13)], "gate_up")
    gate, up = b.nodes_multi("Split", [gu, b.const("split", np.array([ffn, ffn], np.int64))],
                             ["gate", "up"], axis=-1)
    act = b.node("Mul", [gate, b.node("Sigmoid", [gate], "gate_sig")], "silu")
    h = b.node("Mul", [act, up], "act")
    return b.node("MatMul", [h, b.weight("w2", w[p + "w2"].T)], "mlp_out")


def decoder_layer(b: _Builder, cfg: ModelConfig, x: str, w: Mapping[str, np.ndarray], layer: int) -> str:
    """x + attn(norm(x)), then + mlp(norm(.)) — the pre-norm Llama block."""
    p = f"layers.{layer}."
    attn = attention(b, cfg, rms_norm(b, x, w[p + "attention_norm"], cfg.norm_eps, "attn_norm"), w, layer)
    h = b.node("Add", [x, attn], "h")
    mlp = swiglu(b, rms_norm(b, h, w[p + "ffn_norm"], cfg.norm_eps, "ffn_norm"), w, layer)
    return b.node("Add", [h, mlp], "@" + hidden_out(layer))


# --- graphs ---------------------------------------------------------------


def _model(b: _Builder, name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="meshllm",
    )
    model.ir_version = IR_VERSION
    return model


def _f32(name: str, shape: list[object]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def build_embed(cfg: ModelConfig, weights: Mapping[str, np.ndarray], dtype: str) -> onnx.ModelProto:
    b = _Builder("embed.", dtype, [], [])
    table = b.weight("tok_embeddings", weights["tok_embeddings"])
    b.node("Gather", [table, INPUT_IDS], "@" + HIDDEN, axis=0)
    return _model(
        b, "embed",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["B", "S"])],
        [_f32(HIDDEN, ["B", "S", cfg.dim])],
    )


def build_layer(cfg: ModelConfig, weights: Mapping[str, np.ndarray], layer: int, dtype: str) -> onnx.ModelProto:
    b = _Builder(f"layer{layer}.", dtype, [], [])
    hidden_in = HIDDEN if layer == 0 else hidden_out(layer - 1)
    decoder_layer(b, cfg, hidden_in, weights, layer)
    cache = ["B", cfg.n_kv_heads, "M", cfg.head_dim]
    return _model(
        b, f"layer{layer}",
        [
            _f32(hidden_in, ["B", "S", cfg.dim]),
            helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info(TOTAL_SEQ_LEN, TensorProto.INT32, []),
            _f32(past_key(layer), cache),
            _f32(past_value(layer), cache),
        ],
        [_f32(hidden_out(layer), ["B", "S", cfg.dim]), _f32(present_key(layer), cache),
         _f32(present_value(layer), cache)],
    )


def build_head(cfg: ModelConfig, weights: Mapping[str, np.ndarray], dtype: str) -> onnx.ModelProto:
    """Final RMSNorm + LM head on the last position only: decode never needs more."""
    b = _Builder("head.", dtype, [], [])
    x = hidden_out(cfg.n_layers - 1)
    # the index is named HEAD_LAST_INDEX ("head." + "last_index"): the runtime rewrites this Gather at load
    last = b.node("Gather", [x, b.const("last_index", np.array(-1, np.int64))], "last", axis=1)  # (B, D)
    normed = rms_norm(b, last, weights["norm"], cfg.norm_eps, "norm")
    out_w = weights["tok_embeddings"] if cfg.tied_embeddings else weights["output"]
    b.node("MatMul", [normed, b.weight("output", out_w.T)], "@" + LOGITS)
    return _model(
        b, "head",
        [_f32(x, ["B", "S", cfg.dim])],
        [_f32(LOGITS, ["B", cfg.vocab_size])],
    )
