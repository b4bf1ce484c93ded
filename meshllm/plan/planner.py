"""Entry points: make a plan, re-score a plan under new conditions, re-plan with hysteresis.

The planner node of a mesh and ``meshllm plan`` call these same functions:
:func:`plan_mesh` for a fresh plan; :func:`replan` when membership or measured
profiles change — it re-scores the current plan's exact placement under the
new cost model and keeps it unless the new plan is clearly better: at least
``SIM_MARGIN`` less waiting in the same pilot simulation when the election is on
(the default), else :func:`~meshllm.plan.plan.should_replace`. Pure; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from meshllm.plan.baselines import BASELINES, baseline_plan, splitwise_machines
from meshllm.plan.cost import CostModel, DeviceFactors, ModelCosts
from meshllm.plan.elect import (
    MAX_CANDIDATES,
    SPLIT_ALL_UP_TO,
    TIE_S,
    candidates,
    elect,
    every_split,
    pilot_score,
    spec_key,
)
from meshllm.plan.errors import PlanError
from meshllm.plan.ga import run_ga
from meshllm.plan.partition import Partition, Placement
from meshllm.plan.plan import DEFAULT_MARGIN, Plan, Role, should_replace
from meshllm.plan.system import PlanOptions, ReplicaSpec, Scored, SystemModel
from meshllm.plan.workload import Workload
from meshllm.profile import DeviceProfile

METHODS = ("ga", *BASELINES)
SIM_MARGIN = 0.25  # a re-plan must cut the simulated pilot wait by at least this fraction


def system_model(devices: Sequence[DeviceProfile], model: ModelCosts, workload: Workload,
                 options: PlanOptions | None = None, factors: Mapping[str, DeviceFactors] | None = None
                 ) -> SystemModel:
    return SystemModel(CostModel(model, devices, factors), workload, options or PlanOptions())


def plan_mesh(devices: Sequence[DeviceProfile], model: ModelCosts, workload: Workload, *,
              options: PlanOptions | None = None, factors: Mapping[str, DeviceFactors] | None = None,
              method: str = "ga", version: int = 1, seed_plans: Sequence[Plan] = ()) -> Plan:
    """The plan of ``method`` ("ga" or a baseline) for these devices, model and workload."""
    if method not in METHODS:
        raise PlanError(f"unknown planning method {method!r} (choose from {', '.join(METHODS)})")
    sm = system_model(devices, model, workload, options, factors)
    return plan_with(sm, method, version, seed_plans)


def plan_with(sm: SystemModel, method: str = "ga", version: int = 1, seed_plans: Sequence[Plan] = ()) -> Plan:
    if method != "ga":
        plan = baseline_plan(sm, method, sm.options.seed)
        return plan.with_version(version)
    index = sm.cost.index
    seeds = [splitwise_machines(sm)]
    for p in seed_plans:
        groups = [[index[n] for n in r.node_ids if n in index] for r in p.replicas]
        seeds.append([g for g in groups if g])
    search = sm
    if sm.options.search_quantum > 0:  # search on profiles rounded to classes, score the result exactly
        search = SystemModel(sm.cost, sm.workload, replace(sm.options, profile_quantum=sm.options.search_quantum))
    result = run_ga(search, [s for s in seeds if s])
    extra: dict[str, object] = {"objective": sm.options.objective, "generations": result.generations,
                                "evaluations": result.evaluations, "converged": result.converged}
    cands = candidates(sm, [result.groups, *[s for s in seeds if s]]) if sm.options.elect > 0 else []
    if cands:  # the analytic model proposes, a short simulation decides; the GA's own choice is tried first
        own = sm.score(result.groups)
        cands = [own, *[c for c in cands if c.replicas != own.replicas]] if own.replicas else cands
        splits: list[Scored] = []
        if len(sm.cost.devices) <= SPLIT_ALL_UP_TO:  # small meshes: a few more pilots are cheap
            seen = {spec_key(c.replicas) for c in cands[:MAX_CANDIDATES]}
            for c in [*every_split(sm, seeds[0]), _roles_only(sm, search, seeds)]:
                if c.replicas and spec_key(c.replicas) not in seen:
                    seen.add(spec_key(c.replicas))
                    splits.append(c)
        plan, tried = elect(sm, cands, "ga", pilot_size(sm), version=version, seed=sm.options.seed, extra=splits)
        key = "pilot_e2e_s" if sm.options.objective == "response" else "pilot_waits_s"
        extra[key] = [round(w, 4) if math.isfinite(w) else None for _, w in tried]
    else:
        plan = sm.to_plan(sm.score(result.groups), "ga", version=version, seed=sm.options.seed)
    extra["dp_runs"] = search.dp_runs + (sm.dp_runs if search is not sm else 0)
    return replace(plan, extra=extra)


def _roles_only(sm: SystemModel, search: SystemModel, seeds: Sequence[Sequence[Sequence[int]]]) -> Scored:
    """E2LLM's own choice for these devices: the GA with roles by the role rule and no MIXED replica, on mean
    end-to-end time. Its grouping differs from the wait GA's, and with the scheduler's lending it can wait less."""
    opts = replace(sm.options, allow_mixed=False, objective="response", elect=0)
    exact = SystemModel(sm.cost, sm.workload, opts)
    rough = exact if search is sm else \
        SystemModel(sm.cost, sm.workload, replace(opts, profile_quantum=search.options.profile_quantum))
    return exact.score(run_ga(rough, [s for s in seeds if s]).groups)


def rescore(plan: Plan, sm: SystemModel) -> Plan | None:
    """``plan``'s exact placement (groups, order, layer ranges, roles, slots) scored under ``sm``.

    None when it no longer applies: a node is gone, the model (or its dtype) changed, or a stage no longer fits.
    """
    cost = sm.cost
    if plan.n_layers != cost.L or plan.dtype != cost.model.dtype or not plan.replicas:
        return None
    specs: list[ReplicaSpec] = []
    for r in plan.replicas:
        if any(s.node_id not in cost.index for s in r.stages):
            return None
        devs = [cost.index[s.node_id] for s in r.stages]
        k = len(devs)
        if r.role is Role.PREFILL:
            work = sm.prefill_work
        elif r.role is Role.DECODE:
            work = sm.decode_work(r.slots, k)
        else:
            work = sm.mixed_work(r.slots, k)
        placed = []
        for m, (d, s) in enumerate(zip(devs, r.stages, strict=True)):
            if not cost.fits(d, s.start, s.stop, r.slots * r.context):
                return None
            send = cost.activation_time(d, devs[m + 1], s.stop, work.tokens) if m + 1 < k else 0.0
            placed.append(Placement(d, s.start, s.stop, cost.run_time(d, s.start, s.stop, work), send))
        part = Partition(tuple(placed), max(p.time_s for p in placed), r.order_exact)
        specs.append(ReplicaSpec(r.role, part, r.slots, r.context, sm.prefill_service(part),
                                 sm.decode_service(part, r.slots)))
    try:
        metrics = sm.evaluate_specs(specs)
    except ValueError:
        return None
    used = {p.device for s in specs for p in s.partition.stages}
    idle = tuple(i for i in range(len(cost.devices)) if i not in used)
    return sm.to_plan(Scored(sm.objective(metrics), metrics, tuple(specs), idle, ()), plan.method, plan.version,
                      plan.seed)


def replan(current: Plan | None, devices: Sequence[DeviceProfile], model: ModelCosts, workload: Workload, *,
           options: PlanOptions | None = None, factors: Mapping[str, DeviceFactors] | None = None,
           margin: float = DEFAULT_MARGIN) -> tuple[Plan, bool]:
    """(plan to run, whether it is a new one). The new plan gets ``current.version + 1``."""
    sm = system_model(devices, model, workload, options, factors)
    now = rescore(current, sm) if current is not None else None
    version = current.version + 1 if current is not None else 1
    new = plan_with(sm, "ga", version, seed_plans=[current] if current is not None else [])
    if now is not None and now.replicas and new.replicas and sm.options.elect > 0:
        if _placement(now) == _placement(new):
            return now, False
        # the new plan was elected by simulation: it must beat the current one there, by a margin that
        # also covers the pilot's noise near capacity (a 3% drift of the profiles moves pilot waits ~15%)
        n = pilot_size(sm)
        w_now, w_new = pilot_score(sm, now, n), pilot_score(sm, new, n)
        if math.isfinite(w_now) or math.isfinite(w_new):
            bar = max(margin, SIM_MARGIN)
            return (new, True) if w_new < w_now * (1.0 - bar) - TIE_S else (now, False)
    if should_replace(now, new, margin):
        return new, True
    assert now is not None
    return now, False


def _placement(plan: Plan) -> frozenset[tuple[str, tuple[tuple[str, int, int], ...]]]:
    return frozenset((r.role.value, tuple((s.node_id, s.start, s.stop) for s in r.stages)) for r in plan.replicas)


def pilot_size(sm: SystemModel) -> int:
    """Requests of the election's pilot stream: ``elect`` from 32 devices on, up to 4x that on smaller meshes."""
    e = sm.options.elect
    return min(4 * e, max(e, e * 32 // max(len(sm.cost.devices), 1)))
