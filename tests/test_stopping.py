"""The one stop rule (meshllm.runtime.stopping), unit-tested once for both its users:
``meshllm generate`` and the mesh's last stage. Tokens are llama2.c byte pieces, one byte each,
so that a test writes text and knows each token's bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.model.tokenizer import Llama2cTokenizer, random_llama2c_vocab
from meshllm.runtime.stopping import StopRule

TOK = Llama2cTokenizer(*random_llama2c_vocab(300))
EOS, BOS = 2, 1
STOP_IDS = frozenset({BOS, EOS})
BIG = 1 << 30


def ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()]  # the byte pieces <0x00>..<0xFF>


def rule(stop: tuple[str, ...] = (), max_tokens: int = BIG, prompt_len: int = 1) -> StopRule:
    return StopRule(TOK, STOP_IDS, stop, max_tokens, prompt_len, last_prompt_token=ids("a")[0])


def run(r: StopRule, tokens: list[int], context: int = BIG) -> tuple[str, str | None, int]:
    """(all text emitted, the finish reason, tokens kept) feeding ``tokens`` until the rule ends."""
    out, reason = "", None
    for t in tokens:
        step = r.push(t, context)
        out += step.text
        if step.finish is not None:
            tail, reason = r.finish(step.finish)
            return out + tail, reason, r.kept
    return out, reason, r.kept


@pytest.mark.parametrize("eos", [EOS, BOS])
def test_an_end_of_sequence_id_stops_is_not_kept_and_releases_the_held_text(eos: int) -> None:
    r = rule(stop=("XY",))
    assert [r.push(t, BIG).text for t in ids("abX")] == ["a", "b", ""]  # "X" may start the stop string
    step = r.push(eos, BIG)
    assert (step.kept, step.text, step.finish) == (False, "", "stop")
    assert r.finish("stop") == ("X", "stop") and r.kept == 3


def test_a_stop_string_across_tokens_cuts_it_and_what_follows() -> None:
    assert run(rule(stop=("XY", "zz")), ids("helXYafter")) == ("hel", "stop", 5)


def test_max_tokens_ends_with_length_and_releases_the_held_text() -> None:
    assert run(rule(stop=("XY",), max_tokens=3), ids("abXYZ")) == ("abX", "length", 3)


def test_a_full_context_ends_with_length() -> None:
    assert run(rule(prompt_len=5), ids("abcdefgh"), context=8) == ("abc", "length", 3)


def test_a_partial_character_is_held_until_complete_and_flushed_at_the_end() -> None:
    r = rule()
    euro = ids("€")  # three bytes
    assert [r.push(t, BIG).text for t in euro] == ["", "", "€"]
    r = rule(max_tokens=2)
    assert run(r, euro) == ("\ufffd", "length", 2)  # the dangling bytes, as the tokenizer decodes them


def test_a_tail_that_completes_a_stop_string_makes_the_reason_stop() -> None:
    assert run(rule(stop=("\ufffd",), max_tokens=1), ids("€")) == ("", "stop", 1)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
       st.lists(st.text(st.sampled_from("abXY"), min_size=1, max_size=3), max_size=3),
       st.integers(1, 40), st.booleans())
def test_the_rule_emits_the_text_before_the_first_stop_within_max_tokens(text: str, stops: list[str],
                                                                        max_tokens: int, eos: bool) -> None:
    tokens = ids(text) + ([EOS] if eos else [])
    out, reason, kept = run(rule(tuple(stops), max_tokens), tokens)
    within = text[:max_tokens]
    # the reference: the first prefix that holds a stop string ends the text where the earliest one found begins
    done = next((k for k in range(1, len(within) + 1) if any(x in within[:k] for x in stops)), None)
    if done is not None:
        cut = min(i for i in (within[:done].find(x) for x in stops) if i >= 0)
        assert (out, reason, kept) == (within[:cut], "stop", done)
    elif len(text) >= max_tokens:
        assert (out, reason, kept) == (within, "length", max_tokens)
    elif eos:
        assert (out, reason, kept) == (text, "stop", len(text))
    else:
        assert (out, reason) == (text[: len(out)], None)  # still going: only held-back text is missing
