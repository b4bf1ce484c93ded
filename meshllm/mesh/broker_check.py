"""Before a node logs in at a broker that a peer advertises, the peer proves it runs that broker, now.

mDNS records are signed with the mesh secret, but a signed record can be
captured and announced again after its node is gone: a stranger who then
listens on the old broker port would collect the node login. So a hosted
broker seen over mDNS is only a lead. The node asks the advertising peer over
the data plane, whose handshake proves the peer holds the secret on this very
connection, which broker it hosts; the answer carries a MAC over the asker's
fresh nonce, the URL and the broker's epoch (drawn at each broker start), so it
can be neither replayed nor altered on the way. The node then logs in with a
one-time token bound to that epoch (:func:`meshllm.mesh.access.node_token`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Any

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import encode, read_frame
from meshllm.errors import MeshError
from meshllm.mesh.access import broker_proof

log = logging.getLogger(__name__)

QUERY, ANSWER = "broker?", "broker"
NONCE_BYTES = 16
TIMEOUT_S = 2.0


async def answer(key: bytes | None, hosted: tuple[str, str] | None, msg: dict[str, Any],
                 writer: asyncio.StreamWriter) -> None:
    """Data-plane handler of ``broker?``: the (url, epoch) this node hosts, or empty strings."""
    nonce = msg.get("nonce")
    if key is None or not isinstance(nonce, bytes) or not NONCE_BYTES <= len(nonce) <= 64:
        return
    url, epoch = hosted or ("", "")
    writer.write(encode({"t": ANSWER, "url": url, "epoch": epoch, "mac": broker_proof(key, nonce, url, epoch)}))
    await writer.drain()


async def confirmed_epoch(key: bytes, host: str, port: int, url: str) -> str | None:
    """The epoch of the broker at ``url`` if the node at ``host:port`` proves now that it hosts it, else None."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        reader, writer = await connect(host, port, key, TIMEOUT_S)
        try:
            writer.write(encode({"t": QUERY, "nonce": nonce}))
            await writer.drain()
            reply = await asyncio.wait_for(read_frame(reader, 4096), TIMEOUT_S)
        finally:
            writer.close()
    except (OSError, EOFError, TimeoutError, MeshError) as e:
        log.debug("broker check at %s:%d failed: %s", host, port, e)
        return None
    got_url, epoch, mac = reply.get("url"), reply.get("epoch"), reply.get("mac")
    if not (isinstance(got_url, str) and isinstance(epoch, str) and isinstance(mac, bytes)):
        return None
    if not hmac.compare_digest(mac, broker_proof(key, nonce, got_url, epoch)) or got_url != url or not epoch:
        return None
    return epoch


async def holds_secret(key: bytes, host: str, port: int) -> bool:
    """Whether a live node at ``host:port`` proves it holds the mesh secret (an open port proves nothing)."""
    try:
        _, writer = await connect(host, port, key, TIMEOUT_S)
    except (OSError, EOFError, TimeoutError, MeshError):
        return False
    writer.close()
    return True
