"""The planner's request duties: accept, journal, route, dispatch, and resume after faults.

Runs on every serving node and acts only while its node is the elected
planner. A request from the MQTT ``requests`` topic is parsed, tokenized and
checked, given a sampling seed if it has none (so that it can be replayed),
journaled (:mod:`meshllm.serve.journal`), routed by the
:class:`~meshllm.serve.scheduler.Scheduler`, journaled again with its route,
and only then sent to its PREFILL replica's first stage.

Intake never runs on the event loop (which carries heartbeats, frames and
replies): requests wait in a bounded FIFO (beyond it: ``busy``) and are parsed
and tokenized one at a time on a thread of their own. A copy of a request
(same id, same bytes: a client that sent it again) is served once, whether it
arrives while the first is tokenized, queued, running, or lately ended (then
the replies are published again); another request under an id in use is
refused. Each job carries its own prompt and meta, and is sent only while the
scheduler still holds that very job; a dispatch that does not end with the
prompt sent gives its slot back (see :mod:`meshllm.serve.scheduler`).

Faults (checked every :data:`TEND_S`):

- a routed request one of whose nodes left the mesh is silenced where it
  still runs (``release`` to the surviving stages) and resumed from its
  checkpoint on a ready replica, ahead of new requests;
- a node that becomes planner takes over its predecessor's requests from the
  journal: running ones count against their replicas, queued ones are queued
  again, stranded ones resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiomqtt
import numpy as np

from meshllm.errors import MeshError
from meshllm.mesh.topics import Topics
from meshllm.serve import api
from meshllm.serve.journal import JobRecord, Journal, Route, request_of
from meshllm.serve.layout import Layout
from meshllm.serve.messages import Cancel, PayloadError
from meshllm.serve.protocol import (
    Bounce,
    CancelStream,
    Done,
    Frame,
    Prefill,
    Prefilled,
    Release,
    RequestMeta,
    Resume,
)
from meshllm.serve.scheduler import Job, Scheduler

log = logging.getLogger(__name__)

TEND_S = 0.2
RETRY_S, MAX_DISPATCH_TRIES = 0.5, 40  # a prompt that cannot be sent is routed again, for about 20 s
MAX_INTAKE = 64  # parsed requests waiting to be tokenized; beyond, 'busy'
# requests waiting to be parsed (quick: JSON only); beyond either bound they are dropped unanswered (a client
# sends its request again until it hears back), which only a flood faster than a parse per request meets
MAX_UNPARSED, MAX_UNPARSED_BYTES = 1024, 64 << 20
FINISHED_KEEP, FINISHED_KEEP_S = 4096, 120.0  # ended requests remembered, so that a late copy is not served again


class MeshNode(Protocol):
    """What the dispatcher reads of its mesh node (:class:`~meshllm.mesh.node.Node`)."""

    node_id: str
    topics: Topics

    @property
    def is_planner(self) -> bool: ...

    @property
    def in_touch(self) -> bool: ...

    def member_ids(self) -> set[str]: ...

    async def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False) -> bool: ...


class Sender(Protocol):
    """The node's frame fabric and outbox: frames to stages, replies and journal writes to the broker."""

    async def send(self, node_id: str, frame: Frame) -> None: ...

    async def publish(self, topic: str, payload: dict[str, Any]) -> None: ...

    async def publish_retained(self, topic: str, data: str) -> None: ...


class Plans(Protocol):
    """The node's deployment, as the dispatcher sees it: the plan in force and which replicas are ready."""

    @property
    def layout(self) -> Layout | None: ...

    def ready_replicas(self) -> set[int]: ...


class Tokenizes(Protocol):
    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


Spawn = Callable[[Coroutine[Any, Any, Any]], Any]  # runs a coroutine as a task the node owns


class Dispatcher:
    """The planner's request duties on one serving node. It is given only what it uses: the mesh node's view
    (``node``), the journal it follows, the fabric that sends and publishes, the deployment's plan and
    readiness, the model's tokenizer and context, and ``spawn`` for the tasks it starts (owned by the node)."""

    def __init__(self, node: MeshNode, journal: Journal, fabric: Sender, plans: Plans,
                 tokenizer: Callable[[], Tokenizes], max_seq_len: Callable[[], int], spawn: Spawn) -> None:
        self.node = node
        self.journal = journal
        self.fabric = fabric
        self.plans = plans
        self._tokenizer, self._max_seq_len, self._spawn = tokenizer, max_seq_len, spawn
        self.scheduler: Scheduler | None = None
        self._adopted = False
        # Intake, in two FIFOs served by one thread of its own (never the event loop, which carries heartbeats,
        # frames and replies): requests are parsed in order of arrival, then wait (bounded: beyond, 'busy') to be
        # tokenized, their id registered in _preparing so that a copy arriving meanwhile is recognised.
        self._unparsed: asyncio.Queue[bytes] = asyncio.Queue()
        self._unparsed_bytes = 0
        self._parsed: asyncio.Queue[tuple[api.Request, str]] = asyncio.Queue()
        self._intake_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self._preparing: dict[str, str] = {}  # id -> digest of requests parsed, waiting for or being tokenized
        self._cancel_pending: set[str] = set()  # of those, the ones cancelled meanwhile
        self._finished: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (when, digest), ended lately
        # the time from routing a prompt to having sent it (journaling its route first), summed over the prompts
        # sent: a cost on every request's wait that the stages do not see (the stats report both figures; the
        # simulator charges the mean as ``dispatch_s``)
        self.dispatch_s = 0.0
        self.dispatched = 0

    # --- intake ---------------------------------------------------------

    async def on_request(self, msg: aiomqtt.Message) -> None:
        """Hands a request to the intake (this runs in the node's MQTT receive loop: it must not wait)."""
        if not self.node.is_planner:
            return
        if msg.retain:  # left on the broker, delivered because we subscribed: not an app asking now
            log.warning("%s: ignoring a retained request on %s (apps must not retain requests)", self.node.node_id,
                        msg.topic)
            return
        payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
        if self._unparsed.qsize() >= MAX_UNPARSED or self._unparsed_bytes + len(payload) > MAX_UNPARSED_BYTES:
            log.warning("%s: intake overflowing; dropped a request of %d bytes unanswered", self.node.node_id,
                        len(payload))
            return
        self._unparsed_bytes += len(payload)
        self._unparsed.put_nowait(payload)

    async def _parse_worker(self) -> None:
        """Parses requests in their order of arrival; a copy of one already known is dropped here, and one
        that would wait too long to be tokenized is refused as busy."""
        loop = asyncio.get_running_loop()
        while True:
            payload = await self._unparsed.get()
            self._unparsed_bytes -= len(payload)
            req: api.Request | None = None
            try:
                req, digest = await loop.run_in_executor(self._intake_pool, self._parse, payload)
                if not self.node.is_planner or self._seen(req, digest):
                    continue
                self.ensure_scheduler()  # no plan yet: say so before tokenizing
                if self._parsed.qsize() >= MAX_INTAKE:
                    raise api.RequestFailed(api.BUSY, f"the mesh is busy: {MAX_INTAKE} requests already waiting to "
                                           "be taken in; try again shortly")
                self._preparing[req.id] = digest  # before any wait: a copy arriving meanwhile is recognised
                self._parsed.put_nowait((req, digest))
            except api.RequestFailed as e:
                if e.request_id is None and req is not None:  # e.g. no plan yet: answered all the same
                    e.request_id, e.reply_to = req.id, req.reply_to
                await self._answer(e)
            except Exception:  # a bug met by one request must not stop the intake for all
                log.exception("%s: parsing a request failed", self.node.node_id)

    async def _tokenize_worker(self) -> None:
        """Tokenizes and admits parsed requests, in order."""
        while True:
            req, digest = await self._parsed.get()
            try:
                await self._take(req, digest)
            except Exception:
                log.exception("%s: taking in %s failed", self.node.node_id, req.id)
            finally:
                self._preparing.pop(req.id, None)
                self._cancel_pending.discard(req.id)

    async def _take(self, req: api.Request, digest: str) -> None:
        try:
            try:
                ids = await asyncio.get_running_loop().run_in_executor(self._intake_pool, self._tokenize, req)
            finally:
                del self._preparing[req.id]
            if req.id in self._cancel_pending:
                raise api.RequestFailed(api.CANCELLED, "cancelled by the client", req.id, req.reply_to)
            if self.node.is_planner:
                self._accept(req, digest, ids)
        except api.RequestFailed as e:
            if e.request_id is None:
                e.request_id, e.reply_to = req.id, req.reply_to
            await self._answer(e)
        except MeshError as e:  # e.g. a chat request to a model without a chat template
            await self.fabric.publish(req.reply_to, api.error_reply(req.id, api.INVALID_REQUEST, str(e)))
        except Exception as e:
            log.exception("%s: taking in %s failed", self.node.node_id, req.id)
            await self.fabric.publish(req.reply_to, api.error_reply(req.id, api.INTERNAL, f"internal error: {e}"))

    def _parse(self, payload: bytes) -> tuple[api.Request, str]:
        """(On the intake thread.) The request and its digest, by which a copy of it is recognised."""
        req = api.parse_request(payload, self.node.topics.replies)
        return req, hashlib.sha256(payload).hexdigest()[:32]

    def _tokenize(self, req: api.Request) -> list[int]:
        """(On the intake thread.) The prompt's token ids."""
        tok = self._tokenizer()
        prompt = req.prompt if req.prompt is not None else tok.apply_chat_template(list(req.messages))
        ids = tok.encode(prompt, bos=req.prompt is not None)
        if not ids:
            raise api.RequestFailed(api.INVALID_REQUEST, "the prompt encodes to no tokens", req.id, req.reply_to)
        return ids

    def _seen(self, req: api.Request, digest: str) -> bool:
        """Whether ``req`` is a copy of a request already taken in (then it is served once); raises for another
        request under an id in use."""
        rec = self.journal.jobs.get(req.id)
        if rec is not None or req.id in self._preparing:
            if (rec.meta.get("digest") if rec is not None else self._preparing[req.id]) == digest:
                # the same request again (a client that reconnected, or sent it again while it waited)
                log.info("%s: request %s arrived twice; serving it once", self.node.node_id, req.id)
                return True
            raise api.RequestFailed(api.INVALID_REQUEST, f"request id {req.id!r} is already in progress", req.id,
                                   req.reply_to)
        ended = self._ended_digest(req.id)
        if ended is None:
            return False
        if ended == digest:
            # a copy that crossed its own end: serving it again would race the end's late messages (the
            # journal clear, the done frame) with the new run's; the node that streamed it replays the replies
            log.info("%s: request %s arrived again after it ended; asking for its replies again", self.node.node_id,
                     req.id)
            self._spawn(self.fabric.publish(self.node.topics.replay, {"id": req.id, "from": 0}))
            return True
        raise api.RequestFailed(api.INVALID_REQUEST, f"request id {req.id!r} was used by another request that ended "
                               f"less than {FINISHED_KEEP_S:g} s ago; give every request a new id", req.id,
                               req.reply_to)

    def _accept(self, req: api.Request, digest: str, ids: list[int]) -> None:
        """Checks, journals and admits a tokenized request (no await: nothing else runs in between)."""
        sched = self.ensure_scheduler()
        default = self._max_seq_len()
        limit = min((r.context or default for r in sched.layout.replicas.values()), default=default)
        if len(ids) >= limit:
            raise api.RequestFailed(api.CONTEXT_LENGTH, f"prompt of {len(ids)} tokens does not fit the context "
                                   f"of {limit} tokens", req.id, req.reply_to)
        sampling = req.sampling.to_json()
        if not req.sampling.greedy and sampling["seed"] is None:
            # fixed now, so that a resumed request draws the same; from the request itself, so that a
            # second planner handling the same request (during a hand-over) draws the same too
            sampling["seed"] = int(digest[:15], 16)
        meta = {"reply_to": req.reply_to, "sampling": sampling, "prompt_len": len(ids),
                "last_prompt_token": ids[-1], "t_received": time.time(), "request_id": req.id, "digest": digest}
        job = Job(req.id, req.reply_to, len(ids), prompt=ids, meta=meta, n_kv=_kv_reach(meta))
        routed = sched.admit(job)  # raises busy
        # Journal writes go out in the order they are made (one MQTT session), so a queued record never
        # overtakes its route.
        rec = JobRecord(job.id, ids, meta)
        self.journal.jobs[job.id] = rec  # at once: the same request sent again is recognised from now on
        if routed is None:  # queued: journal it now, so that a new planner would queue it again
            self._spawn(self._write(rec))
        else:
            self._spawn(self._start(routed, time.perf_counter()))

    async def _answer(self, e: api.RequestFailed) -> None:
        topics = self.node.topics
        topic = e.reply_to or (topics.reply(e.request_id) if e.request_id else f"{topics.replies}/_invalid")
        await self.fabric.publish(topic, e.reply())

    def _ended_digest(self, request_id: str) -> str | None:
        """The digest of the request that ended lately under ``request_id``, if one did."""
        now = time.monotonic()
        while self._finished and next(iter(self._finished.values()))[0] < now - FINISHED_KEEP_S:
            self._finished.popitem(last=False)
        got = self._finished.get(request_id)
        return got[1] if got is not None else None

    def _close(self, rec: JobRecord) -> None:
        """A request ended (finished, failed or cancelled): out of the journal (never restated to a new broker),
        and remembered a while, so that a copy of it arriving late is not served again."""
        if self.journal.jobs.get(rec.id) is rec:
            self.journal.jobs.pop(rec.id)
        self.journal.progress.pop(rec.id, None)
        self._finished[rec.id] = (time.monotonic(), str(rec.meta.get("digest")))
        self._finished.move_to_end(rec.id)
        while len(self._finished) > FINISHED_KEEP:
            self._finished.popitem(last=False)

    def ensure_scheduler(self) -> Scheduler:
        layout = self.plans.layout
        if layout is None:
            raise api.RequestFailed(api.UNAVAILABLE, "the mesh has no plan yet; try again shortly")
        if self.scheduler is None:
            self.scheduler = Scheduler(layout)
        self.scheduler.layout = layout
        self.scheduler.ready = self.plans.ready_replicas()
        return self.scheduler

    def on_layout(self, layout: Layout) -> None:
        """A new plan is deployed here: the scheduler (if this node runs one) routes by it from now on."""
        if self.scheduler is not None:
            self.scheduler.layout = layout
            self.refresh_ready()

    def refresh_ready(self) -> None:
        if self.scheduler is not None:
            self.scheduler.ready = self.plans.ready_replicas()
            self._dispatch_all(self.scheduler.drain())

    def _dispatch_all(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._spawn(self._start(job, time.perf_counter()))

    async def _start(self, job: Job, routed_at: float | None = None) -> None:
        """Journals the route, then sends the prompt: a new planner never mistakes a sent job for a queued one.

        Acts only while the scheduler holds this very job (a job dropped or replaced meanwhile is left alone),
        and gives its slot back on every path that does not end with the prompt sent. ``routed_at``: the
        ``perf_counter`` when the scheduler routed it (None: now)."""
        routed_at = time.perf_counter() if routed_at is None else routed_at
        sched = self.scheduler
        if sched is None or not sched.owns(job):
            log.debug("%s: not sending %s: no longer held", self.node.node_id, job.key)
            return
        fabric = self.fabric
        sent, error = False, None
        try:
            layout = self.plans.layout
            prefill = layout.replicas.get(job.prefill_r) if layout is not None else None
            decode = layout.replicas.get(job.decode_r) if layout is not None else None
            if layout is None or prefill is None or decode is None:
                raise MeshError(f"replicas {job.prefill_r}/{job.decode_r} are not in the current plan")
            meta = {**job.meta, "prefill_r": prefill.id, "decode_r": decode.id, "attempt": job.attempt}
            route = Route(layout.version, prefill.id, decode.id, [s.node_id for s in prefill.stages],
                          [s.node_id for s in decode.stages])
            rec = JobRecord(job.id, job.prompt[: int(meta["prompt_len"])], _journaled(meta), route, job.attempt)
            self.journal.jobs[job.id] = rec
            if not await self._write(rec):
                log.warning("%s: could not journal %s (no broker session); sending it anyway", self.node.node_id,
                            job.id)
            if not sched.owns(job):  # moved (resumed) while its route was being journaled: the mover sends it
                return
            frame = Prefill(layout.version, prefill.id, job.key, np.asarray(job.prompt, np.int64),
                            RequestMeta.decode(meta, f"request {job.id}"))
            await fabric.send(prefill.first.node_id, frame)
            sent = True
            self.dispatch_s += time.perf_counter() - routed_at
            self.dispatched += 1
        except MeshError as e:
            error = e
        finally:
            if not sent:
                sched.release(job)
        if error is not None:
            await self._retry(job, error)

    async def _retry(self, job: Job, error: MeshError) -> None:
        """A prompt that could not be sent (its replica going away: a node lost, a plan rolling out) is journaled
        as queued again at once, and routed again shortly unless something else took the request over meanwhile."""
        tries = int(job.meta.get("dispatch_tries", 0)) + 1
        log.warning("%s: could not send %s (%s); try %d", self.node.node_id, job.id, error, tries)
        rec = self.journal.jobs.get(job.id)
        if rec is None or rec.key != job.key:
            return  # resumed or ended meanwhile
        if tries > MAX_DISPATCH_TRIES:
            self._close(rec)
            await self.fabric.publish(job.reply_to, api.error_reply(job.id, api.UNAVAILABLE,
                                                                    f"replica unreachable: {error}"))
            await self.fabric.publish_retained(self.node.topics.job(job.id), "")
            return
        job = Job(job.id, job.reply_to, len(job.prompt), attempt=job.attempt, prompt=job.prompt,
                  meta={**job.meta, "dispatch_tries": tries}, n_kv=job.n_kv)
        queued = await self._journal_queued(job)
        await asyncio.sleep(RETRY_S)
        if self.journal.jobs.get(job.id) is queued:  # else resumed, cancelled or ended meanwhile
            await self._admit_accepted(job)

    async def _requeue(self, job: Job) -> None:
        """Admits an accepted request again (never refused, ahead of new ones), journaled as queued first."""
        await self._journal_queued(job)
        await self._admit_accepted(job)

    async def _journal_queued(self, job: Job) -> JobRecord:
        rec = JobRecord(job.id, job.prompt[: int(job.meta["prompt_len"])], _journaled(job.meta), None, job.attempt)
        self.journal.jobs[job.id] = rec  # at once: the next tending must not resume it again
        await self._write(rec)
        return rec

    async def _admit_accepted(self, job: Job) -> None:
        sched = self.scheduler
        if sched is None or not self.node.is_planner:
            return  # the next planner queues it again from the journal
        try:
            routed = sched.admit(job, accepted=True)
        except api.RequestFailed:
            log.info("%s: %s was taken over meanwhile", self.node.node_id, job.id)
            return
        if routed is not None:
            await self._start(routed)

    async def _write(self, rec: JobRecord) -> bool:
        """Journals a record and waits until the broker has it (retained, QoS 1)."""
        return await self.node.publish(self.node.topics.job(rec.id), self.journal.encode_job(rec), retain=True)

    # --- completion and cancellation --------------------------------------

    def on_done(self, done: Done) -> None:
        """A ``done`` frame (keyed by attempt: a late one from a replaced attempt changes nothing).

        The streaming node clears the request's record; the planner clears it too, after every write of its
        own: a record the planner wrote (a resume racing the end) may reach the broker after the streamer's
        clear, and its echo may come back while the request is still held here, so nothing else would clear it
        (tests/test_resume.py saw one left retained)."""
        if self._ended(done.key) and self.node.is_planner:
            self._spawn(self.node.publish(self.node.topics.job(request_of(done.key)), "", retain=True))

    def on_prefilled(self, frame: Prefilled) -> None:
        """A prompt's prefill ended: its replica's prefill work waiting is that much less (for the current attempt
        only; a late frame of a replaced attempt changes nothing)."""
        held = self.scheduler.held(request_of(frame.key)) if self.scheduler is not None else None
        if held is not None and held.key == frame.key:
            self.scheduler.prefilled(held.id)

    def _ended(self, key: str) -> bool:
        """The run ``key`` ended (its done frame, or its journal record cleared): free its slots. Whether it was
        the request's current attempt (then it is closed here)."""
        rid = request_of(key)
        sched = self.scheduler
        held = sched.held(rid) if sched is not None else None
        if held is not None and held.key != key:
            return False
        rec = self.journal.jobs.get(rid)
        closed = sched is not None and rec is not None and rec.key == key
        if closed:
            self._close(rec)  # before its clear arrives: never restated to a new broker
        if sched is not None:
            self._dispatch_all(sched.done(rid))
        return closed

    async def on_bounce(self, bounce: Bounce) -> None:
        """A node got a prompt or begin for a stage it does not hold: move the request (its current attempt)."""
        key = bounce.key
        rid = request_of(key)
        rec = self.journal.jobs.get(rid)
        if (not self.node.is_planner or self.scheduler is None or rec is None or rec.route is None
                or rec.key != key):
            return
        await self._resume(rec, self.node.member_ids(), why=bounce.why)

    def on_journal_cleared(self, rec: JobRecord) -> None:
        """The journal dropped an ended request (every node follows it, so a planner to be knows it ended too):
        also a 'done' for a planner that missed the frame."""
        self._close(rec)
        self._ended(rec.key)

    async def on_record(self, request_id: str) -> None:
        """A ``jobs/<id>`` record arrived. The planner journals a request's attempts while the node streaming it
        clears the record at its end, over two MQTT sessions: the broker may order a write of the planner after
        the clear. Such a record of a request that ended (this node closed it and holds no attempt of it) is
        the broker's last word and nobody would clear it: the planner clears it again."""
        rec = self.journal.jobs.get(request_id)
        if rec is None or not self.node.is_planner:
            return
        sched = self.scheduler
        if sched is not None and sched.held(request_id) is not None:
            return
        if self._ended_digest(request_id) != rec.meta.get("digest"):
            return
        log.info("%s: %s ended before its record %s was written; clearing it again", self.node.node_id, request_id,
                 rec.key)
        self.journal.jobs.pop(request_id, None)
        self.journal.progress.pop(request_id, None)
        await self.node.publish(self.node.topics.job(request_id), "", retain=True)

    async def on_cancel(self, msg: aiomqtt.Message) -> None:
        if not self.node.is_planner or msg.retain:
            return
        try:
            rid = Cancel.parse(msg.payload if isinstance(msg.payload, bytes) else b"").id
        except PayloadError as e:
            log.info("%s: ignoring a cancel: %s", self.node.node_id, e)
            return
        if rid in self._preparing:  # being tokenized: answered once that is done
            self._cancel_pending.add(rid)
            return
        sched = self.scheduler
        if sched is None:
            return
        fabric = self.fabric
        rec = self.journal.jobs.get(rid)
        job = sched.held(rid)
        if job is not None and (rec is None or rec.route is None or rec.key != job.key):
            # queued, or routed but not yet sent (its _start sees it is no longer held)
            sched.release(job)
            if rec is not None:
                self._close(rec)
            await fabric.publish(job.reply_to, api.error_reply(job.id, api.CANCELLED, "cancelled by the client"))
            await fabric.publish_retained(self.node.topics.job(job.id), "")
            self._dispatch_all(sched.drain())
            return
        if rec is not None and rec.route is not None:
            with contextlib.suppress(MeshError):
                await fabric.send(rec.route.decode_nodes[-1], CancelStream(rec.key))

    async def restate_journal(self) -> None:
        """On a new broker session the planner writes back the journal it follows: a broker that was
        restarted or replaced holds none of it."""
        if not self.node.is_planner:
            return
        for rec in list(self.journal.jobs.values()):
            await self._write(rec)
            progress = self.journal.progress.get(rec.id)
            if progress is not None:
                sealed = self.journal.encode_progress(rec.id, progress)
                await self.node.publish(self.node.topics.progress(rec.id), sealed, retain=True)

    # --- faults -----------------------------------------------------------

    async def tend(self) -> None:
        """The dispatcher's duties while the node runs: the intake worker, and, while this node is the planner,
        taking over a predecessor's requests and resuming stranded ones."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._parse_worker(), name="intake-parse")
                tg.create_task(self._tokenize_worker(), name="intake-tokenize")
                tg.create_task(self._tend_journal(), name="tend-journal")
        finally:
            self._intake_pool.shutdown(wait=False, cancel_futures=True)

    async def _tend_journal(self) -> None:
        # a poll, deliberately: what it acts on (a journal record whose route lost a node) changes by two
        # streams of events (membership, the journal) and by the passing of time (being in touch)
        while True:
            await asyncio.sleep(TEND_S)
            if not self.node.is_planner:
                self.scheduler, self._adopted = None, False  # the journal is the truth for the next planner
                continue
            if self.plans.layout is None or not self.node.in_touch:
                continue
            try:
                await self._tend_once()
            except MeshError as e:
                log.warning("%s: tending the journal: %s", self.node.node_id, e)

    async def _tend_once(self) -> None:
        sched = self.ensure_scheduler()
        alive = self.node.member_ids()
        if not self._adopted:
            self._adopted = True
            for rec in list(self.journal.jobs.values()):
                if sched.held(rec.id) is not None:
                    continue
                if rec.route is None:
                    log.info("%s: queueing %s, accepted by the previous planner", self.node.node_id, rec.id)
                    await self._readmit(rec, [], None)
                elif rec.route.nodes <= alive:
                    sched.restore(Job(rec.id, str(rec.meta["reply_to"]), 0, rec.route.prefill_r,
                                      rec.route.decode_r, attempt=rec.attempt, n_kv=_kv_reach(rec.meta)))
        for rec in self.journal.stranded(alive):
            await self._resume(rec, alive)

    async def _resume(self, rec: JobRecord, alive: set[str], why: str | None = None) -> None:
        assert rec.route is not None and self.scheduler is not None
        if not self._current(rec):  # ended (or moved) while earlier requests of the same tending were resumed
            return
        fabric, route = self.fabric, rec.route
        self.scheduler.forget(rec.id)
        old_key = rec.key
        for nodes, r in ((route.prefill_nodes, route.prefill_r), (route.decode_nodes, route.decode_r)):
            for n in sorted(set(nodes) & alive):  # silence the old attempt wherever it still runs
                with contextlib.suppress(MeshError):
                    await fabric.send(n, Release(route.pv, r, old_key))
        if not self._current(rec):
            # it ended meanwhile (the old attempt streamed its final reply just before the release reached it),
            # or another path moved it: running it again would journal an ended request anew
            log.info("%s: not resuming %s: it ended or moved meanwhile", self.node.node_id, rec.id)
            return
        progress = self.journal.progress_of(rec)
        max_tokens = int(rec.meta["sampling"]["max_tokens"])
        log.warning("%s: resuming %s (%s), from token %d", self.node.node_id, rec.id,
                    why or f"lost {', '.join(sorted(route.nodes - alive))}", len(progress.tokens))
        if len(progress.tokens) >= max_tokens:  # it had streamed everything: only the final reply may be missing
            n = len(progress.tokens)
            await fabric.publish(str(rec.meta["reply_to"]), api.final_reply(
                rec.id, n, "", "length", int(rec.meta["prompt_len"]), n, {}))
            self._close(rec)
            await fabric.publish_retained(self.node.topics.progress(rec.id), "")
            await fabric.publish_retained(self.node.topics.job(rec.id), "")
            return
        await self._readmit(rec, progress.tokens, progress.sampler, attempt=rec.attempt + 1)

    def _current(self, rec: JobRecord) -> bool:
        """Whether ``rec``'s attempt is still the journal's record of its request (by key: the journal replaces
        a record with the copy the broker hands back)."""
        current = self.journal.jobs.get(rec.id)
        return current is not None and current.key == rec.key

    async def _readmit(self, rec: JobRecord, tokens: list[int], sampler: str | None, attempt: int | None = None
                       ) -> None:
        """Queues an accepted request again (never refused), ahead of new ones; prefill is its prompt plus
        the tokens it already streamed."""
        meta = dict(rec.meta)
        if tokens:
            meta["resume"] = Resume(tuple(tokens), sampler).encode()
        await self._requeue(Job(rec.id, str(rec.meta["reply_to"]), len(rec.prompt) + len(tokens),
                                attempt=rec.attempt if attempt is None else attempt, prompt=rec.prompt + tokens,
                                meta=meta, n_kv=_kv_reach(meta)))


def _kv_reach(meta: dict[str, Any]) -> int:
    """KV positions a request can reach: its prompt and its ``max_tokens`` (0, a whole context, if a journal
    record from elsewhere lacks them)."""
    try:
        return max(0, int(meta["prompt_len"]) + int(meta["sampling"]["max_tokens"]))
    except (KeyError, TypeError, ValueError):
        return 0


def _journaled(meta: dict[str, Any]) -> dict[str, Any]:
    """What the journal keeps of a job's meta: not the resumed tokens (the progress record has them)."""
    return {k: v for k, v in meta.items() if k != "resume"}
