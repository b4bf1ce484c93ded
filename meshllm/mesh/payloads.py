"""Decoding MQTT payloads that anyone on the broker may have written.

Every JSON payload a node reads goes through :func:`loads_bounded`, so that a
hostile or broken one fails as a :class:`PayloadError` naming what is wrong,
never as a RecursionError (deep nesting), a MemoryError (size) or a
UnicodeDecodeError that the caller did not expect.
"""

from __future__ import annotations

import json
from typing import Any

from meshllm.errors import PayloadError

MAX_PAYLOAD = 1 << 20  # bytes: member records, planner claims and plans are far smaller


def loads_bounded(payload: bytes | bytearray | str, max_bytes: int = MAX_PAYLOAD) -> Any:
    """The JSON value of ``payload``; :class:`PayloadError` if it is larger than ``max_bytes`` or not JSON."""
    if len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(payload)
    except RecursionError:
        raise PayloadError("payload is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise PayloadError(f"payload is not JSON: {_short(str(e))}") from None


def loads_object(payload: bytes | bytearray | str, max_bytes: int = MAX_PAYLOAD) -> dict[str, Any]:
    """Like :func:`loads_bounded`, for a payload that must be a JSON object."""
    value = loads_bounded(payload, max_bytes)
    if not isinstance(value, dict):
        raise PayloadError(f"payload is a JSON {type(value).__name__}, not an object")
    return value


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."
