"""A serving node: a mesh :class:`~meshllm.mesh.node.Node` that deploys plans and serves requests.

A small composition of parts, each given only what it uses (see docs/serving.md, "The parts of a node"):

- **The frame fabric** (this class): links to peers, serving frames validated (:mod:`meshllm.serve.protocol`)
  and handed to the runner of their plan version and replica, or to the dispatcher; what a
  :class:`~meshllm.serve.stage.StageRunner` uses (:class:`~meshllm.serve.stage.Fabric`); replays of streams;
  following the journal.
- **The outbox** (:mod:`meshllm.serve.outbox`): replies and journal writes, published in order by one task.
- **Deployment** (:mod:`meshllm.serve.deployment`): the plan in force, the segment cache, the stage runners
  and readiness.
- **Intake and dispatch** (:mod:`meshllm.serve.dispatch`) and **the planner duty**
  (:mod:`meshllm.serve.planning`): act while this node is the elected planner.

The node owns every task of its parts through one :class:`asyncio.TaskGroup`, and every resource through one
:class:`contextlib.AsyncExitStack`: leaving the node, or failing half-way into it, stops and closes exactly
what was started, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt

from meshllm.aio import TaskOwner
from meshllm.dataplane.links import PeerLinks
from meshllm.errors import GenerationError, MeshError
from meshllm.mesh.node import Node, NodeConfig
from meshllm.model.manifest import Manifest
from meshllm.profile import serving_overhead_update
from meshllm.runtime.sampling import Sampler
from meshllm.secret import Sealer
from meshllm.serve import protocol
from meshllm.serve.deployment import Deployment
from meshllm.serve.dispatch import Dispatcher
from meshllm.serve.journal import Journal, Progress
from meshllm.serve.layout import Layout
from meshllm.serve.messages import PayloadError, Replay
from meshllm.serve.model_files import ModelFiles, Source, sources
from meshllm.serve.outbox import Outbox
from meshllm.serve.planning import PlannerDuty, PlannerOptions
from meshllm.serve.protocol import (
    Begin,
    Bounce,
    CancelStream,
    Done,
    Frame,
    Prefill,
    Prefilled,
    Release,
    RequestMeta,
    Step,
)
from meshllm.serve.sequence import SequenceState
from meshllm.serve.stage import StageRunner

log = logging.getLogger(__name__)

REPLAY_KEEP, REPLAY_KEEP_S = 256, 120.0  # ended streams kept for replays, and for how long
FRAME_KINDS = tuple(protocol.FRAME_TYPES)  # every serving frame the data plane routes here


class ServingNode:
    """``async with ServingNode(config) as s:`` runs a node that serves its share of the model."""

    def __init__(self, config: NodeConfig, *, threads: int | None = None, kv_dtype: str | None = None) -> None:
        if not config.model:
            raise MeshError("a serving node needs --model DIR")
        # checked before anything starts
        planner_options = PlannerOptions.parse(config.workload, config.plan_file, config.objective)
        self.config = config
        self.node = Node(config)
        self.node_id = self.node.node_id
        self.model_dir = Path(config.model)
        self.files = ModelFiles(self.model_dir, self.node_id, self.node.key, self._announce_model)
        self.manifest: Manifest | None = None
        if self.files.manifest is not None:
            self.tokenizer, self.stop_ids = self.files.tokenizer, self.files.manifest.config.stop_ids()
            self.manifest = self.files.manifest
        self.links = PeerLinks(key=self.node.key)
        # the segments' owner (every model step, one at a time) and, apart, loading: a roll-out never stalls decoding
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.journal = Journal(Sealer.for_secret(config.secret, "journal"))
        self.tasks = TaskOwner(log, f"serving node {self.node_id}")  # every task of every part, in one TaskGroup
        self.spawn = self.tasks.spawn
        self.outbox = Outbox(self.node)
        self.publish, self.publish_retained = self.outbox.publish, self.outbox.publish_retained
        self.deployment = Deployment(
            self.node, self, self.files, lambda: self.manifest, self._fetch_sources, model_dir=self.model_dir,
            threads=threads, kv_dtype=kv_dtype, emulation=config.emulation, executor=self.executor,
            loader=self.loader, spawn=self.spawn, on_layout=lambda layout: self.dispatcher.on_layout(layout),
            on_ready=lambda: self.dispatcher.refresh_ready(), routed_through=self.journal.routed_through)
        self.dispatcher = Dispatcher(
            self.node, self.journal, self, self.deployment, lambda: self.tokenizer,
            lambda: self.manifest.config.max_seq_len if self.manifest is not None else 0, self.spawn)
        self.planner = PlannerDuty(self.node, lambda: self.manifest, planner_options)
        # streams that ended here lately, for a client's replay after a broker outage (bounded)
        self._ended: OrderedDict[str, tuple[float, SequenceState]] = OrderedDict()
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def runners(self) -> dict[tuple[int, int], StageRunner]:
        return self.deployment.runners

    @property
    def layout(self) -> Layout | None:
        return self.deployment.layout

    def _model_known(self) -> None:
        """Manifest and tokenizer, as :class:`ModelFiles` fetched them from a peer."""
        assert self.files.manifest is not None and self.files.tokenizer is not None
        self.manifest, self.tokenizer = self.files.manifest, self.files.tokenizer
        self.stop_ids = self.manifest.config.stop_ids()

    async def _announce_model(self) -> None:
        """Restates this node's record after its model files changed (fetched, found corrupt, given up)."""
        await self.node.set_record_fields(self.files.record())

    def _fetch_sources(self, model_sha: str | None) -> list[Source]:
        """Members holding the complete model of manifest hash ``model_sha``, to fetch files from."""
        return sources(self.node.member_records().items(), self.node_id, model_sha)

    # --- lifecycle ----------------------------------------------------

    async def __aenter__(self) -> ServingNode:
        node = self.node
        for kind in FRAME_KINDS:
            node.route(kind, self._frame_handler(kind))
        node.route("fetch", self.files.serve)
        node.on_plan(self.deployment.on_plan)
        node.subscribe(node.topics.readiness, self.deployment.on_ready_message)
        node.subscribe(node.topics.requests, self.dispatcher.on_request)
        node.subscribe(node.topics.cancel, self.dispatcher.on_cancel)
        node.subscribe(node.topics.jobs, self._on_job)
        node.subscribe(node.topics.all_progress, self._on_progress)
        node.on_session(self.dispatcher.restate_journal)
        node.on_session(self.deployment.announce)
        node.subscribe(node.topics.replay, self._on_replay)
        # Each resource is pushed on the stack as soon as it exists: a failure at any step below (a data-plane
        # port in use, no peer to fetch the model from) closes exactly what was started, in reverse order.
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.loader.shutdown, wait=False, cancel_futures=True)
            stack.callback(self.executor.shutdown, wait=False, cancel_futures=True)
            await stack.enter_async_context(self.links)
            await stack.enter_async_context(self.tasks)  # before the node: plans may arrive as soon as it joins
            await node.set_record_fields(self.files.record())  # in the record from the first session on
            await stack.enter_async_context(node)
            stack.push_async_callback(self._withdraw)
            stack.push_async_callback(self.tasks.stop)  # at exit: the parts' tasks stop before the node leaves
            if self.files.manifest is None:  # a node with no model files yet: learn the model from a peer
                await self.files.fetch_meta(self._fetch_sources)
                self._model_known()
            self.spawn(self.planner.run(), "planner")
            self.spawn(self._publish_stats(), "stats")
            self.spawn(self.outbox.run(), "outbox")
            self.spawn(self.dispatcher.tend(), "dispatch")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _withdraw(self) -> None:
        with contextlib.suppress(Exception):
            await self.deployment.withdraw()

    # --- the Fabric a stage uses --------------------------------------

    def _addr(self, node_id: str) -> tuple[str, int]:
        return self.node.address_of(node_id)

    async def send(self, node_id: str, frame: Frame) -> None:
        if node_id == self.node_id:
            await self._dispatch(frame)  # a frame to ourselves never touches the network (nor the codec)
            return
        await self.links.send(self._addr(node_id), frame.encode())

    def make_sequence(self, request_id: str, meta: RequestMeta, sampler: Sampler) -> SequenceState:
        return SequenceState(request_id, meta, sampler, self.tokenizer, self.stop_ids, self.publish,
                             checkpoint=self._checkpoint)

    async def _checkpoint(self, seq: SequenceState) -> None:
        """Journals how far a request got (queued behind its token replies, so never ahead of them)."""
        progress = Progress(seq.tokens, None if seq.params.greedy else seq.sampler.state(),
                            seq.meta.attempt)
        await self.publish_retained(self.node.topics.progress(seq.request_id),
                                    self.journal.encode_progress(seq.request_id, progress))

    def stream_ended(self, seq: SequenceState) -> None:
        """Keeps an ended stream a while (``REPLAY_KEEP_S``, at most ``REPLAY_KEEP``) for replays."""
        now = time.monotonic()
        self._ended[seq.request_id] = (now, seq)
        self._ended.move_to_end(seq.request_id)
        while self._ended and (len(self._ended) > REPLAY_KEEP
                               or next(iter(self._ended.values()))[0] < now - REPLAY_KEEP_S):
            self._ended.popitem(last=False)

    async def _on_replay(self, msg: aiomqtt.Message) -> None:
        """``{"id", "from"}``: the node streaming (or lately done with) that request publishes its replies again."""
        if msg.retain:
            return  # left on the broker by someone: not a client asking now
        try:
            replay = Replay.parse(msg.payload if isinstance(msg.payload, bytes) else b"")
        except PayloadError as e:
            log.info("%s: ignoring a replay request: %s", self.node_id, e)
            return
        rid, start = replay.id, replay.start
        seqs = [s for r in self.runners.values() for s in r.sequences.values() if s.request_id == rid]
        if not seqs and rid in self._ended:
            seqs = [self._ended[rid][1]]
        for seq in seqs:
            n = await seq.replay(start)
            log.info("%s: replayed %d replies of %s from index %d", self.node_id, n, rid, start)

    async def finished(self, key: str, meta: RequestMeta, finish_reason: str) -> None:
        """A request ended here (its final reply or error is queued): clear its journal, tell the planner."""
        request_id = meta.request_id or key
        topics = self.node.topics
        await self.publish_retained(topics.progress(request_id), "")
        await self.publish_retained(topics.job(request_id), "")
        frame = Done(key, meta.prefill_replica, meta.decode_replica, finish_reason)
        planner = self.node.planner_id
        if planner:
            try:
                await self.send(planner, frame)
            except MeshError as e:
                log.warning("%s: cannot tell the planner that %s is done: %s", self.node_id, request_id, e)

    async def prefilled(self, key: str) -> None:
        """A prompt's prefill ended here: the planner's scheduler routes new prompts by the prefill work left."""
        planner = self.node.planner_id
        if planner:
            try:
                await self.send(planner, Prefilled(key))
            except MeshError as e:  # routing estimates only: the request goes on
                log.debug("%s: cannot tell the planner that %s is prefilled: %s", self.node_id, key, e)

    async def bounce(self, key: str, why: str) -> None:
        """Asks the planner to move request ``key`` (a ``bounce``): a prompt or begin reached this node without
        its stage, or a stage here could not pass the request on."""
        planner = self.node.planner_id
        if planner:
            try:
                await self.send(planner, Bounce(key, why))
            except MeshError as e:  # the planner itself is gone: its successor resumes the request
                log.debug("%s: cannot ask the planner to move %s: %s", self.node_id, key, e)

    # --- frames -------------------------------------------------------

    def _frame_handler(self, kind: str) -> Any:
        async def handle(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
            # decoded and validated once, here at the boundary (a malformed frame raises FrameError: the data
            # plane drops that connection); from here on every part of the node holds the typed frame
            await self._dispatch(protocol.decode(msg))
        return handle

    async def _dispatch(self, frame: Frame) -> None:
        """Hands a typed frame to the scheduler or to the runner of its plan version and replica."""
        if isinstance(frame, Done):
            self.dispatcher.on_done(frame)
            return
        if isinstance(frame, Prefilled):
            self.dispatcher.on_prefilled(frame)
            return
        if isinstance(frame, Bounce):
            await self.dispatcher.on_bounce(frame)
            return
        if isinstance(frame, CancelStream):
            for runner in self.runners.values():
                runner.on_cancel(frame.key)
            return
        runner = self.runners.get((frame.plan_version, frame.replica))
        if runner is None:
            # A frame for a stage this node does not hold (any more): a plan changed under it. Never close
            # the connection for it (it carries other requests' frames); a prompt or a begin goes back to
            # the planner, which moves the request; a step or KV block belongs to a request being moved.
            why = f"no stage of plan v{frame.plan_version} replica {frame.replica} on {self.node_id}"
            if isinstance(frame, (Prefill, Begin)) and self.node.planner_id:
                log.warning("%s: %s frame for %s bounced: %s", self.node_id, frame.WIRE_TYPE, frame.key, why)
                await self.bounce(frame.key, why)
            elif not isinstance(frame, Release):
                log.info("%s: dropped a %s frame: %s", self.node_id, frame.WIRE_TYPE, why)
            return
        try:  # frames are immutable: the runner shares nothing it could change with the sender
            await runner.on_frame(frame)
        except GenerationError as e:
            # one request's problem: log it and keep the connection, which carries other requests
            log.error("%s: %s frame for %s refused: %s", self.node_id, frame.WIRE_TYPE,
                      ", ".join(frame.keys) if isinstance(frame, Step) else frame.key, e)

    async def _publish_stats(self, every_s: float = 1.0) -> None:
        """Live load figures for dashboards (the gateway's mesh page): not retained, once a second."""
        last_tokens, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(every_s)
            runners = [r for r in self.runners.values() if self.layout and r.layout.version == self.layout.version]
            tokens = sum(r.tokens_out for r in self.runners.values())
            now = time.monotonic()
            rate = (tokens - last_tokens) / (now - last_t)
            last_tokens, last_t = tokens, now
            # rows_held: cache rows held by every stage here, of every plan version (old ones drain): 0 once every
            # request this node served has ended
            stats: dict[str, Any] = {"node_id": self.node_id, "pv": self.layout.version if self.layout else None,
                                     "tokens_per_s": round(rate, 2), "tokens_out": tokens,
                                     "rows_held": sum(len(r.active) for r in self.runners.values())}
            if runners:
                r = runners[0]
                stats.update(replica=r.replica.id, role=r.replica.role, stage=r.index, active=len(r.active),
                             inbox=r.inbox.qsize(), busy_s=round(r.busy_s, 3), overhead_s=round(r.overhead_s, 4),
                             runs=r.runs)
            sc = self.dispatcher.scheduler
            if self.node.is_planner and sc is not None:
                d = self.dispatcher
                stats["scheduler"] = {"queued": len(sc.queue), "in_flight": len(sc.jobs),
                                      "active": {str(k): v for k, v in sc.active.items()},
                                      "ready": sorted(sc.ready), "dispatch_s": round(d.dispatch_s, 4),
                                      "dispatched": d.dispatched}
            await self.node.publish(self.node.topics.stats(self.node_id), json.dumps(stats), qos=0)
            await self._advertise_serving_overhead()

    async def _advertise_serving_overhead(self) -> None:
        """Puts the serving overhead per stage run that this node's stages measured into its gossiped profile
        (when it moved enough to matter: :func:`~meshllm.profile.serving_overhead_update`), so that the planner's
        cost model, the election's pilots and the simulator charge what this device really spends per run."""
        profile = self.node.profile
        if profile is None:
            return
        runners = list(self.runners.values())
        figure = serving_overhead_update(profile.serving_overhead_s, sum(r.overhead_s for r in runners),
                                         sum(r.runs for r in runners))
        if figure is not None:
            log.info("%s: advertising a serving overhead of %.2f ms per stage run (was %.2f)", self.node_id,
                     figure * 1e3, profile.serving_overhead_s * 1e3)
            await self.node.update_profile(dataclasses.replace(profile, serving_overhead_s=figure))

    # --- the journal (every node follows it; the planner acts on it) ------

    async def _on_job(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        request_id = self.node.topics.leaf(str(msg.topic))
        try:
            cleared = self.journal.on_job(request_id, payload)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: ignoring a malformed job record on %s: %s", self.node_id, msg.topic, e)
            return
        if cleared is not None:
            self.dispatcher.on_journal_cleared(cleared)
            self._drop_stale(cleared.id, None)
            return
        current = self.journal.jobs.get(request_id)
        if current is not None and current.attempt > 0:
            self._drop_stale(current.id, current.attempt)
        if payload and (ended := self._ended.get(request_id)) is not None:
            rec = self.journal.jobs.get(ended[1].request_id)
            if rec is not None and rec.meta.get("digest") == ended[1].meta.digest:
                # a request that ended here came back into the journal (restated by a planner that had not
                # yet heard of its end, around a broker restart): clear it again
                log.info("%s: clearing the journal record of %s again", self.node_id, rec.id)
                self.journal.jobs.pop(rec.id, None)
                await self.publish_retained(str(msg.topic), "")
        if payload:  # the planner's own late write of a request that ended: see Dispatcher.on_record
            await self.dispatcher.on_record(request_id)

    def _drop_stale(self, request_id: str, attempt: int | None) -> None:
        """Frees what the stages here hold of a request's attempts the journal has moved past (or of a request
        that ended): see :meth:`StageRunner.drop_stale`."""
        for runner in self.runners.values():
            dropped = runner.drop_stale(request_id, attempt)
            if dropped:
                log.info("%s: released %s here (%s)", self.node_id, ", ".join(dropped),
                         "the request ended" if attempt is None else f"the journal has attempt {attempt}")

    async def _on_progress(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        try:
            self.journal.on_progress(self.node.topics.leaf(str(msg.topic)), payload)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: ignoring a malformed progress record on %s: %s", self.node_id, msg.topic, e)
