"""Persistent outgoing data-plane connections, one per peer, with backpressure.

``send`` encodes a frame and writes it on the peer's connection (opened on
first use), then waits for the socket buffer to drain: a slow peer slows its
sender instead of growing memory. Frames to one peer keep their order.

The receiving node closes a connection that sent nothing for its idle timeout
(see :mod:`meshllm.dataplane.server`). A write on a connection the peer has
closed may be accepted by the kernel and lost, so a connection is never
reused once the peer's close has arrived, nor after ``reuse_idle_s`` without
use (well inside the peer's timeout): ``send`` opens a fresh one instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import encode_buffers
from meshllm.dataplane.server import IDLE_TIMEOUT
from meshllm.errors import MeshError, PeerUnreachable

log = logging.getLogger(__name__)


class _Conn:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0  # monotonic time of the last frame sent

    def usable(self, now: float, reuse_idle_s: float) -> bool:
        """Whether the open connection can take a frame: not closing, not closed by the peer (its EOF
        arrived: the peer never writes on these connections), and not idle long enough for the peer
        to be closing it."""
        return (self.writer is not None and not self.writer.is_closing() and self.reader is not None
                and not self.reader.at_eof() and now - self.used < reuse_idle_s)

    def drop(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.reader = self.writer = None


class PeerLinks:
    """Outgoing connections keyed by (host, port) (async context manager)."""

    def __init__(self, connect_timeout: float = 3.0, key: bytes | None = None,
                 reuse_idle_s: float = IDLE_TIMEOUT / 2) -> None:
        self.connect_timeout = connect_timeout
        self.key = key
        self.reuse_idle_s = reuse_idle_s
        self._conns: dict[tuple[str, int], _Conn] = {}

    async def __aenter__(self) -> PeerLinks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self._conns.values():
            if c.writer is not None:
                c.writer.close()
        self._conns.clear()

    async def send(self, addr: tuple[str, int], frame: dict[str, Any]) -> None:
        buffers = encode_buffers(frame)
        conn = self._conns.setdefault(addr, _Conn())
        async with conn.lock:
            for attempt in (0, 1):  # one reconnect if the cached connection went stale
                if not conn.usable(time.monotonic(), self.reuse_idle_s):
                    conn.drop()
                    try:
                        conn.reader, conn.writer = await connect(addr[0], addr[1], self.key, self.connect_timeout)
                    except (TimeoutError, OSError, EOFError, MeshError) as e:
                        conn.drop()
                        raise PeerUnreachable(f"data plane of {addr[0]}:{addr[1]} unreachable: {e}") from None
                assert conn.writer is not None
                try:
                    conn.writer.writelines(buffers)
                    await conn.writer.drain()
                    conn.used = time.monotonic()
                    return
                except (ConnectionError, OSError) as e:
                    conn.drop()
                    if attempt:
                        raise PeerUnreachable(f"lost data plane of {addr[0]}:{addr[1]}: {e}") from None
