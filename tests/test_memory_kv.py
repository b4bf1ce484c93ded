"""The KV memory a segment holds follows the tokens its sequences hold, as a paged KV cache would.

A segment's caches have ``max_batch`` rows of ``max_seq_len`` positions, more than the memory may hold at full
length once sequences are admitted by the tokens they can reach. The OS's pages are the pages: a page of a
cache is resident once a token's keys or values are written to it, closing a sequence gives its row's pages
back (else the row's next, shorter sequence keeps the high-water mark), and moving rows for a batch leaves
each row only the pages its own length needs (else the shorter sequence keeps the longer one's pages).

What a process holds is read from ``/proc/self/pagemap``: a page counts when it is present and the process's
own (a page only read maps the shared zero page, which costs nothing). Greedy tokens after all this must be
those of each sequence run alone in a fresh segment.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.runtime.segment import Segment

PAGE = mmap.PAGESIZE
CONTEXT = 2048


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Two layers, two KV heads of 32: 128 bytes a token per head row (fp32), 1 KB a token in all."""
    root = tmp_path_factory.mktemp("kv")
    cfg = make_llama2c_config(128, 256, 2, 4, 2, 512, CONTEXT, shared_classifier=True)
    write_llama2c(root / "m.bin", cfg, random_llama2c_weights(cfg, seed=5))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(512, seed=5))
    export(root / "m.bin", root / "model")
    return root / "model"


def held(a: np.ndarray) -> int:
    """Bytes of the pages under ``a`` that are present and the process's own (not the shared zero page)."""
    first = a.ctypes.data // PAGE
    n = -(-(a.ctypes.data + a.nbytes) // PAGE) - first
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        e = np.frombuffer(f.read(n * 8), np.uint64)
    present, own = (e >> np.uint64(63)) & np.uint64(1), (e >> np.uint64(56)) & np.uint64(1)
    return int(np.count_nonzero(present & own)) * PAGE


def caches(seg: Segment) -> list[np.ndarray]:
    return [*seg._k, *seg._v]


def row_held(seg: Segment, slot: int) -> int:
    return sum(held(c[slot]) for c in caches(seg))


def token_bytes(seg: Segment) -> int:
    """KV bytes one token takes in a row: every layer, K and V, every head."""
    _, heads, _, dim = seg._k[0].shape
    return len(caches(seg)) * heads * dim * seg.kv_dtype.itemsize


def row_need(seg: Segment, n: int) -> int:
    """The whole pages ``n`` tokens touch in a row: per head row (each starts on a page), rounded up."""
    _, heads, seq_len, dim = seg._k[0].shape
    head_token = dim * seg.kv_dtype.itemsize
    assert seq_len * head_token % PAGE == 0  # head rows start on pages, so the rounding below is exact
    return len(caches(seg)) * heads * -(-n * head_token // PAGE) * PAGE


def assert_rows_follow_lengths(seg: Segment) -> None:
    for slot in range(seg.max_batch):
        seq = seg._owner[slot]
        n = seg.length(seq) if seq is not None else 0
        got = row_held(seg, slot)
        assert n * token_bytes(seg) <= got <= row_need(seg, n), (slot, seq, n, got, row_need(seg, n))


class Greedy:
    """Greedy decoding of several sequences in one segment, step by step as a caller batches them."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.logits: dict[str, list[np.ndarray]] = {}

    def start(self, seq: str, prompt: np.ndarray) -> None:
        self.seg.open(seq)
        self.logits[seq] = [self.seg.prefill(seq, prompt)[0]]

    def step(self, seqs: list[str]) -> None:
        x = self.seg.decode(seqs, np.array([int(self.logits[s][-1].argmax()) for s in seqs]))
        for s, row in zip(seqs, x, strict=True):
            self.logits[s].append(row)

    def tokens(self, seq: str) -> list[int]:
        return [int(x.argmax()) for x in self.logits[seq]]


def alone(model: Path, prompt: np.ndarray, steps: int, kv_dtype: str | None) -> Greedy:
    """``prompt`` and ``steps`` greedy tokens in a fresh segment of its own."""
    g = Greedy(Segment(model, max_batch=1, kv_dtype=kv_dtype))
    g.start("r", prompt)
    for _ in range(steps):
        g.step(["r"])
    return g


def assert_as_alone(model: Path, g: Greedy, prompts: dict[str, np.ndarray]) -> None:
    for seq, prompt in prompts.items():
        ref = alone(model, prompt, len(g.logits[seq]) - 1, g.seg.kv_dtype_name)
        assert g.tokens(seq) == ref.tokens("r"), seq
        for i, (got, want) in enumerate(zip(g.logits[seq], ref.logits["r"], strict=True)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{seq} step {i}")


def prompt(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 512, n)


def test_resident_kv_is_the_tokens_held_not_the_rows(model: Path) -> None:
    seg = Segment(model, max_batch=16)
    full = sum(c.nbytes for c in caches(seg))
    g = Greedy(seg)
    for i, n in enumerate((3, 20, 70, 130)):  # 130: a chunked prompt
        g.start(f"s{i}", prompt(n, i))
    for _ in range(5):
        g.step(["s0", "s1", "s2", "s3"])
    tokens = sum(seg.length(s) for s in seg.open_sequences)
    assert tokens == 3 + 20 + 70 + 130 + 4 * 5
    total = sum(held(c) for c in caches(seg))
    assert tokens * token_bytes(seg) <= total <= sum(row_need(seg, seg.length(s)) for s in seg.open_sequences)
    assert total < full / 50, (total, full)
    assert_rows_follow_lengths(seg)


def test_a_closed_sequence_gives_its_pages_back(model: Path) -> None:
    seg = Segment(model, max_batch=4)
    g = Greedy(seg)
    g.start("long", prompt(1500, 1))
    g.start("other", prompt(7, 2))
    g.step(["long", "other"])
    assert seg._slot["long"] == 0 and row_held(seg, 0) >= 1501 * token_bytes(seg)
    other = row_held(seg, 1)
    seg.close("long")
    assert row_held(seg, 0) == 0
    assert row_held(seg, 1) == other
    g.start("short", prompt(10, 3))  # in the long one's row
    assert seg._slot["short"] == 0
    for _ in range(3):
        g.step(["short", "other"])
    assert row_held(seg, 0) <= row_need(seg, 13)
    assert_rows_follow_lengths(seg)
    assert_as_alone(model, g, {"short": prompt(10, 3), "other": prompt(7, 2)})


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16"])
def test_a_row_move_leaves_each_row_the_pages_of_its_own_length(model: Path, kv_dtype: str) -> None:
    seg = Segment(model, max_batch=4, kv_dtype=kv_dtype)
    g = Greedy(seg)
    prompts = {"a": prompt(600, 4), "b": prompt(5, 5), "c": prompt(9, 6)}
    for seq, p in prompts.items():
        g.start(seq, p)
    assert [seg._slot[s] for s in "abc"] == [0, 1, 2]
    g.step(["c", "b"])  # c must come before b: c and a swap rows
    assert [seg._slot[s] for s in "abc"] == [2, 1, 0]
    assert row_held(seg, 0) <= row_need(seg, 10)
    assert row_held(seg, 2) >= 600 * token_bytes(seg)
    assert_rows_follow_lengths(seg)
    for plan in (["c", "b"], ["a"], ["b", "a", "c"], ["a", "c"]):  # more moves, each way
        g.step(plan)
        assert_rows_follow_lengths(seg)
    assert_as_alone(model, g, prompts)


def test_sequences_opened_closed_and_moved_give_the_tokens_of_a_fresh_segment(model: Path) -> None:
    seg = Segment(model, max_batch=3)
    g = Greedy(seg)
    prompts = {"a": prompt(300, 7), "b": prompt(4, 8), "c": prompt(70, 9), "d": prompt(12, 10),
               "e": prompt(200, 11)}
    g.start("a", prompts["a"])
    g.start("b", prompts["b"])
    g.start("c", prompts["c"])
    for plan in (["a", "b", "c"], ["c", "a"], ["b"], ["b", "c", "a"]):
        g.step(plan)
    seg.close("a")
    g.start("d", prompts["d"])  # in a's row, after a's 300 tokens
    for plan in (["d", "b", "c"], ["c", "d"], ["d"]):
        g.step(plan)
    seg.close("c")
    g.start("e", prompts["e"])
    for plan in (["e", "b", "d"], ["d", "e"], ["b", "e"]):
        g.step(plan)
    assert_rows_follow_lengths(seg)
    for seq in ("b", "d", "e"):
        seg.close(seq)
    assert sum(held(c) for c in caches(seg)) == 0
    assert_as_alone(model, g, prompts)
