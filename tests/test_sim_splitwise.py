"""The faithful Splitwise router (SplitwiseSim's MixedPoolScheduler) on small cases with known answers.

Machines are one-stage replicas of a 1-layer synthetic model whose KV cache costs 1 byte per token,
so a machine's memory in bytes *is* the number of KV tokens it holds; prefill takes tokens x 1e6 FLOP.
"""

from __future__ import annotations

from meshllm.plan import CostModel, ModelCosts, Workload
from meshllm.plan.objective import infeasible_metrics
from meshllm.plan.plan import Plan, Replica, Role, Stage
from meshllm.profile import DeviceProfile, Link
from meshllm.sim import Request, simulate
from meshllm.sim.routing import SplitwiseRouter

NO_LINK = Link(latency_s=0.0, bandwidth_Bps=1e18)
MODEL = ModelCosts.uniform(1, flops=1e6, attn_flops=0, weight_bytes=0, kv_bytes=1, act_bytes=0,
                           embed_weight_bytes=0, head_flops=0, head_weight_bytes=0, max_seq_len=4096)


def _mesh(machines: list[tuple[str, Role, float, int]]) -> tuple[Plan, CostModel]:
    """(name, role, FLOP/s, KV tokens of memory) per machine -> a Splitwise plan and its cost model."""
    devices = [DeviceProfile(node_id=n, name=n, flops=f, mem_bandwidth_Bps=1e12, mem_bytes=m, default_link=NO_LINK)
               for n, _, f, m in machines]
    reps = tuple(Replica(i, role, (Stage(n, 0, 1, 0.0, 0.0, 0.0, float(m)),), 1, 64, 0.0, 0.0, 1.0, 1.0)
                 for i, (n, role, _, m) in enumerate(machines))
    plan = Plan(1, "synthetic", 1, "splitwise", Workload.simple(100, 10, 1.0), reps, (), infeasible_metrics(1.0))
    return plan, CostModel(MODEL, devices)


def test_prompts_go_by_pending_tokens_speed_blind_or_by_expected_completion() -> None:
    plan, cost = _mesh([("fast", Role.PREFILL, 1e9, 10_000), ("slow", Role.PREFILL, 1e7, 10_000),
                        ("tok", Role.DECODE, 1e9, 10_000)])
    for routing, want in (("tokens", 1), ("ect", 0)):
        r = SplitwiseRouter(plan, cost, prompt_routing=routing)
        assert r.admit(Request(0, 0.0, 100, 10)) == (0, 2)  # both empty: the lower id
        # fast has 100 pending tokens (0.1 s); slow has none but needs 10 s for this prompt
        assert r.admit(Request(1, 0.0, 100, 10)) == (want, 2), routing


def test_a_token_machine_joins_the_mixed_pool_when_the_prompt_queue_is_long_and_returns_when_free() -> None:
    plan, cost = _mesh([("p", Role.PREFILL, 1e9, 10_000), ("t1", Role.DECODE, 1e9, 10_000),
                        ("t2", Role.DECODE, 1e9, 10_000)])
    r = SplitwiseRouter(plan, cost, prompt_cap=300)
    assert r.admit(Request(0, 0.0, 200, 10)) == (0, 1)
    # p is pending 200 tokens and 200 + 200 > 300: the token machine with the fewest pending tokens (t1, busy
    # decoding request 0, but no prompt pending; tie with t2 broken by id) joins the mixed pool
    assert r.admit(Request(1, 0.0, 200, 10)) == (1, 2)
    assert r.borrowed == 1 and r.mixed == [1] and r.token == [2]
    # the mixed machine now takes prompts too (its queue is short), before another machine is borrowed
    r.prefilled(Request(1, 0.0, 200, 10))
    assert r.admit(Request(2, 0.0, 250, 10))[0] == 1 and r.borrowed == 1
    for q in (Request(0, 0.0, 200, 10), Request(2, 0.0, 250, 10)):
        r.prefilled(q)
        r.done(q)
    assert 1 not in r.mixed and 1 in r.token  # free again: back to its own pool


def test_a_prompt_machine_decodes_up_to_its_memory_when_the_token_pool_is_full() -> None:
    plan, cost = _mesh([("p1", Role.PREFILL, 1e9, 900), ("p2", Role.PREFILL, 1e9, 300),
                        ("t", Role.DECODE, 1e9, 150)])
    r = SplitwiseRouter(plan, cost)
    assert r.admit(Request(0, 0.0, 100, 20)) == (0, 2)  # 120 of t's 150 tokens
    # t cannot hold 120 more: the prompt machine with the least scheduled memory (p1, tie by id; its pending
    # prompt counts only as a prompt) joins the mixed pool and keeps the sequence
    assert r.admit(Request(1, 0.0, 100, 20)) == (1, 0)  # the prompt itself: p2, fewer pending tokens
    assert r.lent == 1 and r.mixed == [0]
    # the mixed pool (p1, 900 tokens) takes sequences while they fit: six more of 120 tokens (7 x 120 = 840)
    for i in range(2, 8):
        p, d = r.admit(Request(i, 0.0, 100, 20))
        assert d == 0
    assert r.kv[0] == 840 and r.lent == 1
    # then p1 is full, and the next prompt machine (p2, 300 tokens) joins
    assert r.admit(Request(8, 0.0, 100, 20))[1] == 1 and r.lent == 2


def test_when_nothing_fits_one_machine_runs_both_phases_and_the_request_waits_there_for_memory() -> None:
    plan, cost = _mesh([("p", Role.PREFILL, 1e9, 130), ("t", Role.DECODE, 1e9, 130)])
    r = SplitwiseRouter(plan, cost)
    a, b, c = Request(0, 0.0, 100, 20), Request(1, 0.0, 100, 20), Request(2, 0.0, 100, 20)
    assert r.admit(a) == (0, 1)
    assert r.admit(b) == (0, 0) and r.lent == 1  # p joins the mixed pool and keeps its sequence
    # no machine holds 120 more tokens: the least loaded machine (fewest pending prompt tokens: t, none)
    # runs both phases; it is full, so the request waits there, not in a router queue
    assert r.admit(c) is None
    assert r.fallback == 1 and r.routes[2] == (1, 1) and list(r.waiting[1]) == [c]
    r.prefilled(a)
    assert r.done(a) == [(c, (1, 1))]  # t's memory freed: the waiting request goes, on the machine it was given


def test_the_simulator_serves_a_stream_with_every_kind_of_borrowing() -> None:
    plan, cost = _mesh([("p", Role.PREFILL, 2e8, 400), ("t", Role.DECODE, 2e8, 300)])
    reqs = [Request(i, 0.05 * i, 100, 20) for i in range(60)]
    r = SplitwiseRouter(plan, cost, prompt_cap=300)
    res = simulate(plan, cost, reqs, router=r)
    assert res.completed == 60 and not res.bounded
    assert r.lent > 0 and r.fallback > 0 and r.borrowed > 0
    assert all(v == 0 for v in r.active.values()) and all(v == 0 for v in r.kv.values())


def test_with_a_fixed_reservation_per_sequence_memory_holds_fewer_sequences() -> None:
    plan, cost = _mesh([("p", Role.PREFILL, 1e9, 100), ("t", Role.DECODE, 1e9, 1000)])
    paged, slotted = SplitwiseRouter(plan, cost), SplitwiseRouter(plan, cost, kv_per_seq=400)
    for i in range(8):  # 8 x 120 tokens fit in t's 1,000 when each holds its own; 2 x 400 when reserved
        paged.admit(Request(i, 0.0, 100, 20))
        slotted.admit(Request(i, 0.0, 100, 20))
    assert paged.active[1] == 8 and paged.lent == 0
    assert slotted.active[1] == 2 and slotted.lent == 1 and slotted.fallback > 0
