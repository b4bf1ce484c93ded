"""A segment of a new plan loads at the lowest CPU priority, and decodes at normal priority once loaded.

Real onnxruntime: the session's compute threads are started while it is built, by the loading thread, and
inherit its scheduling policy; :func:`meshllm.serve.background.at_idle_priority` must hand them back.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from meshllm.runtime.segment import Segment
from meshllm.serve.background import at_idle_priority
from tests.serving_harness import random_model

# SCHED_IDLE is Linux only, like the nodes meshllm runs on and this suite (network namespaces, /proc): a platform
# without it fails here, never skips


def threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def test_loading_runs_idle_and_the_new_sessions_threads_do_not(tmp_path: Path) -> None:
    assert hasattr(os, "SCHED_IDLE"), "os.SCHED_IDLE is missing: loading at idle priority needs Linux"
    model = random_model(tmp_path)
    seen: dict[str, object] = {}

    def load() -> Segment:
        seen["policy"] = os.sched_getscheduler(0)
        before = threads()
        seg = Segment(model, 0, 4, max_batch=2, max_seq_len=64, threads=2, verify=False)
        seen["started"] = {t: os.sched_getscheduler(t) for t in threads() - before}
        return seg

    with ThreadPoolExecutor(1) as loader:
        seg = loader.submit(at_idle_priority, load).result()
        after = loader.submit(os.sched_getscheduler, 0).result()
    assert seen["policy"] == os.SCHED_IDLE
    started = seen["started"]
    assert isinstance(started, dict) and started, "onnxruntime started no thread while loading"
    assert set(started.values()) == {os.SCHED_IDLE}  # inherited: what at_idle_priority must undo
    for tid in started:
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    assert after == os.SCHED_OTHER  # the loading thread itself is back too
    seg.open("a")
    assert seg.prefill("a", [1, 5, 6]).shape[-1] == seg.config.vocab_size
