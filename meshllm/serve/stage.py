"""A pipeline stage: one node's segment of one replica, turning frames into model steps.

A :class:`StageRunner` owns a :class:`~meshllm.runtime.segment.Segment` and an
inbox. Its loop takes the next work item; decode steps that are ready are
batched by the rule of :mod:`meshllm.serve.batching` (the first stage of a
pipeline runs its sequences in ``lanes`` micro-batches, one per machine the
replica's stages run on, so that every stage works at once; later stages run
every step waiting for them in one ``Segment.decode``); the prompts waiting at a
stage are prefilled together in one ``Segment.prefill_many`` (``prompts_together``),
so that a burst of requests costs one pipeline trip, not one per prompt, during
which no stage decodes. Results go to the next stage,
or, at the replica's last stage, become tokens:

- in a PREFILL replica the last stage samples the first token and sends a
  ``begin`` to the chosen DECODE replica's last stage; every stage then copies
  the KV cache of its layers (one call on the segment's thread), frees its
  cache rows, and hands the copies to its *shipper*, a task of its own that
  sends them, layer by layer, to the DECODE stages that hold those layers. The
  stage goes on with its next prompt at once: shipping a long prompt's KV
  takes longer than its prefill on a slow link, and a prefill stage that
  waited for it would serve that much fewer prompts (the simulator and the
  planner put the hand-off on the path of the second token only);
- in a DECODE (or MIXED) replica the last stage owns each request's
  :class:`~meshllm.serve.sequence.SequenceState`: it samples, streams tokens to
  the reply topic and feeds each new token back to the first stage.

KV caches stay where their layers are; per token only activations move.

**One owner per segment.** The segment and its KV cache belong to the thread of
``executor``, which must have exactly one worker: every call that reads or moves
cache rows (open, import, export, prefill, decode, close) is queued there, in the
order the event loop issues it, so a KV block or a release that arrives during a
decode step waits behind it instead of landing in a row being moved. The
bookkeeping around it (``active``, held steps, sequences) belongs to the event loop.

**Every failure is answered.** Whatever fails while a request is here (its step,
its sampling, its reply, a full inbox) ends that request alone: an error reply on
its reply topic and a release of its KV at every stage of the replica. A stage
that does not hold the request's reply stream (any but the last) asks the last
stage to answer, with an ``error`` field in the release it sends there. Only a
lost peer is the planner's to handle: the stage tells it which requests it could not pass on, and it resumes
them on a healthy replica.

**A row counted free waits to be free.** A new sequence (a prompt, or a handed-off prompt's KV) that finds
every cache row held waits for the release that frees one (:meth:`StageRunner._park`): the planner counts the
row free when the request ends, and the release reaches this stage from another node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from meshllm.dataplane.codec import FrameError
from meshllm.dataplane.links import PeerUnreachable
from meshllm.errors import ContextLengthError, GenerationError, MeshError
from meshllm.runtime.sampling import Sampler
from meshllm.runtime.segment import Segment
from meshllm.serve import api
from meshllm.serve.batching import PROMPT_BATCH_TOKENS, Lanes, next_batch, prompts_together, stragglers
from meshllm.serve.journal import attempt_of, request_of
from meshllm.serve.layout import Layout, ReplicaLayout
from meshllm.serve.protocol import (
    MAX_ERROR_CODE_CHARS,
    MAX_TEXT_CHARS,
    Begin,
    Frame,
    KvBlock,
    Prefill,
    Release,
    RequestMeta,
    Step,
)
from meshllm.serve.sequence import SequenceState

log = logging.getLogger(__name__)

HANDOFFS_QUEUED = 1  # prompts' KV copied and waiting while the shipper sends another's (memory: see StageRunner._ship)
MAX_INBOX = 4096  # work items queued at a stage; the scheduler keeps far fewer in flight
T = TypeVar("T")
GATHER_FIRST_S, GATHER_MAX_S = 0.02, 0.1  # a batch waits for its stragglers at most one round, and this long
MAX_HELD_PER_ID = 2  # decode steps that overtook their KV (a request has one step in flight)
MAX_GONE = 4096  # released request keys remembered, so that a late frame of one cannot start it again
# A new sequence that finds every cache row held waits for one (see StageRunner._park) this long at most, and at
# most one row's worth of them per row: the planner counted a row free that is not free here yet
PARKED_MAX_S = 10.0
PARK_CHECK_S = 0.5  # how often waiting sequences are checked for their deadline when no row frees


# Emulation by the cost model: (kind "prefill" | "decode", tokens or batch, context) -> seconds
Pace = Callable[[str, int, float], float]


class Fabric(Protocol):
    """What a stage needs from its node: sending frames, publishing replies, the tokenizer."""

    node_id: str

    async def send(self, node_id: str, frame: Frame) -> None: ...

    async def publish(self, topic: str, payload: dict[str, Any]) -> None: ...

    def make_sequence(self, request_id: str, meta: RequestMeta, sampler: Sampler) -> SequenceState: ...

    async def finished(self, request_id: str, meta: RequestMeta, finish_reason: str) -> None: ...

    async def prefilled(self, key: str) -> None: ...

    def stream_ended(self, seq: SequenceState) -> None: ...

    async def bounce(self, key: str, why: str) -> None: ...


@dataclass(frozen=True)
class _Shipment:
    """A prompt's KV, copied off this stage's cache, on its way to the DECODE replica."""

    rid: str
    meta: RequestMeta
    decode: ReplicaLayout
    blocks: list[tuple[int, np.ndarray, np.ndarray]]  # (layer, K, V)


@dataclass(frozen=True)
class _Parked:
    """A new sequence waiting for a cache row here: its prompt, or the KV blocks that came for it so far."""

    since: float  # time.monotonic() when it started waiting
    meta: RequestMeta | None
    work: list[_Item | KvBlock]


@dataclass(frozen=True)
class _Item:
    kind: str  # "prefill" | "step"
    rid: str
    x: np.ndarray
    meta: RequestMeta | None = None  # a prompt's
    at: float = 0.0  # perf_counter when it was ready here (stamped by _put; a step fed back here: its run's end)


class StageRunner:
    def __init__(self, fabric: Fabric, layout: Layout, replica: ReplicaLayout, index: int, segment: Segment,
                 executor: Executor, *, compute_scale: float = 1.0, pace: Pace | None = None,
                 max_inbox: int = MAX_INBOX, lanes: int = 1) -> None:
        self.fabric, self.layout, self.replica, self.index = fabric, layout, replica, index
        self.segment = segment
        self.executor = executor  # one worker: the segment's owner (see the module's docstring)
        self.compute_scale = compute_scale
        self.pace = pace
        self.is_first = index == 0
        self.is_last = index == len(replica.stages) - 1
        # bounded by _put: prompts up to max_inbox, steps of the sequences held here have a reserve above it
        self.inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self.max_inbox = max_inbox
        self.active: set[str] = set()  # requests with KV on this stage
        self._kv_missing: dict[str, int] = {}  # DECODE: layers of a handed-off prompt not yet received
        self._held: dict[str, list[_Item]] = {}  # steps waiting for their KV
        self._prefilling: set[str] = set()  # prompts queued here
        self._decoding: set[str] = set()  # sequences that ran a decode step here: a batch waits for them
        # the first stage of a pipeline runs its sequences in ``lanes`` micro-batches: one per machine its stages
        # run on (batching.lanes_for); one lane, the default, is one batch of every sequence it holds
        self._lanes = Lanes(lanes) if self.is_first and not self.is_last else None
        self._last_step: dict[str, float] = {}  # when each sequence last ran here
        self._round_s = GATHER_FIRST_S  # how long a sequence takes to come back here (moving average)
        self.sequences: dict[str, SequenceState] = {}  # last stage of a decoding replica
        self._gone: OrderedDict[str, tuple[str, str] | None] = OrderedDict()  # released keys (see on_release)
        # KV copies waiting for the shipper (bounded: a stage that outruns its links waits here, with at most
        # this many prompts' KV copied), and the keys being shipped (a release stops the rest of theirs)
        self._outgoing: asyncio.Queue[_Shipment] = asyncio.Queue(HANDOFFS_QUEUED)
        self._shipping: set[str] = set()
        # new sequences waiting for a cache row (see _park), in arrival order, and the signal that a row freed
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self._row_freed = asyncio.Event()
        self.parked_max_s = PARKED_MAX_S
        self.busy_s = 0.0
        # the serving stack's own time per run: from when a run's work was all here and the previous run had
        # ended to the start of the run (taking it from the inbox, batching, the previous run's replies and
        # feeding back). The node advertises the mean per run in its profile (serving_overhead_s), which the
        # cost model and the simulator charge on every run.
        self.overhead_s = 0.0
        self.runs = 0
        self._ended = 0.0  # perf_counter at the end of the last run
        self.tokens_out = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.layout.version, self.replica.id)

    # --- frames in ----------------------------------------------------

    async def _put(self, item: _Item) -> None:
        """Queues work; a full inbox answers "busy" for that request alone (the connection that brought it
        carries other requests' frames and stays open). New prompts fill it only up to ``max_inbox``: the
        rest (two steps per cache slot) is kept for the steps of sequences in flight, which a burst of
        prompts must not crowd out."""
        limit = self.max_inbox + (0 if item.kind == "prefill" else 2 * self.segment.max_batch)
        if self.inbox.qsize() < limit:
            self.inbox.put_nowait(item if item.at else dataclasses.replace(item, at=time.perf_counter()))
        else:
            why = f"stage {self.index} of replica {self.replica.id} is busy ({self.inbox.qsize()} items queued)"
            if item.kind == "prefill":
                await self._fail(item.rid, api.BUSY, why, item.meta)
            elif item.rid in self.active:
                await self._fail(item.rid, api.BUSY, why)

    async def on_frame(self, frame: Prefill | Step | KvBlock | Begin | Release) -> None:
        """One frame of this stage's replica, to its handler (the data plane's, and tests', single entry)."""
        if isinstance(frame, Prefill):
            await self.on_prefill(frame)
        elif isinstance(frame, Step):
            await self.on_step(frame)
        elif isinstance(frame, KvBlock):
            await self.on_kv(frame)
        elif isinstance(frame, Begin):
            await self.on_begin(frame)
        elif isinstance(frame, Release):
            await self.on_release_frame(frame)

    async def on_prefill(self, frame: Prefill) -> None:
        rid = frame.key
        if rid in self._gone:  # released here already (failed, or moved): a late copy starts nothing
            return
        if rid in self.active or rid in self._prefilling or rid in self._shipping:  # dispatched twice: not run twice
            raise GenerationError(f"prefill for {rid!r}, which is already here (sent twice?)")
        self._prefilling.add(rid)
        await self._put(_Item("prefill", rid, frame.x, frame.meta))

    async def on_step(self, frame: Step, at: float = 0.0) -> None:
        """``at``: when the steps were ready (a one-stage replica's own, fed back: the end of the run that made
        them); 0 stamps their arrival."""
        x = frame.x
        for i, rid in enumerate(frame.keys):
            if rid in self._gone:
                continue
            item = _Item("step", rid, x[i:i + 1], at=at)
            # In a DECODE replica the first step can overtake the prompt's KV (they come from different
            # nodes): hold it until every layer of this stage has arrived.
            if rid in self._kv_missing or (self.replica.role == "decode" and rid not in self.active):
                held = self._held.setdefault(rid, [])
                if len(held) >= MAX_HELD_PER_ID or len(self._held) > self.segment.max_batch * 4:
                    raise FrameError(f"step for {rid!r} that has no KV here: too many such steps held")
                held.append(item)
            elif rid in self.active or rid in self._prefilling:  # (a step for nothing held here is dropped)
                await self._put(item)

    async def on_kv(self, frame: KvBlock) -> None:
        """One layer of a prompt prefilled elsewhere. A block this stage cannot take (a layer it does not hold,
        another dtype or shape than its cache) fails that request: an error reply and its KV freed everywhere."""
        rid, layer = frame.key, frame.layer
        if rid in self._gone:
            return
        if rid in self.active and rid not in self._kv_missing:
            raise GenerationError(f"kv frame for {rid!r}, whose KV is complete here (sent twice?)")
        opened = rid not in self.active
        if rid in self._parked or (opened and self._rows_free() <= 0):
            parked = self._parked.get(rid)
            if parked is not None and len(parked.work) >= len(self.segment.layers):
                raise FrameError(f"kv frame for {rid!r}: more layers than this stage holds")
            if not self._park(rid, frame, None):
                await self._fail(rid, api.BUSY, self._full())
            return
        if opened:
            self.active.add(rid)
            self._kv_missing[rid] = len(self.segment.layers)
        seg = self.segment

        def write() -> None:
            if opened:
                seg.open(rid)
            seg.import_kv(rid, layer, frame.k, frame.v)
        try:
            await self._on_segment(write)
        except Exception as e:  # this request's KV is unusable here: it alone ends
            if rid in self.active:
                await self._failed(rid, e)
            return
        if rid not in self._kv_missing:  # released while the block was being written (its close is queued)
            return
        self._kv_missing[rid] -= 1
        if self._kv_missing[rid] == 0:
            del self._kv_missing[rid]
            for item in self._held.pop(rid, []):
                await self._put(item)

    async def on_begin(self, frame: Begin, feed: list[tuple[str, int]] | None = None) -> None:
        """A prompt was prefilled elsewhere (or here): start streaming its tokens from this last stage. With
        ``feed`` (prompts prefilled together here), the first token is added to it instead of being fed back
        alone, so that the sequences of one step start decoding as one batch."""
        rid, meta = frame.key, frame.meta
        if rid in self._gone:  # failed (or moved) before its first token got here
            error = self._gone[rid]
            if error is not None:
                await self._answer(rid, meta, *error)
            return
        if rid in self.sequences:
            raise GenerationError(f"begin for {rid!r}, which already streams here (sent twice?)")
        state = self.fabric.make_sequence(rid, meta, Sampler.restore(meta.sampling, frame.sampler_state))
        self.sequences[rid] = state
        try:
            if await self._emit(state, frame.token, send=feed is None) and feed is not None:
                feed.append((rid, frame.token))
        except PeerUnreachable as e:
            await self._unreachable([rid], e)
        except Exception as e:
            await self._failed(state.id, e)

    async def on_release_frame(self, frame: Release) -> None:
        """A release from another stage; with an error, that stage failed the request, and this one, holding its
        reply stream, answers it (or, if its ``begin`` is still on its way, answers that when it comes)."""
        error = (frame.error_code, frame.error_message or "") if frame.error_code is not None else None
        state = self.on_release(frame.key, error)
        if state is not None and error is not None:
            await self._answer(state.id, state.meta, *error)

    def on_release(self, rid: str, error: tuple[str, str] | None = None) -> SequenceState | None:
        """Frees a request's KV; at a last stage it also drops its stream without a word (the request
        ended, or it moved to another replica after a fault and must not stream from here again) and
        returns it. The key is remembered (with ``error``, the failure a late ``begin`` is answered with)."""
        state = self.sequences.pop(rid, None)
        self._gone[rid] = error
        self._gone.move_to_end(rid)
        while len(self._gone) > MAX_GONE:
            self._gone.popitem(last=False)
        self.active.discard(rid)
        self._prefilling.discard(rid)  # (a prompt still queued here is dropped when its turn comes)
        self._kv_missing.pop(rid, None)
        self._shipping.discard(rid)
        self._parked.pop(rid, None)
        self._held.pop(rid, None)
        self._decoding.discard(rid)
        if self._lanes is not None:
            self._lanes.drop(rid)
        self._last_step.pop(rid, None)
        self._free_rows(rid)
        return state

    def drop_stale(self, request_id: str, attempt: int | None) -> list[str]:
        """Releases, without a word, what this stage holds of ``request_id``'s attempts before ``attempt`` (None:
        of every attempt: the request ended); returns their keys. The journal says so: the planner moved the
        request (a node of its path was declared lost) or it ended. A node that was declared lost while it was
        only stalled still held the old attempt's rows, which nobody else would release: the planner's release
        went to the nodes it counted alive."""
        held = self.active | self.sequences.keys() | self._prefilling | self._parked.keys()
        stale = [k for k in held if request_of(k) == request_id and (attempt is None or attempt_of(k) < attempt)]
        for key in stale:
            self.on_release(key)
        return stale

    def _free_rows(self, rid: str) -> None:
        """Frees ``rid``'s cache rows, after every segment call queued before it (and so before the open of a
        sequence waiting for them: see :meth:`_park`)."""
        try:
            self.executor.submit(self.segment.close, rid)
        except RuntimeError:  # the node is shutting down: the segment goes with it
            pass
        if self._parked:
            self._row_freed.set()

    # --- new sequences waiting for a row ------------------------------

    def _rows_free(self) -> int:
        """Cache rows no sequence holds here (one being freed counts as free: its close is queued before any
        later open)."""
        return self.segment.max_batch - len(self.active)

    def _full(self) -> str:
        return (f"stage {self.index} of replica {self.replica.id} has no free cache row "
                f"({len(self.active)} sequences open, {len(self._parked)} waiting)")

    def _park(self, rid: str, work: _Item | KvBlock, meta: RequestMeta | None) -> bool:
        """Keeps a new sequence's prompt or KV block until a cache row frees here; False if too many wait.

        The planner counts a row free when a request ends, and the release that frees it here comes from the
        replica's last stage while the next prompt (or its KV, from a PREFILL replica) comes from another node:
        on a busy machine, or after a resume, the new one can arrive first. It waits for the release instead of
        failing; one that waits longer than ``parked_max_s`` (a row the planner and this stage disagree about)
        is answered "busy" (:meth:`_unpark`). The connection that brought it is not held up meanwhile."""
        parked = self._parked.get(rid)
        if parked is None:
            if len(self._parked) >= self.segment.max_batch:
                return False
            parked = self._parked[rid] = _Parked(time.monotonic(), meta, [])
            log.debug("stage %s of replica %d: %s waits for a cache row", self.index, self.replica.id, rid)
        parked.work.append(work)
        return True

    async def _unpark(self) -> None:
        """Gives freed rows to the sequences waiting for them, in arrival order; fails those waiting too long."""
        while True:
            try:
                async with asyncio.timeout(PARK_CHECK_S):
                    await self._row_freed.wait()
            except TimeoutError:
                pass
            self._row_freed.clear()
            now = time.monotonic()
            for rid, parked in list(self._parked.items()):
                if now - parked.since > self.parked_max_s and self._parked.pop(rid, None) is not None:
                    await self._fail(rid, api.BUSY, f"{self._full()} for {self.parked_max_s:g} s", parked.meta)
            free = self._rows_free()
            while self._parked and free > 0:
                rid, parked = self._parked.popitem(last=False)
                free -= 1
                try:
                    for work in parked.work:
                        if isinstance(work, KvBlock):
                            await self.on_kv(work)
                        elif rid in self._prefilling:  # (its row is taken when its turn in the inbox comes)
                            self.inbox.put_nowait(work)
                except Exception as e:  # a bad block it brought: it alone ends, as on the data plane
                    await self._failed(rid, e, parked.meta)

    def on_cancel(self, rid: str) -> None:
        state = self.sequences.get(rid)
        if state is not None:
            state.cancelled = True

    # --- the loop -----------------------------------------------------

    async def run(self) -> None:
        """The stage's loop, and beside it its shipper of KV hand-offs and the task that gives freed cache rows
        to new sequences waiting for one (all end when this is cancelled)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._ship())
            tasks.create_task(self._unpark())
            while True:
                try:
                    await self._step()  # answers the failures of its requests itself
                except Exception:  # a bug outside any one request: log it and go on with the next item
                    log.exception("stage %s of replica %d: a work item failed", self.index, self.replica.id)

    async def _step(self) -> None:
        item = await self.inbox.get()
        if item.kind == "prefill":
            await self._prefills(item)
            return
        queued = self._with_queued(item)
        chosen = set(next_batch([q.rid if q.kind == "step" else None for q in queued], self._lanes,
                                self.segment.max_batch))
        batch = {queued[i].rid: queued[i] for i in sorted(chosen)}
        later = [q for i, q in enumerate(queued) if i not in chosen]
        await self._gather(batch, later)
        for d in later:  # prompts, other lanes' steps (and a second step of one request) wait, in order
            self.inbox.put_nowait(d)
        await self._decode([b for b in batch.values() if b.rid in self.active])

    def _with_queued(self, first: _Item) -> list[_Item]:
        """``first`` and every item queued behind it, taken out of the inbox in order (the caller puts back
        what it does not run now)."""
        queued = [first]
        while not self.inbox.empty():
            queued.append(self.inbox.get_nowait())
        return queued

    async def _gather(self, batch: dict[str, _Item], later: list[_Item]) -> None:
        """Waits for the steps of the other sequences of the batch's lane (:mod:`meshllm.serve.batching`), so that
        a lane runs whole. Without it, sequences that started apart circulate the pipeline as sub-batches that
        never meet (each stage forwards a batch as one frame), and batching is lost. Only the first stage waits
        (it forms the lanes; the others run what reaches them: a later stage that waited too could wait for a
        batch that waits for it). The wait ends when the lane is all here, when anything else is waiting (a
        prompt, another lane: the stage has work), or when the stragglers are overdue (about one round of the
        pipeline after they last ran here; one that did not come then is not waited for again until it has run
        here once more)."""
        if self._lanes is None or later:
            return
        missing = stragglers(batch, self._lanes, self._decoding)
        if not missing or len(batch) >= self.segment.max_batch:
            return
        loop = asyncio.get_running_loop()
        # each straggler comes back about one round after it last ran here
        due = max(self._last_step.get(r, 0.0) for r in missing) + 1.5 * self._round_s
        deadline = loop.time() + max(0.0, min(GATHER_MAX_S, due - time.monotonic()))
        try:
            async with asyncio.timeout_at(deadline):
                while missing and len(batch) < self.segment.max_batch and not later:
                    item = await self.inbox.get()
                    if item.kind == "step" and item.rid in missing:
                        batch[item.rid] = item
                    else:
                        later.append(item)
                    missing -= batch.keys()
                    missing &= self._decoding  # (released meanwhile)
        except TimeoutError:
            self._decoding -= missing

    async def _on_segment(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the segment's owner thread, after every segment call queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _compute(self, fn: Callable[[], np.ndarray], kind: str, n: int, seqs: list[str],
                       ready: float | None = None) -> np.ndarray:
        """Runs ``fn`` on the segment's thread; emulating a slower device, stretches the run to its time there
        (``n`` tokens of a prompt, or a decode batch of ``n``, for ``seqs`` at their current lengths). ``ready``:
        when the run's work was all here (counts the serving overhead before it; None: not counted)."""
        pace, seg = self.pace, self.segment

        def run() -> tuple[float, np.ndarray]:
            # the context only matters to pacing: not computed on the ordinary path. A prompt's sequence is
            # opened by ``fn`` itself (on this thread), so before it runs its context is 0
            held = set(seg.open_sequences) if pace is not None else set()
            context = sum(seg.length(s) if s in held else 0 for s in seqs) / len(seqs) if pace is not None else 0.0
            return context, fn()
        t = time.perf_counter()
        if ready is not None:
            self.overhead_s += max(0.0, t - max(ready, self._ended))
            self.runs += 1
        context, out = await self._on_segment(run)
        took = time.perf_counter() - t
        if pace is not None:
            await asyncio.sleep(max(0.0, pace(kind, n, context) - took))
        elif self.compute_scale > 1.0:
            await asyncio.sleep(took * (self.compute_scale - 1.0))
        self._ended = time.perf_counter()
        self.busy_s += self._ended - t
        return out

    def _joinable(self, item: _Item) -> int | None:
        """A queued prompt's tokens if it can be prefilled with others (a new sequence, one chunk), else None."""
        if item.kind != "prefill" or item.rid not in self._prefilling or item.rid in self.active:
            return None
        n = _tokens(item.x)
        seg = self.segment
        return n if seg.prefills_together and 0 < n <= min(seg.prefill_chunk, seg.max_seq_len) else None

    async def _prefills(self, first: _Item) -> None:
        """Prefills ``first`` and, in the same step, the other prompts queued that can join it (as many as there
        are free cache rows)."""
        if first.rid in self._prefilling and first.rid not in self.active and self._rows_free() <= 0:
            if not self._park(first.rid, first, first.meta):  # (the release in _fail drops it from _prefilling)
                await self._fail(first.rid, api.BUSY, self._full(), first.meta)
            return
        queued = self._with_queued(first)
        chosen = set(prompts_together([self._joinable(q) for q in queued], max(1, self._rows_free()),
                                      PROMPT_BATCH_TOKENS))
        for i, q in enumerate(queued):  # the rest waits, in order
            if i not in chosen:
                self.inbox.put_nowait(q)
        batch = [queued[i] for i in sorted(chosen) if queued[i].rid in self._prefilling]
        if len(batch) <= 1:
            for item in batch:
                await self._prefill(item)
            return
        for item in batch:
            self._prefilling.discard(item.rid)
        try:
            outs = await self._prefill_together(batch)
        except Exception as e:  # one of them is at fault (a cache slot short, bad input): each runs alone
            log.debug("stage %s of replica %d: %d prompts together failed (%s): one at a time", self.index,
                      self.replica.id, len(batch), e)
            for item in batch:
                if item.rid in self.active:  # (not released meanwhile)
                    self.active.discard(item.rid)
                    self._prefilling.add(item.rid)
                    await self._prefill(item)
            return
        feed: list[tuple[str, int]] = []
        for item, (meta, out) in zip(batch, outs, strict=True):
            if item.rid not in self.active:  # released while it ran
                continue
            try:
                await self._prefilled(item.rid, meta, out, feed)
            except PeerUnreachable as e:
                await self._unreachable([item.rid], e)
            except Exception as e:
                await self._failed(item.rid, e, meta)
        await self._feed_first(feed)

    async def _prefill_together(self, batch: list[_Item]) -> list[tuple[RequestMeta, np.ndarray]]:
        """Runs new prompts in one ``Segment.prefill_many``; on failure their cache slots are freed again."""
        metas = [self._started(item.meta) for item in batch]
        rids = [item.rid for item in batch]
        self.active.update(rids)
        seg = self.segment

        def prefill() -> list[np.ndarray]:
            opened = []
            try:
                for rid in rids:
                    seg.open(rid)
                    opened.append(rid)
                return seg.prefill_many(rids, [item.x for item in batch])
            except Exception:
                for rid in opened:
                    seg.close(rid)
                raise
        # (paced as the padded step it is: rows x the longest prompt, as the simulator counts it)
        outs = await self._compute(prefill, "prefill", len(batch) * max(_tokens(item.x) for item in batch), rids,
                                   ready=max(item.at for item in batch))
        return list(zip(metas, outs, strict=True))

    def _started(self, meta: RequestMeta) -> RequestMeta:
        return meta.with_times(prefill_started_at=time.time()) if self.is_first else meta

    async def _prefill(self, item: _Item) -> None:
        rid, meta = item.rid, item.meta
        if rid not in self._prefilling:  # released (failed, cancelled, moved) while it waited
            return
        self._prefilling.discard(rid)
        try:
            await self._prefill_one(rid, item.x, meta, item.at)
        except PeerUnreachable as e:
            await self._unreachable([rid], e)
        except Exception as e:
            await self._failed(rid, e, meta)

    async def _prefill_one(self, rid: str, x: np.ndarray, meta: RequestMeta, ready: float | None = None) -> None:
        meta = self._started(meta)
        opened = rid not in self.active
        self.active.add(rid)
        seg = self.segment

        def prefill() -> np.ndarray:
            if opened:
                seg.open(rid)
            return seg.prefill(rid, x)
        out = await self._compute(prefill, "prefill", _tokens(x), [rid], ready)
        feed: list[tuple[str, int]] = []
        await self._prefilled(rid, meta, out, feed)
        await self._feed_first(feed)

    async def _feed_first(self, feed: list[tuple[str, int]]) -> None:
        """Feeds back the first tokens of prompts prefilled here that this (MIXED) replica decodes, as one step,
        ready when their prefill ended; a sequence released meanwhile has no step."""
        if feed:
            await self._feed([(rid, token) for rid, token in feed if rid in self.sequences], at=self._ended)

    async def _prefilled(self, rid: str, meta: RequestMeta, out: np.ndarray,
                         feed: list[tuple[str, int]] | None = None) -> None:
        """A prompt ran here: its activations go on to the next stage, or its first token is sampled (and, with
        ``feed``, added to it if this replica decodes it: see :meth:`on_begin`)."""
        if not self.is_last:
            await self.fabric.send(self.replica.stages[self.index + 1].node_id,
                                   Prefill(self.layout.version, self.replica.id, rid, out, meta))
        else:
            sampling = meta.sampling
            # a resumed request continues its sampler from the checkpoint of the tokens it prefilled again
            sampler = Sampler.restore(sampling, meta.resume.sampler_state if meta.resume is not None else None)
            token = sampler(out[0])
            meta = meta.with_times(first_token_at=time.time())
            decode = self.layout.replicas[meta.decode_replica]
            begin = Begin(self.layout.version, decode.id, rid, token, None if sampling.greedy else sampler.state(),
                          meta)
            if decode.id == self.replica.id:
                await self.on_begin(begin, feed)
            else:
                await self.fabric.send(decode.last.node_id, begin)
            # the first token is on its way; now the scheduler stops counting this prompt as prefill work here
            await self.fabric.prefilled(rid)
        if meta.decode_replica != self.replica.id:  # a PREFILL replica that lends itself decodes it here
            await self._hand_off(rid, meta)

    async def _hand_off(self, rid: str, meta: RequestMeta) -> None:
        """Copies this stage's KV for ``rid``, frees its cache rows, and queues the copies for the shipper, which
        sends them to the DECODE stages holding the same layers (:meth:`_ship`). Returns once they are queued."""
        if rid not in self.active:  # released meanwhile (the planner moved it after a fault): nothing to ship
            return
        blocks = await self._on_segment(functools.partial(self._export, rid))
        if rid not in self.active:
            return
        self.active.discard(rid)
        self._shipping.add(rid)
        self._free_rows(rid)  # the rows are copied: the next prompt may have them
        await self._outgoing.put(_Shipment(rid, meta, self.layout.replicas[meta.decode_replica], blocks))

    def _export(self, rid: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Copies of every layer's KV of ``rid`` here, made on the owner thread: the rows are freed next, and a
        view (even a contiguous one, which ``ascontiguousarray`` would not copy) would see the next prompt's."""
        out = []
        for layer in self.segment.layers:
            k, v = self.segment.export_kv(rid, layer)
            out.append((layer, k.copy(), v.copy()))
        return out

    async def _ship(self) -> None:
        """Sends the queued hand-offs, one after another, each layer by layer; a request released meanwhile (the
        planner moved it after a fault) has the rest of its layers dropped. A lost peer is left to the planner,
        any other failure ends that request alone (as on the stage's loop). Memory: beyond the cache, the KV of
        at most ``HANDOFFS_QUEUED + 1`` prompts is held in copies (one being sent, the rest queued); a stage whose
        links are slower than its prefills then waits for the shipper, as it did before it had one."""
        while True:
            item = await self._outgoing.get()
            try:
                for layer, k, v in item.blocks:
                    if item.rid not in self._shipping:
                        break
                    await self.fabric.send(item.decode.holder(layer).node_id,
                                           KvBlock(self.layout.version, item.decode.id, item.rid, layer, k, v))
            except PeerUnreachable as e:
                await self._unreachable([item.rid], e)
            except Exception as e:
                await self._failed(item.rid, e, item.meta)
            if item.rid in self._shipping:  # shipped (or failed): released here now
                self.on_release(item.rid)

    async def _decode(self, batch: list[_Item]) -> None:
        if not batch:  # every request of the batch was released meanwhile (cancelled, failed)
            return
        ids = [b.rid for b in batch]
        x = np.concatenate([b.x for b in batch], axis=0)
        if self.is_first:
            x = x.reshape(len(ids))
        try:
            out = await self._compute(functools.partial(self.segment.decode, ids, x), "decode", len(ids), ids,
                                      ready=max(b.at for b in batch))
        except Exception as e:
            if len(ids) == 1:
                await self._failed(ids[0], e)
                return
            ids, out = await self._decode_apart(ids, x)  # find the request at fault; the others go on
            if not ids:
                return
        self._ran(ids)
        if not self.is_last:
            try:
                await self.fabric.send(self.replica.stages[self.index + 1].node_id,
                                       Step(self.layout.version, self.replica.id, tuple(ids), out))
            except PeerUnreachable as e:
                await self._unreachable(ids, e)
            return
        feed: list[tuple[str, int]] = []
        for row, rid in enumerate(ids):
            state = self.sequences.get(rid)
            if state is None:
                continue
            try:
                token = state.sampler(out[row])
                if await self._emit(state, token, send=False):
                    feed.append((rid, token))
            except Exception as e:  # this request's sampling or reply: it alone ends
                await self._failed(rid, e)
        if feed:
            await self._feed(feed, at=self._ended)

    def _ran(self, ids: list[str]) -> None:
        """Notes that ``ids`` ran here now; their time since the last run is how long a round takes."""
        now = time.monotonic()
        rounds = [now - t for rid in ids if (t := self._last_step.get(rid)) is not None]
        if rounds:
            self._round_s += 0.2 * (min(rounds) - self._round_s)
        for rid in ids:
            self._last_step[rid] = now
        self._decoding.update(ids)

    async def _decode_apart(self, ids: list[str], x: np.ndarray) -> tuple[list[str], np.ndarray]:
        """A batch failed: runs its requests one by one, failing those that fail alone."""
        ok: list[str] = []
        outs: list[np.ndarray] = []
        for i, rid in enumerate(ids):
            try:
                outs.append(await self._compute(functools.partial(self.segment.decode, [rid], x[i:i + 1]),
                                                "decode", 1, [rid]))
                ok.append(rid)
            except Exception as e:
                await self._failed(rid, e)
        return ok, (np.concatenate(outs, axis=0) if outs else np.empty(0))

    async def _emit(self, state: SequenceState, token: int, send: bool = True) -> bool:
        """Publishes ``token`` for a request; returns True if it continues (and feeds it back when ``send``)."""
        self.tokens_out += 1
        cont = await state.push(token, self.segment.max_seq_len)
        if not cont:
            await self._finish(state)
        elif send:
            await self._feed([(state.id, token)])
        return cont

    async def _feed(self, pairs: list[tuple[str, int]], at: float = 0.0) -> None:
        """Sends tokens back to the first stage as the sequences' next step; ``at``: when the step was ready (the
        end of the run that made the tokens here; 0: now, as for a first token that came in a ``begin``)."""
        frame = Step(self.layout.version, self.replica.id, tuple(p[0] for p in pairs),
                     np.array([p[1] for p in pairs], np.int64))
        if self.is_first:  # a one-stage replica feeds itself
            await self.on_step(frame, at=at)
            return
        try:
            await self.fabric.send(self.replica.first.node_id, frame)
        except PeerUnreachable as e:
            await self._unreachable(list(frame.keys), e)

    async def _finish(self, state: SequenceState) -> None:
        self.sequences.pop(state.id, None)
        self.fabric.stream_ended(state)
        await self._release_everywhere(state.id)
        await self.fabric.finished(state.id, state.meta, state.finish_reason or "stop")

    async def _failed(self, rid: str, e: BaseException, meta: RequestMeta | None = None) -> None:
        """Request ``rid`` failed here with ``e`` (see :meth:`_fail`)."""
        await self._fail(rid, *self._error(e), meta)

    def _error(self, e: BaseException | None) -> tuple[str, str]:
        """The reply code and message for a request that failed here with ``e``."""
        if isinstance(e, ContextLengthError):
            return api.CONTEXT_LENGTH, str(e)
        if isinstance(e, MeshError):
            log.error("stage %s of replica %d: %s", self.index, self.replica.id, e)
            return api.INTERNAL, str(e)
        log.error("stage %s of replica %d: a request failed", self.index, self.replica.id, exc_info=e)
        return api.INTERNAL, f"stage {self.index} of replica {self.replica.id} failed: {type(e).__name__}"

    async def _fail(self, rid: str, code: str, message: str, meta: RequestMeta | None = None) -> None:
        """Ends request ``rid`` with an error reply and frees its KV at every stage of the replica. The reply
        comes from here if this stage holds the request's stream or ``meta``, else from the last stage. A request
        released here while this stage worked on it ends without a word: whoever released it owns its outcome
        (it finished, failed elsewhere, or moved to another replica after a fault, where it goes on)."""
        if rid in self._gone:
            log.debug("stage %s of replica %d: %s failed after its release: %s", self.index, self.replica.id, rid,
                      message)
            return
        state = self.sequences.get(rid)
        meta = state.meta if state is not None else meta
        if meta is not None:
            await self._answer(rid, meta, code, message)
            await self._release_everywhere(rid)
        else:
            await self._release_everywhere(rid, error=(code, message))

    async def _release_everywhere(self, rid: str, error: tuple[str, str] | None = None) -> None:
        """Frees ``rid``'s KV at every stage of the replica; ``error`` (code, message) goes to the last stage,
        which holds the reply stream and answers it."""
        for s in self.replica.stages:
            last = s is self.replica.stages[-1]
            frame = Release(self.layout.version, self.replica.id, rid)
            if error is not None and last:
                frame = Release(self.layout.version, self.replica.id, rid, error[0][:MAX_ERROR_CODE_CHARS],
                                error[1][:MAX_TEXT_CHARS])
            if s.node_id == self.fabric.node_id:
                await self.on_release_frame(frame)
            else:
                await _quietly(self.fabric.send(s.node_id, frame))

    async def _unreachable(self, rids: list[str], e: PeerUnreachable) -> None:
        """Requests ``rids`` could not be passed on: a node of their path is unreachable. The planner moves them
        (resumes them elsewhere from their last journaled token) now, not when, or if, it notices the node's
        loss: a node that was only stalled for a moment is a member again by then, and a request whose frame it
        never got would wait for it forever."""
        log.warning("stage %s of replica %d: %s (%s moved by the planner)", self.index, self.replica.id, e,
                    ", ".join(rids))
        for rid in rids:
            await _quietly(self.fabric.bounce(rid, str(e)))

    async def _answer(self, rid: str, meta: RequestMeta, code: str, message: str) -> None:
        await _quietly(self.fabric.publish(meta.reply_to, api.error_reply(meta.request_id or rid, code, message)))
        await _quietly(self.fabric.finished(rid, meta, "error"))


def _tokens(x: np.ndarray) -> int:
    """A prompt's tokens: ``(S,)`` ids or ``(1, S, dim)`` hidden states."""
    return int(x.shape[1] if x.ndim >= 2 else x.size)


async def _quietly(aw: Awaitable[None]) -> None:
    try:
        await aw
    except MeshError as e:
        log.debug("ignored: %s", e)
