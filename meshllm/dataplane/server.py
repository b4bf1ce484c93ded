"""The data-plane endpoint of a node: a TCP server speaking codec frames.

For the mesh it answers probes (round-trip time and bandwidth between peers);
serving adds its own frame types through :meth:`DataPlane.route`. One
connection per peer, frames handled in order; a malformed frame closes that
connection and nothing else. Connections are limited per peer address and in
all (a peer keeps one for frames, and briefly opens others for probes and file
fetches); one beyond a limit is closed at once, with a warning.

A connection is *pending* until it has proven itself: the handshake of a mesh
with a secret, within ``PENDING_TIMEOUT``; on an open mesh, its first whole
frame, pausing no longer than that. Pending connections have their own small allowance per
address, and a new one beyond it closes that address's oldest pending one, so
a stranger holding idle unauthenticated connections can take neither the slots
of the real peers behind the same address nor their way in. A proven
connection that sends nothing for ``idle_timeout`` is closed (the sender,
:class:`~meshllm.dataplane.links.PeerLinks`, reopens one transparently).
Everything a stranger can trigger is logged through a per-address rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from meshllm.dataplane.auth import HANDSHAKE_TIMEOUT, connect, server_handshake
from meshllm.dataplane.codec import FrameError, decode_body, encode, frame_length, read_frame
from meshllm.errors import ConfigError
from meshllm.logs import RateLimitedLog
from meshllm.profile import Link

log = logging.getLogger(__name__)

# Reader buffer: large frames (KV blocks) arrive in few wake-ups instead of 64 KiB at a time.
STREAM_LIMIT = 8 << 20
MAX_CONNS_PER_PEER = 32  # open connections from one IP address (every node of a loopback test mesh shares one)
MAX_CONNS = 256  # open connections in all
MAX_PENDING_PER_PEER = 8  # connections from one IP address that have not proven themselves yet
PENDING_TIMEOUT = 2 * HANDSHAKE_TIMEOUT  # seconds for a new connection to prove itself
IDLE_TIMEOUT = 120.0  # seconds a proven connection may send nothing before it is closed
_BODY_AT_ONCE = 1 << 20  # frames up to this size are read in one go; larger ones chunk by chunk

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


class DataPlane:
    """TCP server on ``host:port`` (async context manager)."""

    def __init__(self, host: str, port: int = 0, *, delay_s: float = 0.0, key: bytes | None = None,
                 max_conns: int = MAX_CONNS, max_conns_per_peer: int = MAX_CONNS_PER_PEER,
                 max_pending_per_peer: int = MAX_PENDING_PER_PEER, pending_timeout: float = PENDING_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.host, self.port = host, port
        self.key = key  # mesh secret's HMAC key: connections must pass the handshake first
        self._rlog = RateLimitedLog(log)  # this server's log budget, keyed by the peer's address
        self.delay_s = delay_s  # emulated one-way link delay, applied to every reply
        self.max_conns, self.max_conns_per_peer = max_conns, max_conns_per_peer
        self.max_pending_per_peer, self.pending_timeout = max_pending_per_peer, pending_timeout
        self.idle_timeout = idle_timeout
        self._handlers: dict[str, Handler] = {"ping": self._ping}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._per_peer: Counter[str] = Counter()  # proven connections by peer IP address
        # pending connections by peer IP address, oldest first
        self._pending: dict[str, OrderedDict[asyncio.StreamWriter, None]] = {}
        self.refused = 0  # connections closed at once for being over a limit
        self.evicted = 0  # pending connections closed to make room for a newer one from the same address

    def route(self, frame_type: str, handler: Handler) -> None:
        self._handlers[frame_type] = handler

    async def __aenter__(self) -> DataPlane:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=STREAM_LIMIT)
        except OSError as e:  # a port in use, an address not of this host: the operator's to fix, in one line
            raise ConfigError(f"the data plane cannot listen on {self.host}:{self.port}: {e.strerror or e} "
                              "(pick another --port, or 0 for any free one)") from None
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
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if len(self._writers) >= self.max_conns:
            self._refuse(writer, peer, host)
            return
        pending = self._pending.setdefault(host, OrderedDict())
        if len(pending) >= self.max_pending_per_peer:
            oldest, _ = pending.popitem(last=False)
            self.evicted += 1
            self._rlog.warning(host, "closing the oldest of %d unproven data-plane connections from %s to admit a "
                               "new one", len(pending) + 1, host)
            oldest.close()
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        pending[writer] = None
        proven = False
        kind = None
        try:
            if self.key is not None:
                async with asyncio.timeout(self.pending_timeout):
                    await server_handshake(reader, writer, self.key)
                msg = None
            else:  # an open mesh: a whole first frame is all the proof there is (a large one may take long,
                # as long as its bytes keep coming: a pending connection can be closed for a newer one anyway)
                msg = await _read_frame(reader, self.pending_timeout)
            self._forget_pending(host, writer)
            if self._per_peer[host] >= self.max_conns_per_peer:
                self._refuse(writer, peer, host)
                return
            self._per_peer[host] += 1
            proven = True
            while True:
                if msg is None:
                    msg = await _read_frame(reader, self.idle_timeout)
                kind = msg["t"]
                handler = self._handlers.get(kind)
                if handler is None:
                    raise FrameError(f"unknown frame type {_short(kind)}")
                await handler(msg, writer)
                msg = None
        except TimeoutError:
            log.debug("closing data-plane connection from %s: %s", peer,
                      "idle" if proven else "it did not prove itself in time")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except FrameError as e:
            self._rlog.warning(host, "closing data-plane connection from %s: %s", peer, e)
        except Exception:  # a handler's bug: it costs this connection, never the node
            self._rlog.exception(host, "closing data-plane connection from %s: handling a %s frame failed", peer,
                           _short(kind))
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            self._forget_pending(host, writer)
            if proven:
                self._per_peer[host] -= 1
                if not self._per_peer[host]:
                    del self._per_peer[host]
            writer.close()

    def _forget_pending(self, host: str, writer: asyncio.StreamWriter) -> None:
        pending = self._pending.get(host)
        if pending is not None:
            pending.pop(writer, None)
            if not pending:
                del self._pending[host]

    def _refuse(self, writer: asyncio.StreamWriter, peer: object, host: str) -> None:
        self.refused += 1
        self._rlog.warning(host, "refusing data-plane connection from %s: %d open from %s and %d in all "
                           "(limits %d and %d)", peer, self._per_peer[host], host, len(self._writers),
                           self.max_conns_per_peer, self.max_conns)
        writer.close()

    async def _ping(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if self.delay_s:
            await asyncio.sleep(2 * self.delay_s)
        pad = msg.get("pad")
        writer.write(encode({"t": "pong", "n": int(pad.nbytes) if isinstance(pad, np.ndarray) else 0}))
        await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, idle: float) -> dict[str, Any]:
    """The next frame, waiting at most ``idle`` seconds for each piece of it (a large frame may take longer
    in all, as long as its bytes keep coming)."""
    async with asyncio.timeout(idle):
        n = frame_length(await reader.readexactly(4))
    if n <= _BODY_AT_ONCE:
        async with asyncio.timeout(idle):
            return decode_body(await reader.readexactly(n))
    body = bytearray(n)
    view, got = memoryview(body), 0
    while got < n:
        async with asyncio.timeout(idle):
            chunk = await reader.read(n - got)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(view[:got]), n)
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return decode_body(body)


def _short(text: object, n: int = 40) -> str:
    """A peer-chosen string for a log line: quoted and cut, so that a peer cannot flood the log."""
    r = repr(text)
    return r if len(r) <= n else r[:n] + "..."


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
