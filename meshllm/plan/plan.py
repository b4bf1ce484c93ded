"""Plans as artefacts: frozen, versioned, JSON round-trippable, with every predicted figure.

A :class:`Plan` lists the replicas (each a pipeline of :class:`Stage` s with a
role), the idle devices, and what the cost model predicts for each stage,
each replica and the whole system under the workload it was made for.
``version`` is the plan's sequence number in a mesh (the planner node
increments it); ``format_version`` is the JSON schema's.

:func:`should_replace` is the hysteresis rule that keeps a mesh from
thrashing: a new plan replaces the current one only when it is clearly
better. Both plans must be scored under the same, current conditions (see
:func:`meshllm.plan.planner.replan`). Pure values; no I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshllm.plan.errors import PlanError
from meshllm.plan.objective import Metrics
from meshllm.plan.workload import Workload

PLAN_FORMAT = "meshllm-plan"
PLAN_FORMAT_VERSION = 1
DEFAULT_MARGIN = 0.10


class Role(str, enum.Enum):  # noqa: UP042  (StrEnum is 3.11+; the package supports 3.10)
    PREFILL = "prefill"  # runs prompts, hands the KV cache to a DECODE replica
    DECODE = "decode"  # makes output tokens
    MIXED = "mixed"  # both phases (a single replica; the exo and DP-only baselines)


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _unnum(v: Any) -> float:
    return math.inf if v is None else float(v)


@dataclass(frozen=True)
class Stage:
    """Layers ``[start, stop)`` on one node, with predicted figures for the replica's planned run."""

    node_id: str
    start: int
    stop: int
    run_s: float  # one run (mean prompt for PREFILL, one micro-batch step for DECODE)
    send_s: float  # outgoing activations to the next stage
    memory_bytes: float  # weights + reserved KV
    memory_capacity: float

    @property
    def time_s(self) -> float:
        return self.run_s + self.send_s


@dataclass(frozen=True)
class Replica:
    id: int
    role: Role
    stages: tuple[Stage, ...]
    slots: int  # sequences with reserved KV cache
    context: int  # KV positions reserved per slot
    bottleneck_s: float
    latency_s: float  # one run through every stage
    prefill_rate: float  # prompts/s at saturation (this partition)
    decode_token_rate: float  # tokens/s with every slot busy (this partition)
    order_exact: bool = True
    kv_tokens: int = 0  # KV positions its memory holds beside the weights (0: slots x context, as plans before)

    @property
    def kv_budget(self) -> int:
        """KV positions the scheduler may hand out on this replica, by the tokens each sequence can reach."""
        return max(self.kv_tokens, self.slots * self.context)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages)


@dataclass(frozen=True)
class Plan:
    version: int
    model: str
    n_layers: int
    method: str  # "ga", "exo", "splitwise", "dp-only", "random"
    workload: Workload
    replicas: tuple[Replica, ...]
    idle: tuple[str, ...]
    metrics: Metrics
    seed: int | None = None
    notes: tuple[str, ...] = ()
    format_version: int = PLAN_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    dtype: str = "fp32"  # the model's weights: a node serves the plan only from files of this dtype

    @property
    def fitness(self) -> float:
        return self.metrics.fitness if self.replicas else math.inf

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n for r in self.replicas for n in r.node_ids) + self.idle

    def validate(self) -> None:
        """Raises PlanError unless every replica runs every layer exactly once and no node is used twice."""
        seen: set[str] = set()
        for r in self.replicas:
            pos = 0
            for s in r.stages:
                if s.start != pos or s.stop <= s.start:
                    raise PlanError(f"plan v{self.version}: replica {r.id} does not cover the layers contiguously "
                                    f"(stage [{s.start}, {s.stop}) after layer {pos})")
                pos = s.stop
                if s.node_id in seen:
                    raise PlanError(f"plan v{self.version}: node {s.node_id!r} is used twice")
                seen.add(s.node_id)
            if pos != self.n_layers:
                raise PlanError(f"plan v{self.version}: replica {r.id} stops at layer {pos} of {self.n_layers}")
        for n in self.idle:
            if n in seen:
                raise PlanError(f"plan v{self.version}: node {n!r} is both idle and in a replica")
            seen.add(n)

    def with_version(self, version: int) -> Plan:
        return replace(self, version=version)

    # --- JSON -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "format_version": self.format_version,
            "version": self.version,
            "model": self.model,
            "dtype": self.dtype,
            "n_layers": self.n_layers,
            "method": self.method,
            "seed": self.seed,
            "workload": self.workload.to_json(),
            "metrics": self.metrics.to_json(),
            "replicas": [
                {
                    "id": r.id, "role": r.role.value, "slots": r.slots, "context": r.context,
                    "bottleneck_s": _num(r.bottleneck_s), "latency_s": _num(r.latency_s),
                    "prefill_rate": r.prefill_rate, "decode_token_rate": r.decode_token_rate,
                    "order_exact": r.order_exact, "kv_tokens": r.kv_tokens,
                    "stages": [
                        {"node_id": s.node_id, "start": s.start, "stop": s.stop, "run_s": s.run_s,
                         "send_s": s.send_s, "memory_bytes": s.memory_bytes,
                         "memory_capacity": s.memory_capacity}
                        for s in r.stages
                    ],
                }
                for r in self.replicas
            ],
            "idle": list(self.idle),
            "notes": list(self.notes),
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "plan", *, complete: bool = True) -> Plan:
        """The plan of its JSON, validated; raises :class:`PlanError` with one line saying what is wrong.

        ``complete=False`` reads a plan as a mesh publishes it, which may be a plan file written by hand and
        pinned with ``--plan-file``: the format stamp, if given, must be right, and the predicted figures
        (stage times, rates, metrics, workload) and the idle list may be left out; what is left out reads as
        unpredicted (NaN or infinite figures, rates of 0, 4 slots, the model's own context)."""
        if not isinstance(d, Mapping):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(d).__name__}")
        if complete or d.get("format") is not None:
            if d.get("format") != PLAN_FORMAT:
                raise PlanError(f"{where}: not a meshllm plan (format={d.get('format')!r})")
        if complete or d.get("format_version") is not None:
            if d.get("format_version") != PLAN_FORMAT_VERSION:
                raise PlanError(f"{where}: plan format version {d.get('format_version')!r} is not supported "
                                f"(this meshllm reads version {PLAN_FORMAT_VERSION}); re-plan with this meshllm")

        def get(m: Mapping[str, Any], key: str, default: Any) -> Any:
            return m[key] if complete else m.get(key, default)

        try:
            if not isinstance(d["replicas"], list):
                raise TypeError("replicas must be a list")
            replicas = tuple(
                Replica(
                    id=int(r["id"]), role=Role(str(r["role"]).lower()), slots=max(1, int(get(r, "slots", 4))),
                    context=int(get(r, "context", 0)),
                    bottleneck_s=_unnum(get(r, "bottleneck_s", None)), latency_s=_unnum(get(r, "latency_s", None)),
                    prefill_rate=float(get(r, "prefill_rate", 0.0) or 0.0),
                    decode_token_rate=float(get(r, "decode_token_rate", 0.0) or 0.0),
                    order_exact=bool(r.get("order_exact", True)), kv_tokens=max(0, int(r.get("kv_tokens", 0) or 0)),
                    stages=tuple(Stage(str(s["node_id"]), int(s["start"]), int(s["stop"]),
                                       *(float(get(s, k, math.nan)) for k in _STAGE_FIGURES))
                                 for s in r["stages"]),
                )
                for r in d["replicas"]
            )
            workload = get(d, "workload", None)
            metrics = get(d, "metrics", None)
            plan = cls(
                version=int(d["version"]), model=str(get(d, "model", "")), n_layers=int(d["n_layers"]),
                method=str(get(d, "method", "pinned")),
                workload=UNSTATED_WORKLOAD if workload is None else Workload.from_json(workload,
                                                                                      f"{where}.workload"),
                replicas=replicas, idle=tuple(str(n) for n in get(d, "idle", ())),
                metrics=UNPREDICTED if metrics is None else Metrics.from_json(metrics), seed=d.get("seed"),
                notes=tuple(d.get("notes", ())), extra=dict(d.get("extra") or {}),
                dtype=str(d.get("dtype") or "fp32"),  # plans from before quantized models were all fp32-sized
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: malformed plan ({type(e).__name__}: {e})") from None
        plan.validate()
        return plan


_STAGE_FIGURES = ("run_s", "send_s", "memory_bytes", "memory_capacity")
# What a plan written by hand leaves out reads as: a workload of 128-token prompts (the mean that routing
# assumes for turning predicted prompts/s into tokens/s) and metrics that predict nothing.
UNSTATED_WORKLOAD = Workload.simple(128.0, 128.0, 1.0, name="unstated")
UNPREDICTED = Metrics(math.nan, math.nan, False, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                      math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class PublishedPlan:
    """A plan as a mesh publishes it on its retained ``plan`` topic, the one form every reader of that topic
    decodes (the serving layout, the gateway's view, ``meshllm status``, the demo): the plan, stamped with the
    term and id of the planner that published it; ``pinned`` when it came from ``--plan-file``; ``predicted``
    False when it carries no metrics (a plan file written by hand); ``weights_dtype`` the weights' dtype the
    plan was sized for, None when a plan file written by hand does not say (then any node's files will do)."""

    plan: Plan
    term: int | None = None
    planner: str | None = None
    pinned: bool = False
    predicted: bool = True
    weights_dtype: str | None = None

    @classmethod
    def decode(cls, d: Any) -> PublishedPlan:
        """The published plan of the topic's JSON object; raises :class:`PlanError` (one line) for a malformed
        one, which a reader refuses as a whole rather than half-use."""
        plan = Plan.from_json(d, "published plan", complete=False)
        term, planner = d.get("term"), d.get("planner")
        if term is not None and (not isinstance(term, int) or isinstance(term, bool) or term < 0):
            raise PlanError(f"published plan v{plan.version}: term must be a non-negative integer, got {term!r}")
        if planner is not None and not isinstance(planner, str):
            raise PlanError(f"published plan v{plan.version}: planner must be a node id, got {planner!r}")
        dtype = d.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise PlanError(f"published plan v{plan.version}: dtype must be a string, got {dtype!r}")
        return cls(plan, term, planner, bool(d.get("pinned")), isinstance(d.get("metrics"), Mapping), dtype)

    @property
    def version(self) -> int:
        return self.plan.version

    @property
    def stage_nodes(self) -> set[str]:
        """The nodes that hold a stage of the plan."""
        return {n for r in self.plan.replicas for n in r.node_ids}


def should_replace(old: Plan | None, new: Plan, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether ``new`` is clearly better than ``old`` (both scored under the same conditions).

    A stable plan (demand below its sustainable rate) beats an unstable one;
    between two stable plans the new one must cut the objective it was made for (mean wait
    by default, or mean response time) by more than ``margin`` (a fraction); between two
    unstable ones it must raise
    the sustainable rate by more than ``margin``. ``old`` is None when the
    current plan is no longer valid (a node left, a stage no longer fits).
    """
    if old is None or not old.replicas:
        return bool(new.replicas)
    if not new.replicas:
        return False
    if old.metrics.stable != new.metrics.stable:
        return new.metrics.stable
    if new.metrics.stable:
        objective = str(new.extra.get("objective", "response"))
        return new.metrics.score(objective) < old.metrics.score(objective) * (1.0 - margin)
    return new.metrics.sustainable_rate > old.metrics.sustainable_rate * (1.0 + margin)
