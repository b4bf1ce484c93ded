"""Calibration of the cost model against measured segment runs, and its prediction error.

Nodes time their own segments (a prefill chunk, a decode step) and report
``(layer range, work, seconds)`` samples. Per device, the model
``t = o_run + o_layer*layers + FLOPs/(eta_f*F) + bytes/(eta_b*B)`` is linear
in ``(o_run, o_layer, 1/eta_f, 1/eta_b)``: :func:`fit_factors` solves the
least-squares problem on *relative* errors (times span orders of magnitude)
with bounds (overheads >= 0, efficiencies <= 20) by enumerating which bounds
are active — four unknowns, sixteen cases, exact. :func:`prediction_error`
reports how far a cost model's predictions are from samples. Pure; no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.plan.cost import CostModel, DeviceFactors, ModelCosts, Work
from meshllm.profile import DeviceProfile

MAX_EFFICIENCY = 20.0  # a fitted efficiency above this means the term is negligible, not that it is free


@dataclass(frozen=True)
class Sample:
    """One measured run of layers [start, stop) on a node."""

    node_id: str
    start: int
    stop: int
    work: Work
    seconds: float
    kind: str = ""  # "prefill" or "decode" (for reports)

    @classmethod
    def prefill(cls, node_id: str, start: int, stop: int, n_tokens: int, seconds: float, ctx: int = 0) -> Sample:
        return cls(node_id, start, stop, Work.prefill(n_tokens, ctx), seconds, "prefill")

    @classmethod
    def decode(cls, node_id: str, start: int, stop: int, context: int, seconds: float, batch: int = 1) -> Sample:
        return cls(node_id, start, stop, Work.decode(batch, context), seconds, "decode")


@dataclass(frozen=True)
class ErrorReport:
    n: int
    mean_abs_pct: float  # mean |predicted - measured| / measured, in percent
    median_abs_pct: float
    p90_abs_pct: float
    max_abs_pct: float
    mean_signed_pct: float  # > 0: the model predicts too slow
    by_kind: Mapping[str, float]  # mean absolute percent per sample kind

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(self.by_kind.items()))
        return (f"n={self.n}: mean {self.mean_abs_pct:.1f}%, median {self.median_abs_pct:.1f}%, "
                f"p90 {self.p90_abs_pct:.1f}%, max {self.max_abs_pct:.1f}%, bias {self.mean_signed_pct:+.1f}% "
                f"({kinds})")


def prediction_error(cost: CostModel, samples: Sequence[Sample]) -> ErrorReport:
    if not samples:
        raise ValueError("no samples to compare with")
    pred = np.array([cost.run_time(s.node_id, s.start, s.stop, s.work) for s in samples])
    meas = np.array([s.seconds for s in samples])
    rel = (pred - meas) / meas * 100
    err = np.abs(rel)
    kinds = sorted({s.kind for s in samples})
    by_kind = {k: float(np.mean([e for e, s in zip(err, samples, strict=True) if s.kind == k])) for k in kinds}
    return ErrorReport(len(samples), float(err.mean()), float(np.median(err)), float(np.percentile(err, 90)),
                       float(err.max()), float(rel.mean()), by_kind)


def _bounded_lstsq(A: np.ndarray, y: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """min |A x - y| subject to x >= lower, by enumerating the active bounds."""
    n = A.shape[1]
    best, best_res = lower.copy(), math.inf
    for fixed in itertools.product((False, True), repeat=n):
        free = [i for i in range(n) if not fixed[i]]
        x = lower.copy()
        if free:
            rhs = y - A[:, [i for i in range(n) if fixed[i]]] @ lower[[i for i in range(n) if fixed[i]]]
            sol, *_ = np.linalg.lstsq(A[:, free], rhs, rcond=None)
            if np.any(sol < lower[free] - 1e-15):
                continue
            x[free] = sol
        res = float(np.sum((A @ x - y) ** 2))
        if res < best_res - 1e-18:
            best, best_res = x, res
    return best


def fit_factors(model: ModelCosts, devices: Sequence[DeviceProfile], samples: Sequence[Sample]
                ) -> dict[str, DeviceFactors]:
    """Per-device factors that best explain the samples (devices without samples keep the defaults)."""
    raw = CostModel(model, devices)
    out: dict[str, DeviceFactors] = {}
    for d in devices:
        mine = [s for s in samples if s.node_id == d.node_id]
        if len(mine) < 2:
            continue
        i = raw.index[d.node_id]
        rows = []
        for s in mine:
            w = s.work
            rows.append([w.runs, w.runs * (s.stop - s.start), raw.flops(s.start, s.stop, w) / raw.eff_flops[i],
                         raw.bytes_read(s.start, s.stop, w) / raw.eff_bw[i]])
        t = np.array([s.seconds for s in mine])
        A = np.array(rows) / t[:, None]  # relative residuals: (A x - t) / t
        lower = np.array([0.0, 0.0, 1.0 / MAX_EFFICIENCY, 1.0 / MAX_EFFICIENCY])
        o_run, o_layer, inv_f, inv_b = _bounded_lstsq(A, np.ones(len(mine)), lower)
        out[d.node_id] = DeviceFactors(flops_eff=1.0 / inv_f, bw_eff=1.0 / inv_b, run_overhead_s=float(o_run),
                                       layer_overhead_s=float(o_layer))
    return out
