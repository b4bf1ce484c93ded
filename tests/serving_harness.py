"""A serving mesh of real node processes on loopback, and a bare MQTT app to talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt

from meshllm.mesh.broker import BrokerURL
from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from tests.mesh_harness import NodeProc, state, wait_until


def random_model(root: Path, layers: int = 4, seed: int = 3) -> Path:
    cfg = make_llama2c_config(128, 256, layers, 8, 2, 512, 128, shared_classifier=False)
    root.mkdir(parents=True, exist_ok=True)
    write_llama2c(root / "m.bin", cfg, random_llama2c_weights(cfg, seed=seed))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(512, seed=seed))
    export(root / "m.bin", root / "model", overwrite=True)
    return root / "model"


def random_exports(root: Path, dtypes: tuple[str, ...], layers: int, seed: int) -> Path:
    """A random llama2.c model with a tied head, exported once per dtype under ``root / dtype``."""
    cfg = make_llama2c_config(128, 256, layers, 8, 2, 512, 128, shared_classifier=True)
    root.mkdir(parents=True, exist_ok=True)
    write_llama2c(root / "m.bin", cfg, random_llama2c_weights(cfg, seed=seed))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(512, seed=seed))
    for dtype in dtypes:
        export(root / "m.bin", root / dtype, dtype=dtype)
    return root


def replica(rid: int, role: str, stages: list[tuple[str, int, int]], slots: int = 4, context: int = 128) -> dict:
    return {"id": rid, "role": role, "slots": slots, "context": context, "prefill_rate": 10.0,
            "decode_token_rate": 10.0, "stages": [{"node_id": n, "start": a, "stop": b} for n, a, b in stages]}


@contextlib.contextmanager
def serving_mesh(mesh: str, broker: str, model: Path, node_ids: list[str], plan: dict | None = None,
                 tmp: Path | None = None, extra: list[str] | None = None) -> Iterator[list[NodeProc]]:
    args = ["--model", str(model), *(extra or [])]
    if plan is not None:
        assert tmp is not None
        (tmp / "plan.json").write_text(json.dumps(plan))
        args += ["--plan-file", str(tmp / "plan.json")]
    procs = [NodeProc(mesh, i, broker=broker, extra=args) for i in node_ids]
    try:
        for p in procs:
            p.wait_started()
        wait_until(lambda: all_ready(mesh, broker), 60, "every stage of the plan loaded")
        yield procs
    finally:
        for p in procs:
            p.kill()


def all_ready(mesh: str, broker: str) -> bool:
    """The plan is out and every node of it reports its stage loaded (read from retained topics)."""
    async def go() -> bool:
        st = await __import__("meshllm.mesh.status", fromlist=["read_state"]).read_state(mesh, broker, quiet_s=0.3)
        plan = st["plan"]
        if not plan:
            return False
        ready = await read_retained(broker, f"meshllm/v1/{mesh}/ready/+")
        nodes = {s["node_id"] for r in plan["replicas"] for s in r["stages"]}
        return all(json.loads(ready.get(n, "{}")).get("pv") == plan["version"] for n in nodes)
    return asyncio.run(go())


def planner_routes_to(mesh: str, broker: str, version: int, replicas: set[int], timeout: float = 60.0) -> None:
    """Waits until the planner's own scheduler counts exactly ``replicas`` of plan ``version`` ready (its stats,
    once a second). The retained readiness records (:func:`all_ready`) are what the planner reads too, but it
    reads them a moment later: a request sent in between is routed by the older view (a PREFILL replica
    lending itself while the DECODE replica it waits for is not yet counted)."""
    seen = None

    def routes(st: dict[str, Any]) -> bool:
        nonlocal seen
        sc = st.get("scheduler")
        if sc is not None:
            seen = (st.get("pv"), sc.get("ready"))
        return seen == (version, sorted(replicas))

    if not asyncio.run(watch_stats(broker, mesh, routes, timeout)):
        raise AssertionError(f"the planner's scheduler did not count replicas {sorted(replicas)} of plan "
                             f"v{version} ready within {timeout:.0f} s (last seen: pv, ready = {seen})")


async def watch_stats(broker: str, mesh: str, until: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
    """Feeds the nodes' stats (each node's once a second) to ``until`` as they come; True once it returns True,
    False when ``timeout`` s pass first."""
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(f"meshllm/v1/{mesh}/stats/+", qos=0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for m in c.messages:
                    if until(json.loads(m.payload) if isinstance(m.payload, bytes) else {}):
                        return True
    return False


async def read_retained(broker: str, topic: str, quiet_s: float = 0.3) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(topic, qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                m = await asyncio.wait_for(anext(aiter(c.messages)), quiet_s)
                if isinstance(m.payload, bytes) and m.payload:
                    out[str(m.topic).rsplit("/", 1)[-1]] = m.payload
    return out


async def ask_raw(broker: str, mesh: str, requests: list[dict[str, Any] | bytes], timeout: float = 60.0,
                  reply_topics: list[str] | None = None) -> list[list[dict[str, Any]]]:
    """Publishes raw requests at once and collects every reply message until each stream ends."""
    topics = reply_topics or [f"meshllm/v1/{mesh}/replies/{r['id']}" for r in requests if isinstance(r, dict)]
    streams: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        for t in topics:
            await c.subscribe(t, qos=1)
        for r in requests:
            await c.publish(f"meshllm/v1/{mesh}/requests", r if isinstance(r, bytes) else json.dumps(r), qos=1)
        open_ = set(topics)

        async def collect() -> None:
            async for m in c.messages:
                d = json.loads(m.payload)  # type: ignore[arg-type]
                streams[str(m.topic)].append(d)
                if d.get("done") or d.get("error"):
                    open_.discard(str(m.topic))
                    if not open_:
                        return
        await asyncio.wait_for(collect(), timeout)
    return [streams[t] for t in topics]


def by_index(stream: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One request's reply messages in ``index`` order, as every client must read them.

    A resumed request streams the tokens after its last checkpoint again, with the
    same index and the same value, and MQTT QoS 1 may deliver a message twice
    (:mod:`meshllm.serve.journal`). So a repeated index is dropped, but only if it
    repeats exactly; indices must run 0..n without a gap.
    """
    seen: dict[int, dict[str, Any]] = {}
    for m in stream:
        if "index" not in m:
            continue
        i = m["index"]
        if i in seen:
            assert _same_reply(seen[i], m), f"index {i} was sent as {seen[i]} and as {m}"
        else:
            seen[i] = m
    assert sorted(seen) == list(range(len(seen))), f"reply indices with gaps: {sorted(seen)}"
    return [seen[i] for i in range(len(seen))]


def _same_reply(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("token_id", "text", "done", "finish_reason"))


def tokens_of(stream: list[dict[str, Any]]) -> list[int]:
    return [m["token_id"] for m in by_index(stream) if "token_id" in m]


def text_of(stream: list[dict[str, Any]]) -> str:
    return "".join(m.get("text", "") for m in by_index(stream))


def mesh_state(mesh: str, broker: str) -> dict:
    return state(mesh, broker)
