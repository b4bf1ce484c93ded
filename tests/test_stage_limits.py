"""A stage refuses bad frames from an authenticated peer without leaking cache slots, memory or its loop.

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
from meshllm.errors import MeshError
from meshllm.runtime.segment import Segment
from meshllm.serve import protocol
from meshllm.serve.layout import Layout
from meshllm.serve.stage import MAX_HELD_PER_ID, StageRunner
from tests.serving_harness import random_model, replica


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("stage"))


class Recorder:
    node_id = "d1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, node_id: str, frame: dict[str, Any]) -> None:
        self.sent.append((node_id, frame))

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.sent.append((topic, payload))


def decode_stage(model: Path) -> StageRunner:
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("p1", 0, 4)]),
                                                      replica(1, "decode", [("d1", 0, 2), ("d2", 2, 4)], slots=2)]}
    layout = Layout.from_plan(plan)
    seg = Segment(model, 0, 2, max_batch=2, max_seq_len=64, threads=1)
    return StageRunner(Recorder(), layout, layout.replicas[1], 0, seg, ThreadPoolExecutor(1))  # type: ignore[arg-type]


def test_bad_kv_blocks_never_keep_a_cache_slot(model: Path) -> None:
    stage = decode_stage(model)
    k = np.zeros((2, 5, 16), np.float32)
    for i in range(10):  # more than the segment's slots
        with pytest.raises(MeshError):
            asyncio.run(stage.on_kv({"id": f"bad{i}", "layer": 3, "k": k, "vv": k}))  # a layer not held here
        with pytest.raises(MeshError):
            asyncio.run(stage.on_kv({"id": f"bad{i}", "layer": 0, "k": k[:, :, :8], "vv": k[:, :, :8]}))  # bad shape
    stage.executor.submit(lambda: None).result()  # the segment's owner has run the queued closes
    assert stage.segment.open_sequences == [] and not stage.active
    good = np.zeros((stage.segment.config.n_kv_heads, 5, stage.segment.config.head_dim), np.float32)
    asyncio.run(stage.on_kv({"id": "ok", "layer": 0, "k": good, "vv": good}))  # a real hand-off finds a slot
    assert stage.segment.open_sequences == ["ok"]


def test_steps_without_kv_are_held_only_within_bounds(model: Path) -> None:
    stage = decode_stage(model)
    x = np.zeros((1,), np.int64)
    for _ in range(MAX_HELD_PER_ID):
        asyncio.run(stage.on_step({"ids": ["early"], "x": x}))  # a step that overtook its KV: held
    with pytest.raises(FrameError):
        asyncio.run(stage.on_step({"ids": ["early"], "x": x}))
    with pytest.raises(FrameError):
        for i in range(1000):  # a peer inventing ids cannot grow the held steps without bound
            asyncio.run(stage.on_step({"ids": [f"ghost{i}"], "x": x}))
    assert len(stage._held) <= stage.segment.max_batch * 4 + 1


def test_prefill_frames_with_malformed_meta_are_refused() -> None:
    x = np.zeros(3, np.int64)
    good = {"reply_to": "a/b", "sampling": {"max_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                            "seed": None, "stop": []},
            "prompt_len": 3, "last_prompt_token": 1, "prefill_r": 0, "decode_r": 1}
    protocol.check({"t": "prefill", "pv": 1, "r": 0, "id": "a", "x": x, "meta": good})
    for bad in ({}, {**good, "sampling": {"max_tokens": -1}}, {**good, "sampling": {"nope": 1}},
                {**good, "prompt_len": "3"}, {**good, "resume": {"tokens": ["x"]}}):
        with pytest.raises(FrameError):
            protocol.check({"t": "prefill", "pv": 1, "r": 0, "id": "a", "x": x, "meta": bad})


def test_a_failing_item_does_not_stop_the_stage_loop(model: Path) -> None:
    """An item that raises something unexpected fails its request alone (its KV is released at every stage),
    and the loop goes on with the next one."""
    async def go() -> None:
        stage = decode_stage(model)
        fabric: Recorder = stage.fabric  # type: ignore[assignment]
        task = asyncio.ensure_future(stage.run())
        await stage.on_prefill({"id": "boom", "x": None, "meta": {}})  # x is not an array
        good = np.zeros((stage.segment.config.n_kv_heads, 3, stage.segment.config.head_dim), np.float32)
        for layer in (0, 1):
            await stage.on_kv({"id": "r", "layer": layer, "k": good, "vv": good})
        await stage.on_step({"ids": ["r"], "x": np.array([5], np.int64)})
        for _ in range(300):
            if any(f["t"] == "step" for _, f in fabric.sent):
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "the stage loop died"
        task.cancel()
        assert ("d2", {"t": "release", "pv": 1, "r": 1, "id": "boom"}) in fabric.sent
        steps = [(n, f) for n, f in fabric.sent if f["t"] == "step"]
        assert steps[0][0] == "d2" and steps[0][1]["ids"] == ["r"]
    asyncio.run(go())
