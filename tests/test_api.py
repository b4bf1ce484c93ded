"""The request/reply contract (meshllm/serve/api.py) and its JSON Schemas.

Every payload either parses or raises RequestFailed with a known code (never
another exception); the replies api.py builds validate against
schemas/reply-v1.json; and schemas/request-v1.json accepts exactly what
parse_request accepts, apart from the limits JSON Schema cannot express.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from meshllm.serve import api

REPLIES = "meshllm/v1/m/replies"
CODES = {api.INVALID_JSON, api.INVALID_REQUEST, api.CONTEXT_LENGTH, api.BUSY, api.UNAVAILABLE, api.INTERNAL,
         api.CANCELLED}


def _schema(name: str) -> Draft202012Validator:
    schema = json.loads(files("meshllm.serve").joinpath(f"schemas/{name}-v1.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


REQUEST_SCHEMA, REPLY_SCHEMA = _schema("request"), _schema("reply")


def outcome(payload: bytes | str) -> api.Request | api.RequestFailed:
    """parse_request's answer; any exception but RequestFailed fails the test."""
    try:
        req = api.parse_request(payload, REPLIES)
    except api.RequestFailed as e:
        assert e.code in CODES, e.code
        reply = e.reply()
        REPLY_SCHEMA.validate(reply)
        json.dumps(reply).encode("ascii")  # the mesh can publish it
        return e
    assert api.parse_request(json.dumps(req.to_json(), ensure_ascii=False).encode(), REPLIES) == req, "round trip"
    return req


def ok(obj: Any) -> api.Request:
    r = outcome(json.dumps(obj))
    assert isinstance(r, api.Request), r
    return r


def refused(obj: Any, code: str = api.INVALID_REQUEST, match: str = "") -> api.RequestFailed:
    r = outcome(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))
    assert isinstance(r, api.RequestFailed), f"accepted: {obj!r}"
    assert r.code == code and match in r.message, (r.code, r.message)
    return r


# --- parse_request ----------------------------------------------------------------------------


def test_a_minimal_request_gets_the_documented_defaults() -> None:
    r = ok({"id": "r1", "prompt": "Once upon a time"})
    assert r.reply_to == f"{REPLIES}/r1" and r.prompt == "Once upon a time" and r.messages == ()
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.stop) == (128, 0.8, 0, 1.0, None, ())


def test_every_field_is_read() -> None:
    r = ok({"id": "a.b:c-d_e", "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
            "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "\n",
            "reply_to": "my/app/r", "schema": 1})
    assert r.messages == ({"role": "system", "content": ""}, {"role": "user", "content": "hi"})
    assert r.reply_to == "my/app/r" and r.sampling.stop == ("\n",) and r.sampling.seed == 9
    assert r.sampling.temperature == 0.0 and r.sampling.greedy


def test_null_numbers_mean_their_defaults() -> None:
    r = ok({"id": "r", "prompt": "x", "max_tokens": None, "temperature": None, "top_p": None, "top_k": None,
            "seed": None})
    assert r.sampling == ok({"id": "r", "prompt": "x"}).sampling


def test_null_optional_fields_mean_their_defaults() -> None:
    r = ok({"id": "r", "prompt": "x", "stop": None, "reply_to": None, "schema": None, "max_tokens": None})
    assert r.sampling.stop == () and r.reply_to.endswith("/replies/r") and r.sampling.max_tokens == 128


def test_integral_floats_count_as_integers_but_fractions_do_not() -> None:
    assert ok({"id": "r", "prompt": "x", "max_tokens": 5.0, "schema": 1.0}).sampling.max_tokens == 5
    refused({"id": "r", "prompt": "x", "max_tokens": 5.5}, match="'max_tokens' must be an integer")
    refused({"id": "r", "prompt": "x", "top_k": True}, match="'top_k' must be an integer")
    refused({"id": "r", "prompt": "x", "schema": True}, match="schema version")
    refused({"id": "r", "prompt": "x", "schema": 2}, match="schema version 2")


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.01),
                                         ("top_k", -1), ("seed", -1), ("stop", [""]), ("stop", ["a"] * 9),
                                         ("stop", [1]), ("temperature", "0.5")])
def test_out_of_range_sampling_values_are_refused(field: str, value: Any) -> None:
    refused({"id": "r", "prompt": "x", field: value})


def test_integers_too_large_for_a_float_are_refused_not_crashed() -> None:
    big = 10**400
    refused({"id": "r", "prompt": "x", "max_tokens": big}, match="'max_tokens' must be at most")
    refused(f'{{"id": "r", "prompt": "x", "temperature": {big}}}', match="'temperature' must be a number")
    refused('{"id": "r", "prompt": "x", "top_p": NaN}', match="'top_p' must be a number")
    refused('{"id": "r", "prompt": "x", "seed": Infinity}', match="'seed' must be an integer")


@pytest.mark.parametrize("rid", ["", "a b", "a/b", "a+b", "é", "x" * 129, "r1\n", 7, None, ["r"]])
def test_unusable_ids_are_answered_without_an_id(rid: Any) -> None:
    e = refused({"id": rid, "prompt": "x"}, match="'id' must be")
    assert e.request_id is None and e.reply() == {"id": None, "error": {"code": api.INVALID_REQUEST,
                                                                         "message": e.message}}


@pytest.mark.parametrize("topic", ["", "a/#", "a/+/b", "a\x00b", "t" * 257, 5, "a/\ud800", "a/\x19b", "a\x7f",
                                   "a/\x8fb", "a/\ufdd0", "a/\ufffe", "a/\U0001ffff", "$SYS/x"])
def test_reply_to_must_be_a_publishable_topic(topic: Any) -> None:
    e = refused(json.dumps({"id": "r", "prompt": "x", "reply_to": topic}), match="'reply_to'")
    assert e.request_id == "r" and e.reply_to is None  # answered on the default topic


@pytest.mark.parametrize("topic", ["meshllm/v1/m/members/x", "meshllm/v1/m/plan", "meshllm/v1/m/jobs/r",
                                   "meshllm/v1/other/replies/r", "meshllm/v1/m/replies"])
def test_reply_to_cannot_point_nodes_at_mesh_state(topic: str) -> None:
    e = refused(json.dumps({"id": "r", "prompt": "x", "reply_to": topic}), match="'reply_to' under meshllm/")
    assert e.request_id == "r" and e.reply_to is None


def test_topics_with_other_unicode_are_accepted() -> None:
    assert ok({"id": "r", "prompt": "x", "reply_to": "app/é/🙂/\u202e/\U0010fffd"}).reply_to.startswith("app/")


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed"])
def test_integers_beyond_64_bits_are_refused_because_frames_cannot_carry_them(field: str) -> None:
    """Regression (live fuzzing): such a request was accepted and its prefill frame could not be encoded."""
    assert getattr(ok({"id": "r", "prompt": "x", field: api.MAX_INT}).sampling, field) == api.MAX_INT
    for big in (api.MAX_INT + 1, 2**64, 10**30):
        refused({"id": "r", "prompt": "x", field: big}, match=f"'{field}' must be at most")


def test_errors_after_the_id_go_to_the_requested_topic() -> None:
    e = refused({"id": "r", "prompt": "x", "reply_to": "app/r", "colour": "red", "a": 1}, match="a, colour")
    assert (e.request_id, e.reply_to) == ("r", "app/r")


@pytest.mark.parametrize("obj,match", [
    ({"id": "r"}, "exactly one of"),
    ({"id": "r", "prompt": None, "messages": None}, "exactly one of"),
    ({"id": "r", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
    ({"id": "r", "prompt": ""}, "non-empty string"),
    ({"id": "r", "prompt": ["x"]}, "non-empty string"),
    ({"id": "r", "messages": []}, "non-empty list"),
    ({"id": "r", "messages": [{"role": "user"}]}, "string 'role' and 'content'"),
    ({"id": "r", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "string 'role' and 'content'"),
    ({"id": "r", "messages": ["hi"]}, "string 'role' and 'content'"),
])
def test_prompt_or_messages(obj: dict[str, Any], match: str) -> None:
    refused(obj, match=match)


def test_prompt_null_counts_as_absent() -> None:
    assert ok({"id": "r", "prompt": None, "messages": [{"role": "user", "content": "y"}]}).messages


def test_long_prompts_are_context_length_errors() -> None:
    assert ok({"id": "r", "prompt": "x" * api.MAX_PROMPT_CHARS}).prompt
    refused({"id": "r", "prompt": "x" * (api.MAX_PROMPT_CHARS + 1)}, api.CONTEXT_LENGTH)
    half = "y" * (api.MAX_PROMPT_CHARS // 2)
    refused({"id": "r", "messages": [{"role": "user", "content": half}, {"role": "user", "content": half + "!"}]},
            api.CONTEXT_LENGTH)


def test_the_size_limit_counts_bytes_of_utf8() -> None:
    pad = "€" * 200_000  # 600 kB of UTF-8 but 200k characters; the unknown field fails after the size check
    refused(json.dumps({"id": "r", "prompt": "x", "pad": pad}, ensure_ascii=False), match="unknown field")
    e = refused(json.dumps({"id": "r", "prompt": "x", "pad": pad * 2}, ensure_ascii=False), match="exceeds")
    assert (e.request_id, e.reply_to) == ("r", f"{REPLIES}/r")
    refused(b"{" + b" " * api.MAX_REQUEST_BYTES + b"}", match="exceeds")


def test_an_oversized_request_is_answered_with_its_id_on_its_reply_topic() -> None:
    """Issue 14, item 15: up to MAX_ANSWERABLE_BYTES a request too large to serve is still read for its id and
    reply topic, so that its app hears why; beyond that, or with no usable id, it is answered without one."""
    big = "z" * (api.MAX_REQUEST_BYTES + 10)
    e = refused({"id": "big-1", "prompt": big, "reply_to": "my/app/big-1"}, match="exceeds")
    assert (e.request_id, e.reply_to, e.reply()["id"]) == ("big-1", "my/app/big-1", "big-1")
    e = refused({"id": "big-2", "prompt": big}, match="exceeds")
    assert (e.request_id, e.reply_to) == ("big-2", f"{REPLIES}/big-2")
    # a reply topic it may not have: answered on the default one of its id
    e = refused({"id": "big-3", "prompt": big, "reply_to": "meshllm/v1/other/plan"}, match="exceeds")
    assert (e.request_id, e.reply_to) == ("big-3", None)
    for unusable in ({"id": "bad id", "prompt": big}, {"prompt": big}, [big]):
        e = refused(unusable, match="exceeds")
        assert (e.request_id, e.reply_to) == (None, None)
    e = refused(json.dumps({"id": "huge", "prompt": "q" * (api.MAX_ANSWERABLE_BYTES + 1)}), match="exceeds")
    assert e.request_id is None, "beyond MAX_ANSWERABLE_BYTES it is not even parsed"


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe{", b'{"id": "r", "prompt": "\xc3"}', "[" * 100_000,
                                     b'{"id": "r", "prompt": "x"} trailing', "{'id': 'r'}"])
def test_payloads_that_are_not_json(payload: bytes | str) -> None:
    refused(payload, api.INVALID_JSON)


@pytest.mark.parametrize("payload", ["[]", "null", '"r"', "1", "NaN", '[{"id": "r", "prompt": "x"}]'])
def test_json_that_is_not_an_object(payload: str) -> None:
    refused(payload, match="must be a JSON object")


@pytest.mark.parametrize("field", ["prompt", "stop", "messages"])
def test_unpaired_surrogates_are_refused(field: str) -> None:
    obj: dict[str, Any] = {"id": "r", "prompt": "x"}
    if field == "messages":
        del obj["prompt"]
        obj["messages"] = [{"role": "user", "content": "a\udc00"}]
    else:
        obj[field] = "a\ud800"
    refused(json.dumps(obj), match="valid Unicode")
    assert ok({"id": "r", "prompt": "😀 \u2028 \ufeff \x00 \U0010ffff"}).prompt  # paired, odd but valid


# --- fuzz: nothing but RequestFailed ----------------------------------------------------------

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates included
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_TEXT, inner, max_size=5),
    max_leaves=20)
FIELD_VALUES = st.one_of(
    JSON_VALUES, st.integers(-3, 300), st.integers(min_value=2**53), st.floats(-2, 2), st.sampled_from(["", "x", "r1"]),
    st.lists(st.sampled_from(["", "\n", "END", 3]), max_size=10),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", 1]), "content": ANY_TEXT}), max_size=3),
)
NAMES = st.sampled_from(sorted(api.FIELDS)) | ANY_TEXT
REQUEST_LIKE = st.dictionaries(NAMES, FIELD_VALUES, max_size=8).map(
    lambda d: {"id": "r1", "prompt": "hi", **d} if len(d) % 3 else d)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(payload: bytes) -> None:
    outcome(payload)


@settings(max_examples=80, deadline=None)
@given(JSON_VALUES)
def test_fuzz_any_json(value: Any) -> None:
    outcome(json.dumps(value))
    outcome(json.dumps(value).encode("utf-8", "surrogatepass"))  # invalid UTF-8 where there are surrogates


@settings(max_examples=100, deadline=None)
@given(REQUEST_LIKE)
def test_fuzz_request_like_objects(obj: dict[str, Any]) -> None:
    outcome(json.dumps(obj))
    if not _has_surrogate(obj):
        outcome(json.dumps(obj, ensure_ascii=False).encode("utf-8"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(api.MAX_PROMPT_CHARS - 3, api.MAX_PROMPT_CHARS + 3), st.sampled_from(["a", "é", "😀", "\ud83d"]))
def test_fuzz_huge_prompts(n: int, ch: str) -> None:
    lone = ch == "\ud83d"  # only JSON's \u escape can carry it: 6 bytes a character, over the size limit
    r = outcome(json.dumps({"id": "r", "prompt": ch * n}, ensure_ascii=lone))
    if lone:
        assert isinstance(r, api.RequestFailed) and r.code == api.INVALID_REQUEST
    elif n > api.MAX_PROMPT_CHARS:
        assert isinstance(r, api.RequestFailed) and r.code == api.CONTEXT_LENGTH
    else:
        assert isinstance(r, api.Request)


# --- the request schema agrees with parse_request ---------------------------------------------

AGREE_EXAMPLES: list[Any] = [
    {"id": "r", "prompt": "x"},
    {"id": "r", "prompt": "x", "max_tokens": 5.0, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 0},
    {"id": "r", "prompt": "x", "max_tokens": None, "seed": None},
    {"id": "r", "prompt": None, "messages": [{"role": "user", "content": ""}]},
    {"id": "r", "prompt": "x", "messages": None, "stop": "END", "reply_to": "a/b", "schema": 1.0},
    {"id": "r", "prompt": "x", "stop": None, "reply_to": None, "schema": None},
    {"id": "r", "prompt": "x", "stop": ["a"] * 8},
    {"id": "x" * 128, "prompt": "x" * api.MAX_PROMPT_CHARS},
    {"id": "r", "prompt": "x", "reply_to": "t" * 256},
    # refused
    {"id": "r", "prompt": "x", "stop": ["a"] * 9}, {"id": "r", "prompt": "x", "stop": ""},
    {"id": "r", "prompt": "x", "stop": [1]},
    {"id": "r1\n", "prompt": "x"}, {"id": "x" * 129, "prompt": "x"}, {"id": "", "prompt": "x"}, {"prompt": "x"},
    {"id": "r", "prompt": "x", "schema": True}, {"id": "r", "prompt": "x", "schema": 2},
    {"id": "r", "prompt": "x", "schema": None}, {"id": "r", "prompt": "x", "reply_to": None},
    {"id": "r", "prompt": "x", "max_tokens": 0}, {"id": "r", "prompt": "x", "max_tokens": 1.5},
    {"id": "r", "prompt": "x", "max_tokens": True}, {"id": "r", "prompt": "x", "temperature": -1e-9},
    {"id": "r", "prompt": "x", "top_p": 0}, {"id": "r", "prompt": "x", "top_p": 1.0000001},
    {"id": "r", "prompt": "x", "top_k": 1.5}, {"id": "r", "prompt": "x", "seed": -1},
    {"id": "r", "prompt": "x", "reply_to": "a/+"}, {"id": "r", "prompt": "x", "reply_to": "t" * 257},
    {"id": "r", "prompt": "x", "reply_to": "a\x00"}, {"id": "r", "prompt": "x", "reply_to": ""},
    {"id": "r", "prompt": ""}, {"id": "r", "prompt": "x" * (api.MAX_PROMPT_CHARS + 1)},
    {"id": "r", "prompt": None}, {"id": "r", "messages": []}, {"id": "r", "messages": [{"role": "user"}]},
    {"id": "r", "messages": [{"role": "u", "content": "c", "name": "n"}]},
    {"id": "r", "prompt": "x", "messages": [{"role": "u", "content": "c"}]},
    {"id": "r", "prompt": "x", "extra": 1}, [], "r", None,
]


@pytest.mark.parametrize("obj", AGREE_EXAMPLES)
def test_request_schema_agrees_with_parse_request(obj: Any) -> None:
    assert REQUEST_SCHEMA.is_valid(obj) == isinstance(outcome(json.dumps(obj)), api.Request)


def test_request_schema_examples_are_accepted() -> None:
    for example in REQUEST_SCHEMA.schema["examples"]:
        assert REQUEST_SCHEMA.is_valid(example) and ok(example)


AGREE_IDS = st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True) | st.sampled_from(["", "a b", "r\n", 5])
AGREE_TEXT = st.text(max_size=6)  # hypothesis' default alphabet: no surrogates
AGREE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(-3, 3, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, 0.5, 5.0, 1e300]), AGREE_TEXT, st.lists(AGREE_TEXT | st.integers(), max_size=9),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), AGREE_TEXT | st.integers(),
                             max_size=3), max_size=3),
)
AGREE_OBJECTS = st.fixed_dictionaries(
    {"id": AGREE_IDS},
    optional={**{f: AGREE_VALUES for f in sorted(api.FIELDS - {"id"})}, "extra": AGREE_VALUES},
)


@settings(max_examples=150, deadline=None)
@given(AGREE_OBJECTS)
def test_request_schema_agrees_with_parse_request_on_generated_objects(obj: dict[str, Any]) -> None:
    # what JSON Schema cannot say (the 1 MiB size and the total length of messages) stays out of reach here
    assume(not isinstance(obj.get("messages"), list) or sum(
        len(m.get("content", "")) for m in obj["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)
    ) <= api.MAX_PROMPT_CHARS)
    parsed = isinstance(outcome(json.dumps(obj)), api.Request)
    assert REQUEST_SCHEMA.is_valid(obj) == parsed, (obj, [e.message for e in REQUEST_SCHEMA.iter_errors(obj)])


# --- replies validate against the reply schema ----------------------------------------------

TIMINGS = {"queue_s": 0.001, "ttft_s": 0.2, "total_s": 1.5, "tokens_per_s": 12.5,
           "replicas": {"prefill": 0, "decode": 1}}


@settings(max_examples=50, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True), st.integers(0, 10**6), ANY_TEXT.filter(
    lambda t: not _has_surrogate(t)), st.integers(0, 2**31), st.sampled_from(["stop", "length", "cancelled"]))
def test_replies_built_by_api_validate(rid: str, index: int, text: str, token: int, reason: str) -> None:
    for reply in (api.token_reply(rid, index, text, token),
                  api.final_reply(rid, index, text, reason, 7, index, TIMINGS),
                  api.final_reply(rid, index, text, reason, 7, index, {}),
                  *(api.error_reply(rid, code, text) for code in sorted(CODES)),
                  api.error_reply(None, api.INVALID_JSON, text)):
        REPLY_SCHEMA.validate(reply)
        assert json.loads(json.dumps(reply)) == reply


@pytest.mark.parametrize("reply", [
    {"id": "r", "index": 0, "text": "x"},
    {"id": "r", "index": -1, "text": "x", "token_id": 1},
    {"id": "r", "index": 0, "text": "x", "token_id": 1, "done": False},
    {"id": "r", "index": 0, "text": "", "done": True, "finish_reason": "bored",
     "usage": {"prompt_tokens": 1, "completion_tokens": 0}, "timings": {}},
    {"id": "r", "error": {"code": "nope", "message": "x"}},
    {"id": "r", "index": 0, "text": "x", "token_id": 1, "error": {"code": "busy", "message": "x"}},
])
def test_reply_schema_rejects_what_api_never_builds(reply: dict[str, Any]) -> None:
    assert not REPLY_SCHEMA.is_valid(reply)


# --- helpers ---------------------------------------------------------------------------------


def _has_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, dict):
        return any(_has_surrogate(k) or _has_surrogate(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_has_surrogate(x) for x in v)
    return False

