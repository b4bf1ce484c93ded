"""Every failure inside a stage is answered: the request gets an error reply and its slot back, and the
requests sharing its batch or its connection are left alone.

- A real mesh (node processes, Mosquitto, the data plane): a step that cannot run (a token id out of the
  vocabulary, sent on the data plane as a faulty peer would) fails its request only.
- A real data plane in front of a real stage with a small inbox: a burst beyond the inbox is answered
  "busy" per request, and the connection that carried it stays open for the next frames.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from meshllm.dataplane.codec import encode, read_frame
from meshllm.dataplane.links import PeerLinks
from meshllm.dataplane.server import DataPlane
from meshllm.mesh.broker import BrokerURL
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from meshllm.serve import api, protocol
from meshllm.serve.layout import Layout
from meshllm.serve.protocol import Prefill, Step
from meshllm.serve.stage import StageRunner
from tests.mesh_harness import mosquitto, state
from tests.serving_harness import ask_raw, random_model, replica, serving_mesh, tokens_of
from tests.test_stage_ownership import Fabric, meta_for, reference

PROMPTS = ["Once upon a time", "the cat sat on the mat", "a b c d e f", "hello there"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("fail"))


@pytest.fixture(scope="module")
def broker():
    with mosquitto() as url:
        yield url


def expected(model: Path, prompt: str, n: int) -> list[int]:
    return LocalModel(model).generate(prompt, SamplingParams(max_tokens=n, temperature=0)).token_ids


async def stage_activity(broker: str, mesh: str, quiet_s: float = 1.5) -> dict[str, int]:
    """Requests with KV on each node's stage, from the live stats (published once a second)."""
    out: dict[str, int] = {}
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(f"meshllm/v1/{mesh}/stats/+", qos=0)
        try:
            async with asyncio.timeout(quiet_s):
                async for m in c.messages:
                    d = json.loads(m.payload)  # type: ignore[arg-type]
                    out[d["node_id"]] = int(d.get("active", 0))
        except TimeoutError:
            pass
    return out


def test_a_request_whose_step_fails_gets_an_error_and_its_slot_back_while_its_batch_finishes(
        model: Path, broker: str, tmp_path: Path) -> None:
    mesh = f"t-fail-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("n1", 0, 2), ("n2", 2, 4)], slots=4)]}
    n = 40
    with serving_mesh(mesh, broker, model, ["n1", "n2"], plan, tmp_path):
        info = state(mesh, broker)["members"]["n1"]
        addr = (str(info["host"]), int(info["port"]))

        async def go() -> list[list[dict[str, Any]]]:
            reqs = [{"id": f"f{i}", "prompt": p, "max_tokens": n, "temperature": 0} for i, p in enumerate(PROMPTS)]
            asking = asyncio.ensure_future(ask_raw(broker, mesh, reqs, timeout=60))
            async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
                await c.subscribe(f"meshllm/v1/{mesh}/replies/f0", qos=1)
                async for _ in c.messages:  # the victim is decoding: its KV is on n1 and n2
                    break
            async with PeerLinks() as links:  # a faulty peer: a step whose token id is outside the vocabulary
                for _ in range(3):
                    await links.send(addr, Step(1, 0, ("f0",), np.array([10**6], np.int64)).encode())
                    await asyncio.sleep(0.01)
            return await asking

        streams = asyncio.run(go())
        victim = streams[0]
        assert victim[-1].get("error", {}).get("code") == api.INTERNAL, victim[-3:]
        assert "token ids" in victim[-1]["error"]["message"]
        for p, s in zip(PROMPTS[1:], streams[1:], strict=True):
            assert tokens_of(s) == expected(model, p, n) and s[-1].get("done"), s[-2:]
        deadline = time.monotonic() + 10
        while (active := asyncio.run(stage_activity(broker, mesh))) != {"n1": 0, "n2": 0}:
            assert time.monotonic() < deadline, f"cache slots still held: {active}"
        # the scheduler got the slot back too: a full replica's worth of requests runs at once
        again = [{"id": f"g{i}", "prompt": p, "max_tokens": 8, "temperature": 0} for i, p in enumerate(PROMPTS)]
        for p, s in zip(PROMPTS, asyncio.run(ask_raw(broker, mesh, again, timeout=60)), strict=True):
            assert tokens_of(s) == expected(model, p, 8)


def test_a_full_inbox_answers_busy_and_keeps_the_connection_and_the_other_requests(model: Path) -> None:
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("d1", 0, 4)], slots=4)]}
    layout = Layout.from_plan(plan)
    fabric = Fabric(model)
    seg = Segment(model, 0, 4, max_batch=6, max_seq_len=128, threads=1)
    stage = StageRunner(fabric, layout, layout.replicas[0], 0, seg, ThreadPoolExecutor(1),  # type: ignore[arg-type]
                        max_inbox=8)
    ref = Segment(model, 0, 4, max_batch=1, max_seq_len=128, threads=1)
    rng = np.random.default_rng(5)
    prompts = {f"ok{i}": rng.integers(3, 512, 6) for i in range(2)}
    want = {rid: reference(ref, p, 24)[0] for rid, p in prompts.items()}
    flood = 40

    async def dispatch(wire: dict[str, Any], writer: object) -> None:  # what a node does with a stage's frame
        frame = protocol.decode(wire)
        if isinstance(frame, Prefill):
            await stage.on_prefill(frame)

    async def go() -> tuple[bool, float]:
        task = asyncio.ensure_future(stage.run())
        async with DataPlane("127.0.0.1") as dp:
            dp.route("prefill", dispatch)
            _, w0 = await asyncio.open_connection("127.0.0.1", dp.port)  # the previous stage's connection
            for rid, p in prompts.items():
                w0.write(encode(Prefill(1, 0, rid, p, meta_for(rid, p, 24, 0)).encode()))
            await w0.drain()
            while not all(fabric.replies.get(f"replies/{rid}") for rid in prompts):
                await asyncio.sleep(0.005)
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.port)  # a burst, on one connection
            writer.write(b"".join(encode(Prefill(1, 0, f"b{i}", np.array([5, 6]),
                                                 meta_for(f"b{i}", np.array([5, 6]), 4, 0)).encode())
                                  for i in range(flood)))
            await writer.drain()
            t = time.perf_counter()
            writer.write(encode({"t": "ping"}))  # the same connection still answers
            await writer.drain()
            alive = (await asyncio.wait_for(read_frame(reader), 10)).get("t") == "pong"
            rtt = time.perf_counter() - t
            deadline = time.monotonic() + 20
            ids = [*prompts, *(f"b{i}" for i in range(flood))]
            while time.monotonic() < deadline and not all(rid in fabric.ended for rid in ids):
                await asyncio.sleep(0.01)
            w0.close()
            writer.close()
        task.cancel()
        return alive, rtt

    alive, _ = asyncio.run(go())
    assert alive, "the connection that carried the burst was closed"
    for rid in prompts:
        got = [m["token_id"] for m in fabric.replies[f"replies/{rid}"] if "token_id" in m]
        assert got == want[rid] and fabric.ended[rid] == "length", rid
    busy = [i for i in range(flood) if any(m.get("error", {}).get("code") == api.BUSY
                                           for m in fabric.replies.get(f"replies/b{i}", []))]
    unanswered = [i for i in range(flood) if f"b{i}" not in fabric.ended]
    assert busy and not unanswered, (busy, unanswered)
    stage.executor.submit(lambda: None).result()
    assert seg.open_sequences == [] and not stage.active
