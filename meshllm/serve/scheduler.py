"""Routing requests to replicas: least expected wait, bounded queues, a clear 'busy'. Pure logic.

Runs on the planner node, fed by the serving layer. A request goes to the
ready prefill-capable replica whose queued prompt tokens would clear soonest
(queued tokens / predicted prefill tokens/s), and to the ready decode-capable
replica with the least of its KV memory in use; a MIXED replica decodes what
it prefilled, and so does a PREFILL replica when no decode replica has room
(it lends its memory, as Splitwise's mixed pool does). A sequence takes the KV positions it can reach (its prompt and
``max_tokens``, at most the replica's context, plus a page's worth), not a
whole context: a replica admits sequences while their positions fit its
``kv_budget`` and a cache row is free (the runtime gives a finished
sequence's pages back, so its memory follows the tokens, as a paged cache's
does). When no decode replica has room the request waits in a bounded FIFO;
beyond that bound it is refused with ``busy``.

Invariants (:meth:`Scheduler.violations` checks them; tests/test_scheduler.py
drives every operation in any order against them):

- a job is held at most once: in ``jobs`` (dispatched, running) or in
  ``queue`` (waiting), never both, never twice;
- the load of a replica is *derived* from the jobs it runs (sequences and KV
  positions in use, prompt tokens not yet prefilled), never kept in a counter
  beside them, so it can neither drift nor go negative;
- a job admitted without ``accepted`` only goes to a replica with a free row
  and room for its KV positions;
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
from meshllm.serve.layout import Layout, ReplicaLayout

# KV positions added to each sequence's reservation: the runtime's cache holds a sequence in whole pages per
# layer and head (4 KiB: 16 positions of a 64-wide float32 head, 32 of float16), so its last page is reserved too.
KV_PAGE_SLACK = 32


@dataclass(eq=False)  # identity: two admissions of the same request id are two jobs
class Job:
    id: str
    reply_to: str
    n_prompt: int  # prompt tokens not yet prefilled
    prefill_r: int = -1
    decode_r: int = -1
    attempt: int = 0  # how many times it moved off a replica that lost a node
    n_kv: int = 0  # KV positions the sequence can reach: prompt + max_tokens (0: unknown, a whole context)
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
    def kv_in_use(self) -> dict[int, int]:
        """Per decode replica, the KV positions its sequences may reach (derived from ``jobs``)."""
        out: Counter[int] = Counter()
        for j in self.jobs.values():
            r = self.layout.replicas.get(j.decode_r)
            if r is not None:
                out[j.decode_r] += kv_need(j, r)
        return dict(out)

    def _room(self, r: ReplicaLayout, job: Job, active: dict[int, int], kv: dict[int, int]) -> bool:
        if active.get(r.id, 0) >= r.rows:
            return False
        return not r.kv_budget or kv.get(r.id, 0) + kv_need(job, r) <= r.kv_budget

    @property
    def pending_tokens(self) -> dict[int, int]:
        """Per prefill replica, the prompt tokens sent to it and not yet prefilled (derived from ``jobs``)."""
        out: Counter[int] = Counter()
        for j in self.jobs.values():
            if j.n_prompt:
                out[j.prefill_r] += j.n_prompt
        return dict(out)

    def _decode_replica(self, job: Job, active: dict[int, int], kv: dict[int, int]) -> int | None:
        """The ready DECODE replica with room for ``job`` and the least of its KV memory in use."""
        free = [(kv.get(d.id, 0) / d.kv_budget if d.kv_budget else active.get(d.id, 0) / d.rows, d.id)
                for d in self.layout.replicas.values()
                if d.id in self.ready and d.role == "decode" and self._room(d, job, active, kv)]
        return min(free)[1] if free else None

    def route(self, job: Job) -> tuple[int, int] | None:
        """(prefill replica, decode replica) with the least expected wait, or None if nothing has room.

        When no decode-capable replica has room, a PREFILL replica with room decodes the sequence itself
        (it lends its memory to decoding, as Splitwise's mixed pool does) rather than keep it waiting."""
        active, pending, kv = self.active, self.pending_tokens, self.kv_in_use
        decode = self._decode_replica(job, active, kv)
        options, lenders = [], []
        away: Counter[int] | None = None  # per PREFILL replica, prompt tokens it prefills for others
        for r in self.layout.replicas.values():
            if r.id not in self.ready or not r.does_prefill:
                continue
            wait = (pending.get(r.id, 0) + job.n_prompt) / max(r.prefill_tokens_per_s, 1e-9)
            d = (r.id if self._room(r, job, active, kv) else None) if r.role == "mixed" else decode
            if d is not None:
                options.append((wait, r.id, d))
            elif r.role == "prefill" and r.kv_budget and not options:
                if away is None:  # prompts it hands off hold KV there too, until they are prefilled
                    away = Counter()
                    for j in self.jobs.values():
                        if j.n_prompt and j.prefill_r != j.decode_r:
                            away[j.prefill_r] += j.n_prompt
                if self._room(r, job, active, {r.id: kv.get(r.id, 0) + away[r.id]}):
                    lenders.append((wait, r.id, r.id))
        if not options and not lenders:
            return None
        _, p, d = min(options or lenders)
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
        choice = self.route(job)
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


def kv_need(job: Job, replica: ReplicaLayout) -> int:
    """KV positions ``job`` reserves on ``replica``: what it can reach plus its last page, at most a context
    (a cache row is a context long)."""
    if job.n_kv <= 0:
        return replica.context
    reach = job.n_kv + KV_PAGE_SLACK
    return min(reach, replica.context) if replica.context > 0 else reach
