"""Sampler and stop-string rules: pure logic, property-tested."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import GenerationError
from meshllm.runtime.sampling import Sampler, SamplingParams
from meshllm.runtime.stopping import StopStrings

logits_st = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=60).map(
    lambda xs: np.array(xs, np.float32))


@given(logits_st)
def test_greedy_is_first_argmax(logits: np.ndarray) -> None:
    assert Sampler(SamplingParams(temperature=0))(logits) == int(np.argmax(logits))


@given(logits_st, st.integers(1, 10), st.integers(0, 2**31))
def test_top_k_only_draws_from_the_k_largest(logits: np.ndarray, k: int, seed: int) -> None:
    s = Sampler(SamplingParams(temperature=1.5, top_k=k, seed=seed))
    kth = np.sort(logits)[::-1][min(k, logits.size) - 1]
    for _ in range(5):
        assert logits[s(logits)] >= kth


@given(logits_st, st.floats(0.05, 0.99), st.integers(0, 2**31))
def test_top_p_draws_from_the_nucleus(logits: np.ndarray, p: float, seed: int) -> None:
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), p)) + 1].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=p, seed=seed))
    for _ in range(5):
        assert s(logits) in nucleus


def reference_draw(params: SamplingParams, rng: np.random.Generator, logits: np.ndarray) -> int:
    """The sampler as it was before its fast paths (a full sort for top-p, Generator.choice): seeded requests
    must keep drawing the same tokens."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if params.top_k and params.top_k < logits.size:
        idx = np.argpartition(-logits, params.top_k - 1)[: params.top_k]
    else:
        idx = np.arange(logits.size)
    scaled = logits[idx] / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        idx, probs = idx[keep], probs[keep] / probs[keep].sum()
    return int(idx[rng.choice(idx.size, p=probs)])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([0.1, 0.8, 2.0]), st.sampled_from([0, 1, 40, 5000]),
       st.sampled_from([1.0, 0.999, 0.95, 0.5, 0.01]), st.sampled_from([0, 3, 8]))
def test_draws_equal_the_reference_on_a_full_vocabulary(seed: int, temperature: float, top_k: int, top_p: float,
                                                        levels: int) -> None:
    """32,000 logits, some quantized to a few levels so that probabilities tie at the nucleus boundary."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if params.greedy:
        return
    data = np.random.default_rng(seed)
    sampler, rng = Sampler(params), np.random.default_rng(seed)
    for _ in range(3):
        logits = (data.standard_normal(32000) * 3).astype(np.float32)
        if levels:
            logits = np.round(logits * levels / 3) / levels * 3
        assert sampler(logits) == reference_draw(params, rng, logits)


def test_seeded_draws_repeat_and_follow_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    s1, s2 = Sampler(SamplingParams(temperature=1.0, seed=7)), Sampler(SamplingParams(temperature=1.0, seed=7))
    draws1 = [s1(logits) for _ in range(4000)]
    assert draws1 == [s2(logits) for _ in range(4000)]
    freq = np.bincount(draws1, minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
    {"max_tokens": 0}, {"max_tokens": 2.5}, {"seed": -3}, {"stop": ("",)}, {"temperature": True},
])
def test_invalid_params_are_rejected_by_name(bad: dict) -> None:
    with pytest.raises(GenerationError, match=next(iter(bad))):
        SamplingParams(**bad)


@settings(max_examples=200)
@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3), st.data())
def test_stop_strings_emit_exactly_the_text_before_the_first_stop(text: str, stops: list[str], data) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopStrings(stops)
    out, hit = "", False
    for c in chunks:
        piece, hit = matcher.push(c)
        out += piece
        if hit:
            break
    if not hit:
        out += matcher.flush()
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    # the stop may be found in a prefix of the chunks only once it is complete
    assert out == (text[:first] if first >= 0 else text)
    assert hit == (first >= 0)
