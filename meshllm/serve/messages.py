"""Typed forms of the small MQTT messages the serving layer acts on besides requests.

Apps publish ``cancel`` (``{"id"}``) and ``replay`` (``{"id", "from"}``); nodes
publish their retained readiness on ``ready/<node>``. Each is decoded here once,
at the boundary, into a frozen dataclass, or refused with :class:`PayloadError`
(one line, no traceback): a message from an app costs at most itself, never
the node. Request ids follow :mod:`meshllm.serve.api`'s rule. Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshllm.errors import MeshError
from meshllm.serve.api import _ID, MAX_INT

MAX_CONTROL_BYTES = 4096  # a cancel, a replay or a readiness record is a few dozen bytes


class PayloadError(MeshError):
    """An MQTT message that is not what its topic carries (malformed, too large, nested too deeply)."""


def json_object(payload: bytes | bytearray | str, max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """A JSON object of at most ``max_bytes``, or :class:`PayloadError`: never RecursionError or MemoryError."""
    if len(payload) > max_bytes:
        raise PayloadError(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(payload)
    except RecursionError:
        raise PayloadError("message is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise PayloadError("message is not a JSON object")
    return obj


def _request_id(obj: dict[str, Any]) -> str:
    rid = obj.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise PayloadError("'id' must be a request id (1-128 letters, digits, '_', '.', ':', '-')")
    return rid


def _int(obj: dict[str, Any], name: str, low: int = 0) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_INT:
        raise PayloadError(f"'{name}' must be an integer from {low} to {MAX_INT}")
    return v


@dataclass(frozen=True)
class Cancel:
    """``cancel``: stop request ``id`` (queued: answered ``cancelled``; running: stopped at its next token)."""

    id: str

    @classmethod
    def parse(cls, payload: bytes | bytearray | str) -> Cancel:
        return cls(_request_id(json_object(payload)))


@dataclass(frozen=True)
class Replay:
    """``replay``: publish request ``id``'s replies again from index ``start`` (a client back from an outage)."""

    id: str
    start: int

    @classmethod
    def parse(cls, payload: bytes | bytearray | str) -> Replay:
        obj = json_object(payload)
        return cls(_request_id(obj), _int(obj, "from"))


@dataclass(frozen=True)
class Readiness:
    """``ready/<node>``: which stage of which plan the node has loaded (``replica`` None: idle in that plan)."""

    plan_version: int
    replica: int | None
    stage: int | None = None
    role: str | None = None

    @classmethod
    def parse(cls, payload: bytes | bytearray | str) -> Readiness:
        obj = json_object(payload)
        r = obj.get("r")
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise PayloadError("'r' must be a replica id or null")
        stage = obj.get("stage")
        if stage is not None and (not isinstance(stage, int) or isinstance(stage, bool) or stage < 0):
            raise PayloadError("'stage' must be a stage index or null")
        role = obj.get("role")
        if role is not None and not isinstance(role, str):
            raise PayloadError("'role' must be a string")
        return cls(_int(obj, "pv"), r, stage, role)
