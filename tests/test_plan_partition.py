"""DP partitioning: optimal against brute force, memory respected, infeasible groups reported."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.plan.cost import CostModel, Work
from meshllm.plan.partition import Infeasible, Partition, max_kv_tokens, partition
from tests.test_plan_fixtures import LLAMA_1B, brute_force, random_devices, random_model, random_work

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_layout(cost: CostModel, part: Partition, kv_tokens: float) -> None:
    """Every layer exactly once, contiguous, and every stage within its device's memory."""
    pos = 0
    for s in part.stages:
        assert s.start == pos and s.stop > s.start
        assert cost.memory(s.start, s.stop, kv_tokens) <= cost.mem[s.device]
        pos = s.stop
    assert pos == cost.L
    assert part.bottleneck_s == pytest.approx(max(s.time_s for s in part.stages), rel=1e-12)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 16), st.integers(1, 8), st.booleans())
def test_dp_with_fixed_order_equals_brute_force(seed: int, n_layers: int, k: int, same_link: bool) -> None:
    rng = np.random.default_rng(seed)
    k = min(k, n_layers)
    cost = CostModel(random_model(rng, n_layers), random_devices(rng, k, same_link=same_link))
    work, kv = random_work(rng), float(rng.integers(0, 3000))
    order = [int(x) for x in rng.permutation(k)]
    got = partition(cost, list(range(k)), work, kv, order=order)
    want = brute_force(cost, order, work, kv, orders=False)
    if not np.isfinite(want):
        assert isinstance(got, Infeasible)
        return
    assert isinstance(got, Partition)
    assert got.devices == tuple(order)
    assert got.bottleneck_s == pytest.approx(want, rel=1e-9)
    check_layout(cost, got, kv)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 10), st.integers(1, 5), st.booleans(), st.booleans())
def test_dp_with_device_order_choice_equals_brute_force(seed: int, n_layers: int, k: int, same_link: bool,
                                                        uniform: bool) -> None:
    """Exact order choice: all orders batched (k <= 4), subsets DP (k = 5), or the symmetric shortcut."""
    rng = np.random.default_rng(seed)
    k = min(k, n_layers)
    cost = CostModel(random_model(rng, n_layers, uniform), random_devices(rng, k, same_link=same_link))
    work, kv = random_work(rng), float(rng.integers(0, 3000))
    got = partition(cost, list(range(k)), work, kv)
    want = brute_force(cost, list(range(k)), work, kv)
    if not np.isfinite(want):
        assert isinstance(got, Infeasible)
        return
    assert isinstance(got, Partition) and got.order_exact
    assert got.bottleneck_s == pytest.approx(want, rel=1e-9)
    check_layout(cost, got, kv)


@pytest.mark.parametrize("seed", range(3))
def test_subset_dp_for_six_devices_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    cost = CostModel(random_model(rng, 7), random_devices(rng, 6, mem=(2e7, 4e7)))
    work, kv = random_work(rng), 500.0
    got = partition(cost, list(range(6)), work, kv, exact_limit=6)
    assert isinstance(got, Partition) and got.order_exact
    assert got.bottleneck_s == pytest.approx(brute_force(cost, list(range(6)), work, kv), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_heuristic_order_is_never_better_than_exact_and_close(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    cost = CostModel(random_model(rng, 12), random_devices(rng, 6, mem=(2e7, 4e7)))
    work = Work.decode(4, 300)
    exact = partition(cost, list(range(6)), work, 200.0, exact_limit=6)
    heur = partition(cost, list(range(6)), work, 200.0, exact_limit=3)
    assert isinstance(exact, Partition) and isinstance(heur, Partition) and not heur.order_exact
    assert heur.bottleneck_s >= exact.bottleneck_s * (1 - 1e-12)
    assert heur.bottleneck_s <= exact.bottleneck_s * 1.25


def test_symmetric_shortcut_is_exact_for_large_groups() -> None:
    """On one kind of link with identical layers, (first, last) pairs are every distinct order."""
    rng = np.random.default_rng(7)
    cost = CostModel(random_model(rng, 9, uniform=True), random_devices(rng, 6, same_link=True, mem=(2e7, 4e7)))
    assert cost.symmetric(list(range(6)))
    got = partition(cost, list(range(6)), Work.prefill(32), 100.0, exact_limit=2)
    assert isinstance(got, Partition) and got.order_exact
    assert got.bottleneck_s == pytest.approx(brute_force(cost, list(range(6)), Work.prefill(32), 100.0), rel=1e-9)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 4))
def test_max_kv_tokens_is_the_largest_budget_that_fits(seed: int, n_layers: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    k = min(k, n_layers)
    cost = CostModel(random_model(rng, n_layers), random_devices(rng, k))
    room = max_kv_tokens(cost, list(range(k)))
    best = -np.inf
    for order in itertools.permutations(range(k)):
        for inner in itertools.combinations(range(1, n_layers), k - 1):
            cuts = (0, *inner, n_layers)
            worst = min((cost.mem[d] - cost.memory(cuts[m], cuts[m + 1], 0))
                        / (cost.cum_kv[cuts[m + 1]] - cost.cum_kv[cuts[m]]) for m, d in enumerate(order))
            best = max(best, worst)
    if best < 0:
        assert room < 0 or not np.isfinite(room)
    else:
        assert room == pytest.approx(best, rel=1e-9)


def test_group_too_small_for_the_model_is_reported_with_the_memory_figures() -> None:
    rng = np.random.default_rng(1)
    cost = CostModel(LLAMA_1B, random_devices(rng, 3, mem=(1e9, 2e9)))
    res = partition(cost, [0, 1, 2], Work.decode(4, 500), 4 * 1024)
    assert isinstance(res, Infeasible)
    assert "GB of memory but the model needs" in res.reason


def test_more_devices_than_layers_is_infeasible() -> None:
    rng = np.random.default_rng(2)
    cost = CostModel(random_model(rng, 3), random_devices(rng, 4, mem=(1e8, 2e8)))
    res = partition(cost, [0, 1, 2, 3], Work.prefill(8), 10.0)
    assert isinstance(res, Infeasible) and "at least one layer" in res.reason


def test_enough_memory_in_total_but_no_split_fits_is_reported() -> None:
    rng = np.random.default_rng(3)
    model = random_model(rng, 2, uniform=True)
    big = model.layer_weight_bytes[0] + model.embed_weight_bytes + model.head_weight_bytes
    devs = random_devices(rng, 2, mem=(big * 0.9, big * 0.95))  # each holds one layer but not with embed + head
    from dataclasses import replace

    devs = [replace(devs[0], mem_bytes=int(model.total_weight_bytes)), replace(devs[1], mem_bytes=10)]
    cost = CostModel(model, devs)
    res = partition(cost, [0, 1], Work.prefill(4), 0.0)
    assert isinstance(res, Infeasible) and "no contiguous split" in res.reason


def test_faster_device_gets_more_layers() -> None:
    rng = np.random.default_rng(4)
    from dataclasses import replace

    devs = random_devices(rng, 2, same_link=True, mem=(1e10, 1e10))
    devs = [replace(devs[0], flops=1e10, mem_bandwidth_Bps=1e10), replace(devs[1], flops=3e10, mem_bandwidth_Bps=3e10)]
    cost = CostModel(random_model(rng, 16, uniform=True), devs)
    part = partition(cost, [0, 1], Work.prefill(64), 0.0)
    assert isinstance(part, Partition)
    layers = {s.device: s.stop - s.start for s in part.stages}
    assert layers[1] > 2 * layers[0]
