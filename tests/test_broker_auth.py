"""With a mesh secret, the embedded broker wants a login and enforces who may write and read what.

Real amqtt brokers on loopback ports, real MQTT clients, real ``meshllm node`` processes
with real mDNS on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from meshllm.dataplane.auth import secret_key
from meshllm.mesh.access import APP_USER, NODE_USER, app_login, node_login, permitted, with_login
from meshllm.mesh.broker import BrokerURL, EmbeddedBroker
from meshllm.mesh.discovery import Discovery
from meshllm.mesh.status import read_state
from tests.mesh_harness import LOOPBACK, NodeProc, amqtt_broker, wait_until
from tests.serving_harness import all_ready, random_model, replica

SECRET = "correct horse battery staple"
NODE = node_login(SECRET)
APP = app_login(SECRET)
ROOT = "meshllm/v1/home"


def _client(broker: EmbeddedBroker, login: tuple[str, str] | None = None, **kw: object) -> aiomqtt.Client:
    user, password = login or (None, None)
    return aiomqtt.Client(LOOPBACK, broker.port, username=user, password=password, timeout=5, **kw)  # type: ignore[arg-type]


async def _received(client: aiomqtt.Client, until: str, timeout: float = 5.0) -> list[tuple[str, bytes]]:
    """Messages (topic, payload) that reach ``client`` up to and including one on topic ``until``."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            got.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]
            if str(m.topic) == until:
                return got
    return got


# --- the rule (pure) --------------------------------------------------------------------


def test_app_may_write_requests_and_cancel_and_read_replies_and_state_only() -> None:
    assert permitted("app", "publish", f"{ROOT}/requests")
    assert permitted("app", "publish", f"{ROOT}/cancel")
    for topic in ("plan", "planner", "members/n1", "heartbeat/n1", "ready/n1", "stats/n1", "replies/r1"):
        assert not permitted("app", "publish", f"{ROOT}/{topic}"), topic
    for f in ("replies/#", "replies/r1", "members/+", "plan", "planner", "ready/+", "stats/+"):
        assert permitted("app", "subscribe", f"{ROOT}/{f}"), f
    for f in ("#", "+/+/+/#", "meshllm/v1/+/#", f"{ROOT}/#", f"{ROOT}/requests", f"{ROOT}/heartbeat/+",
              f"{ROOT}/+", f"{ROOT}/members/#", "$SYS/#"):
        assert not permitted("app", "subscribe", f), f
    assert permitted("node", "publish", f"{ROOT}/plan") and permitted("node", "subscribe", "#")
    assert not permitted(None, "publish", f"{ROOT}/requests") and not permitted(None, "subscribe", f"{ROOT}/replies/#")


def test_logins_are_derived_per_role_and_do_not_reveal_each_other() -> None:
    assert NODE[0] == NODE_USER and APP[0] == APP_USER
    assert NODE[1] != APP[1] and SECRET not in NODE[1] + APP[1]
    assert app_login("another secret") != APP
    assert with_login("mqtt://h:1", APP) == f"mqtt://{APP_USER}:{APP[1]}@h:1"
    assert with_login("mqtt://u:p@h:1", APP) == "mqtt://u:p@h:1"  # a login in the URL wins
    assert BrokerURL.parse(with_login("h:1", ("a b", "p@ss"))).password == "p@ss"


# --- the broker ---------------------------------------------------------------------------


async def test_anonymous_and_wrong_logins_are_refused_when_the_mesh_has_a_secret() -> None:
    async with EmbeddedBroker(LOOPBACK, secret=SECRET) as broker:
        for login in (None, (APP_USER, "guess"), (NODE_USER, APP[1]), ("admin", NODE[1]),
                      node_login("another secret")):
            with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
                async with _client(broker, login):
                    pass
        for login in (NODE, APP):
            async with _client(broker, login):
                pass


async def test_app_submits_requests_and_reads_replies_but_cannot_write_mesh_state() -> None:
    async with EmbeddedBroker(LOOPBACK, secret=SECRET) as broker, \
            _client(broker, NODE, identifier="n1") as node, _client(broker, APP) as app:
        await node.subscribe(f"{ROOT}/#", qos=1)
        await app.subscribe(f"{ROOT}/replies/r1", qos=1)
        for topic in ("plan", "planner", "members/n9", "heartbeat/n9", "ready/n1", "replies/r2"):
            await app.publish(f"{ROOT}/{topic}", b'{"forged": true}', qos=1, retain=True)
        await app.publish(f"{ROOT}/requests", b'{"id": "r1", "prompt": "hi"}', qos=1)
        # QoS 1 keeps one publisher's messages in order: the forgeries were dropped, not delayed
        assert await _received(node, f"{ROOT}/requests") == [(f"{ROOT}/requests", b'{"id": "r1", "prompt": "hi"}')]
        await node.publish(f"{ROOT}/replies/r1", b'{"index": 0}', qos=1)
        assert await _received(app, f"{ROOT}/replies/r1") == [(f"{ROOT}/replies/r1", b'{"index": 0}')]

        refused = await app.subscribe(f"{ROOT}/#", qos=1)
        assert [r.value for r in refused] == [0x80]  # SUBACK failure
        async with _client(broker, APP) as reader:  # nothing forged was retained either
            await reader.subscribe(f"{ROOT}/plan", qos=1)
            await reader.subscribe(f"{ROOT}/members/+", qos=1)
            await node.publish(f"{ROOT}/plan", b'{"term": 1}', qos=1, retain=True)
            assert await _received(reader, f"{ROOT}/plan") == [(f"{ROOT}/plan", b'{"term": 1}')]


async def test_app_whose_last_will_targets_mesh_state_is_refused() -> None:
    async with EmbeddedBroker(LOOPBACK, secret=SECRET) as broker:
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with _client(broker, APP, will=aiomqtt.Will(f"{ROOT}/members/n1", b"", retain=True)):
                pass
        async with _client(broker, NODE, will=aiomqtt.Will(f"{ROOT}/members/n1", b"", retain=True)):
            pass


async def test_refused_client_claiming_a_nodes_id_does_not_disturb_that_node() -> None:
    async with EmbeddedBroker(LOOPBACK, secret=SECRET) as broker, \
            _client(broker, NODE, identifier="n1") as node, _client(broker, APP) as app:
        await node.subscribe(f"{ROOT}/requests", qos=1)
        for clean in (True, False):  # amqtt would delete (clean) or take over (not clean) n1's session
            with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
                async with _client(broker, (NODE_USER, "guess"), identifier="n1", clean_session=clean):
                    pass
        await app.publish(f"{ROOT}/requests", b"still here", qos=1)
        assert await _received(node, f"{ROOT}/requests") == [(f"{ROOT}/requests", b"still here")]


async def test_without_a_secret_the_embedded_broker_is_open_as_before() -> None:
    async with EmbeddedBroker(LOOPBACK) as broker, _client(broker) as anyone, _client(broker, ("x", "y")) as other:
        await anyone.subscribe("#", qos=1)
        await other.publish(f"{ROOT}/plan", b"anything", qos=1)
        assert await _received(anyone, f"{ROOT}/plan") == [(f"{ROOT}/plan", b"anything")]


# --- real nodes ---------------------------------------------------------------------------


def _signed_broker(mesh: str, timeout: float = 20.0) -> str:
    """The mesh's broker as a node with the secret sees it over mDNS (signed records only)."""
    async def go() -> str:
        async with Discovery(f"t-{secrets.token_hex(3)}", mesh, 0, interface=LOOPBACK, advertise=False,
                             key=secret_key(SECRET)) as d:
            async with asyncio.timeout(timeout):
                while not d.broker_ads():
                    d.changed.clear()
                    await d.changed.wait()
            return d.broker_ads()[0].url
    return asyncio.run(go())


def _formed(mesh: str, members: set[str]) -> str | None:
    """The broker of a mesh formed by exactly ``members``, all on the one broker that one of them hosts
    (two nodes starting together may both host one for a moment: docs/mesh.md)."""
    broker = _signed_broker(mesh)
    st = _state(mesh, broker)["members"]
    hosted = {m["hosts_broker"] for m in st.values()} - {None}
    return broker if set(st) == members and hosted == {broker} else None


def _state(mesh: str, broker: str) -> dict:
    return asyncio.run(read_state(mesh, with_login(broker, APP), quiet_s=0.3))


def test_node_without_the_secret_cannot_join_and_cannot_lure_the_mesh_to_its_broker(tmp_path: Path) -> None:
    mesh = f"t-auth-{secrets.token_hex(3)}"
    (tmp_path / "secret").write_text(SECRET + "\n")
    with_secret = ["--secret-file", str(tmp_path / "secret")]
    procs = [NodeProc(mesh, i, extra=with_secret, log_dir=tmp_path) for i in ("s1", "s2")]
    try:
        for p in procs:
            p.wait_started()
        broker = wait_until(lambda: _formed(mesh, {"s1", "s2"}), 30, "s1 and s2 to form the mesh on one broker")
        # "z9" finds the mesh's broker over mDNS and tries it
        late = NodeProc(mesh, "z9", log_dir=tmp_path)
        procs.append(late)
        late.wait_started()
        wait_until(lambda: "Not authorized" in late.log_path.read_text(), 20, "z9 to be refused by the broker")
        # "a0" sorts first: were unsigned records followed, everyone would move to the broker it hosts
        rogue = NodeProc(mesh, "a0", log_dir=tmp_path)
        procs.append(rogue)
        rogue.wait_started()
        wait_until(lambda: "a0 at 127.0.0.1 (hosting mqtt://" in procs[1].log_path.read_text(), 20,
                   "s2 to see and ignore the broker that a0 hosts")
        assert _formed(mesh, {"s1", "s2"}) == broker  # the same broker as before: a0's is never used
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):  # what a0 would need to publish anything
            asyncio.run(read_state(mesh, broker, quiet_s=0.1))
    finally:
        for p in procs:
            p.kill()


def test_app_with_the_app_login_is_served_and_one_without_it_cannot_submit(tmp_path: Path) -> None:
    model = random_model(tmp_path / "m")
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "app.login").write_text(subprocess.run(
        [sys.executable, "-m", "meshllm", "credentials", "--secret-file", str(tmp_path / "secret")],
        check=True, capture_output=True, text=True).stdout)
    mesh = f"t-auth-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("n1", 0, 4)])]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with amqtt_broker(tmp_path / "secret") as broker:
        node = NodeProc(mesh, "n1", broker=broker, log_dir=tmp_path, extra=[
            "--model", str(model), "--plan-file", str(tmp_path / "plan.json"),
            "--secret-file", str(tmp_path / "secret")])
        try:
            node.wait_started()
            wait_until(lambda: all_ready(mesh, with_login(broker, APP)), 60, "n1 to load its stage")
            _ask_with_and_without_login(mesh, broker, tmp_path / "app.login")
        finally:
            node.kill()


def _ask_with_and_without_login(mesh: str, broker: str, login_file: Path) -> None:
    ask = [sys.executable, "-m", "meshllm", "ask", "--mesh", mesh, "--broker", broker, "--max-tokens", "4",
           "--temperature", "0", "--json", "Once upon a time", "--timeout", "30"]
    ok = subprocess.run([*ask, "--login-file", str(login_file)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) == 4
    refused = subprocess.run(ask, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "Not authorized" in refused.stderr
