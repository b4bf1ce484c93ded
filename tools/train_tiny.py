#!/usr/bin/env python3
"""Train meshllm's tiny bundled demo model: a small Llama on Jane Austen's novels.

The result is a Hugging Face Llama checkpoint directory that ``meshllm export``
reads (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``) plus ``train_report.json``.

Corpus
    Jane Austen's six completed novels (Sense and Sensibility, Pride and
    Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion), as shipped by
    the Debian package ``r-cran-janeaustenr`` (CRAN package janeaustenr 1.0.0 by
    Julia Silge, packaging and data under the MIT licence; the novels themselves
    were published 1811-1817 and are in the public domain).  Install it with::

        apt-get install --no-install-recommends r-cran-janeaustenr

    The texts are read straight from the package's R lazy-load database
    (``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb``) by a small reader in
    this file; R itself is never run.  ``--corpus-dir`` points elsewhere.

Model
    A Llama decoder written here in plain torch with exactly the semantics of
    transformers' ``LlamaForCausalLM`` (RMSNorm, rotate-half RoPE, grouped-query
    attention, SwiGLU MLP, optionally tied embeddings), so the saved weights load
    unchanged in transformers; ``--verify`` checks that (logits and greedy text).

Tokenizer
    Byte-level BPE trained here with the ``tokenizers`` library on the training
    split; ``<unk>`` = 0, ``<s>`` = 1 (prepended to every sequence), ``</s>`` = 2.

Reproducibility
    Everything is seeded and runs on 2 CPU threads.  The learning rate warms up,
    stays constant, then decays linearly (warmup-stable-decay).  ``--steps N``
    fixes the run.  With ``--minutes M`` (used when ``--steps`` is not given) the
    tool trains at constant rate until 80 % of the time is used, then fixes N
    from the measured speed and decays to the end.  The report records
    ``--steps N --decay-start K --seed S``; rerunning with those flags repeats the
    run bit for bit on the same software (the weights' SHA-256 is recorded too).

torch is needed only by this tool (an optional extra of meshllm); transformers
only for ``--verify``.

Example::

    python tools/train_tiny.py --out build/tiny --minutes 45 --verify
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import math
import os
import platform
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# OpenMP threads that spin while waiting are very slow when another process
# shares the cores (4x per step measured on 2 busy cores); sleeping waits cost
# little when the cores are free.  Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - message for users without the extra
    sys.exit("train_tiny.py needs torch: pip install torch  (CPU build is enough)")


# --------------------------------------------------------------------------- corpus

CORPUS_PACKAGE = "r-cran-janeaustenr"
CORPUS_INSTALL = "apt-get install --no-install-recommends r-cran-janeaustenr"
DEFAULT_CORPUS_DIR = "/usr/lib/R/site-library/janeaustenr"
NOVELS = [  # R object name, title, year of first publication
    ("sensesensibility", "Sense and Sensibility", 1811),
    ("prideprejudice", "Pride and Prejudice", 1813),
    ("mansfieldpark", "Mansfield Park", 1814),
    ("emma", "Emma", 1815),
    ("northangerabbey", "Northanger Abbey", 1817),
    ("persuasion", "Persuasion", 1817),
]
CORPUS_LICENCE = (
    "Texts: public domain (Jane Austen, 1775-1817; novels published 1811-1817). "
    "Package janeaustenr (c) 2016-2017 Julia Silge, Debian packaging (c) 2021 "
    "Andreas Tille: MIT licence (/usr/share/doc/r-cran-janeaustenr/copyright)."
)


class RUnserializeError(ValueError):
    pass


class _RReader:
    """Minimal reader of R's XDR serialization format (versions 2 and 3).

    Supports what data packages hold: vectors (logical, integer, double,
    character, list), pairlists, symbols, attributes and references.  Anything
    else raises :class:`RUnserializeError`.
    """

    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.p)
        self.p += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self):
        if self.d[:2] != b"X\n":
            raise RUnserializeError("not an XDR R serialization (expected 'X\\n')")
        self.p = 2
        version = self._int()
        self._int()  # writer version
        self._int()  # minimal reader version
        if version == 3:
            n = self._int()
            self.p += n  # native encoding name
        elif version != 2:
            raise RUnserializeError(f"unsupported R serialization version {version}")
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE_SXP
            return None
        if t in (242, 241, 253, 252, 251, 250):  # special environments / markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self._item()
            self.refs.append(name)
            return name
        if t in (2, 239):  # LISTSXP (pairlist) / ATTRLISTSXP -> dict tag: value
            out = {}
            while True:
                if has_attr:
                    self._item()  # attributes of a pairlist cell: unused
                tag = self._item() if has_tag else None
                out[tag if tag is not None else len(out)] = self._item()
                flags = self._int()  # the CDR: another cell or NILVALUE
                t = flags & 0xFF
                if t == 254:
                    return out
                if t not in (2, 239):
                    raise RUnserializeError(f"unexpected pairlist tail type {t}")
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.d[self.p : self.p + n]
            self.p += n
            enc = "latin-1" if levels & (1 << 2) else "utf-8"
            return raw.decode(enc)
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._len()
            v = np.frombuffer(self.d, dtype=">i4", count=n, offset=self.p).astype(np.int64)
            self.p += 4 * n
            val = v
        elif t == 14:  # REALSXP
            n = self._len()
            v = np.frombuffer(self.d, dtype=">f8", count=n, offset=self.p).astype(np.float64)
            self.p += 8 * n
            val = v
        elif t == 16:  # STRSXP
            n = self._len()
            val = [self._item() for _ in range(n)]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            n = self._len()
            val = [self._item() for _ in range(n)]
        else:
            raise RUnserializeError(f"unsupported R object type {t}")
        if has_attr:
            attrs = self._item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and isinstance(val, list):
                val = dict(zip(names, val))
        return val


def read_r_lazyload(rdb: Path) -> dict:
    """Read every object of an R lazy-load database (``X.rdb`` + ``X.rdx``)."""
    rdx = rdb.with_suffix(".rdx")
    raw = rdx.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    index = _RReader(raw).read()
    data = rdb.read_bytes()
    out = {}
    # "compressed": FALSE/0 none, TRUE/1 zlib, 2 bzip2, 3 xz (the last two carry
    # a type byte after the length: '0' stored, 'Z' bzip2, 'X' xz)
    comp = int(np.asarray(index.get("compressed", 1)).ravel()[0])
    for name, (off, length) in index["variables"].items():
        blob = data[int(off) : int(off) + int(length)]
        (ulen,) = struct.unpack(">I", blob[:4])
        if comp == 0:
            payload = blob[4:]
        elif comp == 1:
            payload = zlib.decompress(blob[4:])
        else:
            kind, body = blob[4:5], blob[5:]
            if kind == b"Z":
                payload = bz2.decompress(body)
            elif kind == b"X":
                payload = lzma.decompress(body)
            else:
                payload = body
        if len(payload) != ulen:
            raise RUnserializeError(f"{name}: bad length {len(payload)} != {ulen}")
        out[name] = _RReader(payload).read()
    return out


def load_austen(corpus_dir: str) -> list[tuple[str, str]]:
    """Return [(title, text)] for the six novels; paragraphs joined by '\\n'."""
    rdb = Path(corpus_dir) / "data" / "Rdata.rdb"
    if not rdb.exists():
        sys.exit(
            f"error: corpus not found at {rdb}.\n"
            f"The training corpus (Jane Austen's novels) comes from the Debian package "
            f"{CORPUS_PACKAGE}; install it with:\n    {CORPUS_INSTALL}\n"
            f"(or pass --corpus-dir to an installed copy of the R package janeaustenr)."
        )
    objs = read_r_lazyload(rdb)
    novels = []
    for key, title, _year in NOVELS:
        if key not in objs:
            sys.exit(f"error: {rdb} has no object {key!r}; is this janeaustenr?")
        lines = [ln if ln is not None else "" for ln in objs[key]]
        novels.append((title, _paragraphs(lines)))
    return novels


def _paragraphs(lines: list[str]) -> str:
    """Undo the hard line wrapping; drop Gutenberg italics marks (_word_)."""
    paras, cur = [], []
    for ln in lines:
        ln = ln.strip()
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    text = "\n".join(p.replace("_", "") for p in paras)
    return " ".join(text.split(" ")).replace("  ", " ")


def split_corpus(novels, val_frac: float):
    """Hold out the last ``val_frac`` of each novel's paragraphs (contiguous)."""
    train, val = [], []
    for title, text in novels:
        paras = text.split("\n")
        k = max(1, int(round(len(paras) * (1 - val_frac))))
        train.append("\n".join(paras[:k]))
        val.append("\n".join(paras[k:]))
    return train, val


# ----------------------------------------------------------------------- tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tok.token_to_id(s) for s in SPECIALS] == [UNK_ID, BOS_ID, EOS_ID]
    return tok


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    """Token stream: each novel is <s> text </s>; returns int32 array."""
    out = []
    for t in texts:
        out.append(BOS_ID)
        out.extend(tok.encode(t, add_special_tokens=False).ids)
        out.append(EOS_ID)
    return np.asarray(out, dtype=np.int32)


# --------------------------------------------------------------------------- model


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_dim: int = 688
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # as LlamaRMSNorm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: TinyConfig, seq_len: int):
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        hd = cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        if rep > 1:  # repeat_kv: kv head j serves query heads j*rep .. j*rep+rep-1
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Parameter names mirror transformers' LlamaForCausalLM (prefix ``model.``)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cos_sin(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    s = std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2 style residual scaling
                nn.init.normal_(p, 0.0, s)

    def forward(self, idx):
        t = idx.shape[1]
        if t > self.rope_cos.shape[0]:
            cos, sin = rope_cos_sin(self.cfg, t)
        else:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new: int, stop=(EOS_ID,)) -> list[int]:
        ids = list(ids)
        for _ in range(max_new):
            ctx = torch.tensor([ids[-self.cfg.max_seq_len :]])
            nxt = int(self(ctx)[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
        return ids


# --------------------------------------------------------------------- checkpoint


def hf_config(cfg: TinyConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def save_checkpoint(out: Path, model: TinyLlama, tok) -> None:
    from safetensors.torch import save_file

    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = p.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file creates it 0600
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": BOS_ID,
                "eos_token_id": EOS_ID,
                "pad_token_id": EOS_ID,
                "do_sample": False,
            },
            indent=2,
        )
        + "\n"
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.max_seq_len,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
            indent=2,
        )
        + "\n"
    )


def load_checkpoint(out: Path) -> tuple[TinyLlama, object]:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    c = json.loads((out / "config.json").read_text())
    cfg = TinyConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_key_value_heads"],
        ffn_dim=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        tie_embeddings=c["tie_word_embeddings"],
    )
    model = TinyLlama(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model, Tokenizer.from_file(str(out / "tokenizer.json"))


# ------------------------------------------------------------------------ training


def paragraph_starts(stream: np.ndarray, tok, ctx: int) -> np.ndarray:
    """Positions just after a newline token (or BOS): where examples may begin."""
    nl = {i for tkn, i in tok.get_vocab().items() if tkn.endswith("Ċ")}
    is_nl = np.isin(stream, np.fromiter(nl, dtype=np.int32)) | (stream == BOS_ID)
    starts = np.nonzero(is_nl)[0] + 1
    return starts[starts + ctx - 1 <= len(stream)]


def make_batch(stream, starts, rng, batch, ctx):
    """Each row: <s> + (ctx-1) tokens starting at a paragraph start; targets shifted."""
    pos = rng.choice(starts, size=batch)
    x = np.empty((batch, ctx), dtype=np.int64)
    y = np.empty((batch, ctx), dtype=np.int64)
    x[:, 0] = BOS_ID
    for r, p in enumerate(pos):
        seg = stream[p : p + ctx - 1]
        x[r, 1:] = seg
        y[r, :-1] = seg
        y[r, -1] = stream[p + ctx - 1] if p + ctx - 1 < len(stream) else EOS_ID
    return torch.from_numpy(x), torch.from_numpy(y)


def eval_windows(stream: np.ndarray, ctx: int):
    """Non-overlapping windows over the whole stream: <s> + up to ctx-1 scored tokens.

    Returns (inputs, targets) lists; every stream token except window-initial
    BOS markers is scored exactly once.
    """
    xs, ys = [], []
    body = stream
    for i in range(0, len(body) - 1, ctx - 1):
        seg = body[i : i + ctx]
        if len(seg) < 2:
            break
        x = np.concatenate([[BOS_ID], seg[:-1]]).astype(np.int64)
        y = seg.astype(np.int64)
        xs.append(x)
        ys.append(y)
    return xs, ys


@torch.no_grad()
def evaluate(model, xs, ys, batch=16) -> float:
    model.eval()
    tot, n = 0.0, 0
    i = 0
    while i < len(xs):
        grp = [j for j in range(i, min(i + batch, len(xs))) if len(xs[j]) == len(xs[i])]
        x = torch.from_numpy(np.stack([xs[j] for j in grp]))
        y = torch.from_numpy(np.stack([ys[j] for j in grp]))
        logits = model(x)
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        n += y.numel()
        i += len(grp)
    model.train()
    return tot / n


def unigram_xent(train_stream: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0  # add-one
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def lr_at(step: int, peak: float, warmup: int, decay_start: int | None, total: int | None, final_ratio: float) -> float:
    """Warmup-stable-decay: linear warm-up, constant, then linear decay to final_ratio*peak.

    The rate at a step depends only on (warmup, decay_start, total), all recorded in
    train_report.json, so ``--steps total --decay-start decay_start`` repeats a run.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay_start is None or step < decay_start:
        return peak
    prog = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return peak * (1.0 - (1.0 - final_ratio) * prog)


DEFAULT_PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mr. Darcy",
    "She was",
    '"My dear Emma,',
    "The next morning",
]


def samples(model, tok, prompts, n_new) -> list[dict]:
    out = []
    for p in prompts:
        ids = tok.encode(p).ids  # <s> + prompt
        gen = model.greedy(ids, n_new)
        out.append({"prompt": p, "continuation": tok.decode(gen[len(ids) :], skip_special_tokens=True)})
    return out


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def train(args) -> dict:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # costly, and not needed here

    out = Path(args.out)
    log = print

    novels = load_austen(args.corpus_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_txt, val_txt = split_corpus(novels, args.val_frac)
    n_chars = (sum(len(t) for t in train_txt), sum(len(t) for t in val_txt))
    log(f"corpus: {len(novels)} novels, train {n_chars[0]:,} chars, val {n_chars[1]:,} chars")

    tok = train_tokenizer(train_txt, args.vocab)
    vocab = tok.get_vocab_size()
    train_stream = encode_docs(tok, train_txt)
    val_stream = encode_docs(tok, val_txt)
    log(f"tokenizer: byte-level BPE, vocab {vocab}; train {len(train_stream):,} tokens, val {len(val_stream):,} tokens")

    cfg = TinyConfig(
        vocab_size=vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        ffn_dim=args.ffn,
        max_seq_len=args.ctx,
        norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_embeddings=not args.untied,
    )
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
    model = TinyLlama(cfg)
    n_params = model.n_params()
    log(f"model: {json.dumps(asdict(cfg))}")
    log(f"params: {n_params:,} ({n_params * 4 / 1e6:.1f} MB fp32)")

    starts = paragraph_starts(train_stream, tok, args.ctx)
    vx, vy = eval_windows(val_stream, args.ctx)
    val_targets = np.concatenate(vy)
    uni = unigram_xent(train_stream, val_targets, vocab)
    log(f"unigram (add-one, fit on train) cross-entropy on val: {uni:.4f} nats/token")
    # a fixed subset of val windows for quick progress reports
    quick = np.random.default_rng(args.seed + 1).choice(len(vx) - 1, size=min(24, len(vx) - 1), replace=False)
    qx, qy = [vx[i] for i in quick], [vy[i] for i in quick]

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    # Schedule.  With --steps: decay over the last --decay-frac of the steps.  With
    # --minutes: run at constant rate until (1 - decay_frac) of the training time
    # budget is used, then fix total from the recent speed and decay to the end.
    total = args.steps
    decay_start = args.decay_start
    if total is not None and decay_start is None:
        decay_start = int(round(total * (1 - args.decay_frac)))
    t_setup = time.time() - t_start
    train_budget = args.minutes * 60.0 - t_setup - args.reserve_s
    hard_deadline = t_start + args.minutes * 60.0 * args.hard_limit if args.steps is None else None
    if args.steps is None:
        log(f"time budget: {args.minutes} min total, {train_budget:.0f} s for training steps")
    t_train0 = time.time()
    step = 0
    tokens_seen = 0
    cut_short = False
    history = []
    recent: list[float] = []  # durations of recent steps
    model.train()
    while total is None or step < total:
        t0 = time.time()
        if total is None and step >= args.warmup:
            used = t0 - t_train0
            if used >= (1 - args.decay_frac) * train_budget:
                per_step = float(np.median(recent[-50:]))
                decay_start = step
                total = step + max(1, int((train_budget - used) / per_step))
                log(f"decay starts at step {decay_start}; {per_step:.2f} s/step -> total {total} steps "
                    f"(repeat exactly with --steps {total} --decay-start {decay_start} --seed {args.seed})", flush=True)
        lr = lr_at(step, args.lr, args.warmup, decay_start, total, args.final_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = make_batch(train_stream, starts, rng, args.batch, args.ctx)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        recent.append(time.time() - t0)
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train0
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": round(lr, 6), "elapsed_s": round(el, 1)}
            if step % (args.log_every * args.eval_every) == 0:
                rec["val_quick"] = round(evaluate(model, qx, qy), 4)
            history.append(rec)
            log(" ".join(f"{k}={v}" for k, v in rec.items()) + (f" total={total}" if total else ""), flush=True)
        if hard_deadline and time.time() > hard_deadline:
            log(f"warning: hard time limit reached at step {step}/{total}; stopping early "
                "(the learning rate had not fully decayed; not repeatable with --steps)")
            cut_short = True
            break
    train_s = time.time() - t_train0

    model.eval()
    val_loss = evaluate(model, vx, vy)
    log(f"final validation loss: {val_loss:.4f} nats/token (ppl {math.exp(val_loss):.1f}); "
        f"unigram: {uni:.4f} nats/token (ppl {math.exp(uni):.1f})")
    samp = samples(model, tok, args.prompts or DEFAULT_PROMPTS, args.sample_tokens)
    for s in samp:
        log(f"--- {s['prompt']!r}\n{s['prompt']}{s['continuation']}")

    save_checkpoint(out, model, tok)
    report = {
        "tool": "tools/train_tiny.py",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "corpus": {
            "name": "Jane Austen, the six completed novels",
            "novels": [f"{t} ({y})" for _, t, y in NOVELS],
            "source_package": f"Debian {CORPUS_PACKAGE} (CRAN janeaustenr)",
            "source_package_version": _pkg_version(),
            "source_files": [str(Path(args.corpus_dir) / "data" / "Rdata.rdb"), str(Path(args.corpus_dir) / "data" / "Rdata.rdx")],
            "install": CORPUS_INSTALL,
            "licence": CORPUS_LICENCE,
            "preprocessing": "paragraph lines joined, '_' italics marks removed; last "
            f"{args.val_frac:.0%} of each novel's paragraphs held out for validation",
            "train_chars": n_chars[0],
            "val_chars": n_chars[1],
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": vocab, "specials": SPECIALS},
        "model": {**asdict(cfg), "head_dim": cfg.head_dim, "params": n_params, "bytes_fp32": n_params * 4},
        "training": {
            "seed": args.seed,
            "threads": args.threads,
            "steps": step,
            "planned_steps": total,
            "decay_start": decay_start,
            "repeat_with": f"--steps {step} --decay-start {decay_start} --seed {args.seed}" if not cut_short else None,
            "cut_short": cut_short,
            "batch": args.batch,
            "ctx": args.ctx,
            "tokens_seen": tokens_seen,
            "epochs": round(tokens_seen / len(train_stream), 2),
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.wd,
            "optimizer": "AdamW(0.9, 0.95), grad clip 1.0",
            "schedule": f"warm-up {args.warmup} steps, constant, linear decay to {args.final_lr_ratio} x lr from decay_start",
            "minutes_budget": args.minutes if not args.steps else None,
            "setup_s": round(t_setup, 1),
            "train_s": round(train_s, 1),
            "wall_s": round(time.time() - t_start, 1),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "history": history,
        },
        "train_tokens": int(len(train_stream)),
        "val_tokens_scored": int(val_targets.size),
        "val_loss_nats_per_token": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 2),
        "unigram_loss_nats_per_token": round(uni, 4),
        "unigram_ppl": round(math.exp(uni), 2),
        "weights_sha256": weights_sha256(model),
        "samples": samp,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved checkpoint to {out} (wall {report['training']['wall_s']:.0f} s)")
    return report


def _pkg_version() -> str | None:
    try:
        import subprocess

        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", CORPUS_PACKAGE], capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


# -------------------------------------------------------------------------- verify


def verify(out: Path, prompts=None, n_new: int = 40) -> dict:
    """Check the checkpoint in transformers: same logits (1e-4) and same greedy text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(2)
    ours, tok = load_checkpoint(out)
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    hft = AutoTokenizer.from_pretrained(str(out))
    res = {"ok": True, "checks": []}

    def check(name, ok, detail=""):
        res["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        res["ok"] &= bool(ok)
        print(f"verify: {'OK  ' if ok else 'FAIL'} {name} {detail}")

    prompts = prompts or DEFAULT_PROMPTS
    text = prompts[0] + " " + prompts[-1] + "\nShe said nothing."
    ids_ours = tok.encode(text).ids
    ids_hf = hft(text)["input_ids"]
    check("tokenizer ids equal (tokenizers vs AutoTokenizer)", ids_ours == ids_hf, f"{len(ids_ours)} tokens")
    check("decode round trip", hft.decode(ids_hf, skip_special_tokens=True) == text)
    with torch.no_grad():
        x = torch.tensor([ids_ours])
        a = ours(x)
        b = hf(x).logits
        diff = (a - b).abs().max().item()
    check("logits equal within 1e-4", diff < 1e-4, f"max |diff| = {diff:.2e}")
    for p in prompts:
        ids = tok.encode(p).ids
        g_ours = ours.greedy(ids, n_new)
        with torch.no_grad():
            g_hf = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)[0].tolist()
        # transformers stops at EOS too; compare token ids and text
        same = g_ours == g_hf[: len(g_ours)] and len(g_hf) == len(g_ours)
        check(f"greedy generation equal for {p!r}", same, repr(hft.decode(g_hf[len(ids):], skip_special_tokens=True))[:100])
    return res


# ---------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Corpus: " + CORPUS_LICENCE + "\nInstall: " + CORPUS_INSTALL)
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-time budget when --steps is not given (default 45)")
    ap.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps (reproducible run)")
    ap.add_argument("--hard-limit", type=float, default=1.25, help="with --minutes: stop at this multiple of the budget")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (part of what makes a run repeatable)")
    ap.add_argument("--corpus-dir", default=DEFAULT_CORPUS_DIR, help="installed R package janeaustenr")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to embeddings)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-frac", type=float, default=0.2, help="fraction of training spent decaying the rate")
    ap.add_argument("--decay-start", type=int, default=None, help="with --steps: step where the decay starts")
    ap.add_argument("--final-lr-ratio", type=float, default=0.05)
    ap.add_argument("--reserve-s", type=float, default=60.0, help="with --minutes: seconds kept for final eval and saving")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=8, help="quick val loss every N log lines")
    ap.add_argument("--sample-tokens", type=int, default=48)
    ap.add_argument("--prompts", nargs="*", default=None)
    ap.add_argument("--verify", action="store_true", help="after training, check the checkpoint in transformers")
    ap.add_argument("--verify-only", action="store_true", help="only verify an existing --out checkpoint")
    args = ap.parse_args(argv)

    if args.verify_only:
        res = verify(Path(args.out), args.prompts)
        return 0 if res["ok"] else 1
    report = train(args)
    if args.verify:
        res = verify(Path(args.out), args.prompts)
        report["verify"] = res
        Path(args.out, "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0 if res["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
