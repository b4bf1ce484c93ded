"""The request API over MQTT: what apps publish, what the mesh streams back. Schema v1.

An app publishes one JSON object to ``meshllm/v1/<mesh>/requests``::

    {"id": "r1", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0,
     "reply_to": "my/app/replies/r1"}

and receives JSON objects on ``reply_to`` (default ``meshllm/v1/<mesh>/replies/<id>``)::

    {"id": "r1", "index": 0, "text": " there", "token_id": 612}
    ...
    {"id": "r1", "index": 12, "text": "", "done": true, "finish_reason": "length",
     "usage": {"prompt_tokens": 5, "completion_tokens": 13},
     "timings": {"queue_s": ..., "ttft_s": ..., "tokens_per_s": ..., "replicas": {...}}}

or one error object ``{"id": "r1", "error": {"code": "invalid_request", "message": "..."}}``.

This module owns parsing and validating requests (strictly: unknown fields are
errors) and building replies; ``schemas/request-v1.json`` and
``schemas/reply-v1.json`` describe the same shapes for other languages. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from meshllm.errors import GenerationError, RequestFailed
from meshllm.runtime.sampling import DEFAULT_SAMPLING, SamplingParams

SCHEMA_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20
# an oversized request is still parsed up to this size, only to answer it on its own reply topic with its id
MAX_ANSWERABLE_BYTES = 8 << 20
MAX_PROMPT_CHARS = 200_000
MAX_STOP_STRINGS = 8
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")  # \Z: "$" would also accept a trailing newline
MAX_INT = 2**63 - 1  # integer fields travel in msgpack data-plane frames (64 bits); larger ones cannot
MAX_TOPIC_CHARS = 256
# Wildcards and what MQTT forbids or brokers refuse in a topic name: NUL, C0 and C1 control characters
# (Mosquitto disconnects a client that publishes to such a topic, which would cut the serving node off
# the mesh) and the Unicode noncharacters (U+FDD0-U+FDEF; U+xFFFE and U+xFFFF, checked in _is_topic).
_TOPIC_BAD = re.compile("[#+\x00-\x1f\x7f-\x9f\ufdd0-\ufdef]")

FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "reply_to",
          "schema"}

# error codes
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
CONTEXT_LENGTH = "context_length_exceeded"
BUSY = "busy"
UNAVAILABLE = "unavailable"  # no ready replica
INTERNAL = "internal_error"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Request:
    id: str
    reply_to: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "reply_to": self.reply_to, **self.sampling.to_json()}
        if self.prompt is not None:
            d["prompt"] = self.prompt
        else:
            d["messages"] = [dict(m) for m in self.messages]
        return d


def parse_request(payload: bytes | str, default_reply: str) -> Request:
    """Validates one request; ``default_reply`` is the reply topic prefix (``.../replies``)."""
    size = len(payload) if isinstance(payload, (bytes, bytearray)) else len(payload.encode("utf-8", "surrogatepass"))
    if size > MAX_REQUEST_BYTES:
        rid, reply_to = _answerable(payload, size, default_reply)
        raise RequestFailed(INVALID_REQUEST, f"request of {size} bytes exceeds {MAX_REQUEST_BYTES} bytes", rid,
                           reply_to)
    obj = _load(payload)
    rid = _request_id(obj)
    reply_to = _reply_topic(obj, rid, default_reply)

    def fail(msg: str, code: str = INVALID_REQUEST) -> RequestFailed:
        return RequestFailed(code, msg, rid, reply_to)

    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise fail(f"unknown field(s): {', '.join(unknown)}")
    schema = obj.get("schema") if obj.get("schema") is not None else SCHEMA_VERSION
    if isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise fail(f"schema version {obj.get('schema')!r} is not supported (this mesh speaks {SCHEMA_VERSION})")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise fail("give exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise fail("'prompt' must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise fail(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters", CONTEXT_LENGTH)
        if not _is_utf8(prompt):
            raise fail("'prompt' must be valid Unicode (it contains an unpaired surrogate)")
    else:
        if not isinstance(messages, list) or not messages:
            raise fail("'messages' must be a non-empty list of {role, content} objects")
        for m in messages:
            if (not isinstance(m, dict) or set(m) - {"role", "content"} or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)):
                raise fail("each message must be an object with string 'role' and 'content'")
        if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
            raise fail(f"messages are longer than {MAX_PROMPT_CHARS} characters", CONTEXT_LENGTH)
        if not all(_is_utf8(m["role"]) and _is_utf8(m["content"]) for m in messages):
            raise fail("messages must be valid Unicode (they contain an unpaired surrogate)")
    stop = obj.get("stop") if obj.get("stop") is not None else []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
        raise fail(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    if not all(_is_utf8(s) for s in stop if isinstance(s, str)):
        raise fail("'stop' strings must be valid Unicode (they contain an unpaired surrogate)")
    # null means "the default", like an absent field
    num: dict[str, Any] = {name: getattr(DEFAULT_SAMPLING, name) for name in ("max_tokens", "temperature", "top_k",
                                                                              "top_p", "seed")}
    for name, kind in (("max_tokens", int), ("top_k", int), ("seed", int), ("temperature", float),
                       ("top_p", float)):
        v = obj.get(name)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and isinstance(v, float):
            ok = math.isfinite(v) and (kind is float or v.is_integer())
        if ok:
            try:
                num[name] = int(v) if kind is int else float(v)
            except OverflowError:  # an integer too large for a float
                ok = False
        if ok and kind is int and num[name] > MAX_INT:
            raise fail(f"'{name}' must be at most {MAX_INT} (2**63 - 1), got {v!r}")
        if not ok:
            raise fail(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    try:
        sampling = SamplingParams(
            max_tokens=num["max_tokens"],
            temperature=num["temperature"],
            top_k=num["top_k"],
            top_p=num["top_p"],
            seed=num["seed"],
            stop=tuple(stop),
        )
    except GenerationError as e:
        raise fail(str(e)) from None
    return Request(rid, reply_to, sampling, prompt, tuple(messages or ()))


def _load(payload: bytes | str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestFailed(INVALID_JSON, f"request is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestFailed(INVALID_JSON, "request is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestFailed(INVALID_REQUEST, "request must be a JSON object")
    return obj


def _request_id(obj: dict[str, Any]) -> str:
    rid = obj.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise RequestFailed(INVALID_REQUEST, "'id' must be a string of 1-128 letters, digits, '_', '.', ':', '-'",
                           rid if isinstance(rid, str) and _ID.match(rid or "") else None)
    return rid


def _reply_topic(obj: dict[str, Any], rid: str, default_reply: str) -> str:
    # null means "the default" for every optional field, as OpenAI-style clients send it
    reply_to = obj.get("reply_to") if obj.get("reply_to") is not None else f"{default_reply}/{rid}"
    if not _is_topic(reply_to):
        raise RequestFailed(INVALID_REQUEST, f"'reply_to' must be an MQTT topic of 1-{MAX_TOPIC_CHARS} characters, "
                           "without wildcards, control characters or a leading '$'", rid)
    if reply_to.split("/", 1)[0] == "meshllm" and not reply_to.startswith(f"{default_reply}/"):
        # nodes publish replies with their own broker login: never onto the mesh's state (members, plan...)
        raise RequestFailed(INVALID_REQUEST, f"'reply_to' under meshllm/ must be under {default_reply}/", rid)
    return reply_to


def _answerable(payload: bytes | str, size: int, default_reply: str) -> tuple[str | None, str | None]:
    """The id and reply topic of an oversized request, if it is a JSON object of at most
    :data:`MAX_ANSWERABLE_BYTES` whose id (and reply topic, when it gives one) are valid; else (None, None)."""
    if size > MAX_ANSWERABLE_BYTES:
        return None, None
    try:
        obj = _load(payload)
        rid = _request_id(obj)
    except RequestFailed:
        return None, None
    try:
        return rid, _reply_topic(obj, rid, default_reply)
    except RequestFailed:
        return rid, None  # answered on the default reply topic of its id


def _is_topic(t: object) -> bool:
    """Whether ``t`` is a topic an app may have replies published to."""
    return (isinstance(t, str) and 0 < len(t) <= MAX_TOPIC_CHARS and not t.startswith("$")  # $: the broker's own
            and not _TOPIC_BAD.search(t) and not any(ord(c) & 0xFFFE == 0xFFFE for c in t) and _is_utf8(t))


def _is_utf8(s: str) -> bool:
    """Whether ``s`` can go on the wire: JSON lets ``\\ud800`` through, UTF-8 (and MQTT topics) cannot."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- replies ------------------------------------------------------------


def token_reply(request_id: str, index: int, text: str, token_id: int) -> dict[str, Any]:
    return {"id": request_id, "index": index, "text": text, "token_id": token_id}


def final_reply(request_id: str, index: int, text: str, finish_reason: str, prompt_tokens: int,
                completion_tokens: int, timings: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "index": index, "text": text, "done": True, "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "timings": timings}


def error_reply(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}
