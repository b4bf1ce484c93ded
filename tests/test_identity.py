"""A node's id belongs to one process: a second node with the same id is refused with a one-line error,
a session taken over anyway is noticed and rejoined, and junk on the node's own topics costs only itself.
Real node processes and real brokers (the embedded one as `meshllm broker`, and Mosquitto)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from meshllm.mesh.broker import BrokerURL
from meshllm.mesh.topics import Topics
from tests.mesh_harness import NodeProc, amqtt_broker, mosquitto, state, wait_until

BROKERS = {"amqtt": amqtt_broker, "mosquitto": mosquitto}


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    with BROKERS[request.param]() as url:
        yield url


@contextlib.contextmanager
def node(mesh: str, node_id: str, broker: str, log_dir: Path) -> Iterator[NodeProc]:
    log_dir.mkdir(exist_ok=True)
    p = NodeProc(mesh, node_id, broker=broker, log_dir=log_dir)
    try:
        p.wait_started()
        yield p
    finally:
        with contextlib.suppress(AssertionError):
            p.stop()


async def _heartbeats(mesh: str, broker: str, node_id: str, seconds: float) -> int:
    """How many heartbeats of ``node_id`` a bystander hears in ``seconds``."""
    b = BrokerURL.parse(broker)
    n = 0
    async with aiomqtt.Client(**b.client_kwargs(None), identifier=f"test-{secrets.token_hex(3)}") as c:
        await c.subscribe(Topics(mesh).heartbeat(node_id))
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(seconds):
                async for _ in c.messages:
                    n += 1
    return n


def heartbeats(mesh: str, broker: str, node_id: str, seconds: float) -> int:
    return asyncio.run(_heartbeats(mesh, broker, node_id, seconds))


def serving(mesh: str, broker: str, node_id: str, seconds: float = 1.0) -> bool:
    """A member, heartbeating all along ``seconds`` (longer than the failure timeout: it stays one)."""
    return heartbeats(mesh, broker, node_id, seconds) >= seconds and node_id in state(mesh, broker)["members"]


async def _impostor(mesh: str, broker: str, node_id: str) -> None:
    """What the second node did before: a clean session with the node's id, then a clean leave that
    clears the node's retained record."""
    b = BrokerURL.parse(broker)
    with contextlib.suppress(aiomqtt.MqttError):  # Mosquitto closes it as soon as the node takes its id back
        async with aiomqtt.Client(**b.client_kwargs(None), identifier=node_id, clean_session=True) as c:
            await asyncio.sleep(1.0)
            await c.publish(Topics(mesh).member(node_id), b"", qos=1, retain=True)
            await asyncio.sleep(0.3)


def test_a_second_node_with_the_same_id_is_refused_and_a_session_taken_over_anyway_is_rejoined(
        broker: str, tmp_path: Path) -> None:
    mesh = f"dup{secrets.token_hex(2)}"
    with node(mesh, "alpha", broker, tmp_path / "first") as first:
        wait_until(lambda: serving(mesh, broker, "alpha"), 15, "the first node to serve")
        (tmp_path / "second").mkdir()
        second = NodeProc(mesh, "alpha", broker=broker, log_dir=tmp_path / "second")
        t = time.monotonic()
        try:
            rc = second.proc.wait(20)
        finally:
            second.kill()
        took = time.monotonic() - t
        err = second.log_path.read_text()
        assert rc == 2, err
        assert "Traceback" not in err, err
        # (an open mesh says so at every start: that warning aside, the refusal is one line)
        lines = [ln for ln in err.splitlines() if ln.strip() and "is OPEN (--open)" not in ln]
        assert len(lines) == 1 and lines[0].startswith("meshllm: error: node id 'alpha' is already in use"), err
        assert took < 15, took
        # the newcomer left: the original is still a member and heartbeating, well past the failure timeout
        assert first.proc.poll() is None
        assert serving(mesh, broker, "alpha", 2.5)

        # a client that skips the check takes the session over (as two nodes started at once could), then
        # leaves clearing the record: the node notices, says so, and is back within a few failure timeouts
        asyncio.run(_impostor(mesh, broker, "alpha"))
        wait_until(lambda: serving(mesh, broker, "alpha"), 15, "the node to rejoin after the takeover")
        assert first.proc.poll() is None
        assert serving(mesh, broker, "alpha", 2.5)
        # the embedded broker leaves the old connection open but deaf; Mosquitto closes it
        log = first.log_path.read_text()
        assert "may have taken over our session" in log or "lost broker" in log, log


def test_of_two_nodes_started_at_once_with_one_id_one_steps_aside_and_the_other_serves(
        broker: str, tmp_path: Path) -> None:
    mesh = f"race{secrets.token_hex(2)}"
    procs = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        procs.append(NodeProc(mesh, "alpha", broker=broker, log_dir=tmp_path / d))
    try:
        wait_until(lambda: any(p.proc.poll() is not None for p in procs), 30, "one of them to step aside")
        gone = next(p for p in procs if p.proc.poll() is not None)
        stays = next(p for p in procs if p is not gone)
        assert gone.proc.wait() == 2
        assert "is already in use" in gone.log_path.read_text()
        wait_until(lambda: serving(mesh, broker, "alpha"), 15, "the other to serve")
        assert serving(mesh, broker, "alpha", 2.5)
        assert stays.proc.poll() is None
    finally:
        for p in procs:
            with contextlib.suppress(AssertionError):
                p.stop()


async def _publish_junk(mesh: str, broker: str, node_id: str) -> None:
    t = Topics(mesh)
    junk = b"[" * 50_000
    b = BrokerURL.parse(broker)
    async with aiomqtt.Client(**b.client_kwargs(None), identifier=f"junk-{secrets.token_hex(3)}") as c:
        for topic in (t.member("x"), t.member(node_id), t.planner, t.plan, t.heartbeat("x"), t.heartbeat(node_id),
                      t.member("y"), t.planner, t.plan):
            await c.publish(topic, junk, qos=1)
        await c.publish(t.plan, b'{"term": "x", "planner": 3}', qos=1)
        await c.publish(t.planner, b"[1, 2]", qos=1)
        await c.publish(t.heartbeat(node_id), b"\xff\xfe", qos=1)


def test_junk_on_the_mesh_topics_costs_only_itself(tmp_path: Path) -> None:
    mesh = f"junk{secrets.token_hex(2)}"
    with amqtt_broker() as broker, node(mesh, "alpha", broker, tmp_path / "a") as n:
        wait_until(lambda: serving(mesh, broker, "alpha"), 15, "the node to serve")
        for _ in range(3):
            asyncio.run(_publish_junk(mesh, broker, "alpha"))
        assert serving(mesh, broker, "alpha", 2.5)
        assert n.proc.poll() is None, n.log_path.read_text()[-3000:]
        log = n.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
