"""Where a request goes: the real meshllm scheduler, or Splitwise's pools.

A router answers ``admit(request)`` with ``(prefill replica, decode replica)``
or None (the request waits in the router's FIFO), and is told when a
request's prefill is done and when it finished; ``done`` returns the queued
requests that can go now, with their replicas.

- :class:`MeshRouter` *is* :class:`meshllm.serve.scheduler.Scheduler` (least
  expected prefill wait; decode replica with the most free slots relative to
  its size; MIXED replicas decode what they prefilled), fed the plan's layout
  exactly as the serving layer feeds it. Its bounded queue is set to hold the
  whole stream (the simulator measures waiting, it does not refuse).
- :class:`SplitwiseRouter` follows SplitwiseSim's ``MixedPoolScheduler``
  (repository Mutinifni/splitwise-sim, ``scheduler.py``; read, not copied).
  Every request is scheduled on arrival, in order; nothing waits in the
  router. The prompt goes to the prompt-pool machine with the fewest pending
  prompt tokens (``prompt_routing="tokens"``, speed-blind as published) or
  the earliest expected completion (``"ect"``: pending prefill seconds plus
  this prompt's, the fair heterogeneous variant), unless its queue is long
  (pending and over ``prompt_cap`` tokens with this one); then the mixed
  pool is tried. The token phase goes to the token-pool machine with the
  least scheduled KV memory (as a fraction of what its memory holds beside
  its weights), unless this request would not fit; then the mixed pool. With
  no prompt machine, the token machine with the fewest pending tokens joins
  the mixed pool (whether idle or not); with no token machine, the prompt
  machine with the least scheduled memory joins it. A machine leaves the
  mixed pool when it is free. If a phase still has no machine, one machine
  (the least loaded of all) runs both phases (mixed batching). A machine
  chosen for the token phase without room waits for memory: the request
  waits at that machine (counted as waiting), not in a router queue.
  Remaining differences from SplitwiseSim (docs/evaluation.md says which
  side each favours): memory is counted in KV tokens per machine (the
  tightest stage of its pipeline), a sequence holding its own prompt +
  output tokens (paged, as in SplitwiseSim) or, with ``kv_per_seq``, a fixed
  reservation (what meshllm's runtime does per slot); a machine batches at most
  ``max(slots, max_seqs)`` sequences (Splitwise: 512 sequences, 2,048 batch
  tokens); a request waiting for memory holds its prompt back too
  (SplitwiseSim would run the prompt and park the KV cache); no preemption.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from meshllm.plan.cost import CostModel
from meshllm.plan.plan import Plan, Replica, Role
from meshllm.serve.layout import Layout
from meshllm.serve.scheduler import Job, Scheduler
from meshllm.sim.arrivals import Request

Route = tuple[int, int]  # (prefill replica id, decode replica id)
PROMPT_ROUTING = ("tokens", "ect")


class Router(Protocol):
    def admit(self, req: Request) -> Route | None: ...
    def prefilled(self, req: Request) -> None: ...
    def done(self, req: Request) -> list[tuple[Request, Route]]: ...


class MeshRouter:
    """The serving layer's :class:`Scheduler`, driven by simulated events."""

    def __init__(self, plan: Plan) -> None:
        layout = Layout.from_plan(plan.to_json())
        self.scheduler = Scheduler(layout, ready=set(layout.replicas), max_queue=1 << 30)
        self._reqs: dict[str, Request] = {}

    def admit(self, req: Request) -> Route | None:
        job = Job(str(req.id), "sim", req.n_in, n_kv=req.n_in + req.n_out)  # max_tokens = its drawn output
        self._reqs[job.id] = req
        got = self.scheduler.admit(job)
        return (got.prefill_r, got.decode_r) if got is not None else None

    def prefilled(self, req: Request) -> None:
        self.scheduler.prefilled(str(req.id))

    def done(self, req: Request) -> list[tuple[Request, Route]]:
        out = [(self._reqs[j.id], (j.prefill_r, j.decode_r)) for j in self.scheduler.done(str(req.id))]
        self._reqs.pop(str(req.id), None)
        return out


class SplitwiseRouter:
    """Splitwise's MixedPoolScheduler (see the module docstring): prompt, token and mixed pools.

    ``prompt_routing``: ``"tokens"`` (Splitwise as published: the instance with the fewest
    pending prompt tokens, blind to its speed) or ``"ect"`` (the fair heterogeneous variant:
    the earliest expected completion, pending prefill seconds plus this prompt's own).
    """

    def __init__(self, plan: Plan, cost: CostModel | None = None, prompt_cap: int = 2048,
                 prompt_routing: str = "tokens", max_seqs: int = 16, kv_per_seq: int | None = None) -> None:
        if prompt_routing not in PROMPT_ROUTING:
            raise ValueError(f"prompt_routing must be one of {PROMPT_ROUTING}, got {prompt_routing!r}")
        self.prompt_cap = prompt_cap  # Splitwise's 8,192 pending batch tokens, scaled like the prompts (x0.25)
        self.prompt_routing = prompt_routing
        # KV tokens a sequence holds: its own prompt + output (None: SplitwiseSim, paged KV), or a fixed
        # reservation (meshllm's runtime reserves the plan's context per slot)
        self.kv_per_seq = kv_per_seq
        self.cost = cost
        self.replicas = {r.id: r for r in plan.replicas}
        # a machine's own pool; a MIXED replica (a one-machine plan) is in both
        self.tag = {r.id: r.role for r in plan.replicas}
        self.prompt = [r.id for r in plan.replicas if r.role in (Role.PREFILL, Role.MIXED)]
        self.token = [r.id for r in plan.replicas if r.role in (Role.DECODE, Role.MIXED)]
        self.mixed: list[int] = []
        self.pending: dict[int, int] = {r: 0 for r in self.replicas}  # prompt tokens scheduled, not yet prefilled
        self.pending_s: dict[int, float] = {r: 0.0 for r in self.replicas}  # their prefill seconds (bottleneck)
        self.active: dict[int, int] = {r: 0 for r in self.replicas}  # sequences holding KV memory
        self.kv: dict[int, int] = {r: 0 for r in self.replicas}  # scheduled KV tokens (prompt + output)
        self.room = {r.id: self._room(r) for r in plan.replicas}  # KV tokens the machine's memory holds
        self.max_seqs = {r.id: max(r.slots, max_seqs) for r in plan.replicas}
        self.routes: dict[int, Route] = {}
        self.waiting: dict[int, deque[Request]] = {r: deque() for r in self.replicas}  # for memory on a machine
        self.borrowed = 0  # a token machine joined the mixed pool to run prompts
        self.lent = 0  # a prompt machine joined the mixed pool to decode
        self.fallback = 0  # both phases on one machine (nothing else fitted)

    # --- per-machine figures ---------------------------------------------------------

    def _room(self, r: Replica) -> int:
        """KV tokens the replica's memory holds beside its weights (its slots x context without a cost model)."""
        if self.cost is None:
            return max(r.slots * r.context, 1)
        return max(int(min(self.cost.kv_room(s.node_id, s.start, s.stop, s.memory_capacity) for s in r.stages)), 1)

    def _prefill_s(self, r: int, n: int) -> tuple[float, float]:
        """(bottleneck, latency) seconds of one prompt of ``n`` tokens on replica ``r``."""
        if self.cost is None:
            return float(n), float(n)
        c = self.cost
        st = self.replicas[r].stages
        times = [c.prefill_time(s.node_id, s.start, s.stop, n)
                 + (c.activation_time(s.node_id, st[j + 1].node_id, s.stop, n) if j + 1 < len(st) else 0.0)
                 for j, s in enumerate(st)]
        return max(times), sum(times)

    def _load(self, r: int, n: int) -> float:
        if self.prompt_routing == "tokens":
            return float(self.pending[r])
        return self.pending_s[r] + self._prefill_s(r, n)[1]

    def _need(self, req: Request) -> int:
        return req.n_in + req.n_out if self.kv_per_seq is None else self.kv_per_seq

    def _fits(self, r: int, need: int) -> bool:
        return self.active[r] < self.max_seqs[r] and self.kv[r] + need <= self.room[r]

    # --- Splitwise's decisions ---------------------------------------------------------

    def _best_prompt(self, pool: list[int], req: Request) -> int | None:
        if not pool:
            return None
        p = min(pool, key=lambda r: (self._load(r, req.n_in), r))
        if self.pending[p] > 0 and self.pending[p] + req.n_in > self.prompt_cap:  # its queue is long
            return None
        return p

    def _best_token(self, pool: list[int], need: int) -> int | None:
        if not pool:
            return None
        d = min(pool, key=lambda r: (self.kv[r] / self.room[r], r))
        return d if self._fits(d, need) else None

    def _join_mixed(self, r: int) -> None:
        for pool in (self.prompt, self.token):
            if r in pool:
                pool.remove(r)
        self.mixed.append(r)

    def _schedule(self, req: Request) -> Route:
        need = self._need(req)
        p = self._best_prompt(self.prompt, req)
        if p is None:
            p = self._best_prompt(self.mixed, req)
        d = self._best_token(self.token, need)
        if d is None:
            d = self._best_token(self.mixed, need)
        borrowers = [r for r in self.token if self.tag[r] is Role.DECODE]
        if p is None and borrowers:
            p = min(borrowers, key=lambda r: (self.pending[r], r))  # a token machine joins the mixed pool
            self._join_mixed(p)
            self.borrowed += 1
        lenders = [r for r in self.prompt if self.tag[r] is Role.PREFILL]
        if d is None and lenders:
            d = min(lenders, key=lambda r: (self.kv[r] / self.room[r], r))  # a prompt machine joins it
            self._join_mixed(d)
            self.lent += 1
        if p is None or d is None:  # nothing else: one machine runs both phases (mixed batching)
            every = self.prompt + self.mixed + self.token
            p = d = min(every, key=lambda r: (self._load(r, req.n_in), r))
            self.fallback += 1
        return p, d

    def _take(self, req: Request, route: Route) -> Route:
        p, d = route
        self.active[d] += 1
        self.kv[d] += self._need(req)
        self.routes[req.id] = route
        return route

    def _book(self, req: Request, p: int) -> None:
        self.pending[p] += req.n_in
        self.pending_s[p] += self._prefill_s(p, req.n_in)[0]

    def admit(self, req: Request) -> Route | None:
        p, d = self._schedule(req)
        self._book(req, p)
        if not self.waiting[d] and self._fits(d, self._need(req)):
            return self._take(req, (p, d))
        self.routes[req.id] = (p, d)  # committed to its machines; waits for memory on ``d``
        self.waiting[d].append(req)
        return None

    def prefilled(self, req: Request) -> None:
        p, _ = self.routes[req.id]
        self.pending[p] = max(0, self.pending[p] - req.n_in)
        self.pending_s[p] = max(0.0, self.pending_s[p] - self._prefill_s(p, req.n_in)[0])
        self._maybe_return(p)

    def _maybe_return(self, r: int) -> None:
        """A machine in the mixed pool goes back to its own pool when it is free."""
        if r in self.mixed and self.pending[r] == 0 and self.active[r] == 0 and not self.waiting[r]:
            self.mixed.remove(r)
            (self.prompt if self.tag[r] is Role.PREFILL else self.token).append(r)

    def done(self, req: Request) -> list[tuple[Request, Route]]:
        p, d = self.routes.pop(req.id)
        self.active[d] -= 1
        self.kv[d] -= self._need(req)
        out = []
        q = self.waiting[d]
        while q and self._fits(d, self._need(q[0])):
            nxt = q.popleft()
            out.append((nxt, self._take(nxt, self.routes[nxt.id])))
        self._maybe_return(d)
        self._maybe_return(p)
        return out


def router_for(plan: Plan, cost: CostModel | None = None, prompt_routing: str = "tokens"
               ) -> MeshRouter | SplitwiseRouter:
    """Splitwise's routing for a Splitwise plan, the real scheduler for every other plan."""
    if plan.method == "splitwise":
        return SplitwiseRouter(plan, cost, prompt_routing=prompt_routing)
    return MeshRouter(plan)
