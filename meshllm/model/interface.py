"""The tensor interface of model parts: names, KV cache dtypes and the attention's form (fused rotary or
not), shared by the graph builder and the runtime.

Apart from :mod:`meshllm.model.graphs` so that the runtime can name a part's tensors without importing
``onnx`` (the builder's dependency): a serving process never builds a graph (docs/inference.md).

Tensor interface (B = batch, S = new tokens, D = dim, M = cache length)::

    embed:  input_ids int64 (B, S)            -> hidden (B, S, D)
    layer:  hidden (B, S, D), seqlens_k int32 (B), total_seq_len int32 ()
            past_key / past_value (B, KV, M, hd)
                                              -> hidden, present_key, present_value
    head:   hidden (B, S, D)                  -> logits (B, V) of the last position
"""

from __future__ import annotations

import numpy as np

from meshllm.model.config import ModelConfig

#: Dtypes of the KV cache (``ModelConfig.kv_dtype``, ``meshllm node --kv-dtype``).
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}

INPUT_IDS = "input_ids"
HIDDEN = "hidden"
SEQLENS_K = "seqlens_k"
TOTAL_SEQ_LEN = "total_seq_len"
LOGITS = "logits"

#: The head's index of the position it reads (``Gather`` along S), which the runtime rewrites at load into a
#: per-row index (:func:`meshllm.runtime.onnx_wire.with_row_last`).
HEAD_LAST_INDEX = "head.last_index"

#: GroupQueryAttention's fused rotary (do_rotary=1) needs head sizes that are multiples of this.
FUSED_ROTARY_MULTIPLE = 16


def fused_rotary(cfg: ModelConfig) -> bool:
    """Whether GroupQueryAttention applies RoPE itself (faster: no separate pass over q and k). The layer
    graphs take this form or the other by it, and the runtime batches prompts only with it."""
    return cfg.head_dim % FUSED_ROTARY_MULTIPLE == 0


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
