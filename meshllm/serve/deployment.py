"""A node's deployment: the plan in force here, the loaded segment, the stage runners and readiness.

On every accepted plan the node finds its stage, loads that layer range (reusing the loaded segment when the
range is unchanged) on the loading executor, starts a :class:`~meshllm.serve.stage.StageRunner` and announces
readiness on the retained ``ready/<node>`` topic. Runners of older plans keep serving the requests they hold
and are dropped once empty and once the journal routes no request through their replica any more (drain, no
request lost: a prompt still on an earlier stage, or its activations on the wire, holds nothing here yet).
It also follows every node's readiness, for the planner's :meth:`ready_replicas`.

It does not route frames (the node's fabric does, to :attr:`runners`) nor schedule requests (the dispatcher
does, told of each new layout through ``on_layout`` and of readiness through ``on_ready``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from meshllm.errors import MeshError, ModelError
from meshllm.mesh.node import Emulation
from meshllm.mesh.topics import Topics
from meshllm.model.manifest import Manifest
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import PublishedPlan
from meshllm.profile import DeviceProfile
from meshllm.runtime.segment import Segment
from meshllm.serve.batching import lanes_for
from meshllm.serve.layout import Layout, LayoutError, ReplicaLayout
from meshllm.serve.messages import PayloadError, Readiness
from meshllm.serve.model_files import ModelFiles, Source
from meshllm.serve.stage import Fabric, Pace, StageRunner

log = logging.getLogger(__name__)


class DeployNode(Protocol):
    """What deployment reads of its mesh node (:class:`~meshllm.mesh.node.Node`) and the one thing it
    publishes there: its own readiness."""

    node_id: str
    topics: Topics
    profile: DeviceProfile | None

    def member_ids(self) -> set[str]: ...

    def address_of(self, node_id: str) -> tuple[str, int]: ...

    def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False) -> Awaitable[bool]: ...


class Deployment:
    # The scheduler admits at most ``rows`` sequences per replica, but a finished sequence's
    # release and the next sequence's KV reach a stage over different connections, in either
    # order; spare cache rows absorb that overlap instead of refusing the newcomer.
    SLOT_HEADROOM = 2

    def __init__(self, node: DeployNode, fabric: Fabric, files: ModelFiles, manifest: Callable[[], Manifest | None],
                 fetch_sources: Callable[[str | None], list[Source]], *, model_dir: Path, threads: int | None,
                 kv_dtype: str | None, emulation: Emulation, executor: Executor, loader: Executor,
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Future[Any]],
                 on_layout: Callable[[Layout], None], on_ready: Callable[[], None],
                 routed_through: Callable[[int, int], bool] = lambda version, replica: False) -> None:
        self.node, self.node_id, self.fabric, self.files = node, node.node_id, fabric, files
        self._manifest, self._fetch_sources = manifest, fetch_sources
        self.model_dir, self.threads, self.kv_dtype, self.emulation = model_dir, threads, kv_dtype, emulation
        self.executor, self.loader = executor, loader  # the segments' owner, and apart, loading (see server.py)
        self._spawn, self._on_layout, self._on_ready = spawn, on_layout, on_ready
        self._routed_through = routed_through  # (plan version, replica id): does the journal route a request there
        self.runners: dict[tuple[int, int], StageRunner] = {}
        self._runner_tasks: dict[tuple[int, int], asyncio.Future[Any]] = {}
        self._segment: tuple[tuple[int, int, int, int], Segment] | None = None
        self.layout: Layout | None = None
        self.ready: dict[str, Readiness] = {}  # node id -> its readiness record
        self._deploy_lock = asyncio.Lock()
        self._ready_record: dict[str, Any] | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest()

    def _lanes(self, replica: ReplicaLayout) -> int:
        """Micro-batches for a pipeline's first stage: one per machine its stages run on, so that every machine
        works at once (stages that share one machine share its cores, and smaller batches only cost more there:
        docs/serving.md). A member gone meanwhile counts as a machine of its own."""
        hosts: list[object] = []
        for s in replica.stages:
            try:
                hosts.append(self.node.address_of(s.node_id)[0])
            except MeshError:
                hosts.append(s.node_id)
        return lanes_for(hosts)

    async def on_plan(self, plan: dict[str, Any]) -> None:
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
            await self.announce({"pv": layout.version, "r": None, "error": why})
            return
        self._spawn(self._deploy(layout))

    async def _deploy(self, layout: Layout) -> None:
        async with self._deploy_lock:
            if self.layout is not None and layout.version <= self.layout.version:
                return
            self.layout = layout
            self._on_layout(layout)
            replica = layout.replica_of(self.node_id)
            if replica is None:
                await self.announce({"pv": layout.version, "r": None, "idle": True})
                self._retire_old(layout.version)
                return
            index = replica.stage_index(self.node_id)
            assert index is not None and self.manifest is not None
            st = replica.stages[index]
            context = min(replica.context or self.manifest.config.max_seq_len, self.manifest.config.max_seq_len)
            key = (st.start, st.stop, replica.rows, context)
            segment = None
            if self._segment is not None and self._segment[0] == key and not self._segment_in_use():
                segment = self._segment[1]
            if segment is None:
                try:
                    await self.files.ensure(self.manifest.segment_files(st.start, st.stop), self._fetch_sources,
                                            self.loader)
                except ModelError as e:  # out of plans from now on (its record says why); one line, no traceback
                    log.error("%s: cannot serve stage %d of plan v%d: %s", self.node_id, index, layout.version, e)
                    await self.announce({"pv": layout.version, "r": None, "error": str(e)})
                    self._retire_old(layout.version)
                    return
                loop = asyncio.get_running_loop()
                # on its own thread, so decoding goes on meanwhile, at normal priority: a thread of this
                # process below the event loop's that holds or waits for the GIL can stall the event loop
                # for as long as the cores are busy (tests/test_loading.py, docs/serving.md)
                segment = await loop.run_in_executor(self.loader, lambda: Segment(
                    self.model_dir, st.start, st.stop, max_batch=replica.rows + self.SLOT_HEADROOM,
                    max_seq_len=context, threads=self.threads, verify=False, manifest=self.manifest,
                    spinning=False, kv_dtype=self.kv_dtype))
                self._segment = (key, segment)
            runner = StageRunner(self.fabric, layout, replica, index, segment, self.executor,
                                 compute_scale=self.emulation.compute_scale,
                                 pace=self._pace(st.start, st.stop), lanes=self._lanes(replica))
            self.runners[runner.key] = runner
            self._runner_tasks[runner.key] = self._spawn(runner.run())
            self._retire_old(layout.version)
            await self.announce({"pv": layout.version, "r": replica.id, "stage": index, "role": replica.role})
            log.info("%s: serving plan v%d as stage %d of %s replica %d (layers %d-%d)", self.node_id,
                     layout.version, index, replica.role, replica.id, st.start, st.stop - 1)

    async def announce(self, ready: dict[str, Any] | None = None) -> None:
        """Publishes (or, without ``ready``, restates to a new broker) this node's retained readiness."""
        if ready is not None:
            self._ready_record = ready
        if self._ready_record is not None:
            await self.node.publish(self.node.topics.ready(self.node_id), json.dumps(self._ready_record), retain=True)

    async def withdraw(self) -> None:
        """Clears this node's readiness (it is leaving), if a broker session is up."""
        await self.node.publish(self.node.topics.ready(self.node_id), b"", retain=True)

    def _pace(self, start: int, stop: int) -> Pace | None:
        """With ``--emulate-timing model``: how long a run of layers [start, stop) takes on the emulated device,
        as the planner's cost model (and the simulator) predict it from this node's advertised profile."""
        if self.emulation.timing != "model" or self.manifest is None or self.node.profile is None:
            return None
        from meshllm.plan import CostModel, ModelCosts

        # the bare run: the node's serving overhead (in its profile once measured) is real time it spends anyway
        cost = CostModel(ModelCosts.from_manifest(self.manifest), [self.node.profile.compute_only()])

        def pace(kind: str, n: int, context: float) -> float:
            if kind == "prefill":
                return cost.prefill_time(0, start, stop, n, context)
            return cost.decode_time(0, start, stop, context, n)
        return pace

    def _segment_in_use(self) -> bool:
        return any(self._holds_requests(r) for r in self.runners.values())

    def _holds_requests(self, runner: StageRunner) -> bool:
        """Whether ``runner`` still has work: sequences or frames here, or a request the journal routes through
        its replica that has not reached this stage yet (or is between two of its steps)."""
        return bool(runner.active or runner.sequences or not runner.inbox.empty()
                    or self._routed_through(*runner.key))

    def _retire_old(self, version: int) -> None:
        """Drops runners of older plans once they hold no request (drain)."""
        for key in [k for k in self.runners if k[0] < version]:
            if self._holds_requests(self.runners[key]):
                self._spawn(self._retire_when_idle(key))
                continue
            self.runners.pop(key)
            self._runner_tasks.pop(key).cancel()

    async def _retire_when_idle(self, key: tuple[int, int]) -> None:
        # a poll: a runner has no event for "holds nothing any more" (serve/stage.py owns that state)
        runner = self.runners.get(key)
        while runner is not None and self._holds_requests(runner):
            await asyncio.sleep(0.1)
        self.runners.pop(key, None)
        task = self._runner_tasks.pop(key, None)
        if task is not None:
            task.cancel()

    # --- readiness (every node follows it; the planner's scheduler routes by it) ---

    async def on_ready_message(self, msg: aiomqtt.Message) -> None:
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
        self._on_ready()

    def ready_replicas(self) -> set[int]:
        layout = self.layout
        if layout is None:
            return set()
        alive = self.node.member_ids()
        out = set()
        for r in layout.replicas.values():
            if all(s.node_id in alive and (rd := self.ready.get(s.node_id)) is not None
                   and rd.plan_version == layout.version and rd.replica == r.id for s in r.stages):
                out.add(r.id)
        return out
