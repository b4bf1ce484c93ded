"""Serving frames on the data plane: one frozen dataclass per frame type, one encode and one decode each. Pure.

Every frame names the plan version and replica it belongs to, so that a node
holding an old and a new plan's stage during a roll-out sends each frame to
the right one. On the wire a frame is a compact msgpack map
(:mod:`meshllm.dataplane.codec`) whose keys stay as they always were, so that
nodes of this and of earlier versions interoperate; in code it is a typed value
with readable names. :func:`decode` validates a wire map once, at the boundary
(types, shapes, dtypes, sizes), and raises :class:`FrameError` with one line
naming the problem; whatever holds a frame afterwards can trust it.

=============  ========  =================================================  ==================================
class          wire t    wire fields (readable name)                        goes to
=============  ========  =================================================  ==================================
Prefill        prefill   pv r id x meta                                     next stage of a replica
Step           step      pv r ids (keys) x                                  next stage (a batch)
KvBlock        kv        pv r id layer k vv (v)                             DECODE stage holding layer
Begin          begin     pv r id token sampler (sampler_state) meta         DECODE replica's last stage
Release        release   pv r id [error {code message}]                     every stage of a replica
CancelStream   cancel    id                                                 the request's last stage
Prefilled      prefilled id                                                 the scheduler: a prompt's prefill
                                                                            ended (its first token is sampled)
Done           done      id pr (prefill_replica) dr (decode_replica) finish  the scheduler
Bounce         bounce    id why                                             the scheduler: a prompt or begin
                                                                            reached a node without that stage
=============  ========  =================================================  ==================================

``pv`` is ``plan_version``, ``r`` is ``replica`` and ``id`` is ``key`` (the
request's frame key, :func:`meshllm.serve.journal.frame_key`) throughout.
``x`` is token ids (int64) for a replica's first stage and hidden states
(float32, ``(B, S, dim)``) for the others; ``k`` and ``v`` travel in the
sender's KV cache dtype (float32 or float16). ``meta`` is the request's
:class:`RequestMeta` (reply topic, sampling, prompt length, timings): an
immutable value, so a stage that records a timing makes a new one
(:meth:`RequestMeta.with_times`) and nothing is ever changed in place across
nodes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from meshllm.dataplane.codec import FrameError
from meshllm.errors import GenerationError
from meshllm.runtime.sampling import SamplingParams

MAX_BATCH_IDS = 1024  # request keys in one step frame
MAX_KEY_CHARS = 256  # a request id (128 characters at most) and its attempt suffix
MAX_TEXT_CHARS = 1024  # a bounce's reason, a digest
MAX_SAMPLER_STATE_CHARS = 4096  # a generator's state as JSON is about 150 characters
MAX_ERROR_CODE_CHARS = 64  # "context_length_exceeded", "internal_error", ...
MAX_FINISH_CHARS = 32  # "stop", "length", "cancelled", "error"
MAX_INT = 2**63 - 1  # integers travel as 64-bit msgpack values
# Plan versions, replica ids and request keys only route a frame: one that matches nothing here finds no stage
# and is dropped (the connection carries other requests), so any 64-bit value or string of the size is taken.
ROUTE_LOW = -(2**63)
KV_WIRE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))  # a KV block travels in its cache's dtype
X_DTYPES = (np.dtype(np.int64), np.dtype(np.float32))  # token ids, or hidden states



# --- field checks (each raises FrameError naming the frame, the field and what was wrong) ---------------------


def _fail(where: str, name: str, want: str, v: Any) -> FrameError:
    got = type(v).__name__ if v is not None else "nothing"
    return FrameError(f"{where}: {name} must be {want}, got {got}")


def _int(where: str, d: Mapping[str, Any], name: str, low: int = 0) -> int:
    v = d.get(name)
    want = "a 64-bit integer" if low == ROUTE_LOW else f"an integer from {low} to 2**63-1"
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(where, name, want, v)
    if not low <= v <= MAX_INT:
        raise FrameError(f"{where}: {name} must be {want}, got {v}")
    return v


def _route(where: str, d: Mapping[str, Any], name: str) -> int:
    return _int(where, d, name, ROUTE_LOW)


def _str(where: str, d: Mapping[str, Any], name: str, limit: int, *, empty: bool = False) -> str:
    v = d.get(name)
    if not isinstance(v, str):
        raise _fail(where, name, "a string", v)
    if len(v) > limit or (not v and not empty):
        raise FrameError(f"{where}: {name} must be a string of {0 if empty else 1} to {limit} characters, "
                         f"got {len(v)}")
    return v


def _key(where: str, d: Mapping[str, Any], name: str = "id") -> str:
    return _str(where, d, name, MAX_KEY_CHARS, empty=True)


def _opt_str(where: str, d: Mapping[str, Any], name: str, limit: int) -> str | None:
    return None if d.get(name) is None else _str(where, d, name, limit, empty=True)


def _time(where: str, d: Mapping[str, Any], name: str) -> float | None:
    v = d.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _fail(where, name, "a finite number of seconds", v)
    return float(v)


def _array(where: str, d: Mapping[str, Any], name: str) -> np.ndarray:
    v = d.get(name)
    if not isinstance(v, np.ndarray):
        raise _fail(where, name, "an array", v)
    return v


def _x(where: str, d: Mapping[str, Any]) -> np.ndarray:
    x = _array(where, d, "x")
    if x.dtype not in X_DTYPES:
        raise FrameError(f"{where}: x must be int64 ids or float32 hidden states, got {x.dtype}")
    if x.ndim == 0 or x.size == 0:
        raise FrameError(f"{where}: x must be a non-empty array of rank 1 or more, got shape {x.shape}")
    return x


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so NaN equals NaN: a frame equals its decoded copy)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --- a request's metadata --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """A resumed request: the tokens it streamed before (prefilled again) and its sampler's state after them."""

    tokens: tuple[int, ...]
    sampler_state: str | None = None

    def encode(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "sampler": self.sampler_state}

    @classmethod
    def decode(cls, d: Any, where: str) -> Resume:
        tokens = d.get("tokens") if isinstance(d, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i <= MAX_INT for i in tokens):
            raise FrameError(f"{where}: meta.resume must hold a list of token ids")
        return cls(tuple(tokens), _sampler_state(where, "meta.resume.sampler", d.get("sampler")))


def _sampler_state(where: str, name: str, v: Any) -> str | None:
    if v is not None and (not isinstance(v, str) or len(v) > MAX_SAMPLER_STATE_CHARS):
        raise FrameError(f"{where}: {name} must be a sampler state (a string of at most "
                         f"{MAX_SAMPLER_STATE_CHARS} characters) or null")
    return v


@dataclass(frozen=True)
class RequestMeta:
    """What travels with a request through the stages; read by the stage that samples. Immutable.

    Wire keys: ``reply_to sampling prompt_len last_prompt_token prefill_r decode_r request_id attempt digest
    resume t_received t_prefill_start t_first_token``; unknown keys are dropped at the boundary."""

    reply_to: str
    sampling: SamplingParams
    prompt_len: int
    last_prompt_token: int
    prefill_replica: int
    decode_replica: int
    request_id: str | None = None  # the app's id (None: the frame key is the request id)
    attempt: int = 0  # how many times the request was resumed
    digest: str | None = None  # of the request's bytes, by which a copy of it is recognised
    resume: Resume | None = None
    received_at: float | None = None  # wall-clock times (time.time()) for the final reply's timings
    prefill_started_at: float | None = None
    first_token_at: float | None = None

    def with_times(self, *, prefill_started_at: float | None = None, first_token_at: float | None = None
                   ) -> RequestMeta:
        """A copy with the given timings recorded (a timing already recorded is kept)."""
        return dataclasses.replace(
            self, prefill_started_at=self.prefill_started_at if self.prefill_started_at is not None
            else prefill_started_at,
            first_token_at=self.first_token_at if self.first_token_at is not None else first_token_at)

    def encode(self) -> dict[str, Any]:
        """The wire map (a fresh dict each time: whoever holds it may change it without touching this value)."""
        d: dict[str, Any] = {"reply_to": self.reply_to, "sampling": self.sampling.to_json(),
                             "prompt_len": self.prompt_len, "last_prompt_token": self.last_prompt_token,
                             "prefill_r": self.prefill_replica, "decode_r": self.decode_replica,
                             "attempt": self.attempt}
        for name, v in (("request_id", self.request_id), ("digest", self.digest),
                        ("t_received", self.received_at), ("t_prefill_start", self.prefill_started_at),
                        ("t_first_token", self.first_token_at)):
            if v is not None:
                d[name] = v
        if self.resume is not None:
            d["resume"] = self.resume.encode()
        return d

    @classmethod
    def decode(cls, d: Any, where: str = "meta") -> RequestMeta:
        if not isinstance(d, Mapping):
            raise _fail(where, "meta", "a map", d)
        s = d.get("sampling")
        if not isinstance(s, Mapping):
            raise _fail(where, "meta.sampling", "a map", s)
        stop = s.get("stop")
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise _fail(where, "meta.sampling.stop", "a list of strings", stop)
        try:
            sampling = SamplingParams(**{**s, "stop": tuple(stop or ())})
        except (TypeError, GenerationError) as e:
            raise FrameError(f"{where}: meta.sampling: {e}") from None
        resume = d.get("resume")
        m = {f"meta.{k}": v for k, v in d.items() if isinstance(k, str)}  # errors name meta.<field>
        m.setdefault("meta.attempt", 0)
        return cls(
            reply_to=_str(where, m, "meta.reply_to", MAX_TEXT_CHARS),
            sampling=sampling,
            prompt_len=_int(where, m, "meta.prompt_len"),
            last_prompt_token=_int(where, m, "meta.last_prompt_token"),
            prefill_replica=_int(where, m, "meta.prefill_r"),
            decode_replica=_int(where, m, "meta.decode_r"),
            request_id=_opt_str(where, m, "meta.request_id", MAX_KEY_CHARS),
            attempt=_int(where, m, "meta.attempt"),
            digest=_opt_str(where, m, "meta.digest", MAX_TEXT_CHARS),
            resume=None if resume is None else Resume.decode(resume, where),
            received_at=_time(where, m, "meta.t_received"),
            prefill_started_at=_time(where, m, "meta.t_prefill_start"),
            first_token_at=_time(where, m, "meta.t_first_token"),
        )


# --- the frames --------------------------------------------------------------------------------------------------


class _Frame:
    """Common to every frame: equality that compares arrays by value, and the wire type tag."""

    WIRE_TYPE: ClassVar[str]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and _same_array(a, b)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # frames hold arrays


@dataclass(frozen=True, eq=False)
class Prefill(_Frame):
    """A prompt (token ids) or its hidden states, on its way through a PREFILL (or MIXED) replica."""

    WIRE_TYPE: ClassVar[str] = "prefill"
    plan_version: int
    replica: int
    key: str
    x: np.ndarray
    meta: RequestMeta

    def encode(self) -> dict[str, Any]:
        return {"t": "prefill", "pv": self.plan_version, "r": self.replica, "id": self.key, "x": self.x,
                "meta": self.meta.encode()}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Prefill:
        w = "prefill frame"
        return cls(_route(w, d, "pv"), _route(w, d, "r"), _key(w, d), _x(w, d), RequestMeta.decode(d.get("meta"), w))


@dataclass(frozen=True, eq=False)
class Step(_Frame):
    """One decode step of a batch: row ``i`` of ``x`` belongs to request ``keys[i]``."""

    WIRE_TYPE: ClassVar[str] = "step"
    plan_version: int
    replica: int
    keys: tuple[str, ...]
    x: np.ndarray

    def encode(self) -> dict[str, Any]:
        return {"t": "step", "pv": self.plan_version, "r": self.replica, "ids": list(self.keys), "x": self.x}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Step:
        w = "step frame"
        ids = d.get("ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BATCH_IDS \
                or not all(isinstance(i, str) and len(i) <= MAX_KEY_CHARS for i in ids):
            raise FrameError(f"{w}: ids must be 1 to {MAX_BATCH_IDS} request keys")
        x = _x(w, d)
        if x.shape[0] != len(ids):
            raise FrameError(f"{w}: x has batch {x.shape[0]} for {len(ids)} ids")
        return cls(_route(w, d, "pv"), _route(w, d, "r"), tuple(ids), x)


@dataclass(frozen=True, eq=False)
class KvBlock(_Frame):
    """One layer's KV cache of a prefilled prompt, from a PREFILL stage to the DECODE stage holding the layer.
    ``k`` and ``v`` are ``(kv_heads, n, head_dim)`` arrays of one dtype (float32 or float16)."""

    WIRE_TYPE: ClassVar[str] = "kv"
    plan_version: int
    replica: int
    key: str
    layer: int
    k: np.ndarray
    v: np.ndarray

    def encode(self) -> dict[str, Any]:
        return {"t": "kv", "pv": self.plan_version, "r": self.replica, "id": self.key, "layer": self.layer,
                "k": self.k, "vv": self.v}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> KvBlock:
        w = "kv frame"
        k, v = _array(w, d, "k"), _array(w, d, "vv")
        if k.shape != v.shape or k.ndim != 3 or k.dtype != v.dtype or k.dtype not in KV_WIRE_DTYPES:
            raise FrameError(f"{w}: k and vv must be float32 or float16 arrays of one dtype and one shape "
                             f"(kv_heads, n, head_dim), got {k.dtype}{k.shape} and {v.dtype}{v.shape}")
        return cls(_route(w, d, "pv"), _route(w, d, "r"), _key(w, d), _int(w, d, "layer"), k, v)


@dataclass(frozen=True, eq=False)
class Begin(_Frame):
    """A prompt was prefilled and its first token sampled: the DECODE replica's last stage starts streaming."""

    WIRE_TYPE: ClassVar[str] = "begin"
    plan_version: int
    replica: int
    key: str
    token: int
    sampler_state: str | None  # None: greedy
    meta: RequestMeta

    def encode(self) -> dict[str, Any]:
        return {"t": "begin", "pv": self.plan_version, "r": self.replica, "id": self.key, "token": self.token,
                "sampler": self.sampler_state, "meta": self.meta.encode()}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Begin:
        w = "begin frame"
        return cls(_route(w, d, "pv"), _route(w, d, "r"), _key(w, d), _int(w, d, "token"),
                   _sampler_state(w, "sampler", d.get("sampler")),
                   RequestMeta.decode(d.get("meta"), w))


@dataclass(frozen=True, eq=False)
class Release(_Frame):
    """Free a request's KV cache (and, at a last stage, drop its stream without a word)."""

    WIRE_TYPE: ClassVar[str] = "release"
    plan_version: int
    replica: int
    key: str
    # a stage that failed the request and does not hold its reply stream asks the last stage to answer it
    error_code: str | None = None
    error_message: str | None = None

    def encode(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": "release", "pv": self.plan_version, "r": self.replica, "id": self.key}
        if self.error_code is not None:
            d["error"] = {"code": self.error_code, "message": self.error_message or ""}
        return d

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Release:
        w = "release frame"
        err = d.get("error")
        if err is None:
            return cls(_route(w, d, "pv"), _route(w, d, "r"), _key(w, d))
        if not isinstance(err, dict):
            raise _fail(w, "error", "a map of code and message", err)
        return cls(_route(w, d, "pv"), _route(w, d, "r"), _key(w, d),
                   _str(w + " error", err, "code", MAX_ERROR_CODE_CHARS),
                   _str(w + " error", err, "message", MAX_TEXT_CHARS, empty=True))


@dataclass(frozen=True, eq=False)
class CancelStream(_Frame):
    """The client cancelled: the stage streaming the request stops it at its next token."""

    WIRE_TYPE: ClassVar[str] = "cancel"
    key: str

    def encode(self) -> dict[str, Any]:
        return {"t": "cancel", "id": self.key}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> CancelStream:
        return cls(_key("cancel frame", d))


@dataclass(frozen=True, eq=False)
class Done(_Frame):
    """A request's run ended (its final reply or error is out): the scheduler frees its slots."""

    WIRE_TYPE: ClassVar[str] = "done"
    key: str
    prefill_replica: int
    decode_replica: int
    finish: str  # "stop", "length", "cancelled", "error"

    def encode(self) -> dict[str, Any]:
        return {"t": "done", "id": self.key, "pr": self.prefill_replica, "dr": self.decode_replica,
                "finish": self.finish}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Done:
        w = "done frame"
        return cls(_key(w, d), _route(w, d, "pr"), _route(w, d, "dr"),
                   _str(w, d, "finish", MAX_FINISH_CHARS, empty=True))


@dataclass(frozen=True, eq=False)
class Prefilled(_Frame):
    """A request's prompt ran through its prefill replica (the first token is sampled): the scheduler stops
    counting its tokens as prefill work waiting there, which is what it routes new prompts by."""

    WIRE_TYPE: ClassVar[str] = "prefilled"
    key: str

    def encode(self) -> dict[str, Any]:
        return {"t": "prefilled", "id": self.key}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Prefilled:
        return cls(_key("prefilled frame", d))


@dataclass(frozen=True, eq=False)
class Bounce(_Frame):
    """A prompt or begin reached a node without that stage (a plan changed under it): the planner moves it."""

    WIRE_TYPE: ClassVar[str] = "bounce"
    key: str
    why: str

    def encode(self) -> dict[str, Any]:
        return {"t": "bounce", "id": self.key, "why": self.why}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> Bounce:
        w = "bounce frame"
        why = d.get("why")
        if isinstance(why, str) and len(why) > MAX_TEXT_CHARS:  # a reason is for a log line: cut, not refused
            d = {**d, "why": why[:MAX_TEXT_CHARS]}
        return cls(_key(w, d), _str(w, d, "why", MAX_TEXT_CHARS, empty=True))


Frame = Prefill | Step | KvBlock | Begin | Release | CancelStream | Prefilled | Done | Bounce
FRAME_TYPES: dict[str, type[Frame]] = {c.WIRE_TYPE: c for c in (Prefill, Step, KvBlock, Begin, Release,  # type: ignore[misc]
                                                                 CancelStream, Prefilled, Done, Bounce)}
# the wire fields of each frame type (besides "t"), for tools and tests that build frames by hand
WIRE_FIELDS: dict[str, tuple[str, ...]] = {
    "prefill": ("pv", "r", "id", "x", "meta"), "step": ("pv", "r", "ids", "x"),
    "kv": ("pv", "r", "id", "layer", "k", "vv"), "begin": ("pv", "r", "id", "token", "sampler", "meta"),
    "release": ("pv", "r", "id"), "cancel": ("id",), "prefilled": ("id",),
    "done": ("id", "pr", "dr", "finish"), "bounce": ("id", "why")}
OPTIONAL_WIRE_FIELDS: dict[str, tuple[str, ...]] = {"release": ("error",)}  # sent only when set


def decode(wire: Mapping[str, Any]) -> Frame:
    """The typed frame of a wire map (as :func:`meshllm.dataplane.codec.decode_body` returns it), validated;
    raises :class:`FrameError` with one line naming the problem."""
    if not isinstance(wire, Mapping):
        raise FrameError(f"a serving frame must be a map, got {type(wire).__name__}")
    t = wire.get("t")
    cls = FRAME_TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise FrameError(f"unknown serving frame type {str(t)[:40]!r}")
    return cls.decode(wire)  # type: ignore[return-value]
