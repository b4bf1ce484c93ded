"""A node's outbox: replies and journal writes, published to the broker in order by one task.

Decode steps queue their replies here and go on (they never wait for a PUBACK); one task publishes the queue
in order, so a journal write queued after a request's replies is never seen before them. Backpressure past the
bound: a full queue makes its writers wait. While the broker is away (a restart, a move to another broker) the
task holds the queue for a while rather than drop replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

log = logging.getLogger(__name__)

BOUND = 10_000  # messages queued; beyond, writers wait
HOLD_S = 30.0  # how long a message waits for a broker session before it is dropped


class Broker(Protocol):
    """What the outbox needs of its node: publishing on the current session, and knowing when there is one."""

    node_id: str
    connected: asyncio.Event

    def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False) -> Awaitable[bool]: ...


class Outbox:
    def __init__(self, broker: Broker, bound: int = BOUND) -> None:
        self._broker = broker
        self._queue: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue(bound)

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queues a reply; the outbox's task publishes them in order, so decode steps never wait for a PUBACK."""
        await self._queue.put((topic, json.dumps(payload), False))

    async def publish_retained(self, topic: str, data: str) -> None:
        """Queues a retained write ('' clears) behind the replies already queued (journal progress)."""
        await self._queue.put((topic, data, True))

    async def run(self, hold_s: float = HOLD_S) -> None:
        """Publishes the queue in order; while the broker is away it holds the queue up to ``hold_s`` rather
        than drop replies."""
        broker = self._broker
        while True:
            topic, data, retain = await self._queue.get()
            deadline = time.monotonic() + hold_s
            while not await broker.publish(topic, data, qos=1, retain=retain):
                if time.monotonic() > deadline:
                    log.warning("%s: dropped a message to %s: no broker session for %g s", broker.node_id, topic,
                                hold_s)
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await broker.connected.wait()
                await asyncio.sleep(0.05)
