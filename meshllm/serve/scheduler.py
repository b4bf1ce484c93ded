"""Routing requests to replicas: least expected wait, bounded queues, a clear 'busy'. Pure logic.

Runs on the planner node, fed by the serving layer. A request goes to the
ready prefill-capable replica whose queued prompt tokens would clear soonest
(queued tokens / predicted prefill tokens/s), and to the ready decode-capable
replica with the most free decode slots relative to its size; a MIXED replica
decodes what it prefilled. When every decode slot is taken the request waits
in a bounded FIFO; beyond that bound it is refused with ``busy``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshllm.serve import api
from meshllm.serve.api import RequestError
from meshllm.serve.journal import frame_key
from meshllm.serve.layout import Layout


@dataclass
class Job:
    id: str
    reply_to: str
    n_prompt: int
    prefill_r: int = -1
    decode_r: int = -1
    attempt: int = 0  # how many times it moved off a replica that lost a node

    @property
    def resumed(self) -> bool:
        return self.attempt > 0

    @property
    def key(self) -> str:
        """The id its frames carry (:func:`meshllm.serve.journal.frame_key`)."""
        return frame_key(self.id, self.attempt)


@dataclass
class Scheduler:
    layout: Layout
    ready: set[int] = field(default_factory=set)  # replica ids whose every stage is loaded
    max_queue: int = 64
    pending_tokens: dict[int, int] = field(default_factory=dict)  # per prefill replica, not yet prefilled
    active: dict[int, int] = field(default_factory=dict)  # per decode replica, sequences decoding
    queue: deque[Job] = field(default_factory=deque)
    jobs: dict[str, Job] = field(default_factory=dict)  # dispatched, not yet done

    def _decode_for(self, prefill_r: int) -> int | None:
        r = self.layout.replicas[prefill_r]
        if r.role == "mixed":
            return prefill_r if self.active.get(prefill_r, 0) < r.slots else None
        free = [(self.active.get(d.id, 0) / d.slots, d.id) for d in self.layout.replicas.values()
                if d.id in self.ready and d.role == "decode" and self.active.get(d.id, 0) < d.slots]
        return min(free)[1] if free else None

    def route(self, n_prompt: int) -> tuple[int, int] | None:
        """(prefill replica, decode replica) with the least expected wait, or None if all decode slots are busy."""
        options = []
        for r in self.layout.replicas.values():
            if r.id not in self.ready or not r.does_prefill:
                continue
            d = self._decode_for(r.id)
            if d is None:
                continue
            wait = (self.pending_tokens.get(r.id, 0) + n_prompt) / max(r.prefill_tokens_per_s, 1e-9)
            options.append((wait, r.id, d))
        if not options:
            return None
        _, p, d = min(options)
        return p, d

    def available(self) -> bool:
        return any(r in self.ready for r in self.layout.replicas)

    def admit(self, job: Job, *, accepted: bool = False) -> Job | None:
        """Returns the job routed for dispatch now, or None if it was queued; raises busy/unavailable
        unless the job was ``accepted`` before (resumed, or taken over from a previous planner)."""
        if job.id in self.jobs or any(q.id == job.id for q in self.queue):
            raise RequestError(api.INVALID_REQUEST, f"request id {job.id!r} is already in progress", job.id,
                               job.reply_to)
        if accepted:  # never refused, and ahead of new requests
            if self._dispatch(job):
                return job
            self.queue.appendleft(job)
            return None
        if not self.layout.replicas:
            raise RequestError(api.UNAVAILABLE, "the plan has no replica; try again shortly", job.id, job.reply_to)
        # With no replica ready (a plan being deployed, or re-made after a node left) the request waits in
        # the queue like one waiting for a slot: the mesh is recovering, and the queue is bounded.
        if not self.queue and self._dispatch(job):
            return job
        if len(self.queue) >= self.max_queue:
            raise RequestError(api.BUSY, f"the mesh is busy: {len(self.queue)} requests already queued",
                               job.id, job.reply_to)
        self.queue.append(job)
        return None

    def _dispatch(self, job: Job) -> bool:
        choice = self.route(job.n_prompt)
        if choice is None:
            return False
        job.prefill_r, job.decode_r = choice
        self.pending_tokens[job.prefill_r] = self.pending_tokens.get(job.prefill_r, 0) + job.n_prompt
        self.active[job.decode_r] = self.active.get(job.decode_r, 0) + 1
        self.jobs[job.id] = job
        return True

    def restore(self, job: Job) -> None:
        """Counts a job that is already running (dispatched by a previous planner) against its replicas."""
        if job.id not in self.jobs:
            self.jobs[job.id] = job
            self.active[job.decode_r] = self.active.get(job.decode_r, 0) + 1

    def forget(self, job_id: str) -> None:
        """Drops a job wherever it is (queued or running) without dispatching others."""
        self.cancel_queued(job_id)
        self.prefilled(job_id)
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.active[job.decode_r] = max(0, self.active.get(job.decode_r, 0) - 1)

    def prefilled(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.n_prompt:
            self.pending_tokens[job.prefill_r] = max(0, self.pending_tokens.get(job.prefill_r, 0) - job.n_prompt)
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
