"""How a segment runs its steps must not show in what they compute.

A segment keeps its decode binding while the batch's slots stay the same; it prefills a long prompt in
chunks (:data:`meshllm.runtime.segment.PREFILL_CHUNK`), and the prompts of several new sequences in one
step (:meth:`~meshllm.runtime.segment.Segment.prefill_many`, rows padded to the longest).

The binding of the caches, the step's scalars and its output is reused from one decode step to the next
(the bound output buffer is written again by every step), so these tests check what that could break:
logits a caller holds stay as they were, batches that change shape and slots between steps (and prefills
in between) give the tokens of a fresh segment per sequence, and a failed step leaves the next one right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meshllm.errors import ContextLengthError, GenerationError
from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.segment import Segment
from tests.serving_harness import random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("binding"))


def reference(model_dir: Path, prompt: list[int], steps: int) -> list[np.ndarray]:
    """Logits of greedy decoding of ``prompt`` alone in a fresh segment per split: the same pair of segments."""
    segs = [Segment(model_dir, 0, 2), Segment(model_dir, 2, None)]
    for s in segs:
        s.open("r")
    x = np.array(prompt)
    for s in segs:
        x = s.prefill("r", x)
    out = [x[0]]
    for _ in range(steps):
        x = np.array([int(out[-1].argmax())])
        for s in segs:
            x = s.decode(["r"], x)
        out.append(x[0])
    return out


def test_held_logits_survive_the_next_step(model: Path) -> None:
    seg = Segment(model, max_batch=2)
    seg.open(0)
    seg.prefill(0, np.array([1, 5, 9]))
    first = seg.decode([0], np.array([4]))
    kept = first.copy()
    second = seg.decode([0], np.array([7]))
    assert np.array_equal(first, kept)
    assert not np.array_equal(first, second)


def test_changing_batches_and_slots_equal_one_sequence_at_a_time(model: Path) -> None:
    prompts = {"a": [1, 17, 3, 40], "b": [1, 8], "c": [1, 99, 23, 5, 61, 7]}
    steps = 12
    ref = {k: reference(model, p, steps) for k, p in prompts.items()}
    segs = [Segment(model, 0, 2, max_batch=3), Segment(model, 2, None, max_batch=3)]
    got: dict[str, list[np.ndarray]] = {}

    def start(seq: str) -> None:
        x = np.array(prompts[seq])
        for s in segs:
            s.open(seq)
            x = s.prefill(seq, x)
        got[seq] = [x[0]]

    def step(seqs: list[str]) -> None:
        x = np.array([int(got[s][-1].argmax()) for s in seqs])
        for s in segs:
            x = s.decode(seqs, x)
        for s, row in zip(seqs, x, strict=True):
            got[s].append(row)

    start("a")
    for plan in (["a"], ["a"], ["a"]):
        step(plan)
    start("b")  # a prefill between decode steps of the same slots
    for plan in (["a", "b"], ["a", "b"], ["b"], ["a"], ["b"], ["b", "a"], ["a"], ["a", "b"]):
        step(plan)
    start("c")
    for plan in (["c", "a", "b"], ["c", "a", "b"], ["b", "c"], ["c"], ["a", "b", "c"]):
        step(plan)
    for s in segs:
        s.close("a")
    while len(got["b"]) <= steps or len(got["c"]) <= steps:
        step([s for s in ("b", "c") if len(got[s]) <= steps])
    for seq in ("b", "c"):
        assert len(got[seq]) == steps + 1
        for i, (g, r) in enumerate(zip(got[seq], ref[seq], strict=True)):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-4, err_msg=f"{seq} step {i}")
    for i, g in enumerate(got["a"]):
        np.testing.assert_allclose(g, ref["a"][i], rtol=0, atol=1e-4, err_msg=f"a step {i}")


def test_a_failed_step_leaves_the_next_step_right(model: Path) -> None:
    seg = Segment(model, max_batch=1, max_seq_len=64)
    seg.open(0)
    seg.prefill(0, np.array([1, 5]))
    first = seg.decode([0], np.array([3]))
    with pytest.raises(GenerationError):
        seg.decode([0], np.array([10**6]))  # out of the vocabulary: refused before the run
    fresh = Segment(model, max_batch=1, max_seq_len=64)
    fresh.open(0)
    fresh.prefill(0, np.array([1, 5]))
    assert np.allclose(fresh.decode([0], np.array([3])), first, atol=1e-5)
    assert np.allclose(fresh.decode([0], np.array([8])), seg.decode([0], np.array([8])), atol=1e-5)


@pytest.mark.parametrize("n", [7, 8, 9, 30])
def test_a_chunked_prefill_equals_one_run(model: Path, n: int) -> None:
    """Chunks of 4 (so a last chunk of 1, 4 or 2 tokens) against the prompt in one run, on a split model:
    the first segment's hidden states for every position, the last one's logits, then decode steps."""
    ids = np.random.default_rng(n).integers(3, 200, n)
    runs = []
    for chunk in (4, 1000):
        first, last = Segment(model, 0, 2, prefill_chunk=chunk), Segment(model, 2, None, prefill_chunk=chunk)
        for s in (first, last):
            s.open(0)
        hidden = first.prefill(0, ids)
        logits = last.prefill(0, hidden)
        assert hidden.shape == (1, n, first.config.dim) and first.length(0) == last.length(0) == n
        steps = [last.decode([0], first.decode([0], np.array([t]))) for t in (5, 9, 11)]
        runs.append((hidden, logits, steps))
    (h1, l1, s1), (h2, l2, s2) = runs
    np.testing.assert_allclose(h1, h2, rtol=0, atol=1e-4)
    np.testing.assert_allclose(l1, l2, rtol=0, atol=1e-4)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_prompt_past_the_context_changes_nothing(model: Path) -> None:
    seg = Segment(model, max_seq_len=20, prefill_chunk=4)
    seg.open(0)
    seg.prefill(0, np.arange(3, 9))
    with pytest.raises(ContextLengthError):
        seg.prefill(0, np.arange(3, 18))  # 6 + 15 > 20: refused before the first chunk
    assert seg.length(0) == 6
    with pytest.raises(GenerationError):
        Segment(model, prefill_chunk=0)


def local_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """The reference: ``n`` greedy tokens of ``prompt`` alone in the whole model in one process."""
    lm = LocalModel(model_dir, verify=False)
    seq = lm.open()
    tokens = [int(lm.prefill(seq, prompt).argmax())]
    while len(tokens) < n:
        tokens.append(int(lm.decode([seq], tokens[-1:])[0].argmax()))
    return tokens


def test_prompts_prefilled_together_equal_one_at_a_time(model: Path) -> None:
    """Prompts of 1 to 16 tokens (padded to 16) in one step on a split model, in slots that must move, then
    decoded as one batch: every sequence's hidden states, logits and greedy tokens are those of its prompt
    alone, exactly; the padding never shows (not in the next prompt's slot either)."""
    rng = np.random.default_rng(5)
    prompts = {f"p{n}": [int(t) for t in rng.integers(3, 500, n)] for n in (5, 1, 16, 2, 9)}
    steps = 10
    segs = [Segment(model, 0, 2, max_batch=7), Segment(model, 2, None, max_batch=7)]
    alone = [Segment(model, 0, 2), Segment(model, 2, None)]
    for s in segs:
        s.open("other")  # takes slot 0: the batch's sequences are moved before the step
    ids = list(prompts)
    x: list[np.ndarray] = [np.array(p) for p in prompts.values()]
    for s, a in zip(segs, alone, strict=True):
        for seq in ids:
            s.open(seq)
        outs = s.prefill_many(ids, x)
        ref = []
        for seq, xi in zip(ids, x, strict=True):
            a.open(seq)
            ref.append(a.prefill(seq, xi))
            a.close(seq)
        for seq, o, r in zip(ids, outs, ref, strict=True):
            assert o.shape == r.shape and np.array_equal(o, r), seq
            assert s.length(seq) == len(prompts[seq])
        x = outs
    tokens = {seq: [int(o.argmax())] for seq, o in zip(ids, x, strict=True)}
    for _ in range(steps - 1):
        y = np.array([tokens[seq][-1] for seq in ids])
        for s in segs:
            y = s.decode(ids, y)
        for seq, row in zip(ids, y, strict=True):
            tokens[seq].append(int(row.argmax()))
    for seq in ids:
        assert tokens[seq] == local_greedy(model, prompts[seq], steps), seq
    for s in segs:  # a slot a padded row wrote beyond its prompt serves a new sequence exactly
        s.close("p1")
    y = np.array(prompts["p9"])
    for s in segs:
        s.open("again")
        y = s.prefill_many(["again"], [y])[0]
    assert int(y.argmax()) == local_greedy(model, prompts["p9"], 1)[0]


def test_prompts_together_refuse_what_one_step_cannot_hold(model: Path) -> None:
    seg = Segment(model, 0, 2, max_batch=3, prefill_chunk=8)
    for seq in "abc":
        seg.open(seq)
    seg.prefill("c", np.array([3, 4]))
    for seqs, xs in ((["a", "b"], [np.array([3, 4])]),  # a prompt short
                     (["a", "a"], [np.array([3]), np.array([4])]),  # a sequence twice
                     (["a", "c"], [np.array([3]), np.array([4])]),  # c has tokens cached
                     (["a", "b"], [np.array([3]), np.arange(3, 12)]),  # 9 tokens: more than one chunk
                     (["a", "b"], [np.array([3]), np.array([], np.int64)]),  # an empty prompt
                     (["a", "x"], [np.array([3]), np.array([4])])):  # x is not open
        with pytest.raises(GenerationError):
            seg.prefill_many(seqs, xs)
    assert seg.length("a") == seg.length("b") == 0 and seg.length("c") == 2


def test_a_head_size_whose_rope_runs_apart_prefills_one_prompt_at_a_time(tmp_path: Path) -> None:
    """Head size 8: RoPE runs before the operator, at positions from ``seqlens_k``, which padding would shift."""
    cfg = make_llama2c_config(64, 172, 1, 8, 4, 512, 64, shared_classifier=False)
    write_llama2c(tmp_path / "m.bin", cfg, random_llama2c_weights(cfg, seed=1))
    write_tokenizer_bin(tmp_path / "tokenizer.bin", *random_llama2c_vocab(512, seed=1))
    export(tmp_path / "m.bin", tmp_path / "model", overwrite=True)
    seg = Segment(tmp_path / "model", max_batch=2)
    assert not seg.prefills_together
    seg.open("a")
    seg.open("b")
    with pytest.raises(GenerationError):
        seg.prefill_many(["a", "b"], [np.array([3, 4]), np.array([5])])
    assert seg.length("a") == seg.length("b") == 0
    assert int(seg.prefill_many(["a"], [np.array([3, 4])])[0].argmax()) == \
        local_greedy(tmp_path / "model", [3, 4], 1)[0]
