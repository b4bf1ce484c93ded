"""One decode of the published plan, read alike by every consumer: the serving layout, the gateway's mesh view,
``meshllm status`` and the demo; a malformed plan is refused by each in one line."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshllm.demo import render_plan
from meshllm.gateway.meshview import MeshView
from meshllm.mesh.status import render
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import Plan, PublishedPlan
from meshllm.plan.planner import plan_mesh
from meshllm.plan.workload import Workload
from meshllm.serve.layout import Layout, LayoutError
from tests.serving_harness import replica
from tests.test_plan_fixtures import LLAMA_1B, class_mesh


def stamped(plan: dict[str, Any], term: int = 4) -> dict[str, Any]:
    """The plan as the planner node publishes it (:meth:`meshllm.mesh.node.Node.publish_plan`)."""
    return {**plan, "term": term, "planner": "p"}


def planned() -> dict[str, Any]:
    plan = plan_mesh(class_mesh([("rpi5", 2), ("jetson-orin-nano", 1), ("old-laptop", 1), ("mini-pc", 1)]), LLAMA_1B,
                     Workload.parse("conversation,scale=0.25,rate=0.4")).with_version(7)
    assert len(plan.replicas) >= 2
    return plan.to_json()


HAND_WRITTEN = {"version": 3, "n_layers": 4, "model": "tiny", "pinned": True, "replicas": [
    replica(0, "prefill", [("a", 0, 4)]), {"id": 1, "role": "DECODE", "stages": [
        {"node_id": "b", "start": 0, "stop": 2}, {"node_id": "c", "start": 2, "stop": 4}]}]}


def consumers(wire: dict[str, Any]) -> dict[str, Any]:
    """What each consumer makes of one published plan (its retained JSON)."""
    view = MeshView("m")
    view.apply("meshllm/v1/m/plan", json.dumps(wire).encode(), 0.0)
    snap = view.snapshot(0.0)["plan"]
    layout = Layout.from_plan(wire)
    status = render({"mesh": "m", "broker": "b", "members": {}, "planner": "p", "term": 4, "plan": wire})
    demo = render_plan(PublishedPlan.decode(wire))
    return {"layout": layout, "view": view, "snapshot": snap, "status": status, "demo": demo}


@pytest.mark.parametrize("make", [planned, lambda: HAND_WRITTEN], ids=["planned", "hand_written"])
def test_every_consumer_reads_the_same_published_plan(make: Any) -> None:
    wire = stamped(json.loads(json.dumps(make())))  # exactly what crosses the broker
    published = PublishedPlan.decode(wire)
    plan = published.plan
    got = consumers(wire)
    layout, view, snap = got["layout"], got["view"], got["snapshot"]
    assert view.plan == published and published.term == 4 and published.planner == "p"
    shape = [(r.id, r.role.value, [(s.node_id, s.start, s.stop) for s in r.stages]) for r in plan.replicas]
    assert [(r.id, r.role, [(s.node_id, s.start, s.stop) for s in r.stages])
            for r in layout.replicas.values()] == shape
    assert [(r["id"], r["role"], [(s["node_id"], s["start"], s["stop"]) for s in r["stages"]])
            for r in snap["replicas"]] == shape
    assert layout.version == snap["version"] == plan.version and snap["term"] == 4
    assert [r.slots for r in layout.replicas.values()] == [r["slots"] for r in snap["replicas"]] \
        == [r.slots for r in plan.replicas]
    assert f"plan v{plan.version} (term 4), {len(shape)} replicas" in got["status"]
    assert got["demo"].startswith(f"plan v{plan.version} ({plan.method}), {len(shape)} replica(s)")
    for r in plan.replicas:
        assert f"replica {r.id} {r.role.value.upper()}" in got["demo"]
    if make is planned:  # a planner's plan keeps its predictions; the strict artefact reader agrees
        assert Plan.from_json(wire) == plan and published.predicted and snap["metrics"] == plan.metrics.to_json()
        assert "predicted mean wait" in got["demo"]
    else:  # a plan file written by hand: routing defaults, no predictions shown
        assert published.pinned and not published.predicted and snap["metrics"] is None and snap["pinned"]
        assert [r.slots for r in plan.replicas] == [4, 4] and layout.replicas[1].role == "decode"
        with pytest.raises(PlanError, match="not a meshllm plan"):
            Plan.from_json(wire)  # a planner artefact must say what it is


MALFORMED = [
    ("not an object", [1, 2]),
    ("no replicas", {"version": 1, "n_layers": 4}),
    ("replicas not a list", {"version": 1, "n_layers": 4, "replicas": {"0": 1}}),
    ("unknown role", {**HAND_WRITTEN, "replicas": [{**replica(0, "prefill", [("a", 0, 4)]), "role": "boss"}]}),
    ("a gap in the layers", {**HAND_WRITTEN, "replicas": [replica(0, "mixed", [("a", 0, 2), ("b", 3, 4)])]}),
    ("too few layers", {**HAND_WRITTEN, "replicas": [replica(0, "mixed", [("a", 0, 3)])]}),
    ("a node twice", {**HAND_WRITTEN, "replicas": [replica(0, "prefill", [("a", 0, 4)]),
                                                   replica(1, "decode", [("a", 0, 4)])]}),
    ("a bad number", {**HAND_WRITTEN, "version": "seven"}),
    ("a wrong format", {**HAND_WRITTEN, "format": "something-else"}),
    ("a future format version", {**HAND_WRITTEN, "format": "meshllm-plan", "format_version": 99}),
    ("a bad term", {**HAND_WRITTEN, "term": "x"}),
]


@pytest.mark.parametrize("why, wire", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_published_plan_is_refused_in_one_line_by_every_consumer(why: str, wire: Any) -> None:
    with pytest.raises(PlanError) as e:
        PublishedPlan.decode(wire)
    assert "\n" not in str(e.value) and "plan" in str(e.value)
    with pytest.raises(LayoutError) as le:
        Layout.from_plan(wire if isinstance(wire, dict) else {"replicas": wire})
    assert "\n" not in str(le.value)
    if isinstance(wire, dict):
        view = MeshView("m")
        view.apply("meshllm/v1/m/plan", json.dumps(wire).encode(), 0.0)
        assert view.plan is None and view.replicas() == ()
        status = render({"mesh": "m", "broker": "b", "members": {}, "planner": None, "term": 0, "plan": wire})
        assert status.splitlines()[-1] == f"a malformed plan is published: {e.value}"


def test_a_layout_needs_a_replica_that_prefills_and_one_that_decodes() -> None:
    with pytest.raises(LayoutError, match="prefill and replicas that decode"):
        Layout.from_plan({"version": 1, "n_layers": 4, "replicas": [replica(0, "decode", [("a", 0, 4)])]})
