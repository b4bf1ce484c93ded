"""Elect a plan by simulation: the analytic model proposes, a short seeded simulation decides.

The planner's queueing model (:mod:`meshllm.plan.objective`) is fast enough for the GA's
thousands of groupings, but it is optimistic where the simulator (and the serving code) are
not: MIXED replicas share their stages as a fluid in the model, while real stages let a
decode micro-batch wait behind a whole prompt; a PREFILL replica's spare decode capacity is
not lent by meshllm's scheduler. So the candidates worth deploying — the GA's grouping with
every role assignment the role rule proposes and every replica MIXED, and Splitwise-like
machines (devices of one class, each just large enough) with the same — are each served a
short seeded request stream at the planned rate by :func:`meshllm.sim.simulate`, with the
real scheduler, and the one with the lowest mean of the planner's objective wins: waiting time
(``objective="wait"``, the default) or end-to-end time (``"response"``); ties: the analytic
order. Deterministic: the stream's seed is fixed. Pure; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshllm.plan.plan import Plan, Role
from meshllm.plan.system import ReplicaSpec, Scored, SystemModel

PILOT_SEED = 7919  # a seed of its own: the evaluation's streams are seeds 1, 2, ...
MAX_CANDIDATES = 5  # simulated at most (the analytically best first) ...
SPLIT_ALL_UP_TO = 16  # ... and, on meshes of up to this many devices, every split of the one-class machines
TIE_S, TIE_FRACTION = 0.01, 0.02  # pilot waits this close are a tie (the earlier candidate stays)
PILOT_TOKENS = 20_000  # output tokens a pilot stream may carry (bounds its events on long-output workloads)


def spec_key(specs: Sequence[ReplicaSpec]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """What tells two candidates apart: each replica's role and devices."""
    return tuple(sorted((s.role.value, s.partition.devices) for s in specs))


def candidates(sm: SystemModel, groupings: Sequence[Sequence[Sequence[int]]]) -> list[Scored]:
    """Every role assignment of each grouping (splits, all MIXED), scored analytically, best first, distinct."""
    out: dict[tuple[tuple[str, tuple[int, ...]], ...], Scored] = {}
    for groups in groupings:
        evals = [sm.group(g) for g in groups if g]
        ok = [e for e in evals if e.feasible]
        if not ok:
            continue
        assigns: list[tuple[ReplicaSpec, ...]] = []
        if len(ok) == 1:
            spec = sm.mixed(ok[0].devices)
            if isinstance(spec, ReplicaSpec):
                assigns.append((spec,))
        else:
            assigns = sm.role_candidates(ok)
            if not any(all(s.role is Role.MIXED for s in a) for a in assigns):
                assigns.append(tuple(sm.specs_for(e, Role.MIXED) for e in ok))
        for specs in assigns:
            key = spec_key(specs)
            if key not in out:
                try:
                    out[key] = sm.scored_specs(specs)
                except ValueError:
                    continue
    return sorted(out.values(), key=lambda s: (s.fitness if math.isfinite(s.fitness) else math.inf,))


def every_split(sm: SystemModel, groups: Sequence[Sequence[int]]) -> list[Scored]:
    """Every PREFILL/DECODE split of a grouping's replicas in the role rule's efficiency order (1 to R-1
    PREFILL), scored analytically. The analytic model does not see a PREFILL replica lending itself to
    decoding (the scheduler's mixed pool), so it ranks PREFILL-heavy splits low that the pilot may rank first;
    on small meshes those whose prompts do not saturate the PREFILL replicas are worth one pilot run."""
    ok = [e for e in (sm.group(g) for g in groups if g) if e.feasible]
    if len(ok) < 2:
        return []
    _, _, order = sm.role_rates(ok)
    out = []
    for p in range(1, len(ok)):
        try:
            scored = sm.scored_specs(sm.split_specs(ok, order, p))
        except ValueError:
            continue
        # a PREFILL pool that cannot keep up saturates whatever is lent to decoding: not worth a pilot
        if scored.metrics.prefill_utilisation < 1.0:
            out.append(scored)
    return out


def pilot_means(sm: SystemModel, plan: Plan, n: int, seed: int = PILOT_SEED) -> tuple[float, float]:
    """Mean waiting and end-to-end time of ``n`` seeded requests of the plan's workload served by ``plan`` in the
    simulator (both infinite when some request is not served)."""
    from meshllm.sim import requests, simulate  # the simulator builds on this package: import it when used

    n = max(20, min(n, int(PILOT_TOKENS / max(sm.workload.output.mean, 1.0))))
    reqs = requests([sm.workload], [n], seed=seed, max_seq_len=sm.cost.model.max_seq_len)
    res = simulate(plan, sm.cost, reqs)
    if res.completed < len(reqs):
        return math.inf, math.inf
    return float(res.wait.mean()), float(res.e2e.mean())


def pilot_wait(sm: SystemModel, plan: Plan, n: int, seed: int = PILOT_SEED) -> float:
    """Mean waiting time of ``n`` seeded requests of the plan's workload served by ``plan`` in the simulator."""
    return pilot_means(sm, plan, n, seed)[0]


def pilot_score(sm: SystemModel, plan: Plan, n: int, seed: int = PILOT_SEED) -> float:
    """The planner's objective in a pilot: the mean wait (``"wait"``) or mean end-to-end time (``"response"``)."""
    wait, e2e = pilot_means(sm, plan, n, seed)
    return e2e if sm.options.objective == "response" else wait


def elect(sm: SystemModel, cands: Sequence[Scored], method: str, n: int, version: int = 1,
          seed: int | None = None, extra: Sequence[Scored] = ()) -> tuple[Plan, list[tuple[Plan, float]]]:
    """The candidate whose plan scores best on the planner's objective (:func:`pilot_score`) in a pilot
    simulation of ``n`` requests; and every (plan, score) tried.

    Candidates are tried in their order (the analytic favourite first), then ``extra`` ones (distinct from
    those); a later one must score less by more than ``TIE_S`` and ``TIE_FRACTION`` (pilot noise). On the
    wait, once a plan makes requests wait less than ``TIE_S`` on average nothing can clearly beat it, so
    the rest are not simulated.
    """
    tried: list[tuple[Plan, float]] = []
    for c in [*cands[:MAX_CANDIDATES], *extra]:
        plan = sm.to_plan(c, method, version=version, seed=seed)
        tried.append((plan, pilot_score(sm, plan, n)))
        if sm.options.objective == "wait" and tried[-1][1] < TIE_S:
            break
    low = min(w for _, w in tried)
    best = next(i for i, (_, w) in enumerate(tried) if w <= low + max(TIE_S, TIE_FRACTION * low))
    return tried[best][0], tried
