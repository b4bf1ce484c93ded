"""Calibration: per-device factors recovered from timed segment runs, and the error it removes."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.plan.calibrate import Sample, fit_factors, prediction_error
from meshllm.plan.cost import CostModel, DeviceFactors
from meshllm.profile import DeviceProfile
from tests.test_plan_fixtures import LLAMA_1B

DEVICES = [DeviceProfile("a", "a", 50e9, 10e9, 10**10), DeviceProfile("b", "b", 200e9, 30e9, 10**10)]
TRUTH = {"a": DeviceFactors(0.6, 0.8, 2e-3, 1e-4), "b": DeviceFactors(0.35, 0.7, 5e-4, 3e-4)}


def measured(noise: float = 0.0, seed: int = 0) -> list[Sample]:
    """Runs as the true device would time them: layer ranges x prefill lengths x decode contexts."""
    true = CostModel(LLAMA_1B, DEVICES, TRUTH)
    rng = np.random.default_rng(seed)
    out = []
    for node in ("a", "b"):
        for start, stop in ((0, 4), (4, 20), (20, 32), (0, 32), (10, 11)):
            for n in (8, 64, 256):
                s = Sample.prefill(node, start, stop, n, 0.0)
                out.append(Sample(node, start, stop, s.work, true.run_time(node, start, stop, s.work)
                                  * (1 + noise * rng.standard_normal()), "prefill"))
            for ctx in (16, 400, 1500):
                s = Sample.decode(node, start, stop, ctx, 0.0)
                out.append(Sample(node, start, stop, s.work, true.run_time(node, start, stop, s.work)
                                  * (1 + noise * rng.standard_normal()), "decode"))
    return out


def test_exact_samples_give_back_the_true_factors() -> None:
    fitted = fit_factors(LLAMA_1B, DEVICES, measured())
    for node, truth in TRUTH.items():
        f = fitted[node]
        assert f.flops_eff == pytest.approx(truth.flops_eff, rel=1e-6)
        assert f.bw_eff == pytest.approx(truth.bw_eff, rel=1e-6)
        assert f.run_overhead_s == pytest.approx(truth.run_overhead_s, rel=1e-5)
        assert f.layer_overhead_s == pytest.approx(truth.layer_overhead_s, rel=1e-5)


def test_calibration_removes_the_error_of_the_raw_profile() -> None:
    samples = measured(noise=0.03)
    before = prediction_error(CostModel(LLAMA_1B, DEVICES), samples)
    after = prediction_error(CostModel(LLAMA_1B, DEVICES, fit_factors(LLAMA_1B, DEVICES, samples[::2])),
                             samples[1::2])  # fitted on half, judged on the other half
    assert before.mean_abs_pct > 30 and before.mean_signed_pct < 0  # the raw profile is too optimistic
    assert after.mean_abs_pct < 5 and after.n == len(samples) // 2
    assert set(after.by_kind) == {"prefill", "decode"}
    assert "mean" in after.line() and "decode" in after.line()


def test_factors_stay_physical_and_devices_without_samples_keep_defaults() -> None:
    # decode-only samples cannot see compute: its efficiency is capped, not infinite
    only_decode = [s for s in measured() if s.kind == "decode" and s.node_id == "a"]
    fitted = fit_factors(LLAMA_1B, DEVICES, only_decode)
    assert set(fitted) == {"a"}
    f = fitted["a"]
    assert 0 < f.flops_eff <= 20 and 0 < f.bw_eff <= 20 and f.run_overhead_s >= 0 and f.layer_overhead_s >= 0
    model = CostModel(LLAMA_1B, DEVICES, fitted)
    assert model.factors["b"] == DeviceFactors()
    assert DeviceFactors.from_json(f.to_json()) == f
