"""The adversarial probe, replayed: a hostile app with a valid login, a stranger on the LAN, a careless user.

Each test reproduces one finding of the probe (docs/security.md lists them) against real ``meshllm node``
processes, a real broker (the embedded one a node hosts, Mosquitto) and real mDNS on 127.0.0.1, and checks
that it no longer works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshllm.dataplane.auth import secret_key
from meshllm.mesh import broker_check
from meshllm.mesh.access import NODE_USER, app_login, node_token, with_login
from meshllm.mesh.broker import BrokerURL, free_port
from meshllm.mesh.discovery import MESHLLM_SERVICE, Discovery
from meshllm.secret import MIN_SECRET_CHARS, root_key
from tests.mesh_harness import LOOPBACK, NodeProc, mosquitto, wait_until
from tests.serving_harness import all_ready, ask_raw, random_model, replica, tokens_of

SECRET = "adversary-" + secrets.token_hex(8)
APP = app_login(SECRET)
DEEP = b"[" * 50000


# --- helpers -------------------------------------------------------------------------------


def _members(mesh: str, broker: str) -> dict[str, Any]:
    from meshllm.mesh.status import read_state

    return asyncio.run(read_state(mesh, broker, quiet_s=0.3))["members"]


def _hosted_broker(mesh: str, members: set[str]) -> tuple[str, dict[str, Any]]:
    """The URL of the broker a node of ``mesh`` hosts (found over mDNS, as an app would) and its host's record."""
    from meshllm.mesh.status import find_broker

    def formed() -> tuple[str, dict[str, Any]] | None:
        url = asyncio.run(find_broker(mesh, LOOPBACK, 5.0))
        st = _members(mesh, with_login(url, APP))
        hosts = [m for m in st.values() if m.get("hosts_broker") == url]
        return (url, hosts[0]) if set(st) == members and hosts else None
    return wait_until(formed, 60, f"{sorted(members)} to meet on one hosted broker")  # type: ignore[no-any-return]


async def _node_client(url: str, host_record: dict[str, Any], **kw: Any) -> aiomqtt.Client:
    """An MQTT client with a one-time node login: the epoch comes from the host's live proof, as a node's does."""
    key = secret_key(SECRET)
    epoch = await broker_check.confirmed_epoch(key, host_record["host"], int(host_record["port"]), url)
    assert epoch, "the host did not prove it runs the broker"
    b = BrokerURL.parse(url)
    return aiomqtt.Client(b.host, b.port, username=NODE_USER, password=node_token(SECRET, epoch), **kw)


@contextlib.contextmanager
def _secret_mesh(tmp: Path, ids: list[str], model: Path, plan: dict[str, Any]):  # type: ignore[no-untyped-def]
    (tmp / "secret").write_text(SECRET)
    (tmp / "plan.json").write_text(json.dumps(plan))
    mesh = f"t-adv-{secrets.token_hex(3)}"
    extra = ["--secret-file", str(tmp / "secret"), "--model", str(model), "--plan-file", str(tmp / "plan.json")]
    procs = [NodeProc(mesh, i, extra=extra, log_dir=tmp) for i in ids]
    try:
        for p in procs:
            p.wait_started()
        url, host = _hosted_broker(mesh, set(ids))
        wait_until(lambda: all_ready(mesh, with_login(url, APP)), 90, "every stage loaded")
        yield mesh, url, host, procs
    finally:
        for p in procs:
            p.kill()


def _two_stage_plan() -> dict[str, Any]:
    return {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("n1", 0, 2), ("n2", 2, 4)])]}


def _raw_publish(url: str, login: tuple[str, str] | None, topic: str, payload: bytes, qos: int = 0,
                 retain: bool = False) -> None:
    """Publishes like ``mosquitto_pub``: connect, one PUBLISH, DISCONNECT, close (nothing waits for delivery)."""
    b = BrokerURL.parse(url)

    def field(x: bytes) -> bytes:
        return struct.pack("!H", len(x)) + x

    def packet(kind: int, body: bytes) -> bytes:
        n, size = len(body), b""
        while True:
            byte, n = n % 128, n // 128
            size += bytes([byte | (0x80 if n else 0)])
            if not n:
                return bytes([kind]) + size + body

    flags = 0x02 | (0xC0 if login else 0)
    body = field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + field(f"raw-{secrets.token_hex(3)}".encode())
    if login:
        body += field(login[0].encode()) + field(login[1].encode())
    with socket.create_connection((b.host, b.port), timeout=5) as s:
        s.sendall(packet(0x10, body))
        assert s.recv(4)[3] == 0, "the broker refused the login"
        pub = field(topic.encode()) + (struct.pack("!H", 1) if qos else b"") + payload
        s.sendall(packet(0x30 | (qos << 1) | int(retain), pub))
        if qos:
            s.recv(4)  # PUBACK
        s.sendall(b"\xe0\x00")


def _ask(url: str, mesh: str, rid: str, login: tuple[str, str] | None = APP, max_tokens: int = 6) -> list[int]:
    streams = asyncio.run(ask_raw(with_login(url, login), mesh, [
        {"id": rid, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}], timeout=60))
    assert not any("error" in m for m in streams[0]), streams[0]
    return tokens_of(streams[0])


# --- 1. one message kills every node -----------------------------------------------------------


def test_nested_json_from_an_app_or_a_stranger_kills_no_node(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    with _secret_mesh(tmp_path, ["n1", "n2"], model, _two_stage_plan()) as (mesh, url, _, procs):
        before = _ask(url, mesh, "before")
        root = f"meshllm/v1/{mesh}"
        for topic in ("replay", "cancel", "requests"):  # what the app login may publish
            for payload in (DEEP, b'{"id": ' + DEEP + b"}", b'{"id": "x", "from": ' + b"[" * 3000 + b"}"):
                _raw_publish(url, APP, f"{root}/{topic}", payload, qos=1)
        time.sleep(2.0)
        assert all(p.proc.poll() is None for p in procs), "a node exited"
        assert _ask(url, mesh, "after") == before


def test_on_an_open_mesh_no_topic_takes_a_node_down(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    plan = _two_stage_plan()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with mosquitto() as broker:
        mesh = f"t-adv-open-{secrets.token_hex(3)}"
        extra = ["--model", str(model), "--plan-file", str(tmp_path / "plan.json")]
        procs = [NodeProc(mesh, i, broker=broker, extra=extra, log_dir=tmp_path) for i in ("n1", "n2")]
        try:
            for p in procs:
                p.wait_started()
            wait_until(lambda: all_ready(mesh, broker), 90, "every stage loaded")
            before = _ask(broker, mesh, "before", login=None)
            root = f"meshllm/v1/{mesh}"
            for topic in ("replay", "cancel", "requests", "ready/n1", "ready/n2", "members/n9", "planner", "plan",
                          "heartbeat/n1", "jobs/x", "progress/x", "stats/n1"):
                for payload in (DEEP, b"[1]", b'{"pv": "x", "r": [[]]}', b"\xff\xfe"):
                    _raw_publish(broker, None, f"{root}/{topic}", payload, qos=1)
            time.sleep(2.0)
            assert all(p.proc.poll() is None for p in procs), "a node exited"
            assert _ask(broker, mesh, "after", login=None) == before
        finally:
            for p in procs:
                p.kill()


# --- 2. apps read other apps' prompts -----------------------------------------------------------


def test_an_app_never_receives_the_journal_and_the_journal_is_sealed(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    with _secret_mesh(tmp_path, ["n1", "n2"], model, _two_stage_plan()) as (mesh, url, host, _):
        root = f"meshllm/v1/{mesh}"
        b = BrokerURL.parse(url)

        async def probe() -> tuple[list[str], list[bytes]]:
            leaked: list[str] = []
            sealed: list[bytes] = []
            victim = asyncio.create_task(ask_raw(with_login(url, APP), mesh, [
                {"id": f"victim-{i}", "prompt": "A secret prompt about the garden", "max_tokens": 120,
                 "temperature": 0} for i in range(6)], timeout=90))
            for _ in range(20):  # connect again and again while the victims' journal records are retained
                if victim.done():
                    break
                async with aiomqtt.Client(b.host, b.port, username=APP[0], password=APP[1]) as spy:
                    await spy.subscribe(f"{root}/replies/attacker-only", qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.3):
                            async for m in spy.messages:
                                leaked.append(str(m.topic))
                async with await _node_client(url, host) as node:
                    await node.subscribe(f"{root}/jobs/+", qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.3):
                            async for m in node.messages:
                                if m.payload:
                                    sealed.append(bytes(m.payload))  # type: ignore[arg-type]
            await victim
            return leaked, sealed

        leaked, sealed = asyncio.run(probe())
        assert leaked == []
        assert sealed, "no journal record was seen while requests ran (the probe proved nothing)"
        for payload in sealed:
            assert payload.startswith(b"sealed1:")
            with pytest.raises(ValueError):
                json.loads(payload)


# --- 3. a replayed mDNS record lures nodes to a rogue broker ---------------------------------------


async def _capture_record(mesh: str, node_id: str) -> AsyncServiceInfo:
    azc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    found: list[AsyncServiceInfo] = []
    try:
        names: set[str] = set()
        browser = AsyncServiceBrowser(azc.zeroconf, [MESHLLM_SERVICE], handlers=[
            lambda zeroconf, service_type, name, state_change: names.add(name)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not found:
            for name in list(names):
                info = AsyncServiceInfo(MESHLLM_SERVICE, name)
                if await info.async_request(azc.zeroconf, 2000) and info.properties.get(b"id") == node_id.encode() \
                        and info.properties.get(b"mesh") == mesh.encode() and info.properties.get(b"broker"):
                    found.append(info)
            await asyncio.sleep(0.2)
        await browser.async_cancel()
    finally:
        await azc.async_close()
    assert found, f"no record of {node_id} hosting a broker"
    return found[0]


class _Rogue:
    """Listens where the captured record points (the old broker port and data-plane port) and writes down
    every CONNECT it gets; it answers a data-plane handshake with junk, as it cannot do better."""

    def __init__(self) -> None:
        self.connects: list[bytes] = []
        self.servers: list[asyncio.Server] = []

    async def listen(self, port: int, kind: str) -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                data = await asyncio.wait_for(reader.read(4096), 5)
                if kind == "mqtt":
                    self.connects.append(data)
                    writer.write(b"\x20\x02\x00\x00")  # CONNACK accepted: "come in"
                else:
                    writer.write(b"\x00" * 64)
                await writer.drain()
                await asyncio.sleep(1)
            writer.close()
        self.servers.append(await asyncio.start_server(on_conn, LOOPBACK, port, reuse_address=True))


def test_a_replayed_mdns_record_gets_no_password_and_the_mesh_carries_on(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    mesh = f"t-adv-mdns-{secrets.token_hex(3)}"
    extra = ["--secret-file", str(tmp_path / "secret")]
    a = NodeProc(mesh, "a1", extra=extra, log_dir=tmp_path)
    b = NodeProc(mesh, "b1", extra=extra, log_dir=tmp_path)
    try:
        a.wait_started()
        b.wait_started()
        url, host = _hosted_broker(mesh, {"a1", "b1"})
        hoster, other = (a, b) if host["node_id"] == "a1" else (b, a)
        record = asyncio.run(_capture_record(mesh, hoster.node_id))
        hoster.kill()  # the host dies; its record is in the stranger's hands

        async def replay() -> _Rogue:
            rogue = _Rogue()
            await rogue.listen(BrokerURL.parse(url).port, "mqtt")
            await rogue.listen(int(host["port"]), "dataplane")
            azc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
            info = AsyncServiceInfo(MESHLLM_SERVICE, record.name, addresses=record.addresses, port=record.port,
                                    properties=record.properties, server=f"rogue-{secrets.token_hex(3)}.local.")
            await azc.async_register_service(info, allow_name_change=True)
            try:  # the survivor looks for a broker meanwhile, until it advertises one of its own (12 s at most)
                async with Discovery("watcher", mesh, 0, interface=LOOPBACK, advertise=False,
                                     key=secret_key(SECRET)) as watch:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(12):
                            while (ad := watch.peers.get(other.node_id)) is None or ad.broker in (None, url):
                                watch.changed.clear()
                                await watch.changed.wait()
                await asyncio.sleep(1.0)  # the rogue stays up a little longer: no late attempt either
            finally:
                await azc.async_unregister_all_services()
                await azc.async_close()
                for s in rogue.servers:
                    s.close()
            return rogue

        rogue = asyncio.run(replay())
        assert not any(NODE_USER.encode() in c for c in rogue.connects), "the node sent its login to the rogue"
        assert other.proc.poll() is None
        # the survivor did not wait on the replayed record: it hosts the mesh's broker now
        url2, host2 = _hosted_broker(mesh, {other.node_id})
        assert host2["node_id"] == other.node_id and url2 != url
    finally:
        a.kill()
        b.kill()


# --- 5, 6. weak, empty and missing secrets ---------------------------------------------------------


def _meshllm(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("meshllm: error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("content, words", [("", ["empty"]), ("   \n", ["empty"]), ("summer2024", ["characters"])])
def test_an_empty_or_short_secret_is_refused_at_start(tmp_path: Path, content: str, words: list[str]) -> None:
    (tmp_path / "s").write_text(content)
    node = ["node", "--mesh", "t-weak", "--interface", LOOPBACK, "--quick-profile", "--secret-file",
            str(tmp_path / "s")]
    _one_line_error(_meshllm(*node), *words)
    _one_line_error(_meshllm("broker", "--host", LOOPBACK, "--port", str(free_port()), "--secret-file",
                             str(tmp_path / "s")), *words)
    _one_line_error(_meshllm("credentials", "--secret-file", str(tmp_path / "s")), *words)


def test_a_missing_secret_file_is_one_line() -> None:
    _one_line_error(_meshllm("node", "--mesh", "t-weak", "--interface", LOOPBACK, "--secret-file", "/no/such/secret"),
                    "/no/such/secret", "does not exist")


def test_guessing_the_secret_offline_costs_a_memory_hard_kdf_per_guess() -> None:
    guesses = [f"guess-number-{i:04d}-xx" for i in range(5)]
    t = time.perf_counter()
    keys = {root_key(g) for g in guesses}
    per_guess = (time.perf_counter() - t) / len(guesses)
    assert len(keys) == len(guesses)
    # one SHA-256 took ~1 us a guess ("summer2024" fell in 0.43 s); scrypt (32 MiB) costs ~0.1 s on a laptop
    assert per_guess > 0.01, per_guess
    assert MIN_SECRET_CHARS >= 16


# --- 7. a mesh is closed unless its owner opens it ----------------------------------------------------


def test_a_new_mesh_is_closed_and_a_device_joins_it_with_the_printed_invite(tmp_path: Path) -> None:
    mesh = f"t-adv-new-{secrets.token_hex(3)}"
    home1, home2 = tmp_path / "home1", tmp_path / "home2"
    first = NodeProc(mesh, "f1", log_dir=tmp_path, closed=True, env={"MESHLLM_HOME": str(home1)})
    second: NodeProc | None = None
    try:
        first.wait_started()
        log = first.log_path.read_text()
        token = re.search(r"meshllm node --join (\S+)", log)
        assert token, log
        assert (home1 / f"{mesh}.secret").stat().st_mode & 0o777 == 0o600
        second = NodeProc(mesh, "f2", log_dir=tmp_path, closed=True, extra=["--join", token.group(1)],
                          env={"MESHLLM_HOME": str(home2)})
        second.wait_started()
        # an app on the first device needs no flag: its login comes from the stored secret
        def both() -> bool:
            p = _meshllm("status", "--mesh", mesh, "--interface", LOOPBACK, "--json", env={"MESHLLM_HOME": str(home1)})
            return p.returncode == 0 and set(json.loads(p.stdout)["members"]) == {"f1", "f2"}
        wait_until(both, 60, "f2 to join f1's mesh with the invite")
        # a stranger (no secret) is refused by the broker
        anon = _meshllm("status", "--mesh", mesh, "--interface", LOOPBACK, "--json",
                        env={"MESHLLM_HOME": str(tmp_path / "nobody")})
        _one_line_error(anon, "Not authorized", "app login")
        assert "OPEN" not in first.log_path.read_text()
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_an_open_mesh_broker_or_gateway_says_so_and_nothing_is_open_by_accident(tmp_path: Path) -> None:
    node = NodeProc(f"t-adv-open-{secrets.token_hex(3)}", "o1", log_dir=tmp_path, extra=["--open"])
    try:
        node.wait_started()
        wait_until(lambda: "is OPEN (--open)" in node.log_path.read_text(), 10, "the open-mesh warning")
    finally:
        node.kill()
    _one_line_error(_meshllm("broker", "--host", LOOPBACK, "--port", str(free_port())), "--open")
    _one_line_error(_meshllm("gateway", "--host", "0.0.0.0", "--port", "0", "--broker", "mqtt://127.0.0.1:1"),
                    "API key")
    _one_line_error(_meshllm("node", "--open", "--secret-file", "/x", "--mesh", "m"), "--open")


# --- 9, 9b. retained requests, QoS 0 requests ---------------------------------------------------------


def test_a_retained_request_is_never_served_again(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("n1", 0, 4)])]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with mosquitto() as broker:  # an open mesh on Mosquitto, which retains what anyone asks it to
        mesh = f"t-adv-ret-{secrets.token_hex(3)}"
        req = {"id": "retained", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        _raw_publish(broker, None, f"meshllm/v1/{mesh}/requests", json.dumps(req).encode(), qos=1, retain=True)

        got: list[bytes] = []

        async def replies_to(rid: str) -> None:
            async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
                await c.subscribe(f"meshllm/v1/{mesh}/replies/{rid}", qos=1)
                async for m in c.messages:
                    got.append(bytes(m.payload))  # type: ignore[arg-type]

        async def watch_then_start() -> None:
            watcher = asyncio.create_task(replies_to("retained"))
            await asyncio.sleep(0.5)
            node = NodeProc(mesh, "n1", broker=broker, log_dir=tmp_path, extra=[
                "--model", str(model), "--plan-file", str(tmp_path / "plan.json")])
            try:
                await asyncio.to_thread(node.wait_started)
                await asyncio.to_thread(wait_until, lambda: all_ready(mesh, broker), 60, "n1 ready")
                # the node got the retained request at its subscription, before this live one: had it served
                # it, its 4 tokens would have streamed by the time the live request's 4 have
                assert len(await asyncio.to_thread(_ask, broker, mesh, "live", None)) == 6
                await asyncio.sleep(3.0)  # and a margin for a late start
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                node.kill()
        asyncio.run(watch_then_start())
        assert got == []


def test_an_app_cannot_retain_on_the_embedded_broker(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", "broker", "--host", LOOPBACK, "--port", str(port),
                             "--secret-file", str(tmp_path / "secret")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["event"] == "started"
        url = f"mqtt://{LOOPBACK}:{port}"
        _raw_publish(url, APP, "meshllm/v1/m/requests", b'{"id": "r"}', qos=1, retain=True)

        async def retained() -> list[str]:
            from meshllm.mesh.access import node_login
            got: list[str] = []
            async with aiomqtt.Client(LOOPBACK, port, username=NODE_USER, password=node_login(SECRET)[1]) as c:
                await c.subscribe("meshllm/v1/m/#", qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for m in c.messages:
                            got.append(str(m.topic))
            return got
        assert asyncio.run(retained()) == []
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_qos0_request_on_a_closed_mesh_is_answered(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    with _secret_mesh(tmp_path, ["n1", "n2"], model, _two_stage_plan()) as (mesh, url, _, _procs):
        b = BrokerURL.parse(url)

        async def go() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            async with aiomqtt.Client(b.host, b.port, username=APP[0], password=APP[1]) as c:
                await c.subscribe(f"meshllm/v1/{mesh}/replies/q0", qos=0)
                req = {"id": "q0", "prompt": "She was", "max_tokens": 8}
                await asyncio.to_thread(_raw_publish, url, APP, f"meshllm/v1/{mesh}/requests",
                                        json.dumps(req).encode(), 0)
                async with asyncio.timeout(30):
                    async for m in c.messages:
                        out.append(json.loads(m.payload))  # type: ignore[arg-type]
                        if out[-1].get("done") or out[-1].get("error"):
                            return out
            return out
        replies = asyncio.run(go())
        assert replies[-1].get("done") and len(replies) == 9, replies
