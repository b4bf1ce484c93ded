"""A serving node: a mesh :class:`~meshllm.mesh.node.Node` that deploys plans and serves requests.

- **Deploy.** On every accepted plan the node finds its stage, loads that layer
  range (reusing the loaded segment when the range is unchanged), starts a
  :class:`~meshllm.serve.stage.StageRunner` and announces readiness on the
  retained ``ready/<node>`` topic. Runners of older plans keep serving the
  requests they hold and are dropped once empty (drain, no request lost).
- **Data plane.** Serving frames are validated (:mod:`meshllm.serve.protocol`)
  and handed to the runner of their plan version and replica.
- **Planner duties.** The elected planner computes plans when membership
  changes (:mod:`meshllm.serve.planning`) and runs the
  :class:`~meshllm.serve.scheduler.Scheduler`: it takes requests from the MQTT
  ``requests`` topic, tokenizes them, journals them, routes them, and answers
  errors itself.
- **No request lost.** Every node follows the journal
  (:mod:`meshllm.serve.journal`); the planner resumes requests whose replica
  lost a node on a healthy one, and a new planner takes over the requests its
  predecessor accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt

from meshllm.dataplane.links import PeerLinks, PeerUnreachable
from meshllm.errors import GenerationError, MeshError, ModelError
from meshllm.mesh.node import Node, NodeConfig
from meshllm.model.manifest import Manifest
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import PublishedPlan
from meshllm.runtime.sampling import Sampler
from meshllm.runtime.segment import Segment
from meshllm.secret import Sealer
from meshllm.serve import protocol
from meshllm.serve.background import at_idle_priority
from meshllm.serve.dispatch import Dispatcher
from meshllm.serve.journal import Journal, Progress
from meshllm.serve.layout import Layout, LayoutError
from meshllm.serve.messages import PayloadError, Readiness, Replay
from meshllm.serve.model_files import ModelFiles, Source, sources
from meshllm.serve.protocol import (
    Begin,
    Bounce,
    CancelStream,
    Done,
    Frame,
    KvBlock,
    Prefill,
    Release,
    RequestMeta,
    Step,
)
from meshllm.serve.sequence import SequenceState
from meshllm.serve.stage import Pace, StageRunner

log = logging.getLogger(__name__)

REPLAY_KEEP, REPLAY_KEEP_S = 256, 120.0  # ended streams kept for replays, and for how long


class ServingNode:
    """``async with ServingNode(config) as s:`` runs a node that serves its share of the model."""

    # The scheduler admits at most ``slots`` sequences per replica, but a finished sequence's
    # release and the next sequence's KV reach a stage over different connections, in either
    # order; spare cache rows absorb that overlap instead of refusing the newcomer.
    SLOT_HEADROOM = 2

    def __init__(self, config: NodeConfig, *, threads: int | None = None, kv_dtype: str | None = None) -> None:
        if not config.model:
            raise MeshError("a serving node needs --model DIR")
        from meshllm.serve.planning import PlannerDuty, PlannerOptions

        planner_options = PlannerOptions.parse(config.workload, config.plan_file)  # before anything starts
        self.config = config
        self.node = Node(config)
        self.node_id = self.node.node_id
        self.model_dir = Path(config.model)
        self.files = ModelFiles(self.model_dir, self.node_id, self.node.key, self._announce_model)
        self.manifest: Manifest | None = None
        if self.files.manifest is not None:
            self._load_model_meta()
        self.threads = threads
        self.kv_dtype = kv_dtype  # None: the model's own (ModelConfig.kv_dtype)
        self.links = PeerLinks(key=self.node.key)
        # the segments' owner (every model step, one at a time) and, apart, loading: a roll-out never stalls decoding
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.runners: dict[tuple[int, int], StageRunner] = {}
        self._runner_tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._segment: tuple[tuple[int, int, int, int], Segment] | None = None
        self.layout: Layout | None = None
        self.ready: dict[str, Readiness] = {}  # node id -> its readiness record
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deploy_lock = asyncio.Lock()
        # replies and journal writes, published in order by one task; backpressure past the bound
        self._outbox: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue(10_000)
        self.journal = Journal(Sealer.for_secret(config.secret, "journal"))
        self._pending_routes: list[tuple[str, Any]] = []
        self.dispatcher = Dispatcher(self)
        self.planner = PlannerDuty(self, planner_options)
        # streams that ended here lately, for a client's replay after a broker outage (bounded)
        self._ended: OrderedDict[str, tuple[float, SequenceState]] = OrderedDict()
        self._ready_record: dict[str, Any] | None = None

    def _load_model_meta(self) -> None:
        """Manifest and tokenizer, as :class:`ModelFiles` read them, and what the record says of them."""
        assert self.files.manifest is not None and self.files.tokenizer is not None
        self.manifest, self.tokenizer = self.files.manifest, self.files.tokenizer
        self.stop_ids = self.manifest.config.stop_ids()
        self.node.record_extra.update(self.files.record())

    async def _announce_model(self) -> None:
        """Restates this node's record after its model files changed (fetched, found corrupt, given up)."""
        self.node.record_extra.update(self.files.record())
        await self.node.republish_record()

    def _fetch_sources(self, model_sha: str | None) -> list[Source]:
        """Members holding the complete model of manifest hash ``model_sha``, to fetch files from."""
        return sources(((m.node_id, m.info) for m in self.node.membership.members.values()), self.node_id,
                       model_sha)

    # --- lifecycle ----------------------------------------------------

    async def __aenter__(self) -> ServingNode:
        node = self.node
        for kind in ("prefill", "step", "kv", "begin", "release", "cancel", "done", "bounce"):
            node_route = self._frame_handler(kind)
            self._route(kind, node_route)
        node.on_plan(self._on_plan)
        node.subscribe(node.topics.readiness, self._on_ready)
        node.subscribe(node.topics.requests, self.dispatcher.on_request)
        node.subscribe(node.topics.cancel, self.dispatcher.on_cancel)
        node.subscribe(node.topics.jobs, self._on_job)
        node.subscribe(node.topics.all_progress, self._on_progress)
        node.on_session(self.dispatcher.restate_journal)
        node.on_session(self._announce)
        node.subscribe(node.topics.replay, self._on_replay)
        self._route("fetch", self.files.serve)
        await self.links.__aenter__()
        await node.__aenter__()
        for kind, handler in self._pending_routes:
            node.dataplane.route(kind, handler)
        if self.manifest is None:  # a node with no model files yet: learn the model from a peer
            try:
                await self.files.fetch_meta(self._fetch_sources)
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
            self._load_model_meta()
        self.spawn(self.planner.run())
        self.spawn(self._publish_stats())
        self.spawn(self._publisher())
        self.spawn(self.dispatcher.tend())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in list(self._tasks) + list(self._runner_tasks.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._runner_tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.node.publish(self.node.topics.ready(self.node_id), b"", retain=True)
        await self.node.__aexit__(*exc)
        await self.links.__aexit__(*exc)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)

    def _route(self, kind: str, handler: Any) -> None:
        self._pending_routes.append((kind, handler))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.node_id, exc_info=task.exception())

    # --- the Fabric a stage uses --------------------------------------

    def _addr(self, node_id: str) -> tuple[str, int]:
        if node_id == self.node_id:
            return (self.node.discovery.address, self.node.dataplane.port)
        m = self.node.membership.members.get(node_id)
        if m is None:
            raise PeerUnreachable(f"node {node_id} is not a member of the mesh")
        return (str(m.info["host"]), int(m.info["port"]))

    async def send(self, node_id: str, frame: Frame) -> None:
        if node_id == self.node_id:
            await self._dispatch(frame)  # a frame to ourselves never touches the network (nor the codec)
            return
        await self.links.send(self._addr(node_id), frame.encode())

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queues a reply; one task publishes them in order, so decode steps never wait for a PUBACK."""
        await self._outbox.put((topic, json.dumps(payload), False))

    async def publish_retained(self, topic: str, data: str) -> None:
        """Queues a retained write ('' clears) behind the replies already queued (journal progress)."""
        await self._outbox.put((topic, data, True))

    async def _publisher(self, hold_s: float = 30.0) -> None:
        """Publishes the outbox in order; while the broker is away (a restart, a move to another broker) it
        holds the queue up to ``hold_s`` rather than drop replies."""
        while True:
            topic, data, retain = await self._outbox.get()
            deadline = time.monotonic() + hold_s
            while not await self.node.publish(topic, data, qos=1, retain=retain):
                if time.monotonic() > deadline:
                    log.warning("%s: dropped a message to %s: no broker session for %g s", self.node_id, topic,
                                hold_s)
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await self.node.connected.wait()
                await asyncio.sleep(0.05)

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
        planner = self.node.election.leader
        if planner:
            try:
                await self.send(planner, frame)
            except MeshError as e:
                log.warning("%s: cannot tell the planner that %s is done: %s", self.node_id, request_id, e)

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
            if isinstance(frame, (Prefill, Begin)) and self.node.election.leader:
                log.warning("%s: %s frame for %s bounced: %s", self.node_id, frame.WIRE_TYPE, frame.key, why)
                with contextlib.suppress(MeshError):
                    await self.send(self.node.election.leader, Bounce(frame.key, why))
            elif not isinstance(frame, Release):
                log.info("%s: dropped a %s frame: %s", self.node_id, frame.WIRE_TYPE, why)
            return
        try:  # frames are immutable: the runner shares nothing it could change with the sender
            if isinstance(frame, Prefill):
                await runner.on_prefill(frame)
            elif isinstance(frame, Step):
                await runner.on_step(frame)
            elif isinstance(frame, KvBlock):
                await runner.on_kv(frame)
            elif isinstance(frame, Begin):
                await runner.on_begin(frame)
            elif isinstance(frame, Release):
                await runner.on_release_frame(frame)
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
            stats: dict[str, Any] = {"node_id": self.node_id, "pv": self.layout.version if self.layout else None,
                                     "tokens_per_s": round(rate, 2), "tokens_out": tokens}
            if runners:
                r = runners[0]
                stats.update(replica=r.replica.id, role=r.replica.role, stage=r.index, active=len(r.active),
                             inbox=r.inbox.qsize(), busy_s=round(r.busy_s, 3))
            sc = self.dispatcher.scheduler
            if self.node.is_planner and sc is not None:
                stats["scheduler"] = {"queued": len(sc.queue), "in_flight": len(sc.jobs),
                                      "active": {str(k): v for k, v in sc.active.items()},
                                      "ready": sorted(sc.ready)}
            await self.node.publish(self.node.topics.stats(self.node_id), json.dumps(stats), qos=0)

    # --- deployment ----------------------------------------------------

    async def _on_plan(self, plan: dict[str, Any]) -> None:
        try:
            published = PublishedPlan.decode(plan)
            layout = Layout.from_plan(published)
        except (PlanError, LayoutError) as e:
            log.error("%s: refusing plan v%s: %s", self.node_id, plan.get("version"), e)
            return
        mine = self.manifest.dtype if self.manifest is not None else None
        dtype = published.weights_dtype
        if dtype is not None and mine is not None and dtype != mine and layout.replica_of(self.node_id) is not None:
            # the plan's sizes (and its planner's files) are of another dtype: this node's stage would not be
            # what the plan placed; stay out of it, say so once, and tell the planner through readiness
            why = (f"plan v{layout.version} is for {dtype} weights but this node's model files are {mine}; "
                   "give every node the same export (meshllm quantize) of the model")
            log.error("%s: %s", self.node_id, why)
            await self._announce({"pv": layout.version, "r": None, "error": why})
            return
        self.spawn(self._deploy(layout))

    async def _deploy(self, layout: Layout) -> None:
        async with self._deploy_lock:
            if self.layout is not None and layout.version <= self.layout.version:
                return
            self.layout = layout
            if self.dispatcher.scheduler is not None:
                self.dispatcher.scheduler.layout = layout
                self._refresh_ready()
            replica = layout.replica_of(self.node_id)
            if replica is None:
                await self._announce({"pv": layout.version, "r": None, "idle": True})
                self._retire_old(layout.version)
                return
            index = replica.stage_index(self.node_id)
            assert index is not None
            st = replica.stages[index]
            context = min(replica.context or self.manifest.config.max_seq_len, self.manifest.config.max_seq_len)
            key = (st.start, st.stop, replica.slots, context)
            segment = None
            if self._segment is not None and self._segment[0] == key and not self._segment_in_use():
                segment = self._segment[1]
            if segment is None:
                try:
                    await self.files.ensure(self.manifest.segment_files(st.start, st.stop), self._fetch_sources,
                                            self.loader)
                except ModelError as e:  # out of plans from now on (its record says why); one line, no traceback
                    log.error("%s: cannot serve stage %d of plan v%d: %s", self.node_id, index, layout.version, e)
                    await self._announce({"pv": layout.version, "r": None, "error": str(e)})
                    self._retire_old(layout.version)
                    return
                loop = asyncio.get_running_loop()
                # at the lowest CPU priority: building the session must not take the cores from decoding
                segment = await loop.run_in_executor(self.loader, at_idle_priority, lambda: Segment(
                    self.model_dir, st.start, st.stop, max_batch=replica.slots + self.SLOT_HEADROOM,
                    max_seq_len=context, threads=self.threads, verify=False, manifest=self.manifest,
                    spinning=False, kv_dtype=self.kv_dtype))
                self._segment = (key, segment)
            runner = StageRunner(self, layout, replica, index, segment, self.executor,
                                 compute_scale=self.config.emulation.compute_scale,
                                 pace=self._pace(st.start, st.stop))
            self.runners[runner.key] = runner
            self._runner_tasks[runner.key] = asyncio.get_running_loop().create_task(runner.run())
            self._retire_old(layout.version)
            await self._announce({"pv": layout.version, "r": replica.id, "stage": index, "role": replica.role})
            log.info("%s: serving plan v%d as stage %d of %s replica %d (layers %d-%d)", self.node_id,
                     layout.version, index, replica.role, replica.id, st.start, st.stop - 1)

    async def _announce(self, ready: dict[str, Any] | None = None) -> None:
        """Publishes (or, without ``ready``, restates to a new broker) this node's retained readiness."""
        if ready is not None:
            self._ready_record = ready
        if self._ready_record is not None:
            await self.node.publish(self.node.topics.ready(self.node_id), json.dumps(self._ready_record), retain=True)

    def _pace(self, start: int, stop: int) -> Pace | None:
        """With ``--emulate-timing model``: how long a run of layers [start, stop) takes on the emulated device,
        as the planner's cost model (and the simulator) predict it from this node's advertised profile."""
        if self.config.emulation.timing != "model" or self.manifest is None or self.node.profile is None:
            return None
        from meshllm.plan import CostModel, ModelCosts

        cost = CostModel(ModelCosts.from_manifest(self.manifest), [self.node.profile])

        def pace(kind: str, n: int, context: float) -> float:
            if kind == "prefill":
                return cost.prefill_time(0, start, stop, n, context)
            return cost.decode_time(0, start, stop, context, n)
        return pace

    def _segment_in_use(self) -> bool:
        return any(r.active or r.sequences for r in self.runners.values())

    def _retire_old(self, version: int) -> None:
        """Drops runners of older plans once they hold no request (drain)."""
        for key in [k for k in self.runners if k[0] < version]:
            runner = self.runners[key]
            if runner.active or runner.sequences or not runner.inbox.empty():
                self.spawn(self._retire_when_idle(key))
                continue
            self.runners.pop(key)
            self._runner_tasks.pop(key).cancel()

    async def _retire_when_idle(self, key: tuple[int, int]) -> None:
        runner = self.runners.get(key)
        while runner is not None and (runner.active or runner.sequences or not runner.inbox.empty()):
            await asyncio.sleep(0.1)
        self.runners.pop(key, None)
        task = self._runner_tasks.pop(key, None)
        if task is not None:
            task.cancel()

    # --- readiness, requests (planner side) -----------------------------

    async def _on_ready(self, msg: aiomqtt.Message) -> None:
        node_id = self.node.topics.leaf(str(msg.topic))
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        if payload:
            try:
                self.ready[node_id] = Readiness.parse(payload)
            except PayloadError as e:
                log.warning("%s: ignoring the readiness of %s: %s", self.node_id, node_id, e)
                return
        else:
            self.ready.pop(node_id, None)
        self._refresh_ready()

    def ready_replicas(self) -> set[int]:
        layout = self.layout
        if layout is None:
            return set()
        alive = set(self.node.membership.ids)
        out = set()
        for r in layout.replicas.values():
            if all(s.node_id in alive and (rd := self.ready.get(s.node_id)) is not None
                   and rd.plan_version == layout.version and rd.replica == r.id for s in r.stages):
                out.add(r.id)
        return out

    def _refresh_ready(self) -> None:
        self.dispatcher.refresh_ready()

    # --- the journal (every node follows it; the planner acts on it) ------

    async def _on_job(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        try:
            cleared = self.journal.on_job(self.node.topics.leaf(str(msg.topic)), payload)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: ignoring a malformed job record on %s: %s", self.node_id, msg.topic, e)
            return
        if cleared is not None:
            self.dispatcher.on_journal_cleared(cleared)
            return
        if payload and (ended := self._ended.get(self.node.topics.leaf(str(msg.topic)))) is not None:
            rec = self.journal.jobs.get(ended[1].request_id)
            if rec is not None and rec.meta.get("digest") == ended[1].meta.digest:
                # a request that ended here came back into the journal (restated by a planner that had not
                # yet heard of its end, around a broker restart): clear it again
                log.info("%s: clearing the journal record of %s again", self.node_id, rec.id)
                self.journal.jobs.pop(rec.id, None)
                await self.publish_retained(str(msg.topic), "")
        if payload:  # the planner's own late write of a request that ended: see Dispatcher.on_record
            await self.dispatcher.on_record(self.node.topics.leaf(str(msg.topic)))

    async def _on_progress(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else b""
        try:
            self.journal.on_progress(self.node.topics.leaf(str(msg.topic)), payload)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: ignoring a malformed progress record on %s: %s", self.node_id, msg.topic, e)
