"""What a plan asks of the serving layer: replicas, their roles and stages. Pure values.

Built from the typed :class:`~meshllm.plan.plan.Plan` of the plan the planner
publishes (decoded once by :meth:`~meshllm.plan.plan.PublishedPlan.decode`, as
every other reader of the plan topic does); only the fields serving needs, and
a plan serving cannot use (no replica that prefills or none that decodes) is
refused as a whole instead of half-deployed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.errors import LayoutError
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import Plan, PublishedPlan, Role


@dataclass(frozen=True)
class StageLayout:
    node_id: str
    start: int
    stop: int


# Sequences a decode-capable replica's stages hold at most (cache rows). Their memory is what their tokens
# need (the runtime gives a closed row's pages back), so the scheduler admits by tokens within ``kv_budget``
# and this bounds only the batch: as the planner's largest decode batch (PlanOptions.max_decode_slots).
DECODE_ROWS = 16


@dataclass(frozen=True)
class ReplicaLayout:
    id: int
    role: str
    stages: tuple[StageLayout, ...]
    slots: int  # sequences the plan reserved a whole context for (the planner's figure)
    context: int  # the most KV positions one sequence may reach
    prefill_tokens_per_s: float  # predicted, for routing
    decode_tokens_per_s: float
    kv_budget: int = 0  # KV positions its sequences' tokens may add up to (the plan's Replica.kv_budget)

    @property
    def rows(self) -> int:
        """Sequences its stages hold at once (cache rows): up to DECODE_ROWS as their tokens fit ``kv_budget``
        (a PREFILL replica too: it decodes when it lends itself), or its slots in a plan that gives no context."""
        return max(self.slots, DECODE_ROWS) if self.kv_budget else self.slots

    @property
    def first(self) -> StageLayout:
        return self.stages[0]

    @property
    def last(self) -> StageLayout:
        return self.stages[-1]

    def stage_index(self, node_id: str) -> int | None:
        for i, s in enumerate(self.stages):
            if s.node_id == node_id:
                return i
        return None

    def holder(self, layer: int) -> StageLayout:
        for s in self.stages:
            if s.start <= layer < s.stop:
                return s
        raise LayoutError(f"replica {self.id} holds no layer {layer}")

    @property
    def does_prefill(self) -> bool:
        return self.role in ("prefill", "mixed")

    @property
    def does_decode(self) -> bool:
        return self.role in ("decode", "mixed")


@dataclass(frozen=True)
class Layout:
    version: int
    n_layers: int
    replicas: dict[int, ReplicaLayout]

    def replica_of(self, node_id: str) -> ReplicaLayout | None:
        for r in self.replicas.values():
            if r.stage_index(node_id) is not None:
                return r
        return None

    @property
    def node_ids(self) -> set[str]:
        return {s.node_id for r in self.replicas.values() for s in r.stages}

    @classmethod
    def from_plan(cls, plan: Plan | PublishedPlan | Mapping[str, Any]) -> Layout:
        """The layout of a typed plan (a published plan's JSON is decoded first); raises LayoutError."""
        if isinstance(plan, Mapping):
            try:
                plan = PublishedPlan.decode(plan)
            except PlanError as e:
                raise LayoutError(str(e)) from None
        if isinstance(plan, PublishedPlan):
            plan = plan.plan
        mean_in = max(plan.workload.input.mean, 1.0)  # to turn predicted prompts/s into tokens/s
        replicas = {r.id: ReplicaLayout(
            r.id, r.role.value, tuple(StageLayout(s.node_id, s.start, s.stop) for s in r.stages), r.slots,
            r.context, r.prefill_rate * mean_in, r.decode_token_rate, r.kv_budget) for r in plan.replicas}
        if len(replicas) != len(plan.replicas):
            raise LayoutError(f"plan v{plan.version}: two replicas have one id")
        roles = {r.role for r in plan.replicas}
        if not roles & {Role.PREFILL, Role.MIXED} or not roles & {Role.DECODE, Role.MIXED}:
            raise LayoutError("a plan needs replicas that prefill and replicas that decode")
        return cls(plan.version, plan.n_layers, replicas)
