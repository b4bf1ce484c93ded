"""The planner's bookkeeping of slots: the Scheduler's invariants under any order of events, and the dispatcher's
state machine under the orders of frames and copies of requests that leaked slots before (issue 14, item 10).

The scheduler is pure logic, driven here by a hypothesis state machine. The dispatcher runs for real on an event
loop against a recording stand-in for its serving node (the I/O it would do: frames to stages, replies and
journal writes to the broker): what is tested is which frames it sends and what its scheduler holds.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from meshllm.dataplane.links import PeerUnreachable
from meshllm.mesh.topics import Topics
from meshllm.serve import api
from meshllm.serve.dispatch import Dispatcher
from meshllm.serve.journal import Journal, request_of
from meshllm.serve.layout import Layout
from meshllm.serve.protocol import Done, Frame
from meshllm.serve.scheduler import KV_PAGE_SLACK, Job, Scheduler, kv_need
from tests.serving_harness import replica

# two PREFILL/DECODE-split replicas and a MIXED one, small slots so that queues form
PLAN = {"version": 1, "n_layers": 4, "replicas": [
    replica(0, "prefill", [("a", 0, 4)], slots=2),
    replica(1, "decode", [("b", 0, 4)], slots=2),
    replica(2, "decode", [("c", 0, 2), ("d", 2, 4)], slots=3),
    replica(3, "mixed", [("e", 0, 4)], slots=1)]}
IDS = [f"r{i}" for i in range(8)]


# --- the scheduler --------------------------------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Every operation in any order; a model of what should be held is kept beside it."""

    @initialize()
    def start(self) -> None:
        self.layout = Layout.from_plan(PLAN)
        self.s = Scheduler(self.layout, ready=set(self.layout.replicas), max_queue=3)
        self.held: dict[str, Job] = {}  # what the model says the scheduler holds (queued or running)
        self.restored: set[str] = set()  # restored jobs may exceed slots (dispatched by a previous planner)

    def _check_returned(self, jobs: list[Job]) -> None:
        for j in jobs:
            assert self.s.owns(j) and self.held[j.id] is j, "drained a job it does not hold"

    @rule(rid=st.sampled_from(IDS), n=st.integers(0, 50), reach=st.integers(0, 200), accepted=st.booleans())
    def admit(self, rid: str, n: int, reach: int, accepted: bool) -> None:
        job = Job(rid, f"x/{rid}", n, n_kv=reach and n + reach)  # 0: unknown, a whole context
        try:
            routed = self.s.admit(job, accepted=accepted)
        except api.RequestFailed as e:
            if rid in self.held:
                assert e.code == api.INVALID_REQUEST
            else:
                assert e.code == api.BUSY and not accepted and len(self.s.queue) >= self.s.max_queue
            return
        assert rid not in self.held, "admitted a second job under an id it holds"
        self.held[rid] = job
        if routed is not None:
            assert routed is job and self.s.owns(job)
            p, d = self.layout.replicas[job.prefill_r], self.layout.replicas[job.decode_r]
            # a PREFILL replica decodes only what it prefilled itself (it lent itself: no decode replica had room)
            assert p.does_prefill and (d.does_decode or (d.role == "prefill" and d is p))
        else:
            assert any(q is job for q in self.s.queue)

    @rule(rid=st.sampled_from(IDS))
    def done(self, rid: str) -> None:
        self.held.pop(rid, None)
        self._check_returned(self.s.done(rid))

    @rule(rid=st.sampled_from(IDS))
    def forget(self, rid: str) -> None:
        got = self.s.forget(rid)
        assert got is self.held.pop(rid, None)

    @rule(rid=st.sampled_from(IDS))
    def cancel_queued(self, rid: str) -> None:
        got = self.s.cancel_queued(rid)
        if got is not None:
            assert self.held.pop(rid) is got and not self.s.owns(got)

    @rule(rid=st.sampled_from(IDS))
    def release_a_stale_copy(self, rid: str) -> None:
        """A job object of an earlier admission of the same id (a stale dispatch) never frees the current one."""
        assert not self.s.release(Job(rid, f"x/{rid}", 1))

    @rule(rid=st.sampled_from(IDS))
    def release_the_held_job(self, rid: str) -> None:
        job = self.held.get(rid)
        if job is not None:
            assert self.s.release(job)
            del self.held[rid]
            assert not self.s.release(job), "released twice"

    @rule(rid=st.sampled_from(IDS))
    def prefilled(self, rid: str) -> None:
        self.s.prefilled(rid)

    @rule()
    def drain(self) -> None:
        self._check_returned(self.s.drain())

    @rule(ready=st.sets(st.sampled_from([0, 1, 2, 3])))
    def readiness_changes(self, ready: set[int]) -> None:
        self.s.ready = ready

    @rule(rid=st.sampled_from(IDS), pr=st.sampled_from([0, 3]), dr=st.sampled_from([1, 2, 3]))
    def restore(self, rid: str, pr: int, dr: int) -> None:
        job = Job(rid, f"x/{rid}", 0, pr, dr)
        self.s.restore(job)
        if rid not in self.held:
            self.held[rid] = job
            self.restored.add(rid)

    @invariant()
    def nothing_lost_nothing_duplicated(self) -> None:
        queued = [q.id for q in self.s.queue]
        assert len(queued) == len(set(queued))
        assert not set(queued) & set(self.s.jobs)
        assert set(queued) | set(self.s.jobs) == set(self.held)
        for rid, job in self.held.items():
            assert self.s.held(rid) is job
        assert self.s.violations() == []

    @invariant()
    def active_counts_are_the_running_jobs(self) -> None:
        want = Counter(j.decode_r for j in self.s.jobs.values())
        assert self.s.active == dict(want)
        assert all(v > 0 for v in self.s.active.values())
        assert all(v >= 0 for v in self.s.pending_tokens.values())
        assert sum(self.s.pending_tokens.values()) == sum(j.n_prompt for j in self.s.jobs.values())
        counted = Counter(j.decode_r for j in self.s.jobs.values() if j.id not in self.restored)
        for r, n in counted.items():
            assert n <= self.layout.replicas[r].rows, f"replica {r} runs {n} > {self.layout.replicas[r].rows}"
        kv: Counter[int] = Counter()
        for j in self.s.jobs.values():
            if j.id not in self.restored:
                kv[j.decode_r] += kv_need(j, self.layout.replicas[j.decode_r])
        for r, n in kv.items():
            assert n <= self.layout.replicas[r].kv_budget, f"replica {r} holds {n} KV positions > its budget"


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_scheduler_invariants = SchedulerMachine.TestCase


# --- the scheduler's routing policy, one rule at a time -------------------------------------------------------


def _layout(*replicas: dict) -> Layout:
    return Layout.from_plan({"version": 1, "n_layers": 4, "replicas": list(replicas)})


def _rep(rid: int, role: str, node: str, slots: int = 4, prefill_rate: float = 1.0) -> dict:
    return {**replica(rid, role, [(node, 0, 4)], slots=slots), "prefill_rate": prefill_rate}


def _sched(layout: Layout, **kw: Any) -> Scheduler:
    return Scheduler(layout, ready=set(layout.replicas), **kw)


def test_a_prompt_goes_to_the_prefill_replica_whose_queued_tokens_clear_soonest() -> None:
    # prefill 0 does 128 tokens/s, prefill 1 three times that (rates are prompts/s x 128 mean input tokens)
    s = _sched(_layout(_rep(0, "prefill", "a", prefill_rate=1.0), _rep(1, "prefill", "b", prefill_rate=3.0),
                       _rep(2, "decode", "c", slots=10)))
    jobs = [Job(f"r{i}", "x", 100) for i in range(3)]
    routed = [s.admit(j) for j in jobs]
    # waits: 100/384 < 100/128; then 200/384 < 100/128; then 300/384 == 100/128, the lower id wins
    assert [(j.prefill_r, j.decode_r) for j in routed if j is not None] == [(1, 2), (1, 2), (0, 2)]
    assert s.pending_tokens == {1: 200, 0: 100}
    s.prefilled("r0")  # its prompt is done: replica 1 clears sooner again
    assert s.pending_tokens == {1: 100, 0: 100}
    assert s.admit(Job("r3", "x", 100)).prefill_r == 1


def test_decode_goes_to_the_replica_with_the_most_free_slots_for_its_size() -> None:
    s = _sched(_layout(_rep(0, "prefill", "a"), _rep(1, "decode", "b", slots=2), _rep(2, "decode", "c", slots=4)))
    routed = [s.admit(Job(f"r{i}", "x", 1)) for i in range(11)]
    # shares in use: (0/2, 0/4) -> 1 (lower id); (1/2, 0/4) -> 2; (1/2, 1/4) -> 2; (1/2, 2/4) -> 1; then 2, 2;
    # then both are full and the PREFILL replica decodes what it prefills, as far as its own memory holds (4
    # slots of 128 positions, beside the 6 prompt positions it still has to prefill for the others): 3 more
    assert [j.decode_r if j is not None else None for j in routed] == [1, 2, 2, 1, 2, 2, 0, 0, 0, None, None]
    assert s.active == {0: 3, 1: 2, 2: 4} and [q.id for q in s.queue] == ["r9", "r10"]


def test_a_mixed_replica_decodes_what_it_prefilled_and_only_up_to_its_slots() -> None:
    s = _sched(_layout(_rep(0, "mixed", "a", slots=2), _rep(1, "mixed", "b", slots=1)))
    routed = [s.admit(Job(f"r{i}", "x", 10)) for i in range(4)]
    assert [(j.prefill_r, j.decode_r) if j is not None else None for j in routed] == [(0, 0), (1, 1), (0, 0), None]


def test_sequences_take_the_kv_positions_they_can_reach_not_a_whole_context() -> None:
    # a DECODE replica with 2 slots of 128 positions (256 in all) and a MIXED one whose memory holds 600
    s = _sched(_layout(_rep(0, "prefill", "a"), _rep(1, "decode", "b", slots=2),
                       {**_rep(2, "mixed", "c", slots=1), "kv_tokens": 600}))
    d, m = s.layout.replicas[1], s.layout.replicas[2]
    assert (d.kv_budget, d.rows, m.kv_budget, m.rows) == (256, 16, 600, 16)
    short = [Job(f"s{i}", "x", 10, n_kv=10 + 30) for i in range(20)]  # 40 positions + a page: 72 each
    routed = [s.admit(j) for j in short]
    on = Counter(j.decode_r for j in routed if j is not None)
    # the decode replica takes 3 (3 x 72 <= 256 < 4 x 72), the mixed one 8 (8 x 72 <= 600); then the PREFILL
    # replica (4 slots of 128: 512) lends itself, as far as its memory holds beside the prompts it still has to
    # prefill for the decode replica (3 x 10 positions): 30 + 6 x 72 <= 512 < 30 + 7 x 72
    assert on == {1: 3, 2: 8, 0: 6} and len(s.queue) == 3
    assert s.kv_in_use == {1: 3 * (40 + KV_PAGE_SLACK), 2: 8 * (40 + KV_PAGE_SLACK), 0: 6 * (40 + KV_PAGE_SLACK)}
    # one that can reach a whole context takes one (a row is a context long: no page on top)
    assert kv_need(Job("long", "x", 100, n_kv=5000), d) == 128 and kv_need(Job("old", "x", 1), d) == 128
    for j in routed[:2]:
        assert j is not None
        s.done(j.id)
    assert len(s.queue) == 1  # two places freed, two waiting ones took them


def test_a_replica_takes_at_most_its_rows_however_short_its_sequences() -> None:
    s = _sched(_layout({**_rep(0, "mixed", "a", slots=1), "kv_tokens": 100_000}))
    routed = [s.admit(Job(f"r{i}", "x", 1, n_kv=2)) for i in range(20)]
    assert sum(j is not None for j in routed) == s.layout.replicas[0].rows == 16


def test_a_plan_without_a_context_keeps_counting_slots() -> None:
    s = _sched(_layout({**_rep(0, "mixed", "a", slots=2), "context": 0}))
    assert s.layout.replicas[0].rows == 2
    routed = [s.admit(Job(f"r{i}", "x", 1, n_kv=2)) for i in range(3)]
    assert [j is not None for j in routed] == [True, True, False]


def test_waiting_requests_go_in_arrival_order_and_accepted_ones_first() -> None:
    s = _sched(_layout(_rep(0, "mixed", "a", slots=1)), max_queue=3)
    assert s.admit(Job("run", "x", 1)) is not None
    for rid in ("w1", "w2", "w3"):
        assert s.admit(Job(rid, "x", 1)) is None
    with pytest.raises(api.RequestFailed) as e:
        s.admit(Job("w4", "x", 1))
    assert e.value.code == api.BUSY and "3 requests already queued" in e.value.message
    assert s.admit(Job("resumed", "x", 1), accepted=True) is None  # never refused, even beyond the bound
    order = []
    for done in ("run", "resumed", "w1", "w2", "w3"):
        order += [j.id for j in s.done(done)]
    assert order == ["resumed", "w1", "w2", "w3"]
    assert not s.jobs and not s.queue


def test_a_new_request_does_not_overtake_waiting_ones() -> None:
    s = _sched(_layout(_rep(0, "mixed", "a", slots=1)))
    s.admit(Job("r0", "x", 1))
    assert s.admit(Job("r1", "x", 1)) is None
    s.forget("r0")  # a slot is free, but r1 was first: r2 waits behind it until the queue is drained
    assert s.admit(Job("r2", "x", 1)) is None
    assert [j.id for j in s.drain()] == ["r1"] and [q.id for q in s.queue] == ["r2"]


def test_replicas_that_are_not_ready_get_nothing_and_requests_wait_for_them() -> None:
    layout = _layout(_rep(0, "prefill", "a"), _rep(1, "decode", "b"), _rep(2, "mixed", "c"))
    s = Scheduler(layout, ready={1})  # nothing ready that prefills: a request waits, it is not refused
    assert s.admit(Job("r0", "x", 5)) is None
    s.ready = {2}
    assert [(j.prefill_r, j.decode_r) for j in s.drain()] == [(2, 2)]
    s.ready = {0, 1}
    assert (s.admit(Job("r1", "x", 5)).prefill_r, s.jobs["r1"].decode_r) == (0, 1)


def test_a_restored_job_counts_against_its_replica() -> None:
    s = _sched(_layout(_rep(0, "prefill", "a"), _rep(1, "decode", "b", slots=1)))
    s.restore(Job("old", "x", 40, 0, 1))  # dispatched by the previous planner
    assert s.active == {1: 1} and s.pending_tokens == {}  # its prompt is not waited on
    new = s.admit(Job("new", "x", 1))
    assert new is not None and new.decode_r == 0  # not on the full decode replica: the PREFILL one lends itself


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("arrive"), st.integers(1, 300)),
                          st.tuples(st.just("finish"), st.integers(0, 30)),
                          st.tuples(st.just("prefilled"), st.integers(0, 30))), max_size=80))
def test_any_arrivals_and_completions_dispatch_each_request_once_in_order_within_capacity(events: list) -> None:
    """Never more sequences on a replica than its memory holds; every request dispatched exactly once, in
    arrival order; whatever was admitted is dispatched once everything before it is done."""
    layout = _layout(_rep(0, "prefill", "a", prefill_rate=1.0), _rep(1, "prefill", "b", prefill_rate=2.0),
                     _rep(2, "decode", "c", slots=2), _rep(3, "decode", "d", slots=3), _rep(4, "mixed", "e", slots=1))
    s = _sched(layout, max_queue=5)
    capacity = {0: 4, 1: 4, 2: 2, 3: 3, 4: 1}  # whole-context sequences; PREFILL replicas lend their 4 slots
    admitted: list[str] = []
    dispatched: list[str] = []
    refused = 0

    def record(jobs: list[Job]) -> None:
        for j in jobs:
            assert s.owns(j)
            dispatched.append(j.id)

    for i, (kind, n) in enumerate(events):
        if kind == "arrive":
            try:
                routed = s.admit(Job(f"q{i}", "x", n))
            except api.RequestFailed as e:
                assert e.code == api.BUSY and len(s.queue) == 5
                refused += 1
                continue
            admitted.append(f"q{i}")
            record([routed] if routed is not None else [])
        elif s.jobs:
            running = sorted(s.jobs)
            rid = running[n % len(running)]
            if kind == "finish":
                record(s.done(rid))
            else:
                s.prefilled(rid)
        for r, k in s.active.items():
            assert k <= capacity[r], f"replica {r} runs {k} sequences, it has {capacity[r]} slots"
        assert s.violations() == []
    while s.jobs:  # finish everything: what waited is dispatched, nothing twice, nothing left
        record(s.done(sorted(s.jobs)[0]))
    assert not s.queue
    assert dispatched == admitted  # exactly once each, first come first served


# --- the dispatcher ---------------------------------------------------------------------------------------------


class Chars:
    """A tokenizer stand-in: one id per character (tokenizing is not what these tests are about)."""

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return ([1] if bos else []) + [3 + ord(c) % 200 for c in text]


class Bench:
    """What a Dispatcher is given (the node's view, the fabric, the deployment's plans, the model), recording
    the frames and messages it would send."""

    def __init__(self, slots: int = 1) -> None:
        self.alive = {"a", "b"}
        self.node = SimpleNamespace(node_id="a", is_planner=True, in_touch=True, topics=Topics("t"),
                                    member_ids=lambda: set(self.alive), publish=self._publish_raw)
        self.journal = Journal()
        self.layout = Layout.from_plan({"version": 1, "n_layers": 4,
                                        "replicas": [replica(0, "mixed", [("a", 0, 2), ("b", 2, 4)], slots=slots)]})
        self.manifest = None
        self.tokenizer = Chars()
        self.sent: list[dict[str, Any]] = []  # prefill frames
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self.retained: list[tuple[str, str]] = []
        self.failures: list[BaseException] = []
        self.fail_sends = 0
        self.on_send: Any = None  # called with each frame sent, before it counts as sent
        self.tasks: set[asyncio.Task[Any]] = set()
        self.dispatcher = Dispatcher(self.node, self.journal, self, self, lambda: self.tokenizer,  # type: ignore[arg-type]
                                     lambda: 0, self.spawn)

    async def _publish_raw(self, topic: str, data: Any, qos: int = 1, retain: bool = False) -> bool:
        self.retained.append((topic, data))
        return True

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())  # type: ignore[arg-type]

    async def send(self, node_id: str, typed: Frame) -> None:
        frame = typed.encode()  # what would go on the wire: the checks below read its fields
        if self.fail_sends:
            self.fail_sends -= 1
            raise PeerUnreachable(f"{node_id} is away")
        if self.on_send is not None:
            await self.on_send(frame)
        self.sent.append(frame)

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.replies.append((topic, payload))

    async def publish_retained(self, topic: str, data: str) -> None:
        self.retained.append((topic, data))

    def ready_replicas(self) -> set[int]:
        return set(self.layout.replicas)

    # --- driving it ---

    async def request(self, rid: str, prompt: str = "hello") -> None:
        """A request arrives (as the node's MQTT receive loop hands it over)."""
        # max_tokens of a whole context (128): each request takes a whole slot, so that queues form
        payload = json.dumps({"id": rid, "prompt": prompt, "max_tokens": 128, "temperature": 0}).encode()
        await self.dispatcher.on_request(SimpleNamespace(payload=payload, retain=False))

    def finish(self, key: str) -> None:
        """A stage ended the run ``key``: its done frame (over TCP) and, independently, its journal clear (MQTT)."""
        self.dispatcher.on_done(Done(key, 0, 0, "stop"))

    def late_clear(self, rid: str) -> None:
        cleared = self.journal.on_job(rid, b"")
        if cleared is not None:
            self.dispatcher.on_journal_cleared(cleared)

    def lose_b(self) -> None:
        """Node b is gone: r1's route is stranded, and the plan is made again without it."""
        self.alive = {"a"}
        self.layout = Layout.from_plan({"version": 2, "n_layers": 4, "replicas": [replica(1, "mixed", [("a", 0, 4)])]})

    def broker_job(self, rid: str) -> str | None:
        """What the broker retains on ``jobs/<rid>`` after every write so far, in order (None: never written)."""
        writes = [d for t, d in self.retained if t == self.node.topics.job(rid)]
        return writes[-1] if writes else None

    async def stage_clears(self, rid: str) -> None:
        """The streaming node's journal clear reaches the broker now (another MQTT client than the planner's)."""
        self.retained.append((self.node.topics.job(rid), ""))

    async def deliver_journal(self) -> None:
        """The broker hands the planner every jobs/ message written since the last delivery, in broker order,
        as ServingNode._on_job does."""
        start, self._delivered = getattr(self, "_delivered", 0), len(self.retained)
        for topic, data in self.retained[start:]:
            if "/jobs/" not in topic:
                continue
            rid = topic.rsplit("/", 1)[1]
            payload = data.encode() if isinstance(data, str) else data
            cleared = self.journal.on_job(rid, payload)
            if cleared is not None:
                self.dispatcher.on_journal_cleared(cleared)
            elif payload:
                await self.dispatcher.on_record(rid)

    async def settle(self, s: float = 0.3) -> None:
        await asyncio.sleep(s)

    def sent_for(self, rid: str) -> list[str]:
        return [f["id"] for f in self.sent if request_of(f["id"]) == rid]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_bench(body: Any, slots: int = 1) -> Bench:
    bench = Bench(slots)
    tend = asyncio.get_running_loop().create_task(bench.dispatcher.tend())
    try:
        await body(bench)
    finally:
        tend.cancel()
        await asyncio.gather(tend, *bench.tasks, return_exceptions=True)
    return bench


def test_a_copy_of_a_request_that_crosses_its_end_is_served_once_and_leaks_no_slot() -> None:
    """The sequence of issue 14 item 10: a client sent its request again while it waited; the copy arrives after
    the request ended, between its done frame and its journal clear, and another copy after that. Before the fix
    the copy was admitted again, the late clear dropped it from the scheduler with its prompt left in a side
    table, the next copy overwrote that entry, and one dispatch raised KeyError holding a slot forever."""
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.settle()
        assert b.sent_for("r1") == ["r1"]
        b.finish("r1")  # the done frame
        await b.request("r1")  # a copy sent before the end, arriving after it
        b.late_clear("r1")  # the journal clear of the run that ended
        await b.request("r1")  # another copy
        await b.settle()
    b = run(_with_bench(body))
    assert b.failures == [], f"dispatch tasks failed: {b.failures!r}"
    assert b.sent_for("r1") == ["r1"], "a request was served more than once"
    sched = b.dispatcher.scheduler
    assert sched is not None and sched.jobs == {} and not sched.queue and sched.active == {}
    replays = [p for t, p in b.replies if t.endswith("/replay")]
    assert replays and all(p == {"id": "r1", "from": 0} for p in replays), "copies after the end get the replies"


def test_copies_while_waiting_and_running_are_served_once_and_every_slot_comes_back() -> None:
    async def body(b: Bench) -> None:
        for rid in ("r1", "r2", "r1", "r3", "r2"):  # r2 and r3 wait for r1's only slot; copies of r1 and r2
            await b.request(rid)
        await b.settle()
        assert [f["id"] for f in b.sent] == ["r1"]
        await b.request("r1")  # a copy while it runs
        await b.request("r2", prompt="something else")  # another request under an id in use
        await b.settle()
        for rid in ("r1", "r2", "r3"):
            b.finish(rid)
            await b.settle(0.1)
    b = run(_with_bench(body))
    assert b.failures == []
    assert [f["id"] for f in b.sent] == ["r1", "r2", "r3"]
    errors = [(t, p["error"]["code"]) for t, p in b.replies if "error" in p]
    assert errors == [("meshllm/v1/t/replies/r2", api.INVALID_REQUEST)]
    sched = b.dispatcher.scheduler
    assert sched is not None and sched.jobs == {} and not sched.queue


def test_a_late_done_of_a_replaced_attempt_leaves_the_queued_attempt_alone() -> None:
    async def body(b: Bench) -> None:
        await b.request("r0")
        await b.request("r1")  # queued behind r0
        await b.settle()
        sched = b.dispatcher.scheduler
        assert sched is not None
        queued = sched.held("r1")
        assert queued is not None and queued.attempt == 0
        b.finish("r1@3")  # a done of another attempt of r1 (frames are keyed by attempt)
        assert sched.held("r1") is queued
        b.finish("r0")
        await b.settle()
        assert b.sent_for("r1") == ["r1"]
    b = run(_with_bench(body))
    assert b.failures == []


def test_cancel_while_queued_frees_its_place_and_answers_once() -> None:
    async def body(b: Bench) -> None:
        await b.request("r0")
        await b.request("r1")
        await b.settle()
        await b.dispatcher.on_cancel(SimpleNamespace(payload=b'{"id": "r1"}', retain=False))
        await b.request("r1")  # a copy after the cancel: not served
        b.finish("r0")
        await b.settle()
    b = run(_with_bench(body))
    assert b.failures == []
    assert [f["id"] for f in b.sent] == ["r0"]
    assert [(t, p["error"]["code"]) for t, p in b.replies if "error" in p] == [
        ("meshllm/v1/t/replies/r1", api.CANCELLED)]
    assert b.dispatcher.scheduler is not None and not b.dispatcher.scheduler.jobs
    assert ("meshllm/v1/t/jobs/r1", "") in b.retained


def test_a_send_that_fails_gives_its_slot_back_and_the_request_is_sent_again() -> None:
    async def body(b: Bench) -> None:
        b.fail_sends = 2
        await b.request("r1")
        await b.request("r2")
        await b.settle(0.2)
        sched = b.dispatcher.scheduler
        assert sched is not None
        # while r1 waits to be routed again its slot is free: r2 took it (and failed too)
        await b.settle(1.5)
        assert sorted(f["id"] for f in b.sent) == ["r1"] or sorted(f["id"] for f in b.sent) == ["r2"]
        b.finish(b.sent[0]["id"])
        await b.settle(1.0)
    b = run(_with_bench(body))
    assert b.failures == []
    assert sorted(f["id"] for f in b.sent) == ["r1", "r2"]
    assert sum(1 for f in b.sent) == 2, "sent once each after the failures"


def test_a_dispatch_that_went_stale_sends_nothing_and_frees_nothing() -> None:
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.settle()
        sched = b.dispatcher.scheduler
        assert sched is not None
        stale = Job("r1", "x", 5, 0, 0, prompt=[1, 2], meta={"prompt_len": 2})
        await b.dispatcher._start(stale)  # e.g. spawned for an admission that was dropped since
        assert sched.held("r1") is not stale and sched.active == {0: 1}
    b = run(_with_bench(body))
    assert b.failures == []
    assert b.sent_for("r1") == ["r1"]


@pytest.mark.parametrize("order", ["done-first", "clear-first"])
def test_done_frame_and_journal_clear_in_either_order_end_the_request_once(order: str) -> None:
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.request("r2")
        await b.settle()
        events = [lambda: b.finish("r1"), lambda: b.late_clear("r1")]
        for e in events if order == "done-first" else events[::-1]:
            e()
        await b.settle()
    b = run(_with_bench(body))
    assert b.failures == []
    assert [f["id"] for f in b.sent] == ["r1", "r2"]
    sched = b.dispatcher.scheduler
    assert sched is not None and list(sched.jobs) == ["r2"] and sched.active == {0: 1}


# --- the journal race of issue 16 item 9: a finished request's record left retained ---------------------------


def test_a_request_that_ends_while_it_is_being_resumed_is_not_run_again_nor_journaled() -> None:
    """Node b is lost while r1's last stage (on a) is streaming its final reply: the planner resumes r1 and
    silences the old attempt, but the old attempt ends just as the release goes out (its done frame and journal
    clear arrive while the planner is resuming). Before the fix the resume went on regardless: a second attempt
    ran and its journal record, written after the clear, stayed retained."""
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.settle()
        await b.deliver_journal()
        assert b.sent_for("r1") == ["r1"] and b.broker_job("r1")

        async def ends_now(frame: dict[str, Any]) -> None:
            if frame.get("t") == "release" and frame["id"] == "r1":
                b.finish("r1")
                await b.stage_clears("r1")
                await b.deliver_journal()
        b.on_send = ends_now
        b.lose_b()
        await b.settle(0.5)
        await b.deliver_journal()
        await b.settle(0.3)
    b = run(_with_bench(body))
    assert b.failures == []
    assert [f["id"] for f in b.sent if f.get("t") == "prefill"] == ["r1"], "an ended request was run again"
    assert b.broker_job("r1") == "", "the ended request's journal record is left retained"
    assert "r1" not in b.journal.jobs


def test_a_journal_write_that_lands_after_the_requests_clear_is_cleared_again() -> None:
    """The planner's write of r1's next attempt and the old attempt's clear come from two MQTT clients: the
    broker may order the clear first. The planner hears the clear (r1 ended), then its own record after it:
    that record is the broker's last word, so the planner clears it again."""
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.settle()
        await b.deliver_journal()

        async def clear_overtakes(frame: dict[str, Any]) -> None:
            if frame.get("t") == "prefill" and frame["id"] == "r1@1":
                # attempt 1's route is journaled; the old attempt's clear reached the broker just before it
                route = b.retained.pop()
                await b.stage_clears("r1")
                b.retained.append(route)
        b.on_send = clear_overtakes
        b.lose_b()
        await b.settle(0.5)
        await b.deliver_journal()  # the clear, then the route written after it
        await b.settle(0.3)
    b = run(_with_bench(body))
    assert b.failures == []
    assert b.broker_job("r1") == "", "a record written after the request's clear is left retained"
    assert "r1" not in b.journal.jobs


def test_a_stranded_request_that_ends_while_others_are_resumed_is_not_run_again() -> None:
    """Losing a node strands every request routed over it; the planner resumes them one after the other, and one
    further down the list may end meanwhile (its last stage was alive). It must not start again from scratch
    (its checkpoint is gone with its end) with a journal record that stays while the copy runs."""
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.request("r2")
        await b.settle()
        await b.deliver_journal()
        assert [f["id"] for f in b.sent] == ["r1", "r2"]

        async def r2_ends(frame: dict[str, Any]) -> None:
            if frame.get("t") == "release" and frame["id"] == "r1":
                b.finish("r2")
                await b.stage_clears("r2")
                await b.deliver_journal()
        b.on_send = r2_ends
        b.lose_b()
        await b.settle(0.5)
        await b.deliver_journal()
    b = run(_with_bench(body, slots=2))
    assert b.failures == []
    assert [f["id"] for f in b.sent if f.get("t") == "prefill"] == ["r1", "r2", "r1@1"]
    assert b.broker_job("r2") == "" and "r2" not in b.journal.jobs


def test_the_planner_clears_a_record_it_wrote_after_the_streamers_clear_once_the_done_frame_comes() -> None:
    """The streaming node's clear may reach the broker before a record the planner wrote (a resume racing the
    end); if the planner heard that record while the request was still held, only its own clear at the done
    frame leaves the broker clean (tests/test_resume.py once found a finished request left retained)."""
    async def body(b: Bench) -> None:
        await b.request("r1")
        await b.settle()
        await b.deliver_journal()  # its route, heard while it is held: nothing to clear yet
        await b.stage_clears("r1")  # the streamer's clear ...
        b.retained.append((b.node.topics.job("r1"), b.retained[-2][1]))  # ... then a late record of the planner's
        b.finish("r1")
        await b.settle(0.2)
    b = run(_with_bench(body))
    assert b.failures == []
    assert b.broker_job("r1") == "", "a finished request's record is left retained"
