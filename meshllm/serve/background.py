"""Work that must not slow serving down: run on the calling thread at the lowest CPU priority.

Loading a segment for a new plan (building its onnxruntime session: graph optimisation, weight prepacking)
takes seconds of CPU on the cores that decode the requests in flight. On its own executor it no longer
blocks them, but it still takes its share of the cores; at ``SCHED_IDLE`` it only gets what decoding leaves
idle. ``SCHED_IDLE`` rather than a nice value because nodes may already run at the largest nice value (every
benchmark and test here runs under ``nice -n 19``), and because leaving it needs no privilege.

Threads started while loading inherit the policy: those are the new session's own compute threads, which
must decode at normal priority once the plan is live, so they are put back afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _threads() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def at_idle_priority(fn: Callable[[], T]) -> T:
    """``fn()`` on this thread at ``SCHED_IDLE`` (where the platform has it); the threads it starts leave
    ``SCHED_IDLE`` when it returns, and this thread gets its own policy back."""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is None:
        return fn()
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        before = _threads()
        os.sched_setscheduler(0, idle, os.sched_param(0))  # pid 0: this thread only
    except OSError as e:
        log.debug("cannot lower the loading thread's priority: %s", e)
        return fn()
    try:
        return fn()
    finally:
        os.sched_setscheduler(0, policy, param)
        for tid in _threads() - before:
            try:
                if os.sched_getscheduler(tid) == idle:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except OSError:  # (a thread that ended meanwhile)
                pass
