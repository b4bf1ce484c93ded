"""Baselines, scored by the same cost model and objective as the GA's plans.

- ``exo``: one pipeline over every device, layers in proportion to memory
  (exo's ring partitioning), serving both phases (MIXED).
- ``dp-only``: one pipeline over every device with the DP's partition and
  device order (MIXED) — the DP without GA clustering or roles.
- ``splitwise``: Splitwise's pools adapted to an edge mesh, as PAPER-NOTES
  prescribes: a Splitwise "machine" is a fixed pipeline group. Machines are
  formed role-agnostically (devices in class order, each machine just large
  enough to hold the model, like identical servers), each gets the same DP
  as the GA's replicas. Prompt machines are the most compute-capable ones
  (Splitwise-HA puts prompts on the stronger hardware); their number is the
  best of every split (Splitwise provisions pool sizes by search). Prompts go
  to the least loaded prompt machine, sequences to token machines in
  proportion to their KV memory (least scheduled memory), and idle machines
  of one pool serve the other (the mixed pool).
- ``random``: a random grouping (seeded), with the DP and the role rule.

Pure; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from meshllm.plan.objective import infeasible_metrics
from meshllm.plan.partition import Partition, Placement
from meshllm.plan.plan import Plan, Role
from meshllm.plan.system import ReplicaSpec, Scored, SystemModel

BASELINES = ("exo", "dp-only", "splitwise", "random")


def _empty(sm: SystemModel, method: str, note: str) -> Plan:
    scored = Scored(math.inf, infeasible_metrics(sm.workload.rate), (), tuple(range(len(sm.cost.devices))), (note,))
    return sm.to_plan(scored, method)


def _all_devices(sm: SystemModel) -> list[int]:
    """Every device, or the ``L`` with the most memory when there are more devices than layers."""
    n, L = len(sm.cost.devices), sm.cost.L
    order = sorted(range(n), key=lambda i: (-sm.cost.mem[i], i))
    return sorted(order[:L])


def exo_plan(sm: SystemModel) -> Plan:
    cost = sm.cost
    order = sorted(range(len(cost.devices)), key=lambda i: (-cost.mem[i], i))  # exo sorts its ring by memory
    share = np.cumsum(cost.mem[order]) / cost.mem[order].sum()
    cuts = [0] + [int(round(x * cost.L)) for x in share]
    stages = [(d, a, b) for d, a, b in zip(order, cuts[:-1], cuts[1:], strict=True) if b > a]
    kv_room = min((cost.mem[d] - cost.memory(a, b, 0)) / (cost.cum_kv[b] - cost.cum_kv[a]) for d, a, b in stages)
    slots = int(min(sm.options.max_decode_slots, max(kv_room, 0.0) // sm.ctx_decode))
    if slots < 1:
        return _empty(sm, "exo", "exo: a device cannot hold its memory-proportional share of the layers with "
                                 "the KV cache of one sequence")
    work = sm.mixed_work(slots, len(stages))
    placed = []
    for j, (d, a, b) in enumerate(stages):
        send = (cost.activation_time(d, stages[j + 1][0], b, work.tokens) if j + 1 < len(stages) else 0.0)
        placed.append(Placement(d, a, b, cost.run_time(d, a, b, work), send))
    part = Partition(tuple(placed), max(p.time_s for p in placed), False)
    spec = sm.mixed_spec(part, slots)
    m = sm.evaluate_specs([spec])
    idle = tuple(i for i in range(len(cost.devices)) if i not in {p.device for p in placed})
    return sm.to_plan(Scored(sm.objective(m), m, (spec,), idle, ()), "exo")


def dp_only_plan(sm: SystemModel) -> Plan:
    spec = sm.mixed(_all_devices(sm))
    if not isinstance(spec, ReplicaSpec):
        return _empty(sm, "dp-only", f"dp-only: {spec.reason}")
    m = sm.evaluate_specs([spec])
    used = set(spec.partition.devices)
    idle = tuple(i for i in range(len(sm.cost.devices)) if i not in used)
    return sm.to_plan(Scored(sm.objective(m), m, (spec,), idle, ()), "dp-only")


def splitwise_machines(sm: SystemModel) -> list[list[int]]:
    """Role-agnostic machines: devices in (class, node id) order, each group just large enough."""
    cost = sm.cost
    order = sorted(range(len(cost.devices)), key=lambda i: (cost.devices[i].device_class, cost.devices[i].node_id))
    machines: list[list[int]] = []
    current: list[int] = []
    for d in order:
        current.append(d)
        if sm.group(current).feasible:
            machines.append(current)
            current = []
    if current and machines and sm.group(machines[-1] + current).feasible:
        machines[-1] = machines[-1] + current
    return machines


def splitwise_plan(sm: SystemModel) -> Plan:
    machines = splitwise_machines(sm)
    if not machines:
        return _empty(sm, "splitwise", "splitwise: no group of devices can hold the model")
    if len(machines) == 1:
        spec = sm.mixed(machines[0])
        if not isinstance(spec, ReplicaSpec):
            return _empty(sm, "splitwise", f"splitwise: {spec.reason}")
        m = sm.evaluate_specs([spec])
        used = set(spec.partition.devices)
        return sm.to_plan(Scored(sm.objective(m), m, (spec,), tuple(i for i in range(len(sm.cost.devices))
                                                                 if i not in used), ()), "splitwise")
    evals = [sm.group(g) for g in machines]
    ranked = sorted(evals, key=lambda e: (-e.prefill_service.max_rate, e.devices))  # type: ignore[union-attr]
    best: Scored | None = None
    for p in range(1, len(ranked)):
        specs = tuple(sm.specs_for(e, Role.PREFILL if i < p else Role.DECODE) for i, e in enumerate(ranked))
        m = sm.evaluate_specs(specs, borrow=True, routing="memory")
        if best is None or sm.objective(m) < best.fitness:
            best = Scored(sm.objective(m), m, specs, (), ())
    assert best is not None
    used = {d for s in best.replicas for d in s.partition.devices}
    best = replace(best, idle=tuple(i for i in range(len(sm.cost.devices)) if i not in used))
    return sm.to_plan(best, "splitwise", notes=("splitwise: mixed-pool borrowing, least-memory token routing",))


def split_plans(sm: SystemModel, machines: list[list[int]], method: str = "splitwise") -> list[Plan]:
    """Every prompt/token split of fixed machines, for sizing the pools by simulation (as Splitwise does).

    Machines in two orders (fastest prompt server first: Splitwise-HA's choice of hardware; and most
    prefill-efficient first: the role rule's), the first ``p`` prompt machines, ``p`` = 1 .. R-1;
    one machine: that machine serving both phases.
    """
    evals = [e for e in (sm.group(g) for g in machines) if e.feasible]
    if not evals:
        return []
    if len(evals) == 1:
        spec = sm.mixed(evals[0].devices)
        return [sm.to_plan(sm.scored_specs([spec]), method)] if isinstance(spec, ReplicaSpec) else []
    tokens = max(sm.decode_tokens, 1e-9)
    by_speed = sorted(evals, key=lambda e: (-e.prefill_service.max_rate, e.devices))  # type: ignore[union-attr]
    by_ratio = sorted(evals, key=lambda e: (-e.prefill_service.max_rate * tokens  # type: ignore[union-attr]
                                            / e.decode_service.max_token_rate, e.devices))  # type: ignore[union-attr]
    out: dict[tuple[tuple[int, ...], ...], Plan] = {}
    for ranked in (by_speed, by_ratio):
        for p in range(1, len(ranked)):
            key = tuple(sorted(e.devices for e in ranked[:p]))
            if key in out:
                continue
            specs = [sm.specs_for(e, Role.PREFILL if i < p else Role.DECODE) for i, e in enumerate(ranked)]
            out[key] = sm.to_plan(sm.scored_specs(specs), method)
    return list(out.values())


def random_plan(sm: SystemModel, seed: int = 0, tries: int = 200) -> Plan:
    rng = np.random.default_rng(seed)
    n = len(sm.cost.devices)
    for _ in range(tries):
        r = int(rng.integers(1, n + 1))
        labels = rng.integers(0, r + 1, size=n)
        groups = [[i for i in range(n) if labels[i] == lab] for lab in range(1, r + 1)]
        scored = sm.score([g for g in groups if g])
        if scored.replicas:
            return sm.to_plan(scored, "random", seed=seed)
    return _empty(sm, "random", f"random: no feasible grouping in {tries} draws")


def baseline_plan(sm: SystemModel, name: str, seed: int = 0) -> Plan:
    if name == "exo":
        return exo_plan(sm)
    if name == "dp-only":
        return dp_only_plan(sm)
    if name == "splitwise":
        return splitwise_plan(sm)
    if name == "random":
        return random_plan(sm, seed)
    raise ValueError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
