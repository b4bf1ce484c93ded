"""Which decode steps a pipeline stage runs together next (one rule for the stage and the simulator), and which
prompts (:func:`prompts_together`; the simulator prefills one at a time). Pure.

A replica of k stages keeps every stage working only with k micro-batches in flight: with one, each stage
idles while the others compute (and while the last stage samples and streams), so k stages would give one
stage's throughput at best. The first stage therefore splits the sequences it decodes into ``k`` *lanes*
(a sequence joins the lane with the fewest members when it first runs there and stays in it), and runs one
lane per step: the steps of the first waiting step's lane that are queued, and it waits for that lane's
stragglers (:func:`stragglers`) rather than splitting the lane. Lanes then circulate the pipeline apart,
one behind the other, as pipeline-parallel serving systems schedule micro-batches. Later stages run every
step waiting for them in one batch (two lanes that queued behind a slow stage merge there and the first
stage splits them again). Used by :class:`meshllm.serve.stage.StageRunner` and the simulator's "serving"
batching (:mod:`meshllm.sim.engine`).

Lanes pay only where the stages have CPUs of their own (:func:`lanes_for`): a stage runs k batches of n/k
instead of one of n, which costs more CPU (measured for a quarter of TinyStories-110M on one thread: 8.7 ms
for a batch of 5, 16.6 ms for 16), bought back by the stages working at once. Stages that share a
machine's cores do not work at once (the loopback benchmark's three nodes on two cores: 16 concurrent
requests fell from 3.8-5.3x one request's tokens/s to 1.4-2.6x with three lanes), so they keep one lane,
which is the stage's wait for all its sequences: one batch of everything.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Lanes:
    """The micro-batches of a replica's first stage: each sequence decoding there belongs to one lane."""

    count: int
    _lane: dict[Hashable, int] = field(default_factory=dict)
    _members: list[set[Hashable]] = field(init=False)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a stage needs at least one lane, got {self.count}")
        self._members = [set() for _ in range(self.count)]
        for seq, lane in self._lane.items():
            self._members[lane].add(seq)

    def lane_of(self, seq: Hashable) -> int:
        """``seq``'s lane; a sequence seen for the first time joins the lane with the fewest members."""
        lane = self._lane.get(seq)
        if lane is None:
            lane = min(range(self.count), key=lambda i: (len(self._members[i]), i))
            self._lane[seq] = lane
            self._members[lane].add(seq)
        return lane

    def drop(self, seq: Hashable) -> None:
        """``seq`` left (finished, failed, moved)."""
        lane = self._lane.pop(seq, None)
        if lane is not None:
            self._members[lane].discard(seq)

    def members(self, lane: int) -> frozenset[Hashable]:
        return frozenset(self._members[lane])

    def __contains__(self, seq: object) -> bool:
        return seq in self._lane


def lanes_for(hosts: Iterable[Hashable]) -> int:
    """How many lanes a replica's first stage keeps, given the machine each stage runs on: one per machine."""
    return max(1, len(set(hosts)))


def next_batch(waiting: Sequence[Hashable | None], lanes: Lanes | None, max_batch: int) -> list[int]:
    """The positions in ``waiting`` (the stage's queue in arrival order: a decode step's sequence, or None
    for anything else, e.g. a prompt) of the steps that run now: the first waiting step and, from those
    after it, the steps of the same lane (of any lane when ``lanes`` is None), one per sequence, at most
    ``max_batch``. Everything else stays queued, in order."""
    out: list[int] = []
    seen: set[Hashable] = set()
    lane: int | None = None
    for i, seq in enumerate(waiting):
        if len(out) >= max_batch:
            break
        if seq is None or seq in seen:
            continue
        if lanes is not None:
            if lane is None:
                lane = lanes.lane_of(seq)
            elif lanes.lane_of(seq) != lane:
                continue
        out.append(i)
        seen.add(seq)
    return out


def stragglers(batch: Iterable[Hashable], lanes: Lanes | None, decoding: Iterable[Hashable]) -> set[Hashable]:
    """The sequences of the batch's lane (every sequence when ``lanes`` is None) that decode here (are in
    ``decoding``) but whose step has not come yet: the first stage waits for them, briefly."""
    batch = set(batch)
    if lanes is None:
        return set(decoding) - batch
    lane_ids = {lanes.lane_of(s) for s in batch}
    return {s for s in decoding if s not in batch and s in lanes and lanes.lane_of(s) in lane_ids}


#: Padded tokens of the prompts prefilled in one step: 8 chunks of a long prompt
#: (:data:`meshllm.runtime.segment.PREFILL_CHUNK`, 64). A step's activations grow with its tokens, so a full
#: batch of prompts peaks above one chunk (docs/inference.md).
PROMPT_BATCH_TOKENS = 512


def prompts_together(waiting: Sequence[int | None], max_rows: int, max_tokens: int) -> list[int]:
    """The positions in ``waiting`` (a stage's queue in arrival order, led by the prompt that runs next: a
    prompt's token count if it can be prefilled with others, None for anything else) of the prompts that
    run now, in one step: the first and, if it can join, those after it that can, in order, while the step
    has at most ``max_rows`` rows and at most ``max_tokens`` padded tokens (rows x the longest prompt).
    Everything else stays queued, in order. One step for a burst of prompts instead of one each: each is a
    trip through the whole pipeline during which no stage decodes."""
    if not waiting:
        return []
    out = [0]
    longest = waiting[0]
    if longest is None:
        return out
    for i, n in enumerate(waiting[1:], 1):
        if len(out) >= max_rows:
            break
        if n is None or max(longest, n) * (len(out) + 1) > max_tokens:
            continue
        out.append(i)
        longest = max(longest, n)
    return out
