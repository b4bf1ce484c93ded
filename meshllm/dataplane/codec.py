"""Data-plane frames: msgpack maps with numpy arrays as an extension type. Never pickle.

Wire format of one frame: a 4-byte big-endian length, then that many bytes of
msgpack. A numpy array is msgpack ExtType 1 whose payload is a small header
(dtype code, rank, shape) followed by the raw C-order bytes; decoding wraps the
bytes with ``np.frombuffer`` (no copy beyond msgpack's own). Everything is
validated at the boundary: frame size limit, known dtypes only, shape that
matches the byte count, a map with a string ``t`` (type) field.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from meshllm.errors import MeshError

ARRAY_EXT = 1
MAX_FRAME = 256 << 20  # bytes; a KV block of a 1B model's layer for 8k tokens fits
_LEN = struct.Struct(">I")
_DTYPES = ["float32", "float16", "int64", "int32", "uint8"]
_DTYPE_CODE = {np.dtype(d): i for i, d in enumerate(_DTYPES)}
MAX_RANK = 8


class FrameError(MeshError):
    """A frame is malformed, too large, or of an unknown type."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        code = _DTYPE_CODE.get(obj.dtype)
        if code is None:
            raise FrameError(f"arrays of dtype {obj.dtype} cannot be sent")
        if obj.ndim > MAX_RANK:
            raise FrameError(f"arrays of rank {obj.ndim} cannot be sent")
        head = struct.pack(f">BB{obj.ndim}I", code, obj.ndim, *obj.shape)
        return msgpack.ExtType(ARRAY_EXT, head + np.ascontiguousarray(obj).tobytes())
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise FrameError(f"objects of type {type(obj).__name__} cannot be sent")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise FrameError(f"unknown extension type {code}")
    if len(data) < 2:
        raise FrameError("truncated array header")
    dcode, ndim = data[0], data[1]
    if dcode >= len(_DTYPE_CODE) or ndim > MAX_RANK:
        raise FrameError(f"array of unknown dtype code {dcode} or rank {ndim}")
    off = 2 + 4 * ndim
    if len(data) < off:
        raise FrameError("truncated array shape")
    shape = struct.unpack_from(f">{ndim}I", data, 2)
    dtype = np.dtype(_DTYPES[dcode])
    expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - off != expect:
        raise FrameError(f"array of shape {shape} {dtype} needs {expect} bytes, frame has {len(data) - off}")
    return np.frombuffer(data, dtype, offset=off).reshape(shape)


def encode(msg: dict[str, Any]) -> bytes:
    """One frame (length prefix included)."""
    body = msgpack.packb(msg, default=_default, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"malformed frame: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError("a frame must be a map with a string field 't'")
    return msg


def frame_length(prefix: bytes) -> int:
    (n,) = _LEN.unpack(prefix)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes announced, limit is {MAX_FRAME}")
    return int(n)


async def read_frame(reader: Any) -> dict[str, Any]:
    """Reads one frame from an asyncio StreamReader (raises IncompleteReadError at EOF)."""
    n = frame_length(await reader.readexactly(4))
    return decode_body(await reader.readexactly(n))
