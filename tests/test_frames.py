"""Serving frames: every type survives encode -> msgpack (the data plane's codec) -> decode unchanged, and a
malformed frame of any type is refused with one FrameError line, never another exception."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshllm.dataplane import codec
from meshllm.dataplane.codec import FrameError
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve import protocol
from meshllm.serve.protocol import (
    MAX_BATCH_IDS,
    MAX_KEY_CHARS,
    MAX_SAMPLER_STATE_CHARS,
    OPTIONAL_WIRE_FIELDS,
    WIRE_FIELDS,
    Begin,
    Bounce,
    CancelStream,
    Done,
    KvBlock,
    Prefill,
    Prefilled,
    Release,
    RequestMeta,
    Resume,
    Step,
)

U63 = st.integers(0, 2**63 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)  # plan versions and replica ids only route (a wrong one finds no stage)
KEYS = st.text(max_size=40)
TIMES = st.none() | st.floats(allow_nan=False, allow_infinity=False)
SAMPLING = st.builds(SamplingParams, max_tokens=st.integers(1, 10_000), temperature=st.floats(0, 5),
                     top_k=st.integers(0, 100), top_p=st.floats(0.01, 1.0), seed=st.none() | U63,
                     stop=st.lists(st.text(min_size=1, max_size=8), max_size=3).map(tuple))
STATES = st.none() | st.text(max_size=200)
META = st.builds(RequestMeta, reply_to=st.text(min_size=1, max_size=60), sampling=SAMPLING, prompt_len=U63,
                 last_prompt_token=U63, prefill_replica=U63, decode_replica=U63,
                 request_id=st.none() | st.text(max_size=128), attempt=U63, digest=st.none() | st.text(max_size=32),
                 resume=st.none() | st.builds(Resume, st.lists(U63, max_size=20).map(tuple), STATES),
                 received_at=TIMES, prefill_started_at=TIMES, first_token_at=TIMES)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
X = hnp.arrays(st.sampled_from([np.int64, np.float32]), SHAPES)


@st.composite
def steps(draw: Any) -> Step:
    keys = tuple(draw(st.lists(KEYS, min_size=1, max_size=6)))
    tail = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    x = draw(hnp.arrays(st.sampled_from([np.int64, np.float32]), (len(keys), *tail)))
    return Step(draw(I64), draw(I64), keys, x)


@st.composite
def kv_blocks(draw: Any) -> KvBlock:
    shape = draw(hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=4))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return KvBlock(draw(I64), draw(I64), draw(KEYS), draw(U63), draw(hnp.arrays(dtype, shape)),
                   draw(hnp.arrays(dtype, shape)))


FRAMES = {
    "prefill": st.builds(Prefill, I64, I64, KEYS, X, META),
    "step": steps(),
    "kv": kv_blocks(),
    "begin": st.builds(Begin, I64, I64, KEYS, U63, STATES, META),
    "release": st.builds(Release, I64, I64, KEYS) | st.builds(Release, I64, I64, KEYS, st.text(min_size=1, max_size=64),
                                                             st.text(max_size=200)),
    "cancel": st.builds(CancelStream, KEYS),
    "prefilled": st.builds(Prefilled, KEYS),
    "done": st.builds(Done, KEYS, I64, I64, st.sampled_from(["stop", "length", "cancelled", "error"])),
    "bounce": st.builds(Bounce, KEYS, st.text(max_size=100)),
}


def over_the_wire(wire: dict[str, Any]) -> dict[str, Any]:
    """What the receiving data plane hands its handler: the codec's bytes, decoded."""
    return codec.decode_body(codec.encode(wire)[4:])


def refused(wire: Any) -> str:
    """Decodes ``wire``, which must be refused with one line of FrameError (any other exception fails)."""
    with pytest.raises(FrameError) as e:
        protocol.decode(wire)
    message = str(e.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("t", sorted(FRAMES))
def test_every_frame_type_round_trips_through_the_codec(t: str) -> None:
    @settings(max_examples=60, deadline=None)
    @given(FRAMES[t])
    def check(frame: Any) -> None:
        wire = frame.encode()
        sent = set(wire) - {"t"}
        assert wire["t"] == t == frame.WIRE_TYPE
        assert set(WIRE_FIELDS[t]) <= sent <= set(WIRE_FIELDS[t]) | set(OPTIONAL_WIRE_FIELDS.get(t, ()))
        back = protocol.decode(over_the_wire(wire))
        assert type(back) is type(frame) and back == frame
    check()


def test_the_wire_keeps_its_compact_field_names() -> None:
    """Nodes of this version and of earlier ones read each other's frames: the wire map is what it was."""
    meta = RequestMeta("r/x", SamplingParams(max_tokens=3, temperature=0.0), 4, 9, 0, 1, request_id="x")
    x = np.arange(4, dtype=np.int64)
    assert Prefill(2, 0, "x@1", x, meta).encode() == {
        "t": "prefill", "pv": 2, "r": 0, "id": "x@1", "x": x,
        "meta": {"reply_to": "r/x", "sampling": {"max_tokens": 3, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                                 "seed": None, "stop": []},
                 "prompt_len": 4, "last_prompt_token": 9, "prefill_r": 0, "decode_r": 1, "attempt": 0,
                 "request_id": "x"}}
    assert Done("x@1", 0, 1, "stop").encode() == {"t": "done", "id": "x@1", "pr": 0, "dr": 1, "finish": "stop"}
    # a map from an older node (no attempt, an unknown key) is read all the same
    old = {"t": "begin", "pv": 2, "r": 1, "id": "x", "token": 5, "sampler": None,
           "meta": {"reply_to": "r/x", "sampling": {"max_tokens": 3}, "prompt_len": 4, "last_prompt_token": 9,
                    "prefill_r": 0, "decode_r": 1, "dispatch_tries": 2}}
    begin = protocol.decode(old)
    assert isinstance(begin, Begin) and begin.meta.attempt == 0 and begin.meta.sampling.max_tokens == 3


def test_meta_is_a_value_that_nobody_changes_in_place() -> None:
    meta = RequestMeta("r/x", SamplingParams(), 4, 9, 0, 1, received_at=1.0)
    with pytest.raises(AttributeError):
        meta.prompt_len = 5  # type: ignore[misc]
    later = meta.with_times(prefill_started_at=2.0).with_times(prefill_started_at=3.0, first_token_at=4.0)
    assert (later.prefill_started_at, later.first_token_at, meta.prefill_started_at) == (2.0, 4.0, None)
    wire = meta.encode()
    wire["t_prefill_start"] = 9.0  # a caller changing its wire map changes neither the value nor the next map
    assert meta.prefill_started_at is None and "t_prefill_start" not in meta.encode()


# --- refusals ------------------------------------------------------------------------------------------------

ANY_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
                         | st.binary(max_size=8)
                         | hnp.arrays(st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.uint8]),
                                      hnp.array_shapes(min_dims=0, max_dims=3, max_side=3)),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=3),
                         max_leaves=8)


@pytest.mark.parametrize("t", sorted(FRAMES))
def test_any_damage_to_any_frame_type_is_a_frame_error_never_a_crash(t: str) -> None:
    """Each field of a good frame (and each field of its meta) replaced by any value, or dropped: the frame
    decodes (the value happened to be valid) or is refused with one line."""
    @settings(max_examples=150, deadline=None)
    @given(FRAMES[t], st.data())
    def check(frame: Any, data: Any) -> None:
        wire = frame.encode()
        target = wire
        if "meta" in wire and data.draw(st.booleans()):
            target = wire["meta"]
        name = data.draw(st.sampled_from(sorted(k for k in target if k != "t")))
        if data.draw(st.booleans()):
            del target[name]
        else:
            target[name] = data.draw(ANY_VALUE)
        try:
            protocol.decode(over_the_wire(wire))
        except FrameError as e:
            assert "\n" not in str(e)
    check()


def _good(t: str) -> dict[str, Any]:
    meta = RequestMeta("r/x", SamplingParams(max_tokens=3), 4, 9, 0, 1).encode()
    kv = np.zeros((2, 3, 4), np.float32)
    return {"prefill": {"t": "prefill", "pv": 1, "r": 0, "id": "a", "x": np.arange(3, dtype=np.int64), "meta": meta},
            "step": {"t": "step", "pv": 1, "r": 0, "ids": ["a", "b"], "x": np.zeros((2, 1, 8), np.float32)},
            "kv": {"t": "kv", "pv": 1, "r": 1, "id": "a", "layer": 0, "k": kv, "vv": kv.copy()},
            "begin": {"t": "begin", "pv": 1, "r": 1, "id": "a", "token": 7, "sampler": None, "meta": meta},
            "release": {"t": "release", "pv": 1, "r": 1, "id": "a"},
            "cancel": {"t": "cancel", "id": "a"},
            "prefilled": {"t": "prefilled", "id": "a"},
            "done": {"t": "done", "id": "a", "pr": 0, "dr": 1, "finish": "stop"},
            "bounce": {"t": "bounce", "id": "a", "why": "no stage"}}[t]


WRONG = {  # values of another kind than the field's
    "int": ["1", 1.5, True, 2**64 - 1, [], {}, None, b"\x00"],
    "str": [1, 1.5, True, [], {}, None, b"x", np.zeros(2, np.uint8)],
    "array": ["1", 1, [], {}, None, b"\x00"],
    "ids": ["a", [1], [], ["k" * (MAX_KEY_CHARS + 1)], {}, None],
    "meta": ["1", 1, [], {}, None],
    "sampler": [1, True, [], {}, b"x"],
}
KIND = {"pv": "int", "r": "int", "layer": "int", "token": "int", "pr": "int", "dr": "int", "id": "str",
        "why": "str", "finish": "str", "x": "array", "k": "array", "vv": "array", "ids": "ids", "meta": "meta",
        "sampler": "sampler"}


@pytest.mark.parametrize("t", sorted(FRAMES))
def test_each_frame_type_refuses_missing_fields_and_wrong_types(t: str) -> None:
    assert protocol.decode(over_the_wire(_good(t))).WIRE_TYPE == t
    for name in WIRE_FIELDS[t]:
        if name != "sampler":  # null is its valid absence
            wire = _good(t)
            del wire[name]
            assert t in refused(wire)
        for wrong in WRONG[KIND[name]]:
            assert t in refused({**_good(t), name: wrong}), (name, wrong)


@pytest.mark.parametrize("t, change, says", [
    ("prefill", {"x": np.zeros(3, np.uint8)}, "int64 ids or float32"),
    ("prefill", {"x": np.zeros((), np.int64)}, "rank 1"),
    ("prefill", {"id": "k" * (MAX_KEY_CHARS + 1)}, "characters"),
    ("prefill", {"pv": 2**64 - 1}, "64-bit integer"),
    ("step", {"x": np.zeros((), np.int64)}, "rank 1"),  # before: an IndexError from the check itself
    ("step", {"x": np.zeros((3, 1, 8), np.float32)}, "batch 3 for 2 ids"),
    ("step", {"ids": []}, "ids"),
    ("step", {"ids": [f"r{i}" for i in range(MAX_BATCH_IDS + 1)], "x": np.zeros(MAX_BATCH_IDS + 1, np.int64)},
     "ids"),
    ("step", {"x": np.zeros(2, np.int32)}, "int64 ids or float32"),
    ("kv", {"vv": np.zeros((2, 3, 4), np.float16)}, "one dtype"),
    ("kv", {"k": np.zeros((2, 3), np.float32), "vv": np.zeros((2, 3), np.float32)}, "one shape"),
    ("kv", {"k": np.zeros((2, 3, 4), np.int64), "vv": np.zeros((2, 3, 4), np.int64)}, "float32 or float16"),
    ("kv", {"layer": -1}, "layer"),
    ("begin", {"sampler": "s" * (MAX_SAMPLER_STATE_CHARS + 1)}, "sampler state"),
    ("begin", {"token": 2**63}, "token"),
    ("done", {"finish": "x" * 100}, "finish"),
    ("cancel", {"id": "k" * (MAX_KEY_CHARS + 1)}, "id"),
    ("prefilled", {"id": "k" * (MAX_KEY_CHARS + 1)}, "id"),
    ("begin", {"token": -1}, "token"),
])
def test_oversize_and_misshapen_fields_are_refused_in_one_line(t: str, change: dict[str, Any], says: str) -> None:
    assert says in refused({**_good(t), **change})


@pytest.mark.parametrize("meta_change, says", [
    ({"sampling": {"max_tokens": -1}}, "max_tokens"), ({"sampling": {"nope": 1}}, "nope"),
    ({"sampling": {"stop": "abc"}}, "stop"), ({"prompt_len": "3"}, "meta.prompt_len"),
    ({"resume": {"tokens": ["x"]}}, "meta.resume"), ({"resume": {"tokens": [1], "sampler": 5}}, "resume.sampler"),
    ({"t_received": float("nan")}, "meta.t_received"), ({"reply_to": None}, "meta.reply_to"),
    ({"attempt": True}, "meta.attempt"),
])
def test_malformed_meta_is_refused_naming_the_field(meta_change: dict[str, Any], says: str) -> None:
    for t in ("prefill", "begin"):
        wire = _good(t)
        wire["meta"] = {**wire["meta"], **meta_change}
        assert says in refused(wire)


@pytest.mark.parametrize("wire", [{}, {"t": "nope"}, {"t": 5}, {"t": "ping"}, [1, 2], "prefill"])
def test_unknown_frame_types_are_refused(wire: Any) -> None:
    refused(wire)
