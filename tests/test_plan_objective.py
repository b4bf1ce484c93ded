"""The queueing objective against textbook formulas, and the pipeline service models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshllm.plan.objective import DecodeService, PrefillService, _chain, evaluate, evaluate_mixed
from meshllm.plan.workload import LengthDist, Workload


def erlang_c_wait(lam: float, mu: float, c: int) -> float:
    a = lam / mu
    rho = a / c
    top = a**c / math.factorial(c) / (1 - rho)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    return p_wait / (c * mu - lam)


@pytest.mark.parametrize("lam, mu, c", [(0.5, 1.0, 1), (0.9, 1.0, 1), (2.5, 1.0, 3), (7.0, 2.0, 4)])
def test_birth_death_chain_is_mm_c(lam: float, mu: float, c: int) -> None:
    en, eq, ok = _chain(lam, np.array([min(n, c) * mu for n in range(1, c + 1)], dtype=float))
    assert ok
    assert eq / lam == pytest.approx(erlang_c_wait(lam, mu, c), rel=1e-9)
    assert en / lam == pytest.approx(erlang_c_wait(lam, mu, c) + 1 / mu, rel=1e-9)


def test_deterministic_prompts_wait_half_as_long_as_exponential_ones_pollaczek_khinchine() -> None:
    """One single-stage prefill replica, fixed prompt length: M/D/1, W = rho / (2 mu (1 - rho))."""
    b = 2.0
    svc = PrefillService(b, b * b, b, 1)
    dec = DecodeService.build((1e-3,), (1e-4,), 0.0, 64)
    w = Workload(0.3, LengthDist.fixed(100), LengthDist.fixed(2))
    m = evaluate([svc], [dec], 0.0, w)
    rho = 0.3 * b
    assert m.prefill_wait_s == pytest.approx(rho * b / (2 * (1 - rho)), rel=1e-6)
    assert m.ttft_s == pytest.approx(m.prefill_wait_s + b, rel=1e-6)
    assert m.stable and m.sustainable_rate == pytest.approx(1 / b)


def test_a_pipeline_admits_a_new_prompt_every_bottleneck_not_every_pass() -> None:
    svc = PrefillService(occupancy_s=1.0, occupancy_sq=1.0, latency_s=3.0, depth=3)
    assert svc.max_rate == 1.0
    assert np.allclose(np.cumsum(svc.gains()), [1 / 3, 2 / 3, 1.0])


def test_decode_pipeline_rate_batches_and_fills_stages() -> None:
    one = DecodeService.build((0.1,), (0.01,), 0.0, 8)
    n = np.arange(1, 9)
    assert np.allclose(one.rates[1:], n / (0.1 + 0.01 * n))  # one stage: a batch of n per step
    two = DecodeService.build((0.1, 0.1), (0.01, 0.01), 0.002, 8)
    assert two.rates[1] == pytest.approx(1 / 0.222)  # one sequence: a full pass per token
    assert two.rates[2] == pytest.approx(2 / max(0.222, 2 * 0.11))  # two micro-batches keep both stages busy
    assert np.all(np.diff(two.rates) >= 0) and two.max_token_rate == two.rates[-1]


def test_overload_is_unstable_and_ranked_by_capacity() -> None:
    svc = PrefillService(1.0, 1.0, 1.0, 1)
    dec = DecodeService.build((0.05,), (0.005,), 0.0, 16)
    w = Workload(2.0, LengthDist.fixed(100), LengthDist.fixed(20))
    m = evaluate([svc], [dec], 0.1, w)
    assert not m.stable and m.fitness > 1e6
    better = evaluate([svc, svc], [dec], 0.1, w)
    assert better.fitness < m.fitness
    ok = evaluate([svc], [dec], 0.1, w.with_rate(0.2))
    assert ok.stable and ok.fitness == pytest.approx(ok.e2e_s) and ok.fitness < better.fitness


def test_mixed_replica_shares_its_time_between_phases() -> None:
    svc = PrefillService(1.0, 1.0, 1.0, 1)
    dec = DecodeService.build((0.05,), (0.005,), 0.0, 16)
    w = Workload(0.3, LengthDist.fixed(100), LengthDist.fixed(21))
    m = evaluate_mixed(svc, dec, w)
    rho_d = 0.3 * 20 / dec.max_token_rate
    assert m.prefill_utilisation == pytest.approx(0.3 + rho_d)
    assert m.sustainable_rate == pytest.approx(1 / (1 + 20 / dec.max_token_rate))
    alone = evaluate([svc], [dec], 0.0, w)
    assert m.ttft_s > alone.ttft_s  # prefill waits for the decode share of the same devices
