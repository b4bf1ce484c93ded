"""The embedded broker stops promptly and quietly, whatever its clients are doing (issue 18, item 3).

A real amqtt broker on loopback with real clients: a process of busy aiomqtt clients that freezes (SIGSTOP, as a
node stalled on a loaded machine: amqtt 0.12.1 then waited for it, over 5 s, and the old code logged "shutdown
took over 5 s; leaving it"), well-behaved aiomqtt clients, a raw TCP client that subscribes to everything and
then never reads, a client that connects and never says CONNECT, and clients that keep connecting. Leaving the broker's context must take well under a second, log nothing at
WARNING or above, hand nothing to the loop's exception handler, leave no amqtt task behind and free the port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time

import aiomqtt
import pytest

from meshllm.mesh.broker import EmbeddedBroker


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def _utf8(s: str) -> bytes:
    return len(s).to_bytes(2, "big") + s.encode()


def _stalled_subscriber(port: int) -> socket.socket:
    """A client that subscribes to '#' and then never reads: the broker's writes to it pile up."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # CONNECT: protocol MQTT 3.1.1, clean session, no keep-alive (the broker never drops it for silence)
    s.sendall(_packet(0x10, _utf8("MQTT") + bytes([4, 0x02, 0, 0]) + _utf8("stalled")))
    s.sendall(_packet(0x82, (1).to_bytes(2, "big") + _utf8("#") + bytes([0])))
    return s


# four nodes' worth of MQTT traffic: retained records with wills, QoS 1 subscriptions and publishes
_BUSY_CLIENTS = """
import asyncio, sys, aiomqtt
async def one(port, i):
    will = aiomqtt.Will(f"meshllm/v1/m/members/n{i}", b"", retain=True)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"n{i}", will=will, keepalive=2) as c:
        await c.subscribe("meshllm/v1/m/#", qos=1)
        await c.publish(f"meshllm/v1/m/members/n{i}", b"x" * 100, retain=True, qos=1)
        print("up", flush=True)
        while True:
            await c.publish(f"meshllm/v1/m/stats/n{i}", b"y" * 1000, qos=1)
            await asyncio.sleep(0.01)
async def main():
    await asyncio.gather(*(one(int(sys.argv[1]), i) for i in range(4)))
asyncio.run(main())
"""


async def test_broker_stops_within_a_second_quietly_when_its_clients_freeze(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    handed: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: handed.append(ctx))
    caplog.set_level(logging.DEBUG)
    broker = EmbeddedBroker("127.0.0.1")
    async with broker:
        proc = subprocess.Popen([sys.executable, "-c", _BUSY_CLIENTS, str(broker.port)], stdout=subprocess.PIPE,
                                text=True)
        try:
            for _ in range(4):
                assert await loop.run_in_executor(None, proc.stdout.readline) == "up\n"  # type: ignore[union-attr]
            await asyncio.sleep(0.5)  # traffic flows
            proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            await broker.__aexit__(None, None, None)
            took = time.monotonic() - t0
            broker._broker = None
        finally:
            proc.kill()
            proc.wait()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert took < 1.0, f"broker shutdown took {took:.2f} s"
    assert not noisy, [r.getMessage() for r in noisy]
    assert not handed, handed
    assert not _amqtt_tasks(), _amqtt_tasks()


def _amqtt_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if not t.done() and "amqtt" in str(t.get_coro())]


async def _connect_storm(port: int, stop: asyncio.Event) -> None:
    """Clients that keep arriving (a node reconnecting, a status probe) while the broker stops."""
    writers = []
    i = 0
    while not stop.is_set():
        i += 1
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.001)
            continue
        w.write(_packet(0x10, _utf8("MQTT") + bytes([4, 0x02, 0, 5]) + _utf8(f"storm-{i}")))
        writers.append(w)
        await asyncio.sleep(0)
    for w in writers:
        w.transport.abort()


async def test_broker_stops_promptly_while_clients_keep_connecting(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    handed: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: handed.append(ctx))
    caplog.set_level(logging.DEBUG)
    broker = EmbeddedBroker("127.0.0.1")
    stop = asyncio.Event()
    async with broker:
        storm = asyncio.ensure_future(_connect_storm(broker.port, stop))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await broker.__aexit__(None, None, None)
        took = time.monotonic() - t0
        broker._broker = None
        stop.set()
        await storm
    await asyncio.sleep(0.2)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert took < 1.0, f"broker shutdown took {took:.2f} s"
    assert not noisy, [r.getMessage() for r in noisy]
    assert not handed, handed
    assert not _amqtt_tasks(), _amqtt_tasks()


@pytest.mark.parametrize("secret", [None, "a-demo-secret-of-some-length"])
async def test_broker_stops_within_a_second_quietly_with_busy_and_stalled_clients(
        secret: str | None, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    handed: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: handed.append(ctx))
    caplog.set_level(logging.DEBUG)
    login = {}
    if secret is not None:
        from meshllm.mesh.access import app_login

        user, password = app_login(secret)
        login = {"username": user, "password": password}
    broker = EmbeddedBroker("127.0.0.1", secret=secret)
    raw: list[socket.socket] = []
    async with broker:
        if secret is None:
            raw.append(_stalled_subscriber(broker.port))
        raw.append(socket.create_connection(("127.0.0.1", broker.port)))  # never sends CONNECT
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="sub", **login) as sub, \
                aiomqtt.Client("127.0.0.1", broker.port, identifier="pub", **login) as pub:
            await sub.subscribe("meshllm/v1/m/replies/#")
            blob = b"x" * (1 << 20)
            for i in range(24):  # tens of MB towards the stalled subscriber, which reads none of it
                await pub.publish(f"meshllm/v1/m/replies/{i}", blob, qos=0)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            await broker.__aexit__(None, None, None)
            took = time.monotonic() - t0
            broker._broker = None  # already left: the outer `async with` has nothing more to do
    await asyncio.sleep(0.2)
    for s in raw:
        s.close()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert took < 1.0, f"broker shutdown took {took:.2f} s"
    assert not noisy, [r.getMessage() for r in noisy]
    assert not handed, handed
    assert not _amqtt_tasks(), _amqtt_tasks()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", broker.port)) != 0, "the broker's port still accepts connections"
