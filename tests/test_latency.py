"""No message waits on Nagle's algorithm: a request starts within milliseconds on an idle mesh.

A node answers a request's PUBACK and journals the request (a QoS 1 publish) back to back. With Nagle's
algorithm on the client socket the second write waits until the broker ACKs the first, and the broker's
delayed ACK holds that 40 ms: half the requests of ``tools/sim_to_real.py`` waited 40 ms before their
prefill started, on an idle mesh. Mosquitto itself writes with Nagle unless ``set_tcp_nodelay true``.
Real brokers (Mosquitto as the tests configure it, as docs/mesh.md tells users to; the embedded amqtt
broker) over loopback, real aiomqtt clients, a real mesh of node processes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from pathlib import Path

import aiomqtt
import pytest

from meshllm.mesh.broker import BrokerURL, EmbeddedBroker
from tests.mesh_harness import mosquitto
from tests.serving_harness import ask_raw, random_model, replica, serving_mesh

ROUNDS = 20
NAGLE_S = 0.035  # a delayed ACK holds a segment 40 ms on Linux


async def _relay_round_trips(url: str) -> list[float]:
    """Seconds from a QoS 1 publish to 'ping' until the echo a relay publishes to 'pong' on receipt arrives:
    the relay's PUBACK and its publish go out back to back, as a planner's do."""
    kw = BrokerURL.parse(url).client_kwargs()
    out: list[float] = []
    async with aiomqtt.Client(**kw, identifier="relay") as relay, aiomqtt.Client(**kw, identifier="app") as app:
        await relay.subscribe("ping", qos=1)
        await app.subscribe("pong", qos=1)

        async def echo() -> None:
            async for m in relay.messages:
                await relay.publish("pong", m.payload, qos=1)

        task = asyncio.create_task(echo())
        try:
            await asyncio.sleep(0.2)
            for i in range(ROUNDS):
                t0 = time.monotonic()
                await app.publish("ping", str(i), qos=1)
                m = await asyncio.wait_for(anext(aiter(app.messages)), 5)
                assert m.payload == str(i).encode()
                out.append(time.monotonic() - t0)
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
    return out


def _held(times: list[float]) -> int:
    return sum(t > NAGLE_S for t in times)


def test_a_relay_through_mosquitto_is_not_held_by_nagle() -> None:
    with mosquitto() as url:
        times = asyncio.run(_relay_round_trips(url))
    assert _held(times) <= 2, f"{_held(times)} of {ROUNDS} round trips over {NAGLE_S} s: {sorted(times)}"


def test_a_relay_through_the_embedded_broker_is_not_held_by_nagle() -> None:
    async def go() -> list[float]:
        async with EmbeddedBroker("127.0.0.1") as broker:
            return await _relay_round_trips(broker.url)
    times = asyncio.run(go())
    assert _held(times) <= 2, f"{_held(times)} of {ROUNDS} round trips over {NAGLE_S} s: {sorted(times)}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("latency"))


def test_an_idle_mesh_starts_each_prompt_within_milliseconds(model: Path, tmp_path: Path) -> None:
    """``timings.queue_s`` (received by the planner -> the first stage starts the prompt) on an idle mesh is
    routing, journaling and one frame: about a millisecond here (it was 40 ms for half the requests)."""
    mesh = f"t-lat-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("n1", 0, 4)]),
                                                      replica(1, "decode", [("n2", 0, 4)])]}
    waits: list[float] = []
    with mosquitto() as broker, serving_mesh(mesh, broker, model, ["n1", "n2"], plan, tmp_path):
        for i in range(12):
            [stream] = asyncio.run(ask_raw(broker, mesh, [{"id": f"r{i}", "prompt": "the cat sat on",
                                                           "max_tokens": 3, "temperature": 0}]))
            waits.append(stream[-1]["timings"]["queue_s"])
            time.sleep(0.05)
    assert _held(waits) <= 1 and statistics.median(waits) < 0.01, sorted(waits)


def test_the_planner_routes_by_the_prefill_work_actually_left(model: Path, tmp_path: Path) -> None:
    """A prompt already prefilled is no prefill work: the planner hears of it (a ``prefilled`` frame) and routes the
    next prompt by what is left. Two MIXED replicas, the first predicted to prefill 10 tokens/s, the second 6: with
    the first still decoding an earlier request of the same prompt, a new prompt goes to the first (its wait is
    n/10 against n/6). The planner never heard of prefills before, counted the earlier prompt as work still
    queued there ((n + n)/10 > n/6) and sent the prompt to the slower replica; the simulator, told at once,
    predicted MIXED replicas' waits 27% short of the real mesh's (tools/sim_to_real.py --setting mixed)."""
    mesh = f"t-route-{secrets.token_hex(3)}"
    fast, slow = replica(0, "mixed", [("n1", 0, 4)]), replica(1, "mixed", [("n2", 0, 4)])
    slow["prefill_rate"] = 6.0
    plan = {"version": 1, "n_layers": 4, "replicas": [fast, slow]}
    prompt = "the cat sat on the mat and the dog sat on the log"

    order: list[tuple[str, bool]] = []  # (request, done) of each reply, as they came

    async def go(broker: str) -> dict[str, list[dict]]:
        topics = {r: f"meshllm/v1/{mesh}/replies/{r}" for r in ("early", "late")}
        streams: dict[str, list[dict]] = {r: [] for r in topics}
        async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
            for t in topics.values():
                await c.subscribe(t, qos=1)

            async def ask(rid: str, n: int) -> None:
                await c.publish(f"meshllm/v1/{mesh}/requests", json.dumps(
                    {"id": rid, "prompt": prompt, "max_tokens": n, "temperature": 0}), qos=1)

            await ask("early", 60)
            async with asyncio.timeout(60):
                async for m in c.messages:
                    rid = str(m.topic).rsplit("/", 1)[-1]
                    streams[rid].append(json.loads(m.payload))  # type: ignore[arg-type]
                    order.append((rid, bool(streams[rid][-1].get("done"))))
                    if rid == "early" and len(streams["early"]) == 1:
                        await asyncio.sleep(0.3)  # its prefilled frame has reached the planner by now
                        await ask("late", 2)
                    if all(s and s[-1].get("done") for s in streams.values()):
                        return streams
        raise AssertionError("unreachable")

    with mosquitto() as broker, serving_mesh(mesh, broker, model, ["n1", "n2"], plan, tmp_path,
                                             extra=["--emulate-compute-scale", "20"]):
        streams = asyncio.run(go(broker))
    early, late = streams["early"][-1], streams["late"][-1]
    assert early["timings"]["replicas"]["prefill"] == 0
    assert late["timings"]["replicas"]["prefill"] == 0, late["timings"]
    # the earlier request was still decoding on the fast replica when the later one was routed
    assert order.index(("late", False)) < order.index(("early", True)), order
