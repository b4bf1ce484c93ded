"""The event loop: replicas as pipelines of FIFO stages, priced by the planner's CostModel.

What is modelled (every time comes from :class:`~meshllm.plan.cost.CostModel`):

- A replica is its plan's pipeline. Each stage is a FIFO server; an item (one
  prompt, or one micro-batch of a decode step) runs stage ``j`` for
  ``run_time(stage j) + activation send to stage j+1`` and then moves on, so
  one item's latency is the sum of its stage times while many in flight
  leave at the rate of the slowest stage (the tandem recursion
  ``start_j = max(done_{j-1}, free_j)``). Prompts are pushed into the pipeline
  when routed, in routing order.
- Decode is continuous batching over micro-batches: a replica's running
  sequences (at most its slots, reserved by the router) sit in one *lane*
  per pipeline stage (a sequence joins the lane with the fewest); each lane
  cycles on its own — a step of a lane runs its sequences as one
  micro-batch through the stages (``decode_time`` for that batch at its mean
  context) and sends the sampled token ids back from the last stage to the
  first, then the lane's next step starts. With k lanes in flight a k-stage
  pipeline stays full (a token per sequence per round trip, the stages'
  queues interleave the lanes). Sequences whose KV arrives during a lane's
  step join at its end; finished ones leave at its end.
  With ``batching="serving"`` decode batches as meshllm's stages batch
  instead (see :func:`simulate`), by the same rule
  (:mod:`meshllm.serve.batching`): each sequence starts as its own
  micro-batch; the first stage of a pipeline runs one lane (a fixed
  k-th of its sequences) at a time and waits for that lane's stragglers,
  later stages of a DECODE replica run everything waiting for them as one
  batch, and the last stage feeds the batch's tokens back as one step.
- A MIXED replica time-shares its stages: work enters the first stage only
  when that stage is free; when prompts and decode steps both wait, they
  take turns (one prompt, one lane step; with ``batching="serving"`` the
  prompt's turn takes the prompts waiting that meshllm's stage prefills in
  one step with it, :func:`meshllm.serve.batching.prompts_together`, as one
  pass of their padded tokens). Strict decode-first (the
  planner's MIXED model) starves prompts on a one-stage replica, whose only
  lane is always ready. Later stages serve what entered in entry order,
  without preemption, so a decode micro-batch can wait behind a whole
  prompt already in the pipeline (no chunked prefill).
- The KV hand-off PREFILL -> DECODE takes ``kv_handoff_time`` of the prompt's
  tokens between the two replicas' layouts; links are not contended.
- The first token is made by the prefill: TTFT = end of prefill (the
  hand-off is on the path of the second token).

Metrics: waiting time = arrival to the start of the prompt's first stage
(time in the router's FIFO plus the first stage's queue), TTFT, end-to-end,
throughput. Deterministic (no randomness here) and bounded by
:class:`SimLimits`; a run that hits a bound is reported as such.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshllm.plan.cost import TOKEN_ID_BYTES, CostModel, StageRef
from meshllm.plan.plan import Plan
from meshllm.runtime.segment import PREFILL_CHUNK
from meshllm.serve.batching import PROMPT_BATCH_TOKENS, Lanes, lanes_for, next_batch, prompts_together, stragglers
from meshllm.serve.layout import Layout
from meshllm.sim.arrivals import Request
from meshllm.sim.routing import Route, Router, router_for

ARRIVE, PREFILLED, KV_READY, STEP_DONE, STAGE0_FREE, STAGE_DONE, FED, SENT = range(8)
LANES = 1 << 32  # STEP_DONE payload: replica id * LANES + lane
BATCHING = ("lanes", "serving")


@dataclass(frozen=True)
class SimLimits:
    max_events: int = 2_000_000
    max_time_s: float = 1e6  # simulated seconds


class _Replica:
    def __init__(self, cost: CostModel, rid: int, stages: Sequence[tuple[int, int, int]], slots: int) -> None:
        self.cost, self.id = cost, rid
        self.slots = slots  # sequences its stages hold: the most prompts a prefill step takes
        self.stages = tuple(stages)  # (device index, start, stop)
        self.refs = [StageRef(d, a, b) for d, a, b in stages]
        self.free = [0.0] * len(stages)  # when each stage's queue empties
        self.busy = [0.0] * len(stages)  # seconds each stage computed and sent
        k = len(stages)
        self.active: list[list[list[int]]] = [[] for _ in range(k)]  # per lane: [request id, tokens made]
        self.joining: list[list[list[int]]] = [[] for _ in range(k)]  # KV arrived during the lane's step
        self.stepping = [False] * k
        self.prompts: deque[int] = deque()  # routed prompts waiting to enter the first stage
        self.lanes_ready: deque[int] = deque()  # lanes whose next step waits to enter the first stage
        self.wake_pending = False
        self.prompt_turn = True  # when both wait, the first stage alternates a prompt and a decode step
        first, last = stages[0][0], stages[-1][0]
        self.token_back = cost.transfer_time(last, first, TOKEN_ID_BYTES) if len(stages) > 1 else 0.0
        # "serving" batching in a DECODE replica: each stage's waiting sequences, and what it runs now
        self.per_stage = False
        self.waiting: list[list[list[int]]] = [[] for _ in range(k)]
        self.running: list[list[list[int]] | None] = [None] * k
        # ... and, at the first stage of a pipeline, the stage's lanes (meshllm.serve.batching) and the sequences
        # that decode there
        n_lanes = lanes_for(d for d, _, _ in self.stages)  # simulated devices are machines of their own
        self.lanes = Lanes(n_lanes) if k > 1 else None
        self.decoding: set[int] = set()
        self.made: dict[int, int] = {}  # tokens each sequence has made

    def lane_for(self) -> int:
        sizes = [len(a) + len(j) for a, j in zip(self.active, self.joining, strict=True)]
        return sizes.index(min(sizes))

    def new_lane(self) -> int:
        """An idle lane (a micro-batch slot of the "serving" batching), made if none is idle."""
        for i, (a, j, s) in enumerate(zip(self.active, self.joining, self.stepping, strict=True)):
            if not a and not j and not s:
                return i
        self.active.append([])
        self.joining.append([])
        self.stepping.append(False)
        return len(self.active) - 1

    def _pass(self, t: float, times: Sequence[float]) -> tuple[float, float]:
        """One item through the stages from time ``t``: (start at the first stage, done at the last)."""
        start = ready = t
        for j, dt in enumerate(times):
            s = max(ready, self.free[j])
            if j == 0:
                start = s
            ready = self.free[j] = s + dt
            self.busy[j] += dt
        return start, ready

    def _send(self, j: int, tokens: float) -> float:
        if j + 1 >= len(self.stages):
            return 0.0
        d, _, b = self.stages[j]
        return self.cost.activation_time(d, self.stages[j + 1][0], b, tokens)

    def prefill(self, t: float, n_in: int) -> tuple[float, float]:
        c = self.cost
        return self._pass(t, [c.prefill_time(d, a, b, n_in) + self._send(j, n_in)
                              for j, (d, a, b) in enumerate(self.stages)])

    def step(self, t: float, contexts: Sequence[int]) -> float:
        """Issue one decode step of one micro-batch (cached positions per sequence); returns when it ends."""
        c = self.cost
        bsz, ctx = len(contexts), float(np.mean(contexts))
        _, end = self._pass(t, [c.decode_time(d, a, b, ctx, bsz) + self._send(j, bsz)
                                for j, (d, a, b) in enumerate(self.stages)])
        return end + self.token_back


@dataclass
class SimResult:
    n: int
    completed: int
    wait: np.ndarray  # per completed request, seconds
    ttft: np.ndarray
    e2e: np.ndarray
    tokens_out: int
    makespan_s: float  # first arrival to last completion
    events: int
    bounded: bool  # a limit stopped the run before every request finished
    stats: dict[str, float] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)  # per node: seconds its stage computed and sent
    tpot: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per completed request with > 1 token:
    # (end-to-end - TTFT) / (output tokens - 1), the time per output token after the first

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def throughput_tps(self) -> float:
        return self.tokens_out / self.makespan_s if self.makespan_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        def q(x: np.ndarray, p: float) -> float:
            return float(np.percentile(x, p)) if len(x) else math.nan

        return {
            "n": self.n, "completed": self.completed, "bounded": float(self.bounded),
            "wait_mean": float(self.wait.mean()) if len(self.wait) else math.nan,
            "wait_p50": q(self.wait, 50), "wait_p95": q(self.wait, 95),
            "ttft_mean": float(self.ttft.mean()) if len(self.ttft) else math.nan,
            "ttft_p50": q(self.ttft, 50), "ttft_p95": q(self.ttft, 95),
            "tpot_p50": q(self.tpot, 50), "tpot_p95": q(self.tpot, 95),
            "e2e_mean": float(self.e2e.mean()) if len(self.e2e) else math.nan,
            "e2e_p50": q(self.e2e, 50), "e2e_p95": q(self.e2e, 95),
            "throughput_rps": self.throughput_rps, "throughput_tps": self.throughput_tps,
        }


def simulate(plan: Plan, cost: CostModel, reqs: Sequence[Request], router: Router | None = None,
             limits: SimLimits = SimLimits(), ready_s: float = 0.0, batching: str = "lanes",
             dispatch_s: float = 0.0) -> SimResult:
    """Serve ``reqs`` with ``plan``'s replicas; ``cost`` must be the cost model the plan was made with.

    ``ready_s``: when the replicas can start work (a plan being deployed); requests routed
    earlier wait for it, and that counts as waiting.

    ``batching``: how decode sequences form micro-batches. ``"lanes"`` (the default, the
    evaluation's idealised continuous batching): one lane per stage, a sequence joins the
    lane with the fewest. ``"serving"``: what meshllm's stages do, by their rule
    (:mod:`meshllm.serve.batching`): a sequence starts as its own micro-batch; the first stage
    runs the waiting steps of one lane at a time, once that lane's sequences still in the
    pipeline are back (not waited for while prompts wait, nor for a sequence on its last step);
    in a DECODE replica each later stage, when free, runs every sequence waiting for it as one
    batch, and the last stage feeds the tokens back to the first as one step.

    ``dispatch_s``: how long the planner takes from routing a prompt to its arrival at its first stage (it
    journals the route before it sends the prompt: the planner's stats report ``dispatch_s`` summed over
    ``dispatched`` prompts). The
    request is routed, and holds its slot, from its arrival, as the scheduler does; it counts as waiting.
    """
    if not 0.0 <= dispatch_s < 1.0:
        raise ValueError(f"dispatch_s must be in [0, 1) s, got {dispatch_s!r}")
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
    serving = batching == "serving"
    router = router if router is not None else router_for(plan, cost)
    # cache rows as the serving layer sizes them (Splitwise's machines: their slots, as its router counts)
    rows = ({r.id: r.slots for r in plan.replicas} if plan.method == "splitwise"
            else {r.id: r.rows for r in Layout.from_plan(plan).replicas.values()})
    reps = {r.id: _Replica(cost, r.id, [(cost.index[s.node_id], s.start, s.stop) for s in r.stages], rows[r.id])
            for r in plan.replicas}
    for r in plan.replicas:
        reps[r.id].free = [ready_s] * len(reps[r.id].free)
        reps[r.id].per_stage = serving and r.role == "decode"
    feeding: dict[int, list[list[int]]] = {}  # FED payload -> the sequences whose tokens go back
    by_id = {q.id: q for q in reqs}
    route: dict[int, Route] = {}
    start: dict[int, float] = {}
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    heap: list[tuple[float, int, int, int]] = []
    seq = 0

    def push(t: float, kind: int, x: int) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, kind, x))
        seq += 1

    def dispatch(t: float, q: Request, r: Route) -> None:
        route[q.id] = r
        if dispatch_s > 0.0:
            push(t + dispatch_s, SENT, q.id)
            return
        reps[r[0]].prompts.append(q.id)
        kick(t, reps[r[0]])

    def begin_step(t: float, rep: _Replica, lane: int) -> None:
        rep.active[lane].extend(rep.joining[lane])
        rep.joining[lane] = []
        rep.stepping[lane] = bool(rep.active[lane])
        if rep.stepping[lane]:
            rep.lanes_ready.append(lane)
            kick(t, rep)

    def kick(t: float, rep: _Replica) -> None:
        """Let waiting work into the first stage while it is free; prompts and decode steps alternate."""
        while (rep.prompts or rep.lanes_ready) and rep.free[0] <= t:
            if rep.prompts and (rep.prompt_turn or not rep.lanes_ready):
                batch = prompt_batch(rep)
                s, e = rep.prefill(t, len(batch) * max(q.n_in for q in batch))
                for q in batch:
                    start[q.id] = s
                    push(e, PREFILLED, q.id)
                rep.prompt_turn = False
            else:
                lane = serving_batch(rep) if serving else rep.lanes_ready.popleft()
                if lane is None:
                    break  # the first stage waits for its lane's stragglers (their return kicks it again)
                ctx = [by_id[i].n_in + made for i, made in rep.active[lane]]
                push(rep.step(t, ctx), STEP_DONE, rep.id * LANES + lane)
                rep.prompt_turn = True
        if (rep.prompts or rep.lanes_ready) and not rep.wake_pending and rep.free[0] > t:
            rep.wake_pending = True
            push(rep.free[0], STAGE0_FREE, rep.id)

    def prompt_batch(rep: _Replica) -> list[Request]:
        """The prompts that enter the first stage now: the first waiting and, with "serving" batching, those
        meshllm's stage prefills with it in one step (padded to the longest)."""
        if not serving:
            return [by_id[rep.prompts.popleft()]]
        waiting = [by_id[i] for i in rep.prompts]
        chosen = set(prompts_together([q.n_in if q.n_in <= PREFILL_CHUNK else None for q in waiting], rep.slots,
                                      PROMPT_BATCH_TOKENS))
        rep.prompts = deque(q.id for i, q in enumerate(waiting) if i not in chosen)
        return [q for i, q in enumerate(waiting) if i in chosen]

    def serving_batch(rep: _Replica) -> int | None:
        """A MIXED replica's next decode micro-batch, as meshllm's first stage chooses it from the steps waiting
        (:mod:`meshllm.serve.batching`): one lane of them, once its stragglers are in (not waited for while
        prompts wait); what is left stays ready as one micro-batch. None: wait."""
        slots = list(rep.lanes_ready)
        items = [item for s in slots for item in rep.active[s]]
        ids = [item[0] for item in items]
        chosen = set(next_batch(ids, rep.lanes, len(ids)))
        batch = [item for i, item in enumerate(items) if i in chosen]
        rest = [item for i, item in enumerate(items) if i not in chosen]
        if not rep.prompts and any(s not in ids and rep.made[s] + 1 < by_id[s].n_out
                                   for s in stragglers([item[0] for item in batch], rep.lanes, rep.decoding)):
            return None
        rep.lanes_ready.clear()
        for slot in slots:
            rep.active[slot] = []
            rep.stepping[slot] = False
        lane = slots[0]
        rep.active[lane], rep.stepping[lane] = batch, True
        if rest:
            other = rep.new_lane()
            rep.active[other], rep.stepping[other] = rest, True
            rep.lanes_ready.append(other)
        if rep.lanes is not None:
            rep.decoding.update(item[0] for item in batch)
        return lane

    def run_stage(t: float, rep: _Replica, j: int) -> None:
        """A DECODE stage that is free runs the next batch of the sequences waiting for it, as meshllm's stage
        chooses it (:mod:`meshllm.serve.batching`): a later stage runs them all; the first stage of a pipeline
        runs one lane, and first waits for that lane's sequences still in the pipeline (the stage waits for them
        up to about a round; here they always come, except those on their last step, whose release tells the
        stage not to wait)."""
        if rep.running[j] is not None or not rep.waiting[j]:
            return
        if j == 0 and rep.lanes is not None:
            ids = [item[0] for item in rep.waiting[0]]
            chosen = set(next_batch(ids, rep.lanes, len(ids)))
            batch = [item for i, item in enumerate(rep.waiting[0]) if i in chosen]
            missing = [s for s in stragglers([item[0] for item in batch], rep.lanes, rep.decoding)
                       if s not in ids and rep.made[s] + 1 < by_id[s].n_out]
            if missing:
                return  # their arrival runs the stage again
            rep.waiting[0] = [item for i, item in enumerate(rep.waiting[0]) if i not in chosen]
            rep.decoding.update(item[0] for item in batch)
        else:
            batch, rep.waiting[j] = rep.waiting[j], []
        d, a, b = rep.stages[j]
        ctx = float(np.mean([by_id[i].n_in + made for i, made in batch]))
        dt = cost.decode_time(d, a, b, ctx, len(batch)) + rep._send(j, len(batch))
        s = max(t, rep.free[j])
        rep.free[j] = s + dt
        rep.busy[j] += dt
        rep.running[j] = batch
        push(s + dt, STAGE_DONE, rep.id * LANES + j)

    def stage_done(t: float, rep: _Replica, j: int) -> None:
        batch = rep.running[j]
        assert batch is not None
        rep.running[j] = None
        if j + 1 < len(rep.stages):
            rep.waiting[j + 1].extend(batch)
            run_stage(t, rep, j + 1)
        else:
            still = []
            for item in batch:
                item[1] += 1
                rep.made[item[0]] = item[1]
                if item[1] >= by_id[item[0]].n_out:
                    if rep.lanes is not None:  # (the stage's release)
                        rep.lanes.drop(item[0])
                    rep.decoding.discard(item[0])
                    finished(t, by_id[item[0]])
                else:
                    still.append(item)
            if still and len(rep.stages) == 1:  # a one-stage replica feeds its own inbox at once
                rep.waiting[0].extend(still)
            elif still:
                nonlocal seq
                feeding[seq] = still
                push(t + rep.token_back, FED, rep.id * LANES + seq)  # push() takes seq as the key below
        run_stage(t, rep, j)

    def finished(t: float, q: Request) -> None:
        finish[q.id] = t
        for nq, r in router.done(q):
            dispatch(t, nq, r)

    for q in reqs:
        push(q.arrival, ARRIVE, q.id)
    events = 0
    t = 0.0
    while heap:
        t, _, kind, x = heapq.heappop(heap)
        events += 1
        if events > limits.max_events or t > limits.max_time_s:
            break
        if kind == ARRIVE:
            q = by_id[x]
            r = router.admit(q)
            if r is not None:
                dispatch(t, q, r)
        elif kind == SENT:
            rep = reps[route[x][0]]
            rep.prompts.append(x)
            kick(t, rep)
        elif kind == PREFILLED:
            q = by_id[x]
            router.prefilled(q)
            first[x] = t
            if q.n_out <= 1:
                finished(t, q)
                continue
            p, d = route[x]
            hand = 0.0 if p == d else cost.kv_handoff_time(reps[p].refs, reps[d].refs, q.n_in)
            push(t + hand, KV_READY, x)
        elif kind == KV_READY:
            dec = reps[route[x][1]]
            if dec.per_stage:
                dec.waiting[0].append([x, 1])
                dec.made[x] = 1
                run_stage(t, dec, 0)
                continue
            if serving:  # its own micro-batch, ready to enter the first stage now
                dec.made[x] = 1
                lane = dec.new_lane()
                dec.active[lane].append([x, 1])
                dec.stepping[lane] = True
                dec.lanes_ready.append(lane)
                kick(t, dec)
                continue
            lane = dec.lane_for()
            dec.joining[lane].append([x, 1])
            if not dec.stepping[lane]:
                begin_step(t, dec, lane)
        elif kind == STAGE0_FREE:
            reps[x].wake_pending = False
            kick(t, reps[x])
        elif kind == STAGE_DONE:
            stage_done(t, reps[x // LANES], x % LANES)
        elif kind == FED:
            rep = reps[x // LANES]
            rep.waiting[0].extend(feeding.pop(x % LANES))
            run_stage(t, rep, 0)
        else:  # STEP_DONE
            rep, lane = reps[x // LANES], x % LANES
            still = []
            for item in rep.active[lane]:
                item[1] += 1
                rep.made[item[0]] = item[1]
                if item[1] >= by_id[item[0]].n_out:
                    if rep.lanes is not None:
                        rep.lanes.drop(item[0])
                    rep.decoding.discard(item[0])
                    finished(t, by_id[item[0]])
                else:
                    still.append(item)
            rep.active[lane] = still
            begin_step(t, rep, lane)
    done = [q for q in reqs if q.id in finish]
    arr = np.array([q.arrival for q in done])
    t0 = min((q.arrival for q in reqs), default=0.0)
    return SimResult(
        n=len(reqs), completed=len(done),
        wait=np.array([start[q.id] for q in done]) - arr,
        ttft=np.array([first[q.id] for q in done]) - arr,
        e2e=np.array([finish[q.id] for q in done]) - arr,
        tokens_out=sum(q.n_out for q in done),
        makespan_s=(max(finish.values()) - t0) if finish else 0.0,
        events=events, bounded=len(done) < len(reqs),
        stats={k: float(v) for k, v in vars(router).items() if k in ("borrowed", "lent", "fallback")},
        busy_s={s.node_id: rep.busy[j] for r in plan.replicas for rep in [reps[r.id]] for j, s in enumerate(r.stages)},
        tpot=np.array([(finish[q.id] - first[q.id]) / (q.n_out - 1) for q in done if q.n_out > 1]),
    )
