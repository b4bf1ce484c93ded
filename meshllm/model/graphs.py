"""ONNX graphs for the three kinds of model part: embedding, one decoder layer, head.

Graphs are built straight from numpy weights with ``onnx.helper``; no torch.
Each function reads like the block it builds (shapes in comments). The layer
graph is the unit of placement: the runtime concatenates consecutive layer
graphs into one segment graph (see :mod:`meshllm.runtime.segment`).

Tensor interface (B = batch, S = new tokens, D = dim, M = cache length)::

    embed:  input_ids int64 (B, S)            -> hidden (B, S, D)
    layer:  hidden (B, S, D), seqlens_k int32 (B), total_seq_len int32 ()
            past_key / past_value (B, KV, M, hd)
                                              -> hidden, present_key, present_value
    head:   hidden (B, S, D)                  -> logits (B, V) of the last position

Attention is ``com.microsoft.GroupQueryAttention`` with RoPE inside
(``do_rotary``) and a packed QKV input. The fused rotary needs a head size that
is a multiple of 16; for any other head size RoPE runs before the operator
(``com.microsoft.RotaryEmbedding`` on q and k, positions from ``seqlens_k``)
and the operator gets ``do_rotary=0``. When the runtime binds ``past_*`` and
``present_*`` to one buffer, onnxruntime writes the new keys/values in place
(no per-step copy of the cache); see ``shared/ORT-NOTES.md``.

Exported graphs always hold a float32 KV cache; :func:`with_kv_dtype` turns a
(merged) graph's caches into float16 at load, so the KV dtype is a run-time
choice (per model in its config, per node on the command line) and never
changes the model files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import UnsupportedModelError
from meshllm.model.config import ModelConfig

OPSET = 17
MS_DOMAIN = "com.microsoft"
IR_VERSION = 9

#: Storage dtypes of weights. Compute is always float32 on CPU; half-precision
#: weights are upcast inside the graph (a Cast that onnxruntime folds at load).
WEIGHT_DTYPES = {"fp32": np.float32, "fp16": np.float16}

#: Dtypes of the KV cache (``ModelConfig.kv_dtype``, ``meshllm node --kv-dtype``).
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}

#: GroupQueryAttention's fused rotary (do_rotary=1) needs head sizes that are multiples of this.
FUSED_ROTARY_MULTIPLE = 16

# Public tensor names of a part's interface.
INPUT_IDS = "input_ids"
HIDDEN = "hidden"
SEQLENS_K = "seqlens_k"
TOTAL_SEQ_LEN = "total_seq_len"
LOGITS = "logits"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def hidden_out(layer: int) -> str:
    return f"hidden.{layer + 1}"


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


def fused_rotary(cfg: ModelConfig) -> bool:
    """Whether GroupQueryAttention can apply RoPE itself (faster: no separate pass over q and k)."""
    return cfg.head_dim % FUSED_ROTARY_MULTIPLE == 0


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
    h = b.node("Add", [x, attention(b, cfg, rms_norm(b, x, w[p + "attention_norm"], cfg.norm_eps, "attn_norm"), w, layer)], "h")
    out = b.node("Add", [h, swiglu(b, rms_norm(b, h, w[p + "ffn_norm"], cfg.norm_eps, "ffn_norm"), w, layer)], "@" + hidden_out(layer))
    return out


# --- graphs ---------------------------------------------------------------


def _model(b: _Builder, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
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
    last = b.node("Gather", [x, b.const("last_index", np.array(-1, np.int64))], "last", axis=1)  # (B, D)
    normed = rms_norm(b, last, weights["norm"], cfg.norm_eps, "norm")
    out_w = weights["tok_embeddings"] if cfg.tied_embeddings else weights["output"]
    b.node("MatMul", [normed, b.weight("output", out_w.T)], "@" + LOGITS)
    return _model(
        b, "head",
        [_f32(x, ["B", "S", cfg.dim])],
        [_f32(LOGITS, ["B", cfg.vocab_size])],
    )


# --- KV cache dtype -------------------------------------------------------


def with_kv_dtype(model: onnx.ModelProto, kv_dtype: str) -> onnx.ModelProto:
    """The graph with its KV caches (``past_*``/``present_*``) in ``kv_dtype``, in place.

    GroupQueryAttention has one type T for q, k, v, the caches and the cos/sin tables, so a
    float16 cache makes the whole operator float16: Casts go in front of its float inputs and one
    after its output; everything else stays float32. float32 leaves the graph as it is."""
    if kv_dtype not in KV_DTYPES:
        raise UnsupportedModelError(f"KV dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
    if kv_dtype == "fp32":
        return model
    g = model.graph
    caches = {vi.name for vi in (*g.input, *g.output) if vi.name.startswith(("past_", "present_"))}
    cast: dict[str, str] = {}  # float32 tensor -> its float16 copy (the RoPE tables are shared)
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN:
            for i in (0, 1, 2, 7, 8):  # query, key, value, cos_cache, sin_cache
                if i < len(n.input) and n.input[i]:
                    src = n.input[i]
                    if src not in cast:
                        cast[src] = src + ".f16"
                        nodes.append(helper.make_node("Cast", [src], [cast[src]], name=f"Cast.{src}.f16",
                                                      to=TensorProto.FLOAT16))
                    n.input[i] = cast[src]
            out = n.output[0]
            n.output[0] = out + ".f16"
            nodes.append(n)
            nodes.append(helper.make_node("Cast", [n.output[0]], [out], name=f"Cast.{out}.f32", to=TensorProto.FLOAT))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for vi in (*g.input, *g.output):
        if vi.name in caches:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


#: The head's index of the position it reads (:func:`build_head`), which :func:`with_row_last` replaces.
HEAD_LAST_INDEX = "head.last_index"


def with_row_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """A (merged) graph whose head reads, in each row, position ``min(seqlens_k[b], S - 1)`` instead of ``S - 1``,
    in place; a graph without the head is returned as it is.

    The two agree wherever a row has no padding: a decode step (S = 1) and a prompt chunk after earlier tokens
    (``seqlens_k >= S - 1``) read position ``S - 1``, bit for bit. They differ only for new sequences prefilled
    together (:meth:`meshllm.runtime.segment.Segment.prefill_many`): rows padded on the right to the longest,
    each with its true length in ``seqlens_k``, whose last true token is at ``seqlens_k[b]``. Done at load, so
    that model files exported before it serve batched prompts too."""
    g = model.graph
    at = next((i for i, n in enumerate(g.node) if n.op_type == "Gather" and len(n.input) == 2
               and n.input[1] == HEAD_LAST_INDEX), None)
    if at is None:
        return model
    old = g.node[at]
    x, out, p = old.input[0], old.output[0], "head.row_last."

    def const(name: str, arr: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), p + name))
        return p + name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        new.append(helper.make_node(op, inputs, [p + name], name=p + name, **attrs))
        return p + name

    new: list[onnx.NodeProto] = []
    shape = node("Shape", [x], "shape")  # (B, S, D)
    s1 = node("Sub", [node("Gather", [shape, const("one_index", np.array(1, np.int64))], "S", axis=0),
                      const("one", np.array(1, np.int64))], "S_minus_1")
    row = node("Min", [node("Cast", [SEQLENS_K], "seqlens64", to=TensorProto.INT64), s1], "index")  # (B,)
    index = node("Unsqueeze", [row, const("axes12", np.array([1, 2], np.int64))], "index3")  # (B, 1, 1)
    dims = node("Concat", [node("Slice", [shape, const("zero1", np.array([0], np.int64)),
                                          const("one1", np.array([1], np.int64))], "B"),
                           const("one1b", np.array([1], np.int64)),
                           node("Slice", [shape, const("two1", np.array([2], np.int64)),
                                          const("three1", np.array([3], np.int64))], "D")], "dims", axis=0)
    picked = node("GatherElements", [x, node("Expand", [index, dims], "indices")], "picked", axis=1)  # (B, 1, D)
    new.append(helper.make_node("Squeeze", [picked, const("axis1", np.array([1], np.int64))], [out],
                                name=p + "last"))  # (B, D)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at + 1:])
    if not any(HEAD_LAST_INDEX in n.input for n in g.node):
        kept = [t for t in g.initializer if t.name != HEAD_LAST_INDEX]
        del g.initializer[:]
        g.initializer.extend(kept)
    return model
