"""Model files from a peer: a node that lacks the files of its stage fetches exactly those.

The server side answers ``fetch`` frames for files listed in its manifest (and
nothing else) with ``chunk`` frames and a final ``eof``. The client side writes
``<file>.part``, resumes from its size after an interruption, checks size and
sha256 against the manifest, and only then renames it into place. Both sides
confine every path to the model directory (:func:`confined_path`), whatever the
manifest says: a manifest may come from a hostile peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import FrameError, encode_buffers, read_frame
from meshllm.errors import ManifestError
from meshllm.model.manifest import MANIFEST_NAME, Manifest, check_file_name, sha256_file

log = logging.getLogger(__name__)

CHUNK = 4 << 20


def confined_path(model_dir: Path, name: str) -> Path:
    """``model_dir / name`` resolved, if ``name`` is a safe manifest name and the path (after following
    any symlink) lies inside ``model_dir``; else a :class:`ManifestError`."""
    check_file_name(name, str(model_dir))
    root = model_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ManifestError(f"{model_dir}: file {name!r} leads outside the model directory (a symlink?); refused")
    return path


async def serve_fetch(model_dir: Path, manifest: Manifest | None, msg: dict[str, Any],
                      writer: asyncio.StreamWriter, withheld: Container[str] = ()) -> None:
    """Streams one file (from ``offset``) to the requesting peer: only a file the manifest lists, that lies
    inside ``model_dir`` and is not ``withheld`` (found corrupt here)."""
    name, offset = msg.get("file"), msg.get("offset", 0)
    allowed = set(manifest.files) | {MANIFEST_NAME} if manifest is not None else set()
    path: Path | None = None
    if isinstance(name, str) and name in allowed and name not in withheld and isinstance(offset, int) and offset >= 0:
        try:
            path = confined_path(model_dir, name)
        except ManifestError as e:
            log.warning("fetch of %r refused: %s", name, e)
    if path is None or not path.is_file():
        writer.writelines(encode_buffers({"t": "eof", "file": str(name)[:200], "error": "no such file"}))
        await writer.drain()
        return
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
    dest = confined_path(model_dir, name)
    part = confined_path(model_dir, name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
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
