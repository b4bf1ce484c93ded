"""A stage refuses bad frames from an authenticated peer without leaking cache slots, memory or its loop, and
answers every request that a bad frame ends.

A real :class:`Segment` (onnxruntime) behind a :class:`StageRunner`; the fabric only records what the
stage sends (the network is not what these tests are about: tests/test_fuzz_live.py sends real frames).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshllm.dataplane.codec import FrameError
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from meshllm.serve import api, protocol
from meshllm.serve.layout import Layout
from meshllm.serve.protocol import Begin, Frame, KvBlock, Prefill, Release, RequestMeta, Step
from meshllm.serve.stage import MAX_HELD_PER_ID, StageRunner
from tests.serving_harness import random_model, replica
from tests.test_stage_ownership import Fabric, meta_for, reference


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("stage"))


class Recorder:
    node_id = "d1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def send(self, node_id: str, frame: Frame) -> None:
        self.sent.append((node_id, frame))

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.sent.append((topic, payload))

    async def finished(self, request_id: str, meta: RequestMeta, finish_reason: str) -> None:
        self.sent.append(("finished", (request_id, finish_reason)))

    async def prefilled(self, key: str) -> None:
        self.sent.append(("prefilled", key))

    async def bounce(self, key: str, why: str) -> None:
        self.sent.append(("bounce", (key, why)))


def decode_stage(model: Path) -> StageRunner:
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("p1", 0, 4)]),
                                                      replica(1, "decode", [("d1", 0, 2), ("d2", 2, 4)], slots=2)]}
    layout = Layout.from_plan(plan)
    seg = Segment(model, 0, 2, max_batch=2, max_seq_len=64, threads=1)
    return StageRunner(Recorder(), layout, layout.replicas[1], 0, seg, ThreadPoolExecutor(1))  # type: ignore[arg-type]


def test_bad_kv_blocks_fail_their_request_and_never_keep_a_cache_slot(model: Path) -> None:
    """A block the stage cannot take ends its request: a release with the error goes to the last stage (which
    holds the reply stream and answers it), and no cache slot is kept."""
    stage = decode_stage(model)
    fabric: Recorder = stage.fabric  # type: ignore[assignment]
    k = np.zeros((2, 5, 16), np.float32)
    for i in range(10):  # more than the segment's slots
        asyncio.run(stage.on_kv(KvBlock(1, 1, f"bad{i}", 3, k, k)))  # a layer not held here
        asyncio.run(stage.on_kv(KvBlock(1, 1, f"worse{i}", 0, k[:, :, :8], k[:, :, :8])))  # a wrong shape
    stage.executor.submit(lambda: None).result()  # the segment's owner has run the queued closes
    assert stage.segment.open_sequences == [] and not stage.active
    releases = {f.key: f for node, f in fabric.sent if node == "d2" and isinstance(f, Release)}
    assert sorted(releases) == sorted([f"bad{i}" for i in range(10)] + [f"worse{i}" for i in range(10)])
    assert all(f.error_code == api.INTERNAL for f in releases.values())
    assert "layer 3" in releases["bad0"].error_message and "shape" in releases["worse0"].error_message
    good = np.zeros((stage.segment.config.n_kv_heads, 5, stage.segment.config.head_dim), np.float32)
    asyncio.run(stage.on_kv(KvBlock(1, 1, "bad0", 0, good, good)))  # a late block of a failed request: ignored
    asyncio.run(stage.on_kv(KvBlock(1, 1, "ok", 0, good, good)))  # a real hand-off finds a slot
    stage.executor.submit(lambda: None).result()
    assert stage.segment.open_sequences == ["ok"]


def test_steps_without_kv_are_held_only_within_bounds(model: Path) -> None:
    stage = decode_stage(model)
    x = np.zeros((1,), np.int64)
    for _ in range(MAX_HELD_PER_ID):
        asyncio.run(stage.on_step(Step(1, 1, ("early",), x)))  # a step that overtook its KV: held
    with pytest.raises(FrameError):
        asyncio.run(stage.on_step(Step(1, 1, ("early",), x)))
    with pytest.raises(FrameError):
        for i in range(1000):  # a peer inventing ids cannot grow the held steps without bound
            asyncio.run(stage.on_step(Step(1, 1, (f"ghost{i}",), x)))
    assert len(stage._held) <= stage.segment.max_batch * 4 + 1


def test_prefill_frames_with_malformed_meta_are_refused() -> None:
    x = np.zeros(3, np.int64)
    good = {"reply_to": "a/b", "sampling": {"max_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                            "seed": None, "stop": []},
            "prompt_len": 3, "last_prompt_token": 1, "prefill_r": 0, "decode_r": 1}
    assert isinstance(protocol.decode({"t": "prefill", "pv": 1, "r": 0, "id": "a", "x": x, "meta": good}), Prefill)
    for bad in ({}, {**good, "sampling": {"max_tokens": -1}}, {**good, "sampling": {"nope": 1}},
                {**good, "prompt_len": "3"}, {**good, "resume": {"tokens": ["x"]}}):
        with pytest.raises(FrameError):
            protocol.decode({"t": "prefill", "pv": 1, "r": 0, "id": "a", "x": x, "meta": bad})


def test_a_failing_item_does_not_stop_the_stage_loop(model: Path) -> None:
    """An item that raises something unexpected fails its request alone (an error reply, its KV released at
    every stage), and the loop goes on with the next one."""
    async def go() -> None:
        stage = decode_stage(model)
        fabric: Recorder = stage.fabric  # type: ignore[assignment]
        task = asyncio.ensure_future(stage.run())
        meta = RequestMeta("replies/boom", SamplingParams(max_tokens=4, temperature=0.0), 3, 5, 0, 1)
        await stage.on_prefill(Prefill(1, 1, "boom", np.zeros((1, 3, 5), np.float32), meta))  # not token ids
        good = np.zeros((stage.segment.config.n_kv_heads, 3, stage.segment.config.head_dim), np.float32)
        for layer in (0, 1):
            await stage.on_kv(KvBlock(1, 1, "r", layer, good, good))
        await stage.on_step(Step(1, 1, ("r",), np.array([5], np.int64)))
        for _ in range(300):
            if any(isinstance(f, Step) for _, f in fabric.sent):
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "the stage loop died"
        task.cancel()
        assert ("d2", Release(1, 1, "boom")) in fabric.sent
        assert any(topic == "replies/boom" and reply.get("error", {}).get("code") == api.INTERNAL
                   for topic, reply in fabric.sent if isinstance(reply, dict))
        steps = [(n, f) for n, f in fabric.sent if isinstance(f, Step)]
        assert steps[0][0] == "d2" and steps[0][1].keys == ("r",)
    asyncio.run(go())


@pytest.mark.parametrize("begin_first", [True, False], ids=["streaming", "before-begin"])
def test_a_kv_block_of_the_wrong_shape_ends_its_request_with_an_error_and_frees_its_slot(
        model: Path, begin_first: bool) -> None:
    """The last stage of a DECODE replica gets a request's KV and its ``begin`` in either order: a bad block ends
    that request with one error reply (also when its begin comes after the failure) and frees its slot, while
    another request handed off meanwhile decodes the tokens of one process."""
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("p1", 0, 4)]),
                                                      replica(1, "decode", [("d1", 0, 4)], slots=2)]}
    layout = Layout.from_plan(plan)
    fabric = Fabric(model)
    seg = Segment(model, 0, 4, max_batch=4, max_seq_len=64, threads=1)
    stage = StageRunner(fabric, layout, layout.replicas[1], 0, seg, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    ref = Segment(model, 0, 4, max_batch=1, max_seq_len=64, threads=1)
    prompt = np.array([1, 5, 6, 7], np.int64)
    tokens, kv = reference(ref, prompt, 12)

    async def go() -> None:
        task = asyncio.ensure_future(stage.run())
        bad_begin = Begin(1, 1, "bad", tokens[0], None, meta_for("bad", prompt, 12))
        if begin_first:
            await stage.on_begin(bad_begin)
        for layer, (k, v) in enumerate(kv):
            await stage.on_kv(KvBlock(1, 1, "good", layer, k, v))
            await stage.on_kv(KvBlock(1, 1, "bad", layer, k, v) if layer != 2 else
                              KvBlock(1, 1, "bad", layer, k[:, :, :-2], v[:, :, :-2]))  # one block is cut short
        await stage.on_begin(Begin(1, 1, "good", tokens[0], None, meta_for("good", prompt, 12)))
        if not begin_first:
            await stage.on_begin(bad_begin)
        for _ in range(1000):
            if {"good", "bad"} <= set(fabric.ended):
                break
            await asyncio.sleep(0.01)
        task.cancel()
    asyncio.run(go())
    bad = fabric.replies["replies/bad"]
    errors = [m["error"] for m in bad if "error" in m]
    assert len(errors) == 1 and errors[0]["code"] == api.INTERNAL and "shape" in errors[0]["message"], bad
    assert fabric.ended["bad"] == "error"
    good = [m["token_id"] for m in fabric.replies["replies/good"] if "token_id" in m]
    assert good == tokens and fabric.ended["good"] == "length"
    stage.executor.submit(lambda: None).result()
    assert seg.open_sequences == [] and not stage.active and not stage.sequences


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_first_stage_runs_one_lane_per_step(model: Path, lanes: int) -> None:
    """A real first stage of a two-stage DECODE replica: with one lane the four sequences' steps go on as one
    batch, with two lanes as two micro-batches of two (meshllm.serve.batching), each a step frame of its own."""
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("p1", 0, 4)]),
                                                      replica(1, "decode", [("d1", 0, 2), ("d2", 2, 4)], slots=4)]}
    layout = Layout.from_plan(plan)
    seg = Segment(model, 0, 2, max_batch=4, max_seq_len=64, threads=1)
    stage = StageRunner(Recorder(), layout, layout.replicas[1], 0, seg, ThreadPoolExecutor(1),  # type: ignore[arg-type]
                        lanes=lanes)
    fabric: Recorder = stage.fabric  # type: ignore[assignment]
    keys = ("a", "b", "c", "d")

    async def go() -> list[tuple[str, ...]]:
        task = asyncio.ensure_future(stage.run())
        good = np.zeros((seg.config.n_kv_heads, 3, seg.config.head_dim), np.float32)
        for key in keys:
            for layer in (0, 1):
                await stage.on_kv(KvBlock(1, 1, key, layer, good, good))
        await stage.on_step(Step(1, 1, keys, np.array([5, 6, 7, 8], np.int64)))
        for _ in range(500):
            sent = [f.keys for _, f in fabric.sent if isinstance(f, Step)]
            if sum(map(len, sent)) == len(keys):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return sent
    sent = asyncio.run(go())
    assert sent == ([keys] if lanes == 1 else [("a", "c"), ("b", "d")])
