"""With a mesh secret, data-plane peers must prove membership before any frame is accepted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from meshllm.dataplane.auth import AuthError, connect, secret_key
from meshllm.dataplane.codec import encode, read_frame
from meshllm.dataplane.links import PeerLinks, PeerUnreachable
from meshllm.dataplane.server import DataPlane, probe_link

KEY = secret_key("correct horse battery staple")


async def _server(received: list) -> DataPlane:
    dp = DataPlane("127.0.0.1", key=KEY)

    async def record(msg: dict, writer: object) -> None:
        received.append(msg)

    dp.route("act", record)
    return dp


def test_peer_with_the_secret_is_served() -> None:
    async def go() -> list:
        received: list = []
        async with await _server(received) as dp, PeerLinks(key=KEY) as links:
            link = await probe_link("127.0.0.1", dp.port, key=KEY, bulk_bytes=1 << 16)
            assert link.bandwidth_Bps > 0
            await links.send(("127.0.0.1", dp.port), {"t": "act", "x": np.ones(3, np.float32)})
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.01)
        return received
    assert len(asyncio.run(go())) == 1


def test_peer_without_the_secret_cannot_inject_frames() -> None:
    async def go() -> list:
        received: list = []
        async with await _server(received) as dp:
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)
            writer.write(encode({"t": "act", "x": np.ones(3, np.float32)}))  # no handshake
            await writer.drain()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(read_frame(reader), 3)
            await asyncio.sleep(0.1)
        return received
    assert asyncio.run(go()) == []


def test_wrong_secret_fails_the_handshake_both_ways() -> None:
    async def go() -> list:
        received: list = []
        async with await _server(received) as dp:
            with pytest.raises(AuthError):
                await connect("127.0.0.1", dp.port, secret_key("guess"))
            async with PeerLinks(key=secret_key("guess")) as links:
                with pytest.raises(PeerUnreachable):
                    await links.send(("127.0.0.1", dp.port), {"t": "act", "x": np.ones(3, np.float32)})
        return received
    assert asyncio.run(go()) == []


def test_replayed_handshake_is_refused() -> None:
    """Record a good client's handshake bytes and replay them on a new connection: refused."""
    async def go() -> bool:
        async with DataPlane("127.0.0.1", key=KEY) as dp:
            r, w = await asyncio.open_connection("127.0.0.1", dp.port)
            hello = encode({"t": "hello", "nonce": b"\x01" * 16})
            w.write(hello)
            await w.drain()
            challenge = await read_frame(r)
            # answer with a MAC computed for a different server nonce (as a replay would)
            from meshllm.dataplane.auth import _mac
            w.write(encode({"t": "auth", "mac": _mac(KEY, b"client", b"\x01" * 16, b"\x00" * 16)}))
            w.write(encode({"t": "ping"}))
            await w.drain()
            assert challenge["t"] == "challenge"
            try:
                await asyncio.wait_for(read_frame(r), 3)
            except (asyncio.IncompleteReadError, ConnectionError):
                return True
            return False
    assert asyncio.run(go())
