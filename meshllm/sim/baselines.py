"""Baselines that need the simulator: Splitwise with its pools sized by simulation, and capacity.

Splitwise provisions its prompt and token pools by simulating the workload (Patel et al.,
ISCA 2024, section on provisioning); here, at each request rate, every prompt/token split of
the machines (:func:`meshllm.plan.baselines.split_plans`) serves a short seeded pilot stream
with Splitwise's router, and the split with the lowest mean waiting time is the plan (ties:
the higher throughput). :func:`capacity` is what a plan sustains in simulation when offered far
more than it can serve. Pure and deterministic; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from meshllm.plan.baselines import split_plans, splitwise_machines
from meshllm.plan.plan import Plan
from meshllm.plan.system import SystemModel
from meshllm.sim.arrivals import requests
from meshllm.sim.engine import SimResult, simulate
from meshllm.sim.routing import Router, SplitwiseRouter

PILOT_SEED = 104729  # pilot streams have a seed of their own (evaluations use 1, 2, ...)
RouterFor = Callable[[Plan], Router]


def splitwise_router(cost, routing: str, kv_per_seq: int | None = None) -> RouterFor:  # type: ignore[no-untyped-def]
    return lambda plan: SplitwiseRouter(plan, cost, prompt_routing=routing, kv_per_seq=kv_per_seq)


def pilot(sm: SystemModel, plan: Plan, n: int, router: RouterFor | None = None, seed: int = PILOT_SEED) -> SimResult:
    reqs = requests([sm.workload], [n], seed=seed, max_seq_len=sm.cost.model.max_seq_len)
    return simulate(plan, sm.cost, reqs, router=router(plan) if router else None)


def sized_by_simulation(sm: SystemModel, machines: Sequence[Sequence[int]] | None = None, routing: str = "tokens",
                        n: int = 200, method: str = "splitwise", kv_per_seq: int | None = None) -> Plan | None:
    """The split of ``machines`` (default: Splitwise's) that waits least under Splitwise's router at the rate."""
    ms = [list(m) for m in (machines if machines is not None else splitwise_machines(sm))]
    plans = split_plans(sm, ms, method)
    if not plans:
        return None
    best: tuple[tuple[float, float], Plan] | None = None
    for p in plans:
        res = pilot(sm, p, n, splitwise_router(sm.cost, routing, kv_per_seq))
        wait = float(res.wait.mean()) if res.completed == res.n else math.inf
        key = (wait, -res.throughput_rps)
        if best is None or key < best[0]:
            best = (key, p)
    assert best is not None
    return best[1]


def capacity(plan: Plan, sm: SystemModel, router: RouterFor | None = None, n: int = 300,
             seed: int = PILOT_SEED + 1, offered: float | None = None) -> float:
    """Requests/s ``plan`` completes in simulation when offered more than it serves.

    The offered stream is Poisson at ``offered`` req/s (default: twice the larger of the workload's
    rate and the plan's predicted sustainable rate), so the queues grow and the throughput is the
    service rate; a burst would instead measure how the router copes with everything at once.
    """
    if not plan.replicas:
        return 0.0
    if offered is None:
        pred = plan.metrics.sustainable_rate
        offered = 2.0 * max(sm.workload.rate, pred if math.isfinite(pred) else 0.0)
    reqs = requests([sm.workload.with_rate(offered)], [n], seed=seed, max_seq_len=sm.cost.model.max_seq_len)
    return simulate(plan, sm.cost, reqs, router=router(plan) if router else None).throughput_rps
