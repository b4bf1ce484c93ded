"""Resource limits of the data plane, over real sockets: connections per peer and in all, handshake
frame size, and a handler's bug costing only its own connection."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from meshllm.dataplane import codec
from meshllm.dataplane.auth import HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_FRAME, connect, secret_key
from meshllm.dataplane.codec import FrameError, encode, read_frame
from meshllm.dataplane.server import DataPlane

KEY = secret_key("limits")


async def _open(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _answers_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True if the node answers a ping on this connection, False if it closed it."""
    try:
        writer.write(encode({"t": "ping"}))
        await writer.drain()
        return (await asyncio.wait_for(read_frame(reader), 3))["t"] == "pong"
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


async def _until(cond: Any, what: str, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_connections_beyond_the_per_peer_and_total_limits_are_closed_at_once(caplog) -> None:
    async def go() -> None:
        async with DataPlane("127.0.0.1", max_conns=3, max_conns_per_peer=2) as dp:
            a1, a2, a3 = [await _open(dp.port) for _ in range(3)]
            assert await _answers_ping(*a1) and await _answers_ping(*a2)
            assert not await _answers_ping(*a3)  # a third from 127.0.0.1
            b1 = await _open(dp.port, "127.0.0.2")  # another address has its own allowance...
            assert await _answers_ping(*b1)
            c1 = await _open(dp.port, "127.0.0.3")  # ...until the total is reached
            assert not await _answers_ping(*c1)
            assert dp.refused == 2
            a1[1].close()  # a closed connection frees its place
            await _until(lambda: dp._per_peer["127.0.0.1"] == 1, "the server to see the close")
            a4 = await _open(dp.port)
            assert await _answers_ping(*a4) and await _answers_ping(*a2)
            for _, w in (a2, a3, b1, c1, a4):
                w.close()
            await _until(lambda: not dp._per_peer, "every connection to be closed")
    asyncio.run(go())
    assert "refusing data-plane connection from ('127.0.0.1'" in caplog.text
    assert "limits 2 and 3" in caplog.text


def test_a_peer_that_has_not_authenticated_cannot_announce_a_large_frame() -> None:
    """Before the handshake a frame may be at most MAX_HANDSHAKE_FRAME bytes: the node does not wait for
    (and buffer) the megabytes a stranger announces, it closes at once."""
    async def go() -> float:
        async with DataPlane("127.0.0.1", key=KEY) as dp:
            reader, writer = await _open(dp.port)
            writer.write(struct.pack(">I", MAX_HANDSHAKE_FRAME + 1) + b"\0" * 100)
            await writer.drain()
            t = asyncio.get_running_loop().time()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(read_frame(reader), HANDSHAKE_TIMEOUT + 2)
            writer.close()
            reader, writer = await connect("127.0.0.1", dp.port, KEY)  # members still get in
            assert await _answers_ping(reader, writer)
            writer.close()
            return asyncio.get_running_loop().time() - t
    assert asyncio.run(go()) < HANDSHAKE_TIMEOUT / 2


def test_a_handler_bug_closes_only_its_connection(caplog) -> None:
    async def go() -> None:
        async with DataPlane("127.0.0.1") as dp:
            async def buggy(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
                raise KeyError(msg["missing"])
            dp.route("buggy", buggy)
            r1, w1 = await _open(dp.port)
            r2, w2 = await _open(dp.port)
            w1.write(encode({"t": "buggy"}))
            assert not await _answers_ping(r1, w1)
            assert await _answers_ping(r2, w2)
            w1.close()
            w2.close()
    asyncio.run(go())
    assert "handling a 'buggy' frame failed" in caplog.text


def test_unknown_frame_types_are_logged_cut_short(caplog) -> None:
    async def go() -> None:
        async with DataPlane("127.0.0.1") as dp:
            r, w = await _open(dp.port)
            w.write(encode({"t": "x" * 100_000}))
            assert not await _answers_ping(r, w)
            w.close()
    asyncio.run(go())
    line = next(rec.getMessage() for rec in caplog.records if "unknown frame type" in rec.getMessage())
    assert len(line) < 200, line


@pytest.mark.parametrize("msg", [{"t": "x", "n": 2**64}, {"t": "x", "s": "\ud800"}, {"t": "x", "o": object()}])
def test_values_a_frame_cannot_carry_are_frame_errors(msg: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        codec.encode(msg)
