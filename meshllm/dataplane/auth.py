"""Mesh membership proof on data-plane connections: a mutual HMAC challenge.

When a mesh secret is set, every data-plane connection starts with a
handshake before any other frame is read: the client sends a fresh nonce, the
server answers with its own nonce and an HMAC over both (proving it holds the
secret), and the client answers with its HMAC (proving the same). Nonces are
fresh per connection, so a recorded handshake or frame cannot be replayed on
another connection. The handshake authenticates peers; it does not encrypt the
stream (see docs/security.md: use WireGuard or a trusted LAN for secrecy).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from typing import Any

from meshllm.dataplane.codec import encode, read_frame
from meshllm.errors import AuthError
from meshllm.secret import subkey

NONCE_BYTES = 16
HANDSHAKE_TIMEOUT = 5.0
MAX_HANDSHAKE_FRAME = 1024  # bytes; a peer that has not proven membership cannot make a node buffer more


def _mac(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, role + client_nonce + server_nonce, hashlib.sha256).digest()


def secret_key(secret: str) -> bytes:
    """The data plane's HMAC key: stretched from the mesh secret (:mod:`meshllm.secret`)."""
    return subkey(secret, "dataplane")


def _field(msg: dict[str, Any], name: str) -> bytes:
    v = msg.get(name)
    if not isinstance(v, bytes) or len(v) > 64:
        raise AuthError(f"handshake frame lacks a valid {name!r}")
    return v


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes) -> None:
    cn = os.urandom(NONCE_BYTES)
    writer.write(encode({"t": "hello", "nonce": cn}))
    await writer.drain()
    msg = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE_FRAME), HANDSHAKE_TIMEOUT)
    if msg["t"] != "challenge":
        raise AuthError(f"expected a challenge, got {msg['t']!r}")
    sn = _field(msg, "nonce")
    if not hmac.compare_digest(_field(msg, "mac"), _mac(key, b"server", cn, sn)):
        raise AuthError("the peer does not hold the mesh secret")
    writer.write(encode({"t": "auth", "mac": _mac(key, b"client", cn, sn)}))
    await writer.drain()


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes) -> None:
    msg = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE_FRAME), HANDSHAKE_TIMEOUT)
    if msg["t"] != "hello":
        raise AuthError(f"frame {msg['t']!r} before the handshake")
    cn = _field(msg, "nonce")
    if len(cn) != NONCE_BYTES:
        raise AuthError("bad client nonce")
    sn = os.urandom(NONCE_BYTES)
    writer.write(encode({"t": "challenge", "nonce": sn, "mac": _mac(key, b"server", cn, sn)}))
    await writer.drain()
    msg = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE_FRAME), HANDSHAKE_TIMEOUT)
    if msg["t"] != "auth" or not hmac.compare_digest(_field(msg, "mac"), _mac(key, b"client", cn, sn)):
        raise AuthError("the peer does not hold the mesh secret")


async def connect(host: str, port: int, key: bytes | None, timeout: float = 3.0,
                  limit: int = 8 << 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a data-plane connection, authenticated when ``key`` is set."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=limit), timeout)
    if key is not None:
        try:
            await client_handshake(reader, writer, key)
        except BaseException:
            writer.close()
            raise
    return reader, writer
