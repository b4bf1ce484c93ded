"""From a grouping of devices to a scored serving system and a :class:`~meshllm.plan.plan.Plan`.

:class:`SystemModel` is what the GA, the baselines and the tests share. For a
group it runs the DP twice — once for prefill work (the workload's mean
prompt), once for decode work (a micro-batch step at the mean decode
context, with as many KV slots as fit, up to ``max_decode_slots``) — and
summarises each partition as a prefill or decode server
(:mod:`meshllm.plan.objective`). For a grouping it assigns roles
(:mod:`meshllm.plan.roles`), adds the KV hand-off between pools, and scores the
result; a single feasible group serves both phases (MIXED). Groups that
cannot hold the model are left idle and reported.

Everything is cached: partitions by the group's device *signatures* (devices
with identical figures and no per-peer link measurements are
interchangeable, so a mesh of a few device classes needs few DP runs),
scores by the canonical grouping. Pure and deterministic; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from meshllm.plan.cost import TOKEN_ID_BYTES, CostModel, Work
from meshllm.plan.objective import (
    DecodeService,
    Metrics,
    PrefillService,
    capacities,
    evaluate,
    evaluate_mixed,
    infeasible_metrics,
)
from meshllm.plan.partition import (
    DEFAULT_EXACT_LIMIT,
    Infeasible,
    Partition,
    infeasibility_reason,
    max_kv_tokens,
    partition,
)
from meshllm.plan.plan import Plan, Replica, Role, Stage
from meshllm.plan.roles import efficiency_order, split_candidates
from meshllm.plan.workload import Workload

Group = tuple[int, ...]


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the planner; the defaults are what `meshllm plan` uses."""

    max_decode_slots: int = 16  # sequences a DECODE replica batches at most
    prefill_kv_slots: int = 2  # prompts a PREFILL stage holds KV for (one computing, one handing off)
    context_quantile: float = 0.99  # KV reserved per sequence: this quantile of input + output
    exact_limit: int = DEFAULT_EXACT_LIMIT  # device order by exact DP up to this group size
    borrow: bool = False  # model a mixed pool for GA plans too (idle replicas lend themselves to the other role)
    allow_mixed: bool = True  # "every replica MIXED" is a role candidate too (roles only where they pay)
    objective: str = "wait"  # what the GA minimises: "wait" (mean queueing) or "response" (mean end-to-end)
    elect: int = 100  # > 0: re-score the best candidates by simulation (meshllm.plan.elect): requests per pilot
    # stream at 32 devices and beyond, up to 4x as many on smaller meshes (cheaper per request, and their
    # few replicas need a longer stream to rank plans near capacity)
    profile_quantum: float = 0.0  # > 0: devices within this relative step share DP results
    search_quantum: float = 0.05  # the GA searches with profile_quantum = this; the final plan is scored exactly
    # genetic algorithm
    population: int | None = None  # None: 32 up to 12 devices, else 24
    generations: int = 40
    restarts: int | None = None  # independent GA runs, best kept; None: 3 up to 7 devices, 2 up to 12, else 1
    patience: int | None = None  # generations without an improvement before stopping; None: 15 up to 12 devices, else 8
    min_improvement: float = 1e-3  # relative improvement that counts as one
    elite: int = 2
    immigrants: int = 4  # newcomers per generation
    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_rate: float = 0.7
    max_evaluations: int | None = None  # distinct groupings the GA may score; None: clamp(8000/n, 200, 2000)
    local_search: bool = True  # hill-climb the best chromosome with single-device moves at the end
    local_search_budget: int = 100  # new groupings the hill-climb may score
    seed: int = 0


@dataclass(frozen=True)
class GroupEval:
    """A group's two faces: its best pipeline and capacity as PREFILL and as DECODE."""

    devices: Group
    prefill: Partition | Infeasible
    decode: Partition | Infeasible
    slots: int  # decode KV slots that fit
    prefill_service: PrefillService | None
    decode_service: DecodeService | None

    @property
    def feasible(self) -> bool:
        return self.prefill.feasible and self.decode.feasible

    @property
    def reason(self) -> str:
        for p in (self.decode, self.prefill):
            if isinstance(p, Infeasible):
                return p.reason
        return ""


@dataclass(frozen=True)
class ReplicaSpec:
    role: Role
    partition: Partition
    slots: int
    context: int
    prefill: PrefillService  # capacity as a prefill server (for reports and the role rule)
    decode: DecodeService  # capacity as a decode server
    uid: int = field(default=-1, compare=False)  # set by the SystemModel that caches it (hand-off cache key)


@dataclass(frozen=True)
class Scored:
    fitness: float
    metrics: Metrics
    replicas: tuple[ReplicaSpec, ...]
    idle: tuple[int, ...]
    notes: tuple[str, ...]


class SystemModel:
    def __init__(self, cost: CostModel, workload: Workload, options: PlanOptions = PlanOptions()) -> None:
        self.cost = cost
        self.workload = workload
        self.options = options
        msl = cost.model.max_seq_len
        q = options.context_quantile
        self.ctx_decode = workload.context_budget(q, msl)
        self.ctx_prefill = min(math.ceil(workload.input.quantile(q)), msl)
        self.decode_tokens = workload.decode_tokens()
        self.decode_ctx = min(workload.decode_context(), float(msl))
        n = workload.input.array
        self._prefill_basis = np.stack([np.ones_like(n), n, n * (n + 1) / 2, 2 * n, np.ones_like(n)], axis=1)
        mean_basis = workload.input.probs @ self._prefill_basis
        self.prefill_work = Work(runs=float(mean_basis[0]), tokens=float(mean_basis[1]), attn=float(mean_basis[2]),
                                 kv_tokens=float(mean_basis[3]), head_tokens=float(mean_basis[4]))
        # devices with the same figures (to within ``profile_quantum``) and no per-peer link measurement
        # are interchangeable: one class id, one DP per multiset of classes
        linked = {d.node_id for d in cost.devices if d.links} | {p for d in cost.devices for p in d.links}
        quantum = options.profile_quantum

        def bucket(x: float) -> float:
            return round(math.log(x) / math.log1p(quantum)) if quantum > 0 and x > 0 else x

        classes: dict[Hashable, int] = {}
        self._cls: list[int] = []
        for i, d in enumerate(cost.devices):
            sig: Hashable = ("node", i) if d.node_id in linked else tuple(bucket(float(x)) for x in (
                cost.eff_flops[i], cost.eff_bw[i], cost.run_overhead[i] + 1e-9, cost.layer_overhead[i] + 1e-9,
                cost.mem[i], d.default_link.latency_s, d.default_link.bandwidth_Bps))
            self._cls.append(classes.setdefault(sig, len(classes)))
        self.n_classes = len(classes)
        self._parts: dict[Hashable, tuple[tuple[int, ...], Partition | Infeasible]] = {}
        self._rooms: dict[tuple[int, ...], float] = {}
        self._groups: dict[Group, GroupEval] = {}
        self._mixed: dict[Group, ReplicaSpec | Infeasible] = {}
        self._specs: dict[tuple[Group, Role], ReplicaSpec] = {}
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._scores: dict[tuple[Group, ...], Scored] = {}
        self.dp_runs = 0

    # --- partitions (cached by device signatures) ---------------------------------

    def _partition(self, kind: str, devices: Group, work: Work, kv_tokens: float) -> Partition | Infeasible:
        ordered = tuple(sorted(devices, key=lambda d: (self._cls[d], d)))
        key = (kind, work, kv_tokens, tuple(self._cls[d] for d in ordered))
        hit = self._parts.get(key)
        if hit is None:
            self.dp_runs += 1
            res = partition(self.cost, ordered, work, kv_tokens, exact_limit=self.options.exact_limit)
            self._parts[key] = (ordered, res)
            return res
        origin, res = hit
        if origin == ordered:
            return res
        pos = dict(zip(origin, ordered, strict=True))  # same classes, position by position
        if isinstance(res, Partition):
            return replace(res, stages=tuple(replace(s, device=pos[s.device]) for s in res.stages))
        return Infeasible(ordered, res.reason)

    def _slots_search(self, kind: str, devices: Group, work_for: object) -> tuple[Partition | Infeasible, int]:
        """The partition with the most decode slots (up to the cap) that still fits."""
        k = len(devices)
        if k > self.cost.L or float(self.cost.mem[list(devices)].sum()) < self.cost.memory_needed(self.ctx_decode):
            return Infeasible(tuple(devices), infeasibility_reason(self.cost, devices, self.ctx_decode)), 0
        top = self.options.max_decode_slots
        part = self._partition(kind, devices, work_for(top, k), top * self.ctx_decode)  # type: ignore[operator]
        if part.feasible:
            return part, top
        slots = int(min(top, max(self._room(devices), 0.0) // self.ctx_decode))
        if slots < 1:
            return Infeasible(tuple(devices), infeasibility_reason(self.cost, devices, self.ctx_decode)), 0
        return self._partition(kind, devices, work_for(slots, k), slots * self.ctx_decode), slots  # type: ignore[operator]

    def can_hold(self, devices: Iterable[int]) -> bool:
        """Whether the group can hold the model with the KV cache of at least one sequence (memory only)."""
        g = tuple(devices)
        if len(g) > self.cost.L or float(self.cost.mem[list(g)].sum()) < self.cost.memory_needed(self.ctx_decode):
            return False
        return self._room(g) >= self.ctx_decode

    def _room(self, devices: Group) -> float:
        ordered = sorted(devices, key=lambda d: (self._cls[d], d))
        key = tuple(self._cls[d] for d in ordered)
        room = self._rooms.get(key)
        if room is None:
            self.dp_runs += 1
            room = max_kv_tokens(self.cost, ordered, exact_limit=self.options.exact_limit)
            self._rooms[key] = room
        return room

    def decode_work(self, slots: int, k: int) -> Work:
        return Work.decode(slots / min(slots, k), self.decode_ctx)

    def mixed_work(self, slots: int, k: int) -> Work:
        beta = slots / min(slots, k)
        return self.prefill_work + Work.decode(beta, self.decode_ctx).scale(self.decode_tokens / beta)

    # --- services -----------------------------------------------------------------

    def _coeffs(self, part: Partition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per stage: run-time coefficients (k, 5), send latency (k,), send seconds per token (k,)."""
        c = np.stack([self.cost.run_coeffs(s.device, s.start, s.stop) for s in part.stages])
        lat = np.zeros(len(part.stages))
        per_tok = np.zeros(len(part.stages))
        for j in range(len(part.stages) - 1):
            a, b = part.stages[j].device, part.stages[j + 1].device
            lat[j] = self.cost.latency[a, b]
            per_tok[j] = self.cost.act[part.stages[j].stop] / self.cost.bandwidth[a, b]
        return c, lat, per_tok

    def prefill_service(self, part: Partition) -> PrefillService:
        c, lat, per_tok = self._coeffs(part)
        n = self._prefill_basis[:, 1]
        times = self._prefill_basis @ c.T + lat[None, :] + n[:, None] * per_tok[None, :]  # (Q, k)
        b, s = times.max(axis=1), times.sum(axis=1)
        p = self.workload.input.probs
        return PrefillService(float(p @ b), float(p @ b**2), float(p @ s), len(part.stages))

    def decode_service(self, part: Partition, slots: int) -> DecodeService:
        c, lat, per_tok = self._coeffs(part)
        ctx = self.decode_ctx
        fixed = c[:, 0] + lat
        per_seq = c @ np.array([0.0, 1.0, ctx + 1, ctx + 2, 1.0]) + per_tok
        first, last = part.stages[0].device, part.stages[-1].device
        ret = self.cost.transfer_time(last, first, TOKEN_ID_BYTES) if len(part.stages) > 1 else 0.0
        return DecodeService.build(fixed, per_seq, ret, max(slots, 1))

    # --- groups ---------------------------------------------------------------------

    def group(self, devices: Iterable[int]) -> GroupEval:
        g = tuple(sorted(devices))
        hit = self._groups.get(g)
        if hit is not None:
            return hit
        kv_prefill = self.options.prefill_kv_slots * self.ctx_prefill
        dec, slots = self._slots_search("decode", g, self.decode_work)
        pre = self._partition("prefill", g, self.prefill_work, kv_prefill) if dec.feasible else dec
        ev = GroupEval(
            g, pre, dec, slots,
            self.prefill_service(pre) if isinstance(pre, Partition) else None,
            self.decode_service(dec, slots) if isinstance(dec, Partition) else None,
        )
        self._groups[g] = ev
        return ev

    def mixed(self, devices: Iterable[int]) -> ReplicaSpec | Infeasible:
        """The group as one MIXED replica (DP on the per-request mix of prefill and decode work)."""
        g = tuple(sorted(devices))
        hit = self._mixed.get(g)
        if hit is None:
            found, slots = self._slots_search("mixed", g, self.mixed_work)
            hit = self.mixed_spec(found, slots) if isinstance(found, Partition) else found
            self._mixed[g] = hit
        return hit

    def mixed_spec(self, part: Partition, slots: int) -> ReplicaSpec:
        """A MIXED replica on a given partition (the exo baseline brings its own)."""
        return ReplicaSpec(Role.MIXED, part, slots, self.ctx_decode, self.prefill_service(part),
                           self.decode_service(part, slots))

    def _layout(self, spec: ReplicaSpec) -> tuple[np.ndarray, np.ndarray]:
        hit = self._layouts.get(spec.uid) if spec.uid >= 0 else None
        if hit is None:
            hit = self.cost.stage_layout(spec.partition.refs, self.cost.L)
            if spec.uid >= 0:
                self._layouts[spec.uid] = hit
        return hit

    def mean_handoff(self, pre: Sequence[ReplicaSpec], dec: Sequence[ReplicaSpec]) -> float:
        """Hand-off averaged over (PREFILL, DECODE) pairs, each side weighted by its capacity."""
        s = [self._layout(p) for p in pre]
        d = [self._layout(x) for x in dec]
        H = self.cost.kv_handoff_layouts(np.stack([x[0] for x in s]), np.stack([x[1] for x in s]),
                                         np.stack([x[0] for x in d]), np.stack([x[1] for x in d]),
                                         self.workload.input.mean)
        wp = np.array([x.prefill.max_rate for x in pre])
        wd = np.array([x.decode.max_token_rate for x in dec])
        return float(wp @ H @ wd / (wp.sum() * wd.sum()))

    def objective(self, m: Metrics) -> float:
        return m.score(self.options.objective)

    def sustainable(self, specs: Sequence[ReplicaSpec]) -> float:
        """Requests/s at which the system saturates (cheap: no queueing model)."""
        if all(s.role is Role.MIXED for s in specs):
            tokens = self.decode_tokens
            cap_p = sum(s.prefill.max_rate for s in specs)
            cap_d = sum(s.decode.max_token_rate for s in specs)
            return 1.0 / (1.0 / cap_p + tokens / cap_d)
        pre = [s for s in specs if s.role is Role.PREFILL]
        dec = [s for s in specs if s.role is Role.DECODE]
        lend = ([d.prefill for d in dec], [p.decode for p in pre]) if self.options.borrow else None
        cap_p, cap_d, _, _ = capacities([s.prefill for s in pre], [s.decode for s in dec], self.workload, lend)
        return min(cap_p, cap_d)

    def evaluate_specs(self, specs: Sequence[ReplicaSpec], borrow: bool | None = None, routing: str = "fastest",
                       handoff_s: float | None = None) -> Metrics:
        """Metrics of replicas whose roles are already set (PREFILL + DECODE, or all MIXED)."""
        if all(s.role is Role.MIXED for s in specs):
            return evaluate_mixed([s.prefill for s in specs], [s.decode for s in specs], self.workload)
        pre = [s for s in specs if s.role is Role.PREFILL]
        dec = [s for s in specs if s.role is Role.DECODE]
        if not pre or not dec or len(pre) + len(dec) != len(specs):
            raise ValueError("a disaggregated system needs PREFILL and DECODE replicas only, at least one of each")
        h = self.mean_handoff(pre, dec) if handoff_s is None else handoff_s
        lend = None
        if self.options.borrow if borrow is None else borrow:
            # a lent replica serves the other phase at that phase's rate (its other partition)
            lend = ([d.prefill for d in dec], [p.decode for p in pre])
        return evaluate([s.prefill for s in pre], [s.decode for s in dec], h, self.workload, borrow=lend,
                        routing=routing)

    def specs_for(self, ev: GroupEval, role: Role) -> ReplicaSpec:
        hit = self._specs.get((ev.devices, role))
        if hit is not None:
            return hit
        assert ev.prefill_service is not None and ev.decode_service is not None
        assert isinstance(ev.prefill, Partition) and isinstance(ev.decode, Partition)
        uid = len(self._specs)
        if role is Role.MIXED:  # both phases: the DP on the mixed work (what ``rescore`` re-derives)
            mixed = self.mixed(ev.devices)
            if isinstance(mixed, ReplicaSpec):
                spec = replace(mixed, uid=uid)
            else:  # the decode partition holds the KV slots
                spec = ReplicaSpec(role, ev.decode, ev.slots, self.ctx_decode, self.prefill_service(ev.decode),
                                   ev.decode_service, uid)
        elif role is Role.PREFILL:
            spec = ReplicaSpec(role, ev.prefill, self.options.prefill_kv_slots, self.ctx_prefill,
                               ev.prefill_service, ev.decode_service, uid)
        else:
            spec = ReplicaSpec(role, ev.decode, ev.slots, self.ctx_decode, ev.prefill_service, ev.decode_service,
                               uid)
        self._specs[(ev.devices, role)] = spec
        return spec

    def role_rates(self, ok: Sequence[GroupEval]) -> tuple[list[float], list[float], list[int]]:
        """Per feasible group, its prefill capacity (prompts/s) and decode capacity (requests/s), and the groups
        in the role rule's efficiency order (the most prefill-efficient first)."""
        a = [e.prefill_service.max_rate for e in ok]  # type: ignore[union-attr]
        tokens = max(self.decode_tokens, 1e-9)
        d = [e.decode_service.max_token_rate / tokens for e in ok]  # type: ignore[union-attr]
        return a, d, efficiency_order(a, d)

    def split_specs(self, ok: Sequence[GroupEval], ranked: Sequence[int], p: int) -> tuple[ReplicaSpec, ...]:
        """The first ``p`` groups of ``ranked`` PREFILL, the others DECODE."""
        return tuple(self.specs_for(ok[i], Role.PREFILL if rank < p else Role.DECODE) for rank, i in enumerate(ranked))

    def role_candidates(self, ok: Sequence[GroupEval]) -> list[tuple[ReplicaSpec, ...]]:
        """Role assignments to compare for feasible groups (two or more): the role rule's splits, the fastest
        prompt server alone as PREFILL, and (``allow_mixed``) every replica MIXED."""
        a, d, order = self.role_rates(ok)
        fastest = max(range(len(ok)), key=lambda i: (a[i], -i))
        tries = [(order, p) for p in split_candidates([a[i] for i in order], [d[i] for i in order])]
        if order[0] != fastest:  # also: the fastest prompt server alone as PREFILL
            tries.append(([fastest] + [i for i in order if i != fastest], 1))
        cands = [self.split_specs(ok, ranked, p) for ranked, p in tries]
        if self.options.allow_mixed:
            cands.append(tuple(self.specs_for(e, Role.MIXED) for e in ok))
        return cands

    def scored_specs(self, specs: Sequence[ReplicaSpec], notes: Sequence[str] = ()) -> Scored:
        """``specs`` (roles set) scored with the hand-off, idle devices filled in."""
        m = self.evaluate_specs(specs)
        used = {p.device for s in specs for p in s.partition.stages}
        idle = tuple(i for i in range(len(self.cost.devices)) if i not in used)
        return Scored(self.objective(m), m, tuple(specs), idle, tuple(notes))

    def score(self, groups: Iterable[Iterable[int]]) -> Scored:
        """Roles by the role rule, then the objective. Infeasible groups are left idle.

        The role split candidates are compared without the KV hand-off (it adds
        to every request's latency but not to any queue); the winner's metrics
        include it.
        """
        key = tuple(sorted(tuple(sorted(g)) for g in groups if g))
        hit = self._scores.get(key)
        if hit is not None:
            return hit
        evals = [self.group(g) for g in key]
        ok = [e for e in evals if e.feasible]
        used = {d for e in ok for d in e.devices}
        idle = tuple(i for i in range(len(self.cost.devices)) if i not in used)
        notes = tuple(f"group {self.names(e.devices)} left idle: {e.reason}" for e in evals if not e.feasible)
        n = len(self.cost.devices)
        if not ok:
            scored = Scored(math.inf, infeasible_metrics(self.workload.rate), (), idle, notes)
        elif len(ok) == 1:
            spec = self.mixed(ok[0].devices)
            if isinstance(spec, Infeasible):
                scored = Scored(math.inf, infeasible_metrics(self.workload.rate), (), tuple(range(n)),
                                notes + (f"group {self.names(spec.devices)} left idle: {spec.reason}",))
            else:
                m = self.evaluate_specs([spec])
                scored = Scored(self.objective(m), m, (spec,), idle, notes)
        else:
            cands = self.role_candidates(ok)
            sus = [self.sustainable(c) for c in cands]
            lam = self.workload.rate
            best: tuple[Metrics, tuple[ReplicaSpec, ...]] | None = None
            if max(sus) > lam:  # only stable candidates can win; compare them on the full objective
                for c, r in zip(cands, sus, strict=True):
                    if r > lam:
                        m = self.evaluate_specs(c, handoff_s=0.0)
                        if best is None or self.objective(m) < self.objective(best[0]):
                            best = (m, c)
                assert best is not None
                m = best[0]
                if best[1][0].role is not Role.MIXED:
                    h = self.mean_handoff([x for x in best[1] if x.role is Role.PREFILL],
                                          [x for x in best[1] if x.role is Role.DECODE])
                    m = replace(m, handoff_s=h, e2e_s=m.e2e_s + h)
            else:  # all overloaded: the largest capacity wins
                c = cands[int(np.argmax(sus))]
                m = self.evaluate_specs(c)
                best = (m, c)
            scored = Scored(self.objective(m), m, best[1], idle, notes)
        self._scores[key] = scored
        return scored

    # --- plans ------------------------------------------------------------------------

    def names(self, devices: Iterable[int]) -> str:
        return "+".join(self.cost.devices[d].node_id for d in devices)

    def to_plan(self, scored: Scored, method: str, version: int = 1, seed: int | None = None,
                notes: Sequence[str] = ()) -> Plan:
        cost = self.cost
        rank = {Role.PREFILL: 0, Role.MIXED: 1, Role.DECODE: 2}
        specs = sorted(scored.replicas, key=lambda s: (rank[s.role], -s.prefill.max_rate, s.partition.devices))
        replicas = []
        for rid, s in enumerate(specs):
            kv = s.slots * s.context
            stages = tuple(
                Stage(cost.devices[p.device].node_id, p.start, p.stop, p.run_s, p.send_s,
                      cost.memory(p.start, p.stop, kv), float(cost.mem[p.device]))
                for p in s.partition.stages)
            room = min(cost.kv_room(p.device, p.start, p.stop) for p in s.partition.stages)
            replicas.append(Replica(
                id=rid, role=s.role, stages=stages, slots=s.slots, context=s.context,
                bottleneck_s=s.partition.bottleneck_s, latency_s=s.partition.latency_s,
                prefill_rate=s.prefill.max_rate, decode_token_rate=s.decode.max_token_rate,
                order_exact=s.partition.order_exact, kv_tokens=max(int(room), kv)))
        used = {p.device for s in specs for p in s.partition.stages}
        idle = tuple(cost.devices[i].node_id for i in range(len(cost.devices)) if i not in used)
        plan = Plan(version=version, model=cost.model.name, dtype=cost.model.dtype, n_layers=cost.L, method=method,
                    workload=self.workload, replicas=tuple(replicas), idle=idle, metrics=scored.metrics,
                    seed=seed, notes=tuple(scored.notes) + tuple(notes))
        plan.validate()
        return plan
