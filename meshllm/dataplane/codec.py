"""Data-plane frames: a msgpack map with numpy arrays as an extension type. Never pickle.

Wire format of one frame::

    u32 total length (big-endian, everything after this field)
    u32 header length H
    H bytes   msgpack map; each numpy array in it is ExtType 1 carrying
              (dtype code, rank, shape..., byte length) of that array
    ...       the arrays' raw C-order bytes, in the order they appear in the header

Keeping the array bytes out of the msgpack body makes both directions
zero-copy: encoding returns the header plus memoryviews of the arrays (for
``writer.writelines``), and decoding wraps slices of the received buffer with
``np.frombuffer``. Everything is validated at the boundary: a frame size limit,
known dtypes only, shapes that match the byte counts, array bytes that add up
exactly to the frame, and a map with a string ``t`` (type) field.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from meshllm.errors import FrameError

ARRAY_EXT = 1
MAX_FRAME = 256 << 20  # bytes; a KV block of a 1B model's layer for 8k tokens fits
MAX_HEADER = 1 << 20
MAX_RANK = 8
_U32 = struct.Struct(">I")
_DTYPES = ["float32", "float16", "int64", "int32", "uint8"]
_DTYPE_CODE = {np.dtype(d): i for i, d in enumerate(_DTYPES)}


def encode_buffers(msg: dict[str, Any]) -> list[bytes | memoryview]:
    """One frame as a list of buffers (length prefixes, header, array bytes); the arrays are not copied."""
    arrays: list[np.ndarray] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            code = _DTYPE_CODE.get(obj.dtype)
            if code is None:
                raise FrameError(f"arrays of dtype {obj.dtype} cannot be sent")
            if obj.ndim > MAX_RANK:
                raise FrameError(f"arrays of rank {obj.ndim} cannot be sent")
            arr = np.ascontiguousarray(obj)
            arrays.append(arr)
            return msgpack.ExtType(ARRAY_EXT, struct.pack(f">BB{arr.ndim}IQ", code, arr.ndim, *arr.shape, arr.nbytes))
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        raise FrameError(f"objects of type {type(obj).__name__} cannot be sent")

    try:
        header = msgpack.packb(msg, default=default, use_bin_type=True)
    except FrameError:
        raise
    except (OverflowError, TypeError, ValueError) as e:  # an integer beyond 64 bits, a non-string key, ...
        raise FrameError(f"frame cannot be encoded: {type(e).__name__}: {e}") from None
    total = 4 + len(header) + sum(a.nbytes for a in arrays)
    if total > MAX_FRAME:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {MAX_FRAME}")
    return [_U32.pack(total) + _U32.pack(len(header)) + header,
            *(memoryview(a).cast("B") for a in arrays if a.nbytes)]


def encode(msg: dict[str, Any]) -> bytes:
    """One frame as a single bytes object (length prefix included)."""
    return b"".join(encode_buffers(msg))


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decodes a frame without its leading total-length field; arrays are views of ``body``."""
    view = memoryview(body)
    if len(view) < 4:
        raise FrameError("truncated frame header")
    (hlen,) = _U32.unpack_from(view, 0)
    if hlen > MAX_HEADER or 4 + hlen > len(view):
        raise FrameError(f"frame header of {hlen} bytes does not fit a frame of {len(view)} bytes")
    offset = 4 + hlen

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal offset
        if code != ARRAY_EXT:
            raise FrameError(f"unknown extension type {code}")
        if len(data) < 2:
            raise FrameError("truncated array descriptor")
        dcode, ndim = data[0], data[1]
        if dcode >= len(_DTYPES) or ndim > MAX_RANK or len(data) != 2 + 4 * ndim + 8:
            raise FrameError(f"bad array descriptor (dtype code {dcode}, rank {ndim})")
        *shape, nbytes = struct.unpack_from(f">{ndim}IQ", data, 2)
        dtype = np.dtype(_DTYPES[dcode])
        expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expect:
            raise FrameError(f"array of shape {tuple(shape)} {dtype} needs {expect} bytes, descriptor says {nbytes}")
        if offset + nbytes > len(view):
            raise FrameError("array bytes run past the end of the frame")
        arr = np.frombuffer(view, dtype, count=expect // dtype.itemsize, offset=offset).reshape(shape)
        offset += nbytes
        return arr

    try:
        msg = msgpack.unpackb(view[4:4 + hlen], ext_hook=ext_hook, raw=False, strict_map_key=True)
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"malformed frame: {type(e).__name__}: {e}") from None
    if offset != len(view):
        raise FrameError(f"frame has {len(view) - offset} bytes beyond its arrays")
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError("a frame must be a map with a string field 't'")
    return msg


def frame_length(prefix: bytes, limit: int = MAX_FRAME) -> int:
    (n,) = _U32.unpack(prefix)
    if n > limit:
        raise FrameError(f"frame of {n} bytes announced, limit is {limit}")
    return int(n)


async def read_frame(reader: Any, limit: int = MAX_FRAME) -> dict[str, Any]:
    """Reads one frame of at most ``limit`` bytes from an asyncio StreamReader (IncompleteReadError at EOF)."""
    n = frame_length(await reader.readexactly(4), limit)
    return decode_body(await reader.readexactly(n))
