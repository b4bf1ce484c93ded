"""Persistent outgoing data-plane connections, one per peer, with backpressure.

``send`` encodes a frame and writes it on the peer's connection (opened on
first use), then waits for the socket buffer to drain: a slow peer slows its
sender instead of growing memory. Frames to one peer keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import encode_buffers
from meshllm.errors import MeshError

log = logging.getLogger(__name__)


class PeerUnreachable(MeshError):
    """A peer's data-plane port cannot be reached."""


class _Conn:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.writer: asyncio.StreamWriter | None = None


class PeerLinks:
    """Outgoing connections keyed by (host, port) (async context manager)."""

    def __init__(self, connect_timeout: float = 3.0, key: bytes | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.key = key
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
                if conn.writer is None or conn.writer.is_closing():
                    try:
                        _, conn.writer = await connect(addr[0], addr[1], self.key, self.connect_timeout)
                    except (TimeoutError, OSError, EOFError, MeshError) as e:
                        conn.writer = None
                        raise PeerUnreachable(f"data plane of {addr[0]}:{addr[1]} unreachable: {e}") from None
                try:
                    conn.writer.writelines(buffers)
                    await conn.writer.drain()
                    return
                except (ConnectionError, OSError) as e:
                    with contextlib.suppress(Exception):
                        conn.writer.close()
                    conn.writer = None
                    if attempt:
                        raise PeerUnreachable(f"lost data plane of {addr[0]}:{addr[1]}: {e}") from None
