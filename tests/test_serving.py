"""Serving over the mesh equals one process, token for token; bad requests get JSON errors."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from tests.mesh_harness import mosquitto
from tests.serving_harness import ask_raw, random_model, replica, serving_mesh, text_of, tokens_of

PROMPTS = ["Once upon a time", "the cat sat", "Héllo 🙂 wörld", "a b c d e f g"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def broker():
    with mosquitto() as url:
        yield url


def expected(model: Path, prompt: str, n: int) -> tuple[list[int], str]:
    done = LocalModel(model).generate(prompt, SamplingParams(max_tokens=n, temperature=0))
    return done.token_ids, done.text


PLANS = {
    "prefill1-decode1+3": [replica(0, "prefill", [("n1", 0, 4)]), replica(1, "decode", [("n2", 0, 1), ("n3", 1, 4)])],
    "prefill2+2-decode3+1": [replica(0, "prefill", [("n1", 0, 2), ("n2", 2, 4)]),
                             replica(1, "decode", [("n3", 0, 3), ("n4", 3, 4)])],
    "mixed2+2": [replica(0, "mixed", [("n1", 0, 2), ("n2", 2, 4)])],
    "mixed1-and-mixed1": [replica(0, "mixed", [("n1", 0, 4)]), replica(1, "mixed", [("n2", 0, 4)])],
}


@pytest.mark.parametrize("name", list(PLANS))
def test_mesh_greedy_output_equals_one_process(name: str, model: Path, broker: str, tmp_path: Path) -> None:
    replicas = PLANS[name]
    nodes = sorted({s["node_id"] for r in replicas for s in r["stages"]})
    mesh = f"t-serve-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": replicas}
    with serving_mesh(mesh, broker, model, nodes, plan, tmp_path):
        reqs = [{"id": f"r{i}", "prompt": p, "max_tokens": 24, "temperature": 0} for i, p in enumerate(PROMPTS)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs))
    for p, stream in zip(PROMPTS, streams):
        ids, text = expected(model, p, 24)
        assert tokens_of(stream) == ids, p
        assert text_of(stream) == text
        final = stream[-1]
        assert final["done"] and final["usage"]["completion_tokens"] == len(ids)
        assert [m["index"] for m in stream] == list(range(len(stream)))


def test_twenty_concurrent_requests_complete_exactly_once_in_order(model: Path, broker: str, tmp_path: Path) -> None:
    mesh = f"t-serve20-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": PLANS["prefill1-decode1+3"]}
    with serving_mesh(mesh, broker, model, ["n1", "n2", "n3"], plan, tmp_path):
        reqs = [{"id": f"c{i}", "prompt": PROMPTS[i % 4] + f" {i}", "max_tokens": 16, "temperature": 0}
                for i in range(20)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs, timeout=120))
    for r, stream in zip(reqs, streams):
        ids, _ = expected(model, r["prompt"], 16)
        assert tokens_of(stream) == ids
        assert [m["index"] for m in stream] == list(range(len(ids) + 1))
        assert sum(1 for m in stream if m.get("done")) == 1


def test_bad_requests_get_json_errors_and_the_mesh_keeps_serving(model: Path, broker: str, tmp_path: Path) -> None:
    mesh = f"t-servebad-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": PLANS["mixed2+2"]}
    root = f"meshllm/v1/{mesh}/replies"
    with serving_mesh(mesh, broker, model, ["n1", "n2"], plan, tmp_path):
        bad = [
            (b"{not json", f"{root}/_invalid", "invalid_json"),
            (json.dumps({"id": "u1", "prompt": "hi", "colour": "red"}).encode(), f"{root}/u1", "invalid_request"),
            (json.dumps({"id": "t1", "prompt": "hi", "temperature": -2}).encode(), f"{root}/t1", "invalid_request"),
            (json.dumps({"id": "k1", "prompt": "hi", "top_k": "many"}).encode(), f"{root}/k1", "invalid_request"),
            (json.dumps({"id": "m1", "prompt": "hi", "max_tokens": 0}).encode(), f"{root}/m1", "invalid_request"),
            (json.dumps({"id": "l1", "prompt": "word " * 200}).encode(), f"{root}/l1", "context_length_exceeded"),
            (json.dumps({"id": "c1", "messages": [{"role": "user"}]}).encode(), f"{root}/c1",
             "invalid_request"),  # a chat message without content
        ]
        streams = asyncio.run(ask_raw(broker, mesh, [b for b, _, _ in bad], reply_topics=[t for _, t, _ in bad]))
        for (_, _, code), stream in zip(bad, streams):
            assert len(stream) == 1 and stream[0]["error"]["code"] == code, stream
        good = asyncio.run(ask_raw(broker, mesh, [{"id": "ok", "prompt": PROMPTS[0], "max_tokens": 8,
                                                     "temperature": 0}]))[0]
        assert tokens_of(good) == expected(model, PROMPTS[0], 8)[0]


PLANNER_CASES = {
    # node id -> emulation flags; memory caps force the planner to split the model across devices
    "2-capped": {"a1": ["--emulate-memory", "1800K"], "a2": ["--emulate-memory", "1800K"]},
    "3-mixed": {"b1": [], "b2": ["--emulate-memory", "1800K"], "b3": ["--emulate-memory", "1800K",
                                                                       "--emulate-compute-scale", "2"]},
    "4-hetero": {"c1": [], "c2": ["--emulate-compute-scale", "3"], "c3": ["--emulate-memory", "1800K"],
                 "c4": ["--emulate-memory", "1800K"]},
}


@pytest.mark.parametrize("case", list(PLANNER_CASES))
def test_plans_made_by_the_planner_serve_the_same_greedy_tokens(case: str, model: Path, broker: str) -> None:
    from tests.mesh_harness import NodeProc, state, wait_until
    from tests.serving_harness import all_ready

    mesh = f"t-planned-{secrets.token_hex(3)}"
    procs = [NodeProc(mesh, node_id, broker=broker, extra=["--model", str(model), *flags])
             for node_id, flags in PLANNER_CASES[case].items()]
    try:
        for p in procs:
            p.wait_started()
        wait_until(lambda: all_ready(mesh, broker), 60, "the planner's plan deployed")
        plan = state(mesh, broker)["plan"]
        assert plan["method"] == "ga" and plan["term"] >= 1
        capped = {n for n, f in PLANNER_CASES[case].items() if "--emulate-memory" in f}
        for r in plan["replicas"]:
            assert [s["start"] for s in r["stages"]][0] == 0 and r["stages"][-1]["stop"] == 4
            if {s["node_id"] for s in r["stages"]} <= capped:
                assert len(r["stages"]) >= 2, "a capped device cannot hold the whole model"
        reqs = [{"id": f"p{i}", "prompt": p, "max_tokens": 16, "temperature": 0} for i, p in enumerate(PROMPTS)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs))
    finally:
        for p in procs:
            p.kill()
    for p, stream in zip(PROMPTS, streams):
        assert tokens_of(stream) == expected(model, p, 16)[0], (case, p, plan["replicas"])


def test_bundled_model_over_a_planned_mesh_equals_one_process(broker: str) -> None:
    """The bundled model on three emulated devices that cannot hold it alone: split, and unchanged."""
    from tests.mesh_harness import NodeProc, state, wait_until
    from tests.serving_harness import all_ready

    bundled = Path(__file__).resolve().parent.parent / "models" / "tiny-austen"
    mesh = f"t-bundled-{secrets.token_hex(3)}"
    procs = [NodeProc(mesh, f"d{i}", broker=broker, extra=["--model", str(bundled), "--emulate-memory", "10M",
                                                          "--emulate-compute-scale", str(1 + i)]) for i in range(3)]
    prompts = ["It is a truth universally acknowledged, that", "She was"]
    try:
        for p in procs:
            p.wait_started()
        wait_until(lambda: all_ready(mesh, broker), 60, "the plan deployed")
        plan = state(mesh, broker)["plan"]
        assert all(len(r["stages"]) >= 2 for r in plan["replicas"]), "10 MB devices cannot hold 16 MB alone"
        reqs = [{"id": f"b{i}", "prompt": p, "max_tokens": 32, "temperature": 0} for i, p in enumerate(prompts)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs))
    finally:
        for p in procs:
            p.kill()
    for p, stream in zip(prompts, streams):
        ids, text = expected(bundled, p, 32)
        assert tokens_of(stream) == ids and text_of(stream) == text


def test_a_new_plan_rolls_out_without_dropping_accepted_requests(model: Path, broker: str, tmp_path: Path) -> None:
    """Requests in flight when the plan changes finish on the old layout (drain); new ones use the new one."""
    import aiomqtt

    from meshllm.mesh.broker import BrokerURL
    from tests.mesh_harness import state, wait_until
    from tests.serving_harness import all_ready, planner_routes_to

    mesh = f"t-rollout-{secrets.token_hex(3)}"
    v1 = {"version": 1, "n_layers": 4, "replicas": PLANS["mixed2+2"]}
    with serving_mesh(mesh, broker, model, ["n1", "n2", "n3"], v1, tmp_path):
        live = state(mesh, broker)["plan"]

        async def go() -> list[list[dict]]:
            reqs = [{"id": f"roll{i}", "prompt": PROMPTS[i % 4], "max_tokens": 48, "temperature": 0} for i in range(6)]
            asking = asyncio.ensure_future(ask_raw(broker, mesh, reqs, timeout=120))
            await asyncio.sleep(0.3)  # requests are being served on plan v1 ...
            v2 = {"version": 2, "n_layers": 4, "term": live["term"], "planner": live["planner"], "pinned": True,
                  "replicas": [replica(0, "prefill", [("n3", 0, 4)]), replica(1, "decode", [("n1", 0, 3), ("n2", 3, 4)])]}
            async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:  # ... when v2 is published
                await c.publish(f"meshllm/v1/{mesh}/plan", json.dumps(v2), qos=1, retain=True)
            return await asking

        streams = asyncio.run(go())
        wait_until(lambda: all_ready(mesh, broker), 60, "plan v2 deployed")
        planner_routes_to(mesh, broker, 2, {0, 1})
        after = asyncio.run(ask_raw(broker, mesh, [{"id": "after", "prompt": PROMPTS[0], "max_tokens": 16,
                                                     "temperature": 0}]))[0]
    for i, stream in enumerate(streams):
        assert tokens_of(stream) == expected(model, PROMPTS[i % 4], 48)[0], i
    assert any(s[-1]["timings"]["replicas"]["decode"] == 0 for s in streams), "none was in flight on plan v1"
    assert tokens_of(after) == expected(model, PROMPTS[0], 16)[0]
    assert after[-1]["timings"]["replicas"] == {"prefill": 0, "decode": 1}  # served by v2's PREFILL/DECODE pair


def test_a_prompt_still_on_its_first_stage_when_the_plan_changes_finishes_on_the_old_layout(
        model: Path, broker: str, tmp_path: Path) -> None:
    """Drain covers what a stage does not hold yet: the prompt is being prefilled by v1's first stage (slowed)
    when v2 arrives, and v1's second stage, which holds nothing of it, keeps its v1 runner because the journal
    routes the request through it; the request is not moved (resumed 0) and streams the reference tokens."""
    import aiomqtt

    from meshllm.mesh.broker import BrokerURL
    from tests.mesh_harness import state, wait_until
    from tests.serving_harness import all_ready

    mesh = f"t-drain-{secrets.token_hex(3)}"
    v1 = {"version": 1, "n_layers": 4, "replicas": PLANS["mixed2+2"]}
    prompt = " ".join(PROMPTS) * 3
    with serving_mesh(mesh, broker, model, ["n1", "n2", "n3"], v1, tmp_path,
                      extra=["--emulate-compute-scale", "400"]):
        live = state(mesh, broker)["plan"]

        async def go() -> list[dict]:
            req = {"id": "drain0", "prompt": prompt, "max_tokens": 3, "temperature": 0}
            asking = asyncio.ensure_future(ask_raw(broker, mesh, [req], timeout=120))
            await asyncio.sleep(0.5)  # the prompt is on n1, v1's first stage; n2 holds nothing of it yet
            v2 = {"version": 2, "n_layers": 4, "term": live["term"], "planner": live["planner"], "pinned": True,
                  "replicas": [replica(0, "mixed", [("n3", 0, 4)])]}
            async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
                await c.publish(f"meshllm/v1/{mesh}/plan", json.dumps(v2), qos=1, retain=True)
            return (await asking)[0]

        stream = asyncio.run(go())
        wait_until(lambda: all_ready(mesh, broker), 60, "plan v2 deployed")
    assert tokens_of(stream) == expected(model, prompt, 3)[0]
    assert stream[-1]["timings"]["replicas"] == {"prefill": 0, "decode": 0}
    assert stream[-1]["timings"]["resumed"] == 0, stream[-1]["timings"]


def test_a_prefill_replica_decodes_itself_when_the_decode_replica_is_full(model: Path, broker: str,
                                                                           tmp_path: Path) -> None:
    """The decode replica's memory holds one of these sequences (128 positions; each can reach ~40 + a page):
    the others are decoded by the PREFILL replica that prefilled them (it lends itself, with no KV hand-off),
    and every one streams exactly the tokens of one process."""
    mesh = f"t-serve-lend-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("n1", 0, 2), ("n2", 2, 4)]),
                                                      replica(1, "decode", [("n3", 0, 4)], slots=1)]}
    with serving_mesh(mesh, broker, model, ["n1", "n2", "n3"], plan, tmp_path):
        reqs = [{"id": f"l{i}", "prompt": PROMPTS[i % 4] + f" {i}", "max_tokens": 16, "temperature": 0}
                for i in range(6)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs, timeout=120))
    for r, stream in zip(reqs, streams, strict=True):
        assert tokens_of(stream) == expected(model, r["prompt"], 16)[0], r["id"]
        assert sum(1 for m in stream if m.get("done")) == 1
    decoded_by = [stream[-1]["timings"]["replicas"]["decode"] for stream in streams]
    assert 0 in decoded_by and 1 in decoded_by, decoded_by  # both replicas decoded; all six ran at once
