"""Routing requests to replicas: least expected wait, bounded queues, a clear 'busy'. Pure logic.

Runs on the planner node, fed by the serving layer. A request goes to the
ready prefill-capable replica whose queued prompt tokens would clear soonest
(queued tokens / predicted prefill tokens/s), and to the ready decode-capable
replica with the most free decode slots relative to its size; a MIXED replica
decodes what it prefilled. When every decode slot is taken the request waits
in a bounded FIFO; beyond that bound it is refused with ``busy``.

Invariants (:meth:`Scheduler.violations` checks them; tests/test_scheduler.py
drives every operation in any order against them):

- a job is held at most once: in ``jobs`` (dispatched, running) or in
  ``queue`` (waiting), never both, never twice;
- the load of a replica is *derived* from the jobs it runs (decode slots in
  use, prompt tokens not yet prefilled), never kept in a counter beside them,
  so it can neither drift nor go negative;
- a job admitted without ``accepted`` only goes to a replica with a free slot;
- a job leaves only through :meth:`~Scheduler.done`, :meth:`~Scheduler.forget`,
  :meth:`~Scheduler.release` or :meth:`~Scheduler.cancel_queued`, and the
  dispatcher acts only on the very :class:`Job` object the scheduler holds
  (:meth:`~Scheduler.owns`): a stale copy from an earlier admission of the same
  id can never take or free another one's slot.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from meshllm.errors import RequestFailed
from meshllm.serve import api
from meshllm.serve.journal import frame_key
from meshllm.serve.layout import Layout


@dataclass(eq=False)  # identity: two admissions of the same request id are two jobs
class Job:
    id: str
    reply_to: str
    n_prompt: int  # prompt tokens not yet prefilled
    prefill_r: int = -1
    decode_r: int = -1
    attempt: int = 0  # how many times it moved off a replica that lost a node
    # what the dispatcher sends once the job is routed (the scheduler never reads them): carried here, not in a
    # table beside the scheduler that could go out of step with it
    prompt: list[int] = field(default_factory=list, repr=False)  # token ids to prefill (with resumed tokens)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # what stages carry (reply topic, sampling...)

    @property
    def key(self) -> str:
        """The id its frames carry (:func:`meshllm.serve.journal.frame_key`)."""
        return frame_key(self.id, self.attempt)


@dataclass
class Scheduler:
    layout: Layout
    ready: set[int] = field(default_factory=set)  # replica ids whose every stage is loaded
    max_queue: int = 64
    queue: deque[Job] = field(default_factory=deque)
    jobs: dict[str, Job] = field(default_factory=dict)  # dispatched, not yet done

    @property
    def active(self) -> dict[int, int]:
        """Per decode replica, the sequences it decodes (derived from ``jobs``)."""
        return dict(Counter(j.decode_r for j in self.jobs.values()))

    @property
    def pending_tokens(self) -> dict[int, int]:
        """Per prefill replica, the prompt tokens sent to it and not yet prefilled (derived from ``jobs``)."""
        out: Counter[int] = Counter()
        for j in self.jobs.values():
            if j.n_prompt:
                out[j.prefill_r] += j.n_prompt
        return dict(out)

    def _decode_for(self, prefill_r: int, active: dict[int, int]) -> int | None:
        r = self.layout.replicas[prefill_r]
        if r.role == "mixed":
            return prefill_r if active.get(prefill_r, 0) < r.slots else None
        free = [(active.get(d.id, 0) / d.slots, d.id) for d in self.layout.replicas.values()
                if d.id in self.ready and d.role == "decode" and active.get(d.id, 0) < d.slots]
        return min(free)[1] if free else None

    def route(self, n_prompt: int) -> tuple[int, int] | None:
        """(prefill replica, decode replica) with the least expected wait, or None if all decode slots are busy."""
        active, pending = self.active, self.pending_tokens
        options = []
        for r in self.layout.replicas.values():
            if r.id not in self.ready or not r.does_prefill:
                continue
            d = self._decode_for(r.id, active)
            if d is None:
                continue
            wait = (pending.get(r.id, 0) + n_prompt) / max(r.prefill_tokens_per_s, 1e-9)
            options.append((wait, r.id, d))
        if not options:
            return None
        _, p, d = min(options)
        return p, d

    def held(self, job_id: str) -> Job | None:
        """The job held under ``job_id``, running or queued."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        return next((q for q in self.queue if q.id == job_id), None)

    def owns(self, job: Job) -> bool:
        """Whether ``job`` (this very object) is the one dispatched under its id."""
        return self.jobs.get(job.id) is job

    def admit(self, job: Job, *, accepted: bool = False) -> Job | None:
        """Returns the job routed for dispatch now, or None if it was queued; raises busy/unavailable
        unless the job was ``accepted`` before (resumed, or taken over from a previous planner)."""
        if self.held(job.id) is not None:
            raise RequestFailed(api.INVALID_REQUEST, f"request id {job.id!r} is already in progress", job.id,
                               job.reply_to)
        if accepted:  # never refused, and ahead of new requests
            if self._dispatch(job):
                return job
            self.queue.appendleft(job)
            return None
        if not self.layout.replicas:
            raise RequestFailed(api.UNAVAILABLE, "the plan has no replica; try again shortly", job.id, job.reply_to)
        # With no replica ready (a plan being deployed, or re-made after a node left) the request waits in
        # the queue like one waiting for a slot: the mesh is recovering, and the queue is bounded.
        if not self.queue and self._dispatch(job):
            return job
        if len(self.queue) >= self.max_queue:
            raise RequestFailed(api.BUSY, f"the mesh is busy: {len(self.queue)} requests already queued",
                               job.id, job.reply_to)
        self.queue.append(job)
        return None

    def _dispatch(self, job: Job) -> bool:
        choice = self.route(job.n_prompt)
        if choice is None:
            return False
        job.prefill_r, job.decode_r = choice
        self.jobs[job.id] = job
        return True

    def restore(self, job: Job) -> None:
        """Counts a job that is already running (dispatched by a previous planner) against its replicas."""
        if self.held(job.id) is None:
            job.n_prompt = 0  # its prompt was prefilled, or is being: no routing waits on it
            self.jobs[job.id] = job

    def forget(self, job_id: str) -> Job | None:
        """Drops the job held under ``job_id`` (queued or running) without dispatching others; returns it."""
        return self.cancel_queued(job_id) or self.jobs.pop(job_id, None)

    def release(self, job: Job) -> bool:
        """Drops ``job`` only if it is this very object that is held (a dispatch that failed or went stale)."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            return True
        if any(q is job for q in self.queue):
            self.queue.remove(job)
            return True
        return False

    def prefilled(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.n_prompt = 0

    def done(self, job_id: str) -> list[Job]:
        """A request finished; returns queued jobs that can be dispatched now."""
        self.forget(job_id)
        return self.drain()

    def drain(self) -> list[Job]:
        out = []
        while self.queue and self._dispatch(self.queue[0]):
            out.append(self.queue.popleft())
        return out

    def cancel_queued(self, job_id: str) -> Job | None:
        for q in self.queue:
            if q.id == job_id:
                self.queue.remove(q)
                return q
        return None

    def violations(self) -> list[str]:
        """The invariants of the module docstring that do not hold now (empty when all hold)."""
        out = []
        queued = [q.id for q in self.queue]
        if len(set(queued)) != len(queued):
            out.append(f"a job is queued twice: {sorted(k for k, n in Counter(queued).items() if n > 1)}")
        if both := set(queued) & set(self.jobs):
            out.append(f"jobs both queued and running: {sorted(both)}")
        if wrong := [k for k, j in self.jobs.items() if j.id != k]:
            out.append(f"jobs held under another id: {wrong}")
        if unrouted := [k for k, j in self.jobs.items() if j.decode_r < 0 or j.prefill_r < 0]:
            out.append(f"running jobs without a route: {unrouted}")
        if negative := [j.id for j in self.jobs.values() if j.n_prompt < 0]:
            out.append(f"negative pending prompt tokens: {negative}")
        return out
