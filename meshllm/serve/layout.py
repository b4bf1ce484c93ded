"""What a plan asks of the serving layer: replicas, their roles and stages. Pure values.

Read from the plan JSON that the planner publishes (see ``meshllm.plan.plan``);
only the fields serving needs, validated so that a malformed plan is refused
as a whole instead of half-deployed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.errors import LayoutError

ROLES = ("prefill", "decode", "mixed")


def _mean_input(plan: dict[str, Any]) -> float:
    """Mean prompt length of the plan's workload (to turn predicted prompts/s into tokens/s)."""
    if "workload" not in plan:
        return 128.0
    from meshllm.plan.workload import Workload

    return max(Workload.from_json(plan["workload"]).input.mean, 1.0)


@dataclass(frozen=True)
class StageLayout:
    node_id: str
    start: int
    stop: int


@dataclass(frozen=True)
class ReplicaLayout:
    id: int
    role: str
    stages: tuple[StageLayout, ...]
    slots: int
    context: int
    prefill_tokens_per_s: float  # predicted, for routing
    decode_tokens_per_s: float

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
    def from_plan(cls, plan: dict[str, Any]) -> Layout:
        try:
            n_layers = int(plan["n_layers"])
            mean_in = _mean_input(plan)
            replicas: dict[int, ReplicaLayout] = {}
            for r in plan["replicas"]:
                role = str(r["role"]).lower()
                if role not in ROLES:
                    raise LayoutError(f"replica {r.get('id')}: unknown role {role!r}")
                stages = tuple(StageLayout(str(s["node_id"]), int(s["start"]), int(s["stop"])) for s in r["stages"])
                pos = 0
                for s in stages:
                    if s.start != pos or s.stop <= s.start:
                        raise LayoutError(f"replica {r['id']}: layers are not contiguous at {s.start}")
                    pos = s.stop
                if pos != n_layers:
                    raise LayoutError(f"replica {r['id']}: covers {pos} of {n_layers} layers")
                rid = int(r["id"])
                replicas[rid] = ReplicaLayout(
                    rid, role, stages, max(1, int(r.get("slots", 4))), int(r.get("context", 0)),
                    float(r.get("prefill_rate", 0.0) or 0.0) * mean_in, float(r.get("decode_token_rate", 0.0) or 0.0))
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"malformed plan: {type(e).__name__}: {e}") from None
        layout = cls(int(plan["version"]), n_layers, replicas)
        nodes = [s.node_id for r in replicas.values() for s in r.stages]
        if len(nodes) != len(set(nodes)):
            raise LayoutError("a node appears in two stages")
        if not any(r.does_prefill for r in replicas.values()) or not any(r.does_decode for r in replicas.values()):
            raise LayoutError("a plan needs replicas that prefill and replicas that decode")
        return layout
