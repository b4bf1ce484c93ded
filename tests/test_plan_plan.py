"""Plans as artefacts: JSON round trip, validation, hysteresis, re-planning."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from meshllm.plan.errors import PlanError
from meshllm.plan.plan import PLAN_FORMAT_VERSION, Plan, Stage, should_replace
from meshllm.plan.planner import plan_mesh, plan_with, replan, rescore, system_model
from meshllm.plan.workload import Workload
from tests.test_plan_fixtures import LLAMA_1B, class_mesh

DEVICES = class_mesh([("rpi5", 2), ("jetson-orin-nano", 1), ("old-laptop", 1), ("mini-pc", 1)])
WORKLOAD = Workload.parse("conversation,scale=0.25,rate=0.4")


@pytest.fixture(scope="module")
def plan() -> Plan:
    return plan_mesh(DEVICES, LLAMA_1B, WORKLOAD)


def test_json_round_trip_keeps_every_figure(plan: Plan) -> None:
    text = json.dumps(plan.to_json())
    back = Plan.from_json(json.loads(text))
    assert back == plan and back.to_json() == plan.to_json()
    assert plan.format_version == PLAN_FORMAT_VERSION and plan.version == 1
    d = json.loads(text)
    assert {"run_s", "send_s", "memory_bytes", "memory_capacity"} <= set(d["replicas"][0]["stages"][0])
    assert {"bottleneck_s", "latency_s", "prefill_rate", "decode_token_rate", "slots", "context"} <= \
        set(d["replicas"][0])
    assert {"mean_wait_s", "ttft_s", "e2e_s", "sustainable_rate", "handoff_s", "tbt_s"} <= set(d["metrics"])


def test_unstable_plans_round_trip_with_unbounded_figures() -> None:
    p = plan_mesh(DEVICES, LLAMA_1B, WORKLOAD.with_rate(50.0))
    assert not p.metrics.stable and math.isinf(p.metrics.e2e_s)
    text = json.dumps(p.to_json())  # strict JSON: no Infinity
    assert "Infinity" not in text
    assert Plan.from_json(json.loads(text)) == p


def test_plans_from_other_formats_or_versions_are_refused(plan: Plan) -> None:
    d = plan.to_json()
    with pytest.raises(PlanError, match="format version 99"):
        Plan.from_json({**d, "format_version": 99})
    with pytest.raises(PlanError, match="not a meshllm plan"):
        Plan.from_json({**d, "format": "other"})


def test_validation_catches_gaps_overlaps_and_shared_nodes(plan: Plan) -> None:
    r = plan.replicas[0]
    s0 = r.stages[0]
    gap = replace(r, stages=(replace(s0, start=1),) + r.stages[1:])
    with pytest.raises(PlanError, match="contiguously"):
        replace(plan, replicas=(gap,) + plan.replicas[1:]).validate()
    short = replace(r, stages=tuple(replace(s, stop=min(s.stop, LLAMA_1B.n_layers - 1)) for s in r.stages
                                    if s.start < LLAMA_1B.n_layers - 1))
    with pytest.raises(PlanError, match="stops at layer"):
        replace(plan, replicas=(short,) + plan.replicas[1:]).validate()
    extra = Stage(s0.node_id, 0, LLAMA_1B.n_layers, 1.0, 0.0, 1.0, 2.0)
    dup = replace(r, id=99, stages=(extra,))
    with pytest.raises(PlanError, match="used twice"):
        replace(plan, replicas=plan.replicas + (dup,)).validate()


def test_hysteresis_replaces_only_clearly_better_plans(plan: Plan) -> None:
    m = plan.metrics
    better = replace(plan, metrics=replace(m, e2e_s=m.e2e_s * 0.85, mean_wait_s=m.mean_wait_s * 0.85))
    slightly = replace(plan, metrics=replace(m, e2e_s=m.e2e_s * 0.95, mean_wait_s=m.mean_wait_s * 0.95))
    unstable = replace(plan, metrics=replace(m, stable=False, sustainable_rate=m.rate * 0.9))
    assert should_replace(None, plan)
    assert should_replace(plan, better, margin=0.1)
    assert not should_replace(plan, slightly, margin=0.1)
    assert should_replace(plan, slightly, margin=0.0)
    assert not should_replace(plan, unstable) and should_replace(unstable, slightly)
    more = replace(unstable, metrics=replace(unstable.metrics, sustainable_rate=m.rate * 0.95))
    assert not should_replace(unstable, more, margin=0.1) and should_replace(unstable, more, margin=0.01)
    assert not should_replace(plan, replace(plan, replicas=()))


def test_replan_keeps_the_plan_when_nothing_changed(plan: Plan) -> None:
    kept, new = replan(plan, DEVICES, LLAMA_1B, WORKLOAD)
    assert not new and kept.version == plan.version
    assert [r.node_ids for r in kept.replicas] == [r.node_ids for r in plan.replicas]
    assert kept.metrics.e2e_s == pytest.approx(plan.metrics.e2e_s, rel=1e-9)


def test_replan_when_a_node_leaves_or_a_device_becomes_much_faster(plan: Plan) -> None:
    used = plan.replicas[0].node_ids[0]
    fewer = [d for d in DEVICES if d.node_id != used]
    assert rescore(plan, system_model(fewer, LLAMA_1B, WORKLOAD)) is None
    after, new = replan(plan, fewer, LLAMA_1B, WORKLOAD)
    assert new and after.version == plan.version + 1 and used not in after.node_ids
    # a small drift of the measured figures does not move anything
    drift = [replace(d, flops=d.flops * 1.03) for d in DEVICES]
    assert not replan(plan, drift, LLAMA_1B, WORKLOAD)[1]


def test_rescore_reports_current_figures_for_the_same_placement(plan: Plan) -> None:
    slower = [replace(d, flops=d.flops / 2, mem_bandwidth_Bps=d.mem_bandwidth_Bps / 2) for d in DEVICES]
    again = rescore(plan, system_model(slower, LLAMA_1B, WORKLOAD))
    assert again is not None
    assert [r.node_ids for r in again.replicas] == [r.node_ids for r in plan.replicas]
    assert again.replicas[0].stages[0].run_s == pytest.approx(2 * plan.replicas[0].stages[0].run_s, rel=0.01)


def test_baseline_plans_are_valid_artefacts_too() -> None:
    sm = system_model(DEVICES, LLAMA_1B, WORKLOAD)
    for method in ("exo", "dp-only", "splitwise", "random"):
        p = plan_with(sm, method)
        assert p.method == method
        assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p


class _Mesh:
    """The little of a mesh node that the planner duty reads (meshllm.serve.planning.PlannerNode)."""

    def __init__(self, records: dict[str, dict]) -> None:
        import asyncio

        self.node_id, self.plan, self.records, self.published = "a", None, records, []
        self.is_planner = self.in_touch = True
        self.view_version, self._event = 0, asyncio.Event()

    def change(self, node_id: str, **figures: float) -> None:
        self.records[node_id] = {**self.records[node_id],
                                 "profile": {**self.records[node_id]["profile"], **figures}}
        self.view_version += 1
        self._event.set()

    async def view_changed(self, since: int) -> int:
        while self.view_version == since:
            self._event.clear()
            await self._event.wait()
        return self.view_version

    def member_ids(self) -> set[str]:
        return set(self.records)

    def member_records(self) -> dict[str, dict]:
        return dict(self.records)

    async def publish_plan(self, plan: dict) -> None:
        self.plan = plan
        self.published.append(plan)


async def test_a_restated_serving_overhead_alone_does_not_make_the_planner_replan_but_the_next_plan_uses_it() -> None:
    import asyncio
    from pathlib import Path

    from meshllm.model.manifest import load_manifest
    from meshllm.profile import DeviceProfile
    from meshllm.serve import planning

    manifest = load_manifest(Path(__file__).resolve().parent.parent / "models" / "tiny-austen")
    records = {n: {"profile": DeviceProfile(n, n, flops=2e9, mem_bandwidth_Bps=1e9, mem_bytes=10**9).to_json()}
               for n in ("a", "b")}
    mesh = _Mesh(records)
    duty = planning.PlannerDuty(mesh, lambda: manifest, planning.PlannerOptions())
    seen: list[list[DeviceProfile]] = []
    make_plan = duty.make_plan

    def spy(members: dict) -> dict | None:
        seen.append(planning.member_profiles(members))
        return make_plan(members)
    duty.make_plan = spy  # type: ignore[method-assign]

    async def until(check, what: str) -> None:
        async with asyncio.timeout(20):
            while not check():
                await asyncio.sleep(0.05)

    task = asyncio.create_task(duty.run())
    try:
        await until(lambda: mesh.published, "the first plan")
        assert len(seen) == 1
        mesh.change("b", serving_overhead_s=0.004)  # b restates what it measured while serving
        await asyncio.sleep(planning.SETTLE_S + 1.0)
        assert len(seen) == 1, "the planner re-planned for a restated serving overhead alone"
        mesh.change("a", flops=4e9)  # a's measured figures changed: the planner looks again
        await until(lambda: len(seen) == 2, "a re-plan for a changed device")
        assert {p.node_id: p.serving_overhead_s for p in seen[1]} == {"a": 0.0, "b": 0.004}
    finally:
        task.cancel()
