"""The test harness reads raw reply streams as a client must: by index, a repeat only if identical."""

from __future__ import annotations

import pytest

from tests.serving_harness import text_of, tokens_of


def _tok(i: int, t: int) -> dict:
    return {"id": "q", "index": i, "text": f"<{t}>", "token_id": t}


def _final(i: int) -> dict:
    return {"id": "q", "index": i, "text": "", "done": True, "finish_reason": "length"}


def test_a_resumed_stream_repeats_indices_and_is_read_once_in_order() -> None:
    # tokens 0-2 streamed, the request resumed from a checkpoint after token 1: index 2 comes again
    stream = [_tok(0, 5), _tok(1, 7), _tok(2, 9), _tok(2, 9), _tok(4, 3), _tok(3, 1), _final(5)]
    assert tokens_of(stream) == [5, 7, 9, 1, 3]
    assert text_of(stream) == "<5><7><9><1><3>"


def test_an_index_sent_twice_with_different_tokens_fails() -> None:
    with pytest.raises(AssertionError, match="index 1 was sent as"):
        tokens_of([_tok(0, 5), _tok(1, 7), _tok(1, 8), _final(2)])


def test_a_missing_index_fails() -> None:
    with pytest.raises(AssertionError, match="gaps"):
        tokens_of([_tok(0, 5), _tok(2, 7), _final(3)])
