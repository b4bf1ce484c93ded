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
- :class:`SplitwiseRouter` follows Splitwise (Patel et al., ISCA 2024) as
  summarised in /work/shared/PAPER-NOTES.md: prompts to the prompt instance
  with the fewest pending prompt tokens, unless every prompt instance is
  over ``prompt_cap`` pending tokens (or the prompt pool is empty): then an
  idle token instance is borrowed into the mixed pool and runs the prompt
  and its decode (mixed batching, no hand-off). The token phase goes to the
  token instance with the least scheduled KV memory (as a fraction of its
  budget) that has a free slot; with none, the prompt instance keeps the
  sequence if it has a free KV slot (the other direction of borrowing).
  Simplifications: when every prompt instance is over the cap and no token
  instance is idle, the prompt still goes to the least-pending prompt
  instance (Splitwise refuses it there and retries later; the wait is the
  same kind). The decode replica is chosen at admission, not after the
  prompt phase (a request waits in the FIFO until a slot is free); an
  instance is "in the mixed pool" exactly while it runs the other phase's
  work; no preemption; the 512-sequence / 2,048-token batch limits become the
  plan's slots per replica.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from meshllm.plan.plan import Plan, Role
from meshllm.serve.layout import Layout
from meshllm.serve.scheduler import Job, Scheduler
from meshllm.sim.arrivals import Request

Route = tuple[int, int]  # (prefill replica id, decode replica id)


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
        job = Job(str(req.id), "sim", req.n_in)
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
    """Splitwise's prompt pool, token pool and mixed-pool borrowing (see the module docstring)."""

    def __init__(self, plan: Plan, prompt_cap: int = 2048) -> None:
        self.prompt_cap = prompt_cap  # Splitwise's 8,192 pending batch tokens, scaled like the prompts (x0.25)
        self.replicas = {r.id: r for r in plan.replicas}
        self.prompt = [r.id for r in plan.replicas if r.role in (Role.PREFILL, Role.MIXED)]
        self.token = [r.id for r in plan.replicas if r.role in (Role.DECODE, Role.MIXED)]
        self.pending: dict[int, int] = {r: 0 for r in self.replicas}  # prompt tokens not yet prefilled
        self.active: dict[int, int] = {r: 0 for r in self.replicas}  # sequences holding a KV slot
        self.kv: dict[int, int] = {r: 0 for r in self.replicas}  # scheduled KV tokens (prompt + output)
        self.routes: dict[int, Route] = {}
        self.queue: deque[Request] = deque()
        self.borrowed = 0  # prompts run by a borrowed token instance
        self.kept = 0  # sequences decoded by the prompt instance that prefilled them

    def _free(self, r: int) -> bool:
        return self.active[r] < self.replicas[r].slots

    def _route(self, req: Request) -> Route | None:
        open_p = [p for p in self.prompt if self.pending[p] + req.n_in <= self.prompt_cap or self.pending[p] == 0]
        if not open_p:  # prompt pool empty or overloaded: borrow an idle token instance (mixed pool)
            idle = [d for d in self.token if self.active[d] == 0 and self.pending[d] == 0]
            if idle:
                self.borrowed += 1
                return idle[0], idle[0]
            open_p = self.prompt or self.token
        p = min(open_p, key=lambda r: (self.pending[r], r))
        if self.replicas[p].role is Role.MIXED or p in self.token and p not in self.prompt:
            return (p, p) if self._free(p) else None
        need = req.n_in + req.n_out
        cands = [d for d in self.token if self._free(d) and self.kv[d] + need <= self._budget(d)]
        if cands:
            return p, min(cands, key=lambda d: (self.kv[d] / self._budget(d), d))
        if self._free(p):  # token pool full: the prompt instance keeps the sequence (mixed pool)
            self.kept += 1
            return p, p
        return None

    def _budget(self, r: int) -> int:
        rep = self.replicas[r]
        return max(rep.slots * rep.context, 1)

    def _take(self, req: Request, route: Route) -> Route:
        p, d = route
        self.pending[p] += req.n_in
        self.active[d] += 1
        self.kv[d] += req.n_in + req.n_out
        self.routes[req.id] = route
        return route

    def admit(self, req: Request) -> Route | None:
        if not self.queue:
            route = self._route(req)
            if route is not None:
                return self._take(req, route)
        self.queue.append(req)
        return None

    def prefilled(self, req: Request) -> None:
        p, _ = self.routes[req.id]
        self.pending[p] = max(0, self.pending[p] - req.n_in)

    def done(self, req: Request) -> list[tuple[Request, Route]]:
        _, d = self.routes.pop(req.id)
        self.active[d] -= 1
        self.kv[d] -= req.n_in + req.n_out
        out = []
        while self.queue:
            route = self._route(self.queue[0])
            if route is None:
                break
            q = self.queue.popleft()
            out.append((q, self._take(q, route)))
        return out


def router_for(plan: Plan) -> MeshRouter | SplitwiseRouter:
    """Splitwise's routing for a Splitwise plan, the real scheduler for every other plan."""
    return SplitwiseRouter(plan) if plan.method == "splitwise" else MeshRouter(plan)
