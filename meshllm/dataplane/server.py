"""The data-plane endpoint of a node: a TCP server speaking codec frames.

For the mesh it answers probes (round-trip time and bandwidth between peers);
serving adds its own frame types through :meth:`DataPlane.route`. One
connection per peer, frames handled in order; a malformed frame closes that
connection and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from typing import Any, Awaitable, Callable

from meshllm.dataplane.auth import connect, server_handshake
from meshllm.dataplane.codec import FrameError, encode, read_frame
from meshllm.profile import Link

log = logging.getLogger(__name__)

# Reader buffer: large frames (KV blocks) arrive in few wake-ups instead of 64 KiB at a time.
STREAM_LIMIT = 8 << 20

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


class DataPlane:
    """TCP server on ``host:port`` (async context manager)."""

    def __init__(self, host: str, port: int = 0, *, delay_s: float = 0.0, key: bytes | None = None) -> None:
        self.host, self.port = host, port
        self.key = key  # mesh secret's HMAC key: connections must pass the handshake first
        self.delay_s = delay_s  # emulated one-way link delay, applied to every reply
        self._handlers: dict[str, Handler] = {"ping": self._ping}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def route(self, frame_type: str, handler: Handler) -> None:
        self._handlers[frame_type] = handler

    async def __aenter__(self) -> DataPlane:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):  # closing the sockets ends each connection's loop by itself
            w.close()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        try:
            if self.key is not None:
                await server_handshake(reader, writer, self.key)
            while True:
                msg = await read_frame(reader)
                handler = self._handlers.get(msg["t"])
                if handler is None:
                    raise FrameError(f"unknown frame type {msg['t']!r}")
                await handler(msg, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except FrameError as e:
            log.warning("closing data-plane connection from %s: %s", peer, e)
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _ping(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if self.delay_s:
            await asyncio.sleep(2 * self.delay_s)
        pad = msg.get("pad")
        writer.write(encode({"t": "pong", "n": int(pad.nbytes) if isinstance(pad, np.ndarray) else 0}))
        await writer.drain()


async def probe_link(host: str, port: int, *, bulk_bytes: int = 1 << 20, timeout: float = 5.0,
                     key: bytes | None = None) -> Link:
    """Measures round-trip latency (small pings) and bandwidth (one bulk ping) to a peer."""
    reader, writer = await connect(host, port, key, timeout)
    try:
        async def ping(pad: np.ndarray) -> float:
            t = time.perf_counter()
            writer.write(encode({"t": "ping", "pad": pad}))
            await writer.drain()
            reply = await asyncio.wait_for(read_frame(reader), timeout)
            if reply.get("t") != "pong":
                raise FrameError(f"unexpected reply {reply.get('t')!r} to a ping")
            return time.perf_counter() - t

        rtt = min([await ping(np.zeros(0, np.uint8)) for _ in range(5)])
        bulk = await ping(np.zeros(bulk_bytes, np.uint8))  # array bytes travel out of band, like KV blocks
        return Link(latency_s=rtt / 2, bandwidth_Bps=bulk_bytes / max(bulk - rtt, 1e-6))
    finally:
        writer.close()
