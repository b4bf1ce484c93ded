"""A burst of prompts costs a pipeline one trip: the prompts queued at a stage are prefilled in one step.

Two real :class:`StageRunner` s (a MIXED replica cut in two) on real :class:`Segment` s of a small random model,
wired by a fabric that hands each frame to the stage it is for, as the data plane would. The reference is one
process decoding each prompt alone (greedy); every sequence must get exactly its tokens, whether its prompt ran
alone or with others, and a prompt that fails costs only itself.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from meshllm.serve.layout import Layout
from meshllm.serve.protocol import Frame, Prefill, RequestMeta
from meshllm.serve.stage import StageRunner
from tests.serving_harness import random_model, replica
from tests.test_stage_ownership import Fabric

SLOTS = 12
CONTEXT = 128


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("prompts"))


class Wire(Fabric):
    """The two nodes' fabric: frames go to the stage of the node they are sent to; replies are kept."""

    def __init__(self, model: Path) -> None:
        super().__init__(model)
        self.stages: dict[str, StageRunner] = {}

    async def send(self, to: str, frame: Frame) -> None:
        await self.stages[to].on_frame(frame)  # type: ignore[arg-type]

    def fabric(self, node_id: str) -> Wire:
        """The wire as one node sees it (its id; the stages and replies shared)."""
        view = copy.copy(self)
        view.node_id = node_id
        return view

    def tokens(self, rid: str) -> list[int]:
        return [m["token_id"] for m in self.replies.get(f"replies/{rid}", []) if "token_id" in m]

    def errors(self, rid: str) -> list[str]:
        return [m["error"] for m in self.replies.get(f"replies/{rid}", []) if "error" in m]


class Counted:
    """A segment's prefill calls, by kind, and the rows in them."""

    def __init__(self, seg: Segment) -> None:
        self.calls: list[int] = []
        one, many = seg.prefill, seg.prefill_many

        def prefill(seq: Any, x: Any) -> Any:
            self.calls.append(1)
            return one(seq, x)

        def prefill_many(seqs: Any, xs: Any) -> Any:
            self.calls.append(len(seqs))
            return many(seqs, xs)
        seg.prefill = prefill  # type: ignore[method-assign]
        seg.prefill_many = prefill_many  # type: ignore[method-assign]


def greedy(lm: LocalModel, prompt: np.ndarray, n: int) -> list[int]:
    seq = lm.open()
    try:
        tokens = [int(lm.prefill(seq, prompt.tolist()).argmax())]
        while len(tokens) < n:
            tokens.append(int(lm.decode([seq], tokens[-1:])[0].argmax()))
        return tokens
    finally:
        lm.close(seq)


def meta_for(rid: str, prompt: np.ndarray, max_tokens: int) -> RequestMeta:
    return RequestMeta(f"replies/{rid}", SamplingParams(max_tokens=max_tokens, temperature=0.0), int(prompt.size),
                       int(prompt[-1]), 0, 0, request_id=rid)


def pipeline(model: Path) -> tuple[Wire, list[StageRunner], list[Counted]]:
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("a", 0, 2), ("b", 2, 4)], slots=SLOTS,
                                                              context=CONTEXT)]}
    layout = Layout.from_plan(plan)
    wire = Wire(model)
    stages, counts = [], []
    for i, (node, a, b) in enumerate((("a", 0, 2), ("b", 2, 4))):
        seg = Segment(model, a, b, max_batch=SLOTS, max_seq_len=CONTEXT, threads=1)
        counts.append(Counted(seg))
        stage = StageRunner(wire.fabric(node), layout, layout.replicas[0], i, seg, ThreadPoolExecutor(1))
        wire.stages[node] = stage
        stages.append(stage)
    return wire, stages, counts


def run(wire: Wire, stages: list[StageRunner], burst: list[tuple[str, np.ndarray, int]], *, running: int = 0) -> None:
    """Starts ``running`` requests, waits until they decode, then sends ``burst`` at once; waits for all."""
    async def go() -> None:
        tasks = [asyncio.ensure_future(s.run()) for s in stages]
        first = stages[0]
        for rid, prompt, n in burst[:running]:
            await first.on_prefill(Prefill(1, 0, rid, prompt, meta_for(rid, prompt, n)))
        while running and any(len(wire.tokens(rid)) < 3 for rid, _, _ in burst[:running]):
            await asyncio.sleep(0.001)
        for rid, prompt, n in burst[running:]:
            await first.on_prefill(Prefill(1, 0, rid, prompt, meta_for(rid, prompt, n)))
        async with asyncio.timeout(60):
            while len(wire.ended) < len(burst):
                await asyncio.sleep(0.005)
        for t in tasks:
            t.cancel()
    asyncio.run(go())


def test_a_burst_of_prompts_is_one_step_per_stage_and_every_sequence_exact(model: Path) -> None:
    rng = np.random.default_rng(11)
    lm = LocalModel(model, verify=False, max_seq_len=CONTEXT)
    burst = [(f"r{i}", rng.integers(3, 512, int(rng.integers(1, 20))), int(rng.integers(4, 16))) for i in range(10)]
    wire, stages, counts = pipeline(model)
    run(wire, stages, burst, running=2)  # two decode while the burst comes: its prompts queue behind their steps
    for rid, prompt, n in burst:
        assert wire.errors(rid) == [] and wire.ended[rid] == "length", rid
        assert wire.tokens(rid) == greedy(lm, prompt, n), rid
    for c in counts:  # the two running ones alone, then the 8 in one step (not one step each)
        assert c.calls == [1, 1, 8] or c.calls == [2, 8], c.calls
    for s in stages:
        s.executor.submit(lambda: None).result()
        assert s.segment.open_sequences == [] and not s.active, "cache slots leaked"


def test_a_prompt_that_fails_in_a_burst_costs_only_itself(model: Path) -> None:
    """A token id outside the vocabulary fails the step of the burst: each prompt then runs alone, and only the
    bad one gets an error reply; the others get their exact tokens."""
    rng = np.random.default_rng(12)
    lm = LocalModel(model, verify=False, max_seq_len=CONTEXT)
    burst = [(f"q{i}", rng.integers(3, 512, int(rng.integers(2, 12))), 6) for i in range(6)]
    burst[3] = ("bad", np.array([5, 10**6, 7]), 6)
    wire, stages, counts = pipeline(model)
    run(wire, stages, burst)
    assert wire.errors("bad") and wire.tokens("bad") == []
    for rid, prompt, n in burst:
        if rid != "bad":
            assert wire.errors(rid) == [] and wire.tokens(rid) == greedy(lm, prompt, n), rid
    assert counts[0].calls == [6] + [1] * 6, counts[0].calls  # all six in one step, then each alone
    for s in stages:
        s.executor.submit(lambda: None).result()
        assert s.segment.open_sequences == [] and not s.active, "cache slots leaked"
