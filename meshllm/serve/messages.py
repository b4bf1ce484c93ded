"""Typed forms of the small MQTT messages the serving layer acts on besides requests.

Apps publish ``cancel`` (``{"id"}``) and ``replay`` (``{"id", "from"}``); nodes
publish their retained readiness on ``ready/<node>``. Each is decoded here once,
at the boundary, into a frozen dataclass, or refused with :class:`PayloadError`
(:mod:`meshllm.mesh.payloads`; one line, no traceback): a message from an app costs at most itself, never
the node. Request ids follow :mod:`meshllm.serve.api`'s rule. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.mesh.payloads import PayloadError, loads_object
from meshllm.serve.api import _ID, MAX_INT

MAX_CONTROL_BYTES = 4096  # a cancel, a replay or a readiness record is a few dozen bytes


def json_object(payload: bytes | bytearray | str) -> dict[str, Any]:
    """A JSON object of at most :data:`MAX_CONTROL_BYTES`, or :class:`PayloadError`."""
    return loads_object(payload, MAX_CONTROL_BYTES)


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
