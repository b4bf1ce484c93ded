"""The small MQTT messages the serving layer acts on: decoded once, or refused without harm."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.serve.messages import Cancel, PayloadError, Readiness, Replay

IDS = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20)


@given(IDS, st.integers(0, 2**63 - 1))
def test_replay_and_cancel_round_trip(rid: str, start: int) -> None:
    assert Replay.parse(json.dumps({"id": rid, "from": start})) == Replay(rid, start)
    assert Cancel.parse(json.dumps({"id": rid}).encode()) == Cancel(rid)


@settings(max_examples=300)
@given(JSON)
def test_anything_else_is_a_payload_error_never_a_crash(value: object) -> None:
    for parse in (Replay.parse, Cancel.parse, Readiness.parse):
        try:
            parse(json.dumps(value))
        except PayloadError:
            pass


@pytest.mark.parametrize("payload", [b"[" * 50000, b"[1]", b"\xff\xfe", b"", b'{"id": "a b"}',
                                     b'{"id": "x", "from": -1}', b'{"id": "x", "from": true}',
                                     b'{"id": "x", "from": 99999999999999999999}',
                                     b'{"pv": "1", "r": 0}', b'{"pv": 1, "r": [0]}'])
def test_malformed_control_messages_are_refused_in_one_line(payload: bytes) -> None:
    for parse in (Replay.parse, Readiness.parse):
        with pytest.raises(PayloadError):
            parse(payload)


def test_readiness_of_a_stage_and_of_an_idle_node() -> None:
    assert Readiness.parse(b'{"pv": 3, "r": 1, "stage": 0, "role": "decode"}') == Readiness(3, 1, 0, "decode")
    assert Readiness.parse(b'{"pv": 3, "r": null, "idle": true}') == Readiness(3, None)
