"""Model files from a peer: a node that lacks the files of its stage fetches exactly those.

The server side answers ``fetch`` frames for files listed in its manifest (and
nothing else: no paths outside the model directory) with ``chunk`` frames and a
final ``eof``. The client side writes ``<file>.part``, resumes from its size
after an interruption, checks size and sha256 against the manifest, and only
then renames it into place.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import FrameError, encode_buffers, read_frame
from meshllm.errors import ManifestError
from meshllm.model.manifest import MANIFEST_NAME, Manifest, sha256_file

log = logging.getLogger(__name__)

CHUNK = 4 << 20


async def serve_fetch(model_dir: Path, manifest: Manifest | None, msg: dict[str, Any],
                      writer: asyncio.StreamWriter) -> None:
    """Streams one file (from ``offset``) to the requesting peer."""
    name, offset = msg.get("file"), msg.get("offset", 0)
    allowed = set(manifest.files) | {MANIFEST_NAME} if manifest is not None else set()
    if not isinstance(name, str) or name not in allowed or not isinstance(offset, int) or offset < 0:
        writer.writelines(encode_buffers({"t": "eof", "file": str(name), "error": "no such file"}))
        await writer.drain()
        return
    path = model_dir / name
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(min(offset, size))
        pos = min(offset, size)
        while pos < size:
            data = f.read(CHUNK)
            writer.writelines(encode_buffers({"t": "chunk", "file": name, "offset": pos,
                                              "data": np.frombuffer(data, np.uint8)}))
            await writer.drain()
            pos += len(data)
    writer.writelines(encode_buffers({"t": "eof", "file": name, "size": size}))
    await writer.drain()


async def fetch_file(host: str, port: int, model_dir: Path, name: str, *, sha256: str | None,
                     size: int | None, timeout: float = 30.0, key: bytes | None = None) -> None:
    """Fetches ``name`` into ``model_dir`` from a peer, resuming a ``.part`` file; verifies before use."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ManifestError(f"refusing to fetch a file outside the model directory: {name!r}")
    dest = model_dir / name
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    reader, writer = await connect(host, port, key, timeout)
    try:
        writer.writelines(encode_buffers({"t": "fetch", "file": name, "offset": offset}))
        await writer.drain()
        with open(part, "ab") as out:
            while True:
                msg = await asyncio.wait_for(read_frame(reader), timeout)
                if msg["t"] == "eof":
                    if "error" in msg:
                        raise ManifestError(f"peer {host}:{port} cannot serve {name}: {msg['error']}")
                    break
                if msg["t"] != "chunk" or msg.get("file") != name or msg.get("offset") != out.tell():
                    raise FrameError(f"unexpected frame while fetching {name}")
                data = msg["data"]
                if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
                    raise FrameError("chunk data must be bytes")
                out.write(data.tobytes())
                if size is not None and out.tell() > size:
                    break
    finally:
        writer.close()
    got = part.stat().st_size
    if size is not None and got != size:
        if got > size:
            part.unlink()
        raise ManifestError(f"fetched {name} has {got} bytes, manifest says {size}")
    if sha256 is not None and sha256_file(part) != sha256:
        part.unlink()
        raise ManifestError(f"fetched {name} does not match its manifest hash; discarded")
    part.replace(dest)
    log.info("fetched %s (%d bytes) from %s:%d", name, got, host, port)


def missing_files(model_dir: Path, manifest: Manifest, files: list[str]) -> list[str]:
    """Files of ``files`` that are absent or of the wrong size (hashes are checked at load)."""
    out = []
    for f in files:
        p = model_dir / f
        if not p.is_file() or p.stat().st_size != manifest.files[f].size:
            out.append(f)
    return out
