"""The simulator against cases with known answers: M/D/1, a fixed pipeline, conservation, determinism."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from meshllm.plan import CostModel, ModelCosts, Workload, plan_mesh
from meshllm.plan.devices import class_devices
from meshllm.plan.objective import infeasible_metrics
from meshllm.plan.plan import Plan, Replica, Role, Stage
from meshllm.profile import DeviceProfile, Link
from meshllm.sim import Request, bursty_arrivals, requests, simulate
from meshllm.sim.routing import SplitwiseRouter

FLOPS_PER_TOKEN = 1e6
NO_LINK = Link(latency_s=0.0, bandwidth_Bps=1e18)


def _model(n_layers: int) -> ModelCosts:
    """Prefill time of a stage = tokens x layers x 1e6 / device FLOP/s, and nothing else."""
    return ModelCosts.uniform(n_layers, flops=FLOPS_PER_TOKEN, attn_flops=0, weight_bytes=0, kv_bytes=0, act_bytes=0,
                              embed_weight_bytes=0, head_flops=0, head_weight_bytes=0, max_seq_len=4096)


def _device(name: str, flops: float) -> DeviceProfile:
    return DeviceProfile(node_id=name, name=name, flops=flops, mem_bandwidth_Bps=1e12, mem_bytes=10**12,
                         default_link=NO_LINK)


def _plan(n_layers: int, stages: list[tuple[str, int, int]], slots: int = 1 << 20) -> Plan:
    st = tuple(Stage(n, a, b, 0.0, 0.0, 0.0, 1.0) for n, a, b in stages)
    rep = Replica(0, Role.MIXED, st, slots, 4096, 0.0, 0.0, 1.0, 1.0)
    return Plan(1, "synthetic", n_layers, "test", Workload.simple(100, 1, 1.0), (rep,), (), infeasible_metrics(1.0))


def _stream(arrivals: np.ndarray, n_in: int, n_out: int = 1) -> list[Request]:
    return [Request(i, float(a), n_in, n_out) for i, a in enumerate(arrivals)]


def test_md1_mean_wait_matches_pollaczek_khinchine() -> None:
    service, rho = 1.0, 0.7  # one stage, 100 tokens at 1e8 FLOP/s = 1 s
    cost = CostModel(_model(1), [_device("a", 1e8)])
    rng = np.random.default_rng(3)
    reqs = _stream(np.cumsum(rng.exponential(service / rho, size=60_000)), 100)
    res = simulate(_plan(1, [("a", 0, 1)]), cost, reqs)
    expected = rho * service / (2 * (1 - rho))
    assert res.completed == len(reqs)
    assert res.wait.mean() == pytest.approx(expected, rel=0.05)
    assert np.allclose(res.ttft - res.wait, service)


def test_pipeline_latency_is_sum_and_throughput_is_slowest_stage() -> None:
    # three stages of 0.5, 2.0 and 1.0 s for 100 tokens
    cost = CostModel(_model(3), [_device("a", 2e8), _device("b", 5e7), _device("c", 1e8)])
    plan = _plan(3, [("a", 0, 1), ("b", 1, 2), ("c", 2, 3)])
    alone = simulate(plan, cost, _stream(np.array([0.0]), 100))
    assert alone.ttft[0] == pytest.approx(3.5)
    many = simulate(plan, cost, _stream(np.zeros(200), 100))
    finish = np.sort(many.ttft)
    assert np.diff(finish) == pytest.approx(np.full(199, 2.0))  # one prompt per 2 s: the slowest stage
    assert finish[-1] == pytest.approx(3.5 + 199 * 2.0)


MODEL = ModelCosts.llama("llama-1.4b-32l", n_layers=32, dim=2048, ffn_dim=5632, n_heads=32, n_kv_heads=4,
                         vocab_size=32000, max_seq_len=2048)
DEVICES = class_devices([("rpi5", 2), ("jetson-orin-nano", 1), ("old-laptop", 1), ("mini-pc", 1)])


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    w = Workload.preset("conversation", 0.3, 0.25)
    return {m: plan_mesh(DEVICES, MODEL, w, method=m) for m in ("ga", "splitwise", "exo")}


@pytest.mark.parametrize("method", ["ga", "splitwise", "exo"])
def test_every_request_completes_once_with_ordered_timestamps(plans: dict[str, Plan], method: str) -> None:
    w = Workload.preset("conversation", 0.2, 0.25)
    reqs = requests([w], [150], seed=5, bursty=True, max_seq_len=MODEL.max_seq_len)
    res = simulate(plans[method], CostModel(MODEL, DEVICES), reqs)
    assert (res.completed, res.bounded) == (len(reqs), False)
    assert res.tokens_out == sum(q.n_out for q in reqs)
    assert np.all(res.wait >= 0) and np.all(res.ttft > res.wait) and np.all(res.e2e >= res.ttft)


def test_same_seed_same_result_and_different_seed_differs(plans: dict[str, Plan]) -> None:
    w = Workload.preset("conversation", 0.2, 0.25)
    cost = CostModel(MODEL, DEVICES)
    a = simulate(plans["splitwise"], cost, requests([w], [100], seed=1))
    b = simulate(plans["splitwise"], cost, requests([w], [100], seed=1))
    c = simulate(plans["splitwise"], cost, requests([w], [100], seed=2))
    assert a.summary() == b.summary() and np.array_equal(a.e2e, b.e2e)
    assert a.summary() != c.summary()


def test_limits_stop_an_overloaded_run_and_say_so(plans: dict[str, Plan]) -> None:
    from meshllm.sim import SimLimits

    w = Workload.preset("conversation", 50.0, 0.25)
    res = simulate(plans["exo"], CostModel(MODEL, DEVICES), requests([w], [300], seed=1),
                   limits=SimLimits(max_events=2_000))
    assert res.bounded and res.completed < 300 and res.events <= 2_001


def test_bursty_arrivals_keep_the_mean_rate_and_are_overdispersed() -> None:
    rng = np.random.default_rng(0)
    t = bursty_arrivals(2.0, 40_000, rng, burst=4.0, on_fraction=0.2, mean_period_s=60.0)
    assert len(t) / t[-1] == pytest.approx(2.0, rel=0.1)
    counts = np.histogram(t, bins=np.arange(0, t[-1], 10.0))[0]
    assert counts.var() / counts.mean() > 2.0  # Poisson would be ~1


def test_splitwise_spreads_prompts_by_pending_tokens_on_a_planned_mesh(plans: dict[str, Plan]) -> None:
    plan = plans["splitwise"]
    r = SplitwiseRouter(plan, CostModel(MODEL, DEVICES))
    pre = [x.id for x in plan.replicas if x.role is Role.PREFILL]
    dec = [x.id for x in plan.replicas if x.role is Role.DECODE]
    assert pre and dec
    got = [r.admit(Request(i, 0.0, 200, 10)) for i in range(len(pre))]
    assert sorted(p for p, _ in got) == sorted(pre)  # one prompt each: fewest pending tokens
    assert all(d in dec for _, d in got) and r.borrowed == r.lent == r.fallback == 0


def test_simulation_is_fast() -> None:
    w = Workload.preset("conversation", 0.2, 0.25)
    cost = CostModel(MODEL, DEVICES)
    plan = plan_mesh(DEVICES, MODEL, w, method="splitwise")
    t = time.process_time()
    simulate(plan, cost, requests([w], [1000], seed=1))
    assert time.process_time() - t < 5.0


def test_requests_wait_for_a_plan_that_is_not_deployed_yet() -> None:
    cost = CostModel(_model(1), [_device("a", 1e8)])
    res = simulate(_plan(1, [("a", 0, 1)]), cost, _stream(np.array([1.0, 2.0]), 100), ready_s=5.0)
    assert res.wait == pytest.approx([4.0, 4.0])  # starts at 5 and 6 (1 s service)
    assert res.ttft == pytest.approx([5.0, 5.0])


def test_serving_batching_merges_decode_batches_at_every_stage() -> None:
    """A PREFILL replica (instant) and a two-stage DECODE replica whose runs take 0.5 s on stage 0 and 2 s on
    stage 1 whatever the batch (memory-bound). Requests of one decode step arrive at 0, 0.6 and 1.2 s: each
    passes stage 0 alone, B and C then both wait for stage 1, which runs them as one batch when A leaves it
    (StageRunner batches what waits in its inbox, at every stage). By hand: A ends at 2.5 s, B and C at 4.5 s
    (4.5 and 6.5 s if they could only merge at the first stage); stage 1 computed 4 s."""
    model = ModelCosts.uniform(2, flops=0, attn_flops=0, weight_bytes=1e9, kv_bytes=0, act_bytes=0,
                               embed_weight_bytes=0, head_flops=0, head_weight_bytes=0, max_seq_len=4096)

    def device(name: str, bw: float) -> DeviceProfile:
        return DeviceProfile(node_id=name, name=name, flops=1e18, mem_bandwidth_Bps=bw, mem_bytes=10**12,
                             default_link=NO_LINK)
    cost = CostModel(model, [device("p", 1e18), device("a", 2e9), device("b", 5e8)])
    pre = Replica(0, Role.PREFILL, (Stage("p", 0, 2, 0.0, 0.0, 0.0, 1.0),), 8, 4096, 0.0, 0.0, 1.0, 1.0)
    dec = Replica(1, Role.DECODE, (Stage("a", 0, 1, 0.0, 0.0, 0.0, 1.0), Stage("b", 1, 2, 0.0, 0.0, 0.0, 1.0)), 8,
                  4096, 0.0, 0.0, 1.0, 1.0)
    plan = Plan(1, "synthetic", 2, "test", Workload.simple(100, 2, 1.0), (pre, dec), (), infeasible_metrics(1.0))
    res = simulate(plan, cost, _stream(np.array([0.0, 0.6, 1.2]), 10, n_out=2), batching="serving")
    assert res.completed == 3
    assert list(res.e2e + np.array([0.0, 0.6, 1.2])) == pytest.approx([2.5, 4.5, 4.5], abs=1e-6)
    assert res.busy_s["a"] == pytest.approx(1.5) and res.busy_s["b"] == pytest.approx(4.0)


def test_serving_batching_prefills_the_waiting_prompts_in_one_pass_as_the_stage_does() -> None:
    """Five prompts at once on one stage where a token of prefill costs 0.1 s: the first enters alone (nothing
    else waits yet), the next ones wait and then enter together, as one pass of their padded tokens
    (meshllm.serve.batching.prompts_together: only prompts of one chunk; the 200-token one goes alone). The
    idealised batching takes them one by one."""
    cost = CostModel(_model(1), [_device("a", 1e7)])
    reqs = [Request(i, 0.0, n, 1) for i, n in enumerate([10, 10, 5, 200, 20])]
    plan = _plan(1, [("a", 0, 1)], slots=8)
    serving = simulate(plan, cost, reqs, batching="serving")
    # 0-1 s: the first; 1-7 s: 10, 5 and 20 tokens padded to 3 x 20; 7-27 s: the long one
    assert list(serving.ttft) == pytest.approx([1.0, 7.0, 7.0, 27.0, 7.0])
    lanes = simulate(plan, cost, reqs, batching="lanes")
    assert list(lanes.ttft) == pytest.approx([1.0, 2.0, 2.5, 22.5, 24.5])


@pytest.mark.parametrize("role", [Role.MIXED, Role.DECODE])
def test_serving_batching_keeps_every_stage_of_a_pipeline_busy(role: Role) -> None:
    """Twelve sequences decoding together on a 3-stage replica of compute-bound stages (a run costs its batch
    size in seconds): as one batch they would leave each stage idle two thirds of the time (12 tokens per 36 s);
    the stage's rule (meshllm.serve.batching) runs them in one lane per stage, which keeps the pipeline full, as
    the idealised "lanes" batching does (12 tokens per 12 s)."""
    cost = CostModel(_model(3), [_device(n, 1e6) for n in "abc"] + [_device("p", 1e18)])
    st = tuple(Stage(n, i, i + 1, 0.0, 0.0, 0.0, 1.0) for i, n in enumerate("abc"))
    replicas: tuple[Replica, ...] = (Replica(0, role, st, 64, 4096, 0.0, 0.0, 1.0, 1.0),)
    if role == Role.DECODE:  # an instant PREFILL replica in front
        replicas = (Replica(1, Role.PREFILL, (Stage("p", 0, 3, 0.0, 0.0, 0.0, 1.0),), 64, 4096, 0.0, 0.0, 1.0, 1.0),
                    *replicas)
    plan = Plan(1, "synthetic", 3, "test", Workload.simple(100, 1, 1.0), replicas, (), infeasible_metrics(1.0))
    reqs = _stream(np.zeros(12), 1, 61)
    serving = simulate(plan, cost, reqs, batching="serving")
    ideal = simulate(plan, cost, reqs, batching="lanes")
    assert serving.completed == ideal.completed == 12
    assert serving.throughput_tps >= 0.95 * ideal.throughput_tps
    assert serving.throughput_tps >= 2.5 * 12 / 36  # three times one batch's rate, nearly


def test_a_devices_advertised_serving_overhead_is_charged_on_every_run() -> None:
    # one request alone on a 3-stage pipeline: a prefill run and n_out - 1 decode runs at each stage (the prefill's
    # run makes the first token), so every stage of the request's path pays the overhead once per run
    plan = _plan(3, [("a", 0, 1), ("b", 1, 2), ("c", 2, 3)])
    bare = [_device("a", 2e8), _device("b", 5e7), _device("c", 1e8)]
    overhead = {"a": 1e-3, "b": 4e-3, "c": 2e-3}
    served = [dataclasses.replace(d, serving_overhead_s=overhead[d.node_id]) for d in bare]
    stream = _stream(np.array([0.0]), 100, n_out=5)
    alone = simulate(plan, CostModel(_model(3), bare), stream)
    charged = simulate(plan, CostModel(_model(3), served), stream)
    per_pass = sum(overhead.values())
    assert charged.ttft[0] - alone.ttft[0] == pytest.approx(per_pass)
    assert charged.e2e[0] - alone.e2e[0] == pytest.approx(5 * per_pass)
    for d in bare:  # 1 prefill run + 4 decode runs per stage
        assert charged.busy_s[d.node_id] - alone.busy_s[d.node_id] == pytest.approx(5 * overhead[d.node_id])


def test_the_planners_dispatch_delay_is_charged_on_every_request_from_its_arrival() -> None:
    # one request alone: it is routed on arrival and reaches its first stage dispatch_s later (the planner journals
    # its route first), so its wait, first token and end all move by exactly that, and no stage works longer
    plan = _plan(2, [("a", 0, 1), ("b", 1, 2)])
    cost = CostModel(_model(2), [_device("a", 2e8), _device("b", 1e8)])
    stream = _stream(np.array([0.5]), 100, n_out=4)
    alone = simulate(plan, cost, stream)
    sent = simulate(plan, cost, stream, dispatch_s=0.002)
    assert sent.wait[0] - alone.wait[0] == pytest.approx(0.002)
    assert sent.ttft[0] - alone.ttft[0] == pytest.approx(0.002)
    assert sent.e2e[0] - alone.e2e[0] == pytest.approx(0.002)
    assert sent.busy_s == pytest.approx(alone.busy_s)
    # a queue (prompts 10x faster than they can be served): every prompt still waits at least the delay, and the
    # stream as a whole no less than without it
    busy = _stream(np.arange(20) * 0.05, 100, n_out=2)
    queued, delayed = simulate(plan, cost, busy), simulate(plan, cost, busy, dispatch_s=0.002)
    assert delayed.completed == queued.completed == 20
    assert delayed.wait.min() >= 0.002 - 1e-12 and delayed.wait.mean() >= queued.wait.mean()
    for bad in (-0.001, 1.0, math.nan):
        with pytest.raises(ValueError, match="dispatch_s"):
            simulate(plan, cost, stream, dispatch_s=bad)
