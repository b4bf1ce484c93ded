"""Architecture of a Llama-family decoder, independent of the checkpoint format.

Every reader (llama2.c, Hugging Face) produces a :class:`ModelConfig` and a dict
of numpy weights under the canonical names below; the graph builder and the
runtime only ever see these.

Canonical weight names (float arrays in PyTorch orientation, ``[out, in]``)::

    tok_embeddings                [vocab, dim]
    layers.{i}.attention_norm     [dim]
    layers.{i}.wq                 [n_heads * head_dim, dim]
    layers.{i}.wk, .wv            [n_kv_heads * head_dim, dim]
    layers.{i}.bq / .bk / .bv     optional biases (Qwen2)
    layers.{i}.wo                 [dim, n_heads * head_dim]
    layers.{i}.ffn_norm           [dim]
    layers.{i}.w1 (gate), .w3 (up)  [ffn_dim, dim]
    layers.{i}.w2 (down)          [dim, ffn_dim]
    norm                          [dim]
    output                        [vocab, dim]   (absent when tied)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama", "mistral", "qwen2" (all Llama-family decoders)
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # True: rotate adjacent pairs (llama2.c); False: halves (HF)
    rope_scaling: RopeScaling | None = None
    tied_embeddings: bool = False
    qkv_bias: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    stop_on_bos: bool = False  # llama2.c's run.c stops when it samples BOS
    kv_dtype: str = "fp32"  # the KV cache's dtype at run time, "fp32" or "fp16" (a node may override it)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if rs else None
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def stop_ids(self) -> frozenset[int]:
        ids = set(self.eos_ids)
        if self.stop_on_bos and self.bos_id is not None:
            ids.add(self.bos_id)
        return frozenset(ids)
