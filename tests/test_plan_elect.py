"""The planner earns its plans: candidates proposed by the analytic model, elected by a seeded simulation."""

from __future__ import annotations

import math

from meshllm.plan import Workload, plan_mesh, system_model
from meshllm.plan.elect import TIE_S, candidates, elect, pilot_wait
from meshllm.plan.system import PlanOptions
from tests.test_plan_fixtures import LLAMA_1B, class_mesh

DEVICES = class_mesh([("rpi5", 2), ("jetson-orin-nano", 1), ("old-laptop", 1), ("mini-pc", 1)])


def test_the_elected_plan_waits_least_among_the_candidates_it_simulated() -> None:
    w = Workload.parse("conversation,scale=0.25,rate=0.3")
    sm = system_model(DEVICES, LLAMA_1B, w)
    groupings = [[[0], [1], [2], [3], [4]], [[0, 1], [2, 3], [4]]]
    cands = candidates(sm, groupings)
    assert any(all(s.role.value == "mixed" for s in c.replicas) for c in cands)  # role-less is a candidate
    assert any(any(s.role.value == "prefill" for s in c.replicas) for c in cands)  # and so are roles
    plan, tried = elect(sm, cands, "ga", 60)
    waits = [x for _, x in tried]
    assert len(tried) == min(len(cands), 5) and all(math.isfinite(x) for x in waits)
    chosen = waits[[p for p, _ in tried].index(plan)]
    assert chosen <= min(waits) + max(TIE_S, 0.02 * min(waits))
    assert pilot_wait(sm, plan, 60) == chosen  # seeded: the same stream, the same figure


def test_a_lightly_loaded_mesh_keeps_the_analytic_choice_after_one_pilot() -> None:
    w = Workload.parse("in=64,out=2,rate=0.001")  # requests never overlap
    plan = plan_mesh(DEVICES, LLAMA_1B, w)
    assert len(plan.extra["pilot_waits_s"]) == 1  # nobody waited: no other candidate simulated
    analytic = plan_mesh(DEVICES, LLAMA_1B, w, options=PlanOptions(elect=0))
    assert [(r.role, r.node_ids) for r in plan.replicas] == [(r.role, r.node_ids) for r in analytic.replicas]


def test_the_planners_objective_decides_the_election_wait_or_end_to_end() -> None:
    """The same candidates, elected on the mean wait (the default) and on the mean end-to-end time: each elects
    the best on its own figure among those it tried, and here they disagree (the role-less plan starts prompts
    sooner, the PREFILL/DECODE plan answers sooner)."""
    from meshllm.plan.elect import pilot_means

    w = Workload.parse("conversation,scale=0.25,rate=0.5")
    groupings = [[[0], [1], [2], [3], [4]], [[0, 1], [2, 3], [4]], [[0, 3], [1], [2], [4]]]
    chosen = {}
    for objective, figure in (("wait", 0), ("response", 1)):
        sm = system_model(DEVICES, LLAMA_1B, w, PlanOptions(objective=objective))
        plan, tried = elect(sm, candidates(sm, groupings), "ga", 60)
        scores = [x for _, x in tried]
        assert len(tried) > 1 and all(math.isfinite(x) for x in scores)
        assert scores[[p for p, _ in tried].index(plan)] <= min(scores) + max(TIE_S, 0.02 * min(scores))
        chosen[objective] = pilot_means(sm, plan, 60)
        assert chosen[objective][figure] == scores[[p for p, _ in tried].index(plan)]
    (wait_w, wait_e2e), (resp_w, resp_e2e) = chosen["wait"], chosen["response"]
    assert wait_w < resp_w and resp_e2e < wait_e2e, chosen
