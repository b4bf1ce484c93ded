"""The planner's request duties: accept, journal, route, dispatch, and resume after faults.

Runs on every serving node and acts only while its node is the elected
planner. A request from the MQTT ``requests`` topic is parsed, tokenized and
checked, given a sampling seed if it has none (so that it can be replayed),
journaled (:mod:`meshllm.serve.journal`), routed by the
:class:`~meshllm.serve.scheduler.Scheduler`, journaled again with its route,
and only then sent to its PREFILL replica's first stage.

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
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np

from meshllm.errors import MeshError
from meshllm.serve import api
from meshllm.serve.journal import JobRecord, Route, request_of
from meshllm.serve.messages import Cancel, PayloadError
from meshllm.serve.scheduler import Job, Scheduler

if TYPE_CHECKING:
    from meshllm.serve.server import ServingNode

log = logging.getLogger(__name__)

TEND_S = 0.2
RETRY_S, MAX_DISPATCH_TRIES = 0.5, 40  # a prompt that cannot be sent is routed again, for about 20 s


class Dispatcher:
    def __init__(self, server: ServingNode) -> None:
        self.server = server
        self.node = server.node
        self.journal = server.journal
        self.scheduler: Scheduler | None = None
        self._jobs_meta: dict[str, tuple[list[int], dict[str, Any]]] = {}  # prefill ids and meta, not yet sent
        self._adopted = False

    # --- intake ---------------------------------------------------------

    async def on_request(self, msg: aiomqtt.Message) -> None:
        if not self.node.is_planner:
            return
        if msg.retain:  # left on the broker, delivered because we subscribed: not an app asking now
            log.warning("%s: ignoring a retained request on %s (apps must not retain requests)", self.node.node_id,
                        msg.topic)
            return
        server = self.server
        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
        topics = self.node.topics
        req: api.Request | None = None
        try:
            req = api.parse_request(bytes(payload), topics.replies)
            digest = hashlib.sha256(bytes(payload)).hexdigest()[:32]
            known = self.journal.jobs.get(req.id)
            if known is not None:
                if known.meta.get("digest") == digest:  # the same request again (a client that reconnected)
                    log.info("%s: request %s arrived twice; serving it once", self.node.node_id, req.id)
                    return
                raise api.RequestError(api.INVALID_REQUEST, f"request id {req.id!r} is already in progress", req.id,
                                       req.reply_to)
            tok = server.tokenizer
            prompt = req.prompt if req.prompt is not None else tok.apply_chat_template(list(req.messages))
            ids = tok.encode(prompt, bos=req.prompt is not None)
            if not ids:
                raise api.RequestError(api.INVALID_REQUEST, "the prompt encodes to no tokens", req.id, req.reply_to)
            sched = self.ensure_scheduler()
            default = server.manifest.config.max_seq_len if server.manifest else 0
            limit = min((r.context or default for r in sched.layout.replicas.values()), default=default)
            if len(ids) >= limit:
                raise api.RequestError(api.CONTEXT_LENGTH, f"prompt of {len(ids)} tokens does not fit the context "
                                       f"of {limit} tokens", req.id, req.reply_to)
            sampling = req.sampling.to_json()
            if not req.sampling.greedy and sampling["seed"] is None:
                # fixed now, so that a resumed request draws the same; from the request itself, so that a
                # second planner handling the same request (during a hand-over) draws the same too
                sampling["seed"] = int(digest[:15], 16)
            meta = {"reply_to": req.reply_to, "sampling": sampling, "prompt_len": len(ids),
                    "last_prompt_token": ids[-1], "t_received": time.time(), "request_id": req.id, "digest": digest}
            job = Job(req.id, req.reply_to, len(ids))
            self._jobs_meta[job.id] = (ids, meta)
            try:
                routed = sched.admit(job)
            except api.RequestError:
                self._jobs_meta.pop(job.id, None)
                raise
            # Not awaited here: this handler runs in the node's MQTT receive loop. Journal writes go out in
            # the order they are made (one MQTT session), so a queued record never overtakes its route.
            rec = JobRecord(job.id, ids, meta)
            self.journal.jobs[job.id] = rec  # at once: the same request sent again is recognised from now on
            if routed is None:  # queued: journal it now, so that a new planner would queue it again
                server.spawn(self._write(rec))
            else:
                server.spawn(self._start(routed))
        except api.RequestError as e:
            topic = e.reply_to or (topics.reply(e.request_id) if e.request_id else f"{topics.replies}/_invalid")
            await server.publish(topic, e.reply())
        except MeshError as e:  # e.g. a chat request to a model without a chat template
            if req is not None:
                await server.publish(req.reply_to, api.error_reply(req.id, api.INVALID_REQUEST, str(e)))

    def ensure_scheduler(self) -> Scheduler:
        layout = self.server.layout
        if layout is None:
            raise api.RequestError(api.UNAVAILABLE, "the mesh has no plan yet; try again shortly")
        if self.scheduler is None:
            self.scheduler = Scheduler(layout)
        self.scheduler.layout = layout
        self.scheduler.ready = self.server.ready_replicas()
        return self.scheduler

    def refresh_ready(self) -> None:
        if self.scheduler is not None:
            self.scheduler.ready = self.server.ready_replicas()
            self._dispatch_all(self.scheduler.drain())

    def _dispatch_all(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.server.spawn(self._start(job))

    async def _start(self, job: Job) -> None:
        """Journals the route, then sends the prompt: a new planner never mistakes a sent job for a queued one."""
        server = self.server
        ids, meta = self._jobs_meta.pop(job.id)
        layout = server.layout
        assert layout is not None
        prefill, decode = layout.replicas[job.prefill_r], layout.replicas[job.decode_r]
        meta.update(prefill_r=prefill.id, decode_r=decode.id, attempt=job.attempt)
        route = Route(layout.version, prefill.id, decode.id, [s.node_id for s in prefill.stages],
                      [s.node_id for s in decode.stages])
        journaled = {k: v for k, v in meta.items() if k != "resume"}
        rec = JobRecord(job.id, ids[: int(meta["prompt_len"])], journaled, route, job.attempt)
        self.journal.jobs[job.id] = rec
        if not await self._write(rec):
            log.warning("%s: could not journal %s (no broker session); sending it anyway", self.node.node_id, job.id)
        frame = {"t": "prefill", "pv": layout.version, "r": prefill.id, "id": job.key,
                 "x": np.asarray(ids, np.int64), "meta": meta}
        try:
            await server.send(prefill.first.node_id, frame)
        except MeshError as e:
            # the replica is going away (a node lost, a plan rolling out): route the request again shortly
            tries = int(meta.get("dispatch_tries", 0)) + 1
            log.warning("%s: could not send %s to %s (%s); try %d", self.node.node_id, job.id,
                        prefill.first.node_id, e, tries)
            if self.scheduler is not None:
                self.scheduler.forget(job.id)
            if tries > MAX_DISPATCH_TRIES:
                await server.publish(job.reply_to, api.error_reply(job.id, api.UNAVAILABLE,
                                                                   f"replica unreachable: {e}"))
                await server.publish_retained(self.node.topics.job(job.id), "")
                self.journal.jobs.pop(job.id, None)
                return
            await asyncio.sleep(RETRY_S)
            meta["dispatch_tries"] = tries
            if self.node.is_planner and self.scheduler is not None and job.id not in self._jobs_meta:
                self._jobs_meta[job.id] = (ids, meta)
                routed = self.scheduler.admit(Job(job.id, job.reply_to, len(ids), attempt=job.attempt),
                                              accepted=True)
                if routed is not None:
                    await self._start(routed)

    async def _write(self, rec: JobRecord) -> bool:
        """Journals a record and waits until the broker has it (retained, QoS 1)."""
        return await self.node.publish(self.node.topics.job(rec.id), self.journal.encode_job(rec), retain=True)

    # --- completion and cancellation --------------------------------------

    def on_done(self, frame: dict[str, Any]) -> None:
        """A ``done`` frame (keyed by attempt: a late one from a replaced attempt changes nothing)."""
        if self.scheduler is None:
            return
        key = str(frame["id"])
        rid = request_of(key)
        job = self.scheduler.jobs.get(rid)
        if job is not None and job.key != key:
            return
        rec = self.journal.jobs.get(rid)
        if rec is not None and rec.key == key and frame.get("t") == "done":
            self.journal.jobs.pop(rid)  # before its clear arrives: never restated to a new broker
            self.journal.progress.pop(rid, None)
        self._dispatch_all(self.scheduler.done(rid))

    async def on_bounce(self, frame: dict[str, Any]) -> None:
        """A node got a prompt or begin for a stage it does not hold: move the request (its current attempt)."""
        key = str(frame["id"])
        rid = request_of(key)
        rec = self.journal.jobs.get(rid)
        if (not self.node.is_planner or self.scheduler is None or rec is None or rec.route is None
                or rec.key != key):
            return
        await self._resume(rec, set(self.node.membership.ids), why=str(frame["why"]))

    def on_journal_cleared(self, rec: JobRecord) -> None:
        """The journal dropped a finished request: also a 'done' for a planner that missed the frame."""
        self.on_done({"id": rec.key})

    async def on_cancel(self, msg: aiomqtt.Message) -> None:
        if not self.node.is_planner or self.scheduler is None or msg.retain:
            return
        try:
            rid = Cancel.parse(msg.payload if isinstance(msg.payload, bytes) else b"").id
        except PayloadError as e:
            log.info("%s: ignoring a cancel: %s", self.node.node_id, e)
            return
        server = self.server
        queued = self.scheduler.cancel_queued(rid)
        if queued is not None:
            self._jobs_meta.pop(queued.id, None)
            self.journal.jobs.pop(queued.id, None)
            await server.publish(queued.reply_to, api.error_reply(queued.id, api.CANCELLED, "cancelled by the client"))
            await server.publish_retained(self.node.topics.job(queued.id), "")
            return
        rec = self.journal.jobs.get(rid)
        if rec is not None and rec.route is not None:
            with contextlib.suppress(MeshError):
                await server.send(rec.route.decode_nodes[-1], {"t": "cancel", "id": rec.key})

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
        """Takes over a predecessor's requests and resumes stranded ones, while this node is the planner."""
        while True:
            await asyncio.sleep(TEND_S)
            if not self.node.is_planner:
                self.scheduler, self._adopted = None, False  # the journal is the truth for the next planner
                self._jobs_meta.clear()
                continue
            if self.server.layout is None or not self.node.in_touch:
                continue
            try:
                await self._tend_once()
            except MeshError as e:
                log.warning("%s: tending the journal: %s", self.node.node_id, e)

    async def _tend_once(self) -> None:
        sched = self.ensure_scheduler()
        alive = set(self.node.membership.ids)
        if not self._adopted:
            self._adopted = True
            for rec in list(self.journal.jobs.values()):
                if rec.id in sched.jobs or rec.id in self._jobs_meta:
                    continue
                if rec.route is None:
                    log.info("%s: queueing %s, accepted by the previous planner", self.node.node_id, rec.id)
                    await self._readmit(rec, [], None)
                elif rec.route.nodes <= alive:
                    sched.restore(Job(rec.id, str(rec.meta["reply_to"]), 0, rec.route.prefill_r,
                                      rec.route.decode_r, attempt=rec.attempt))
        for rec in self.journal.stranded(alive):
            await self._resume(rec, alive)

    async def _resume(self, rec: JobRecord, alive: set[str], why: str | None = None) -> None:
        assert rec.route is not None and self.scheduler is not None
        server, route = self.server, rec.route
        self.scheduler.forget(rec.id)
        old_key = rec.key
        for nodes, r in ((route.prefill_nodes, route.prefill_r), (route.decode_nodes, route.decode_r)):
            for n in sorted(set(nodes) & alive):  # silence the old attempt wherever it still runs
                with contextlib.suppress(MeshError):
                    await server.send(n, {"t": "release", "pv": route.pv, "r": r, "id": old_key})
        progress = self.journal.progress_of(rec)
        max_tokens = int(rec.meta["sampling"]["max_tokens"])
        log.warning("%s: resuming %s (%s), from token %d", self.node.node_id, rec.id,
                    why or f"lost {', '.join(sorted(route.nodes - alive))}", len(progress.tokens))
        if len(progress.tokens) >= max_tokens:  # it had streamed everything: only the final reply may be missing
            n = len(progress.tokens)
            await server.publish(str(rec.meta["reply_to"]), api.final_reply(
                rec.id, n, "", "length", int(rec.meta["prompt_len"]), n, {}))
            await server.publish_retained(self.node.topics.progress(rec.id), "")
            await server.publish_retained(self.node.topics.job(rec.id), "")
            self.journal.jobs.pop(rec.id, None)
            return
        await self._readmit(rec, progress.tokens, progress.sampler, attempt=rec.attempt + 1)

    async def _readmit(self, rec: JobRecord, tokens: list[int], sampler: str | None, attempt: int | None = None
                       ) -> None:
        """Queues an accepted request again (never refused), ahead of new ones; prefill is its prompt plus
        the tokens it already streamed."""
        attempt = rec.attempt if attempt is None else attempt
        assert self.scheduler is not None
        moved = JobRecord(rec.id, rec.prompt, rec.meta, None, attempt)
        self.journal.jobs[rec.id] = moved  # at once: the next tending must not resume it again
        await self._write(moved)
        meta = dict(rec.meta)
        if tokens:
            meta["resume"] = {"tokens": tokens, "sampler": sampler}
        self._jobs_meta[rec.id] = (rec.prompt + tokens, meta)
        job = Job(rec.id, str(rec.meta["reply_to"]), len(rec.prompt) + len(tokens), attempt=attempt)
        routed = self.scheduler.admit(job, accepted=True)
        if routed is not None:
            await self._start(routed)
