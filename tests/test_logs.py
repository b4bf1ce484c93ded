"""The per-source log rate limit (meshllm/logs.py): pure window logic with a hand-driven clock, and the
logger on a real event loop writing the summary of a flood once it stops."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.logs import LineBudget, RateLimitedLog, clip


def test_a_source_gets_its_budget_then_one_summary_when_its_window_ends() -> None:
    b = LineBudget(per_second=3)
    assert [b.admit("a", 0.1 * i) for i in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert b.admit("b", 0.5) == (True, 0)  # another source has its own budget
    assert b.due(0.9) == []  # a's window is not over yet
    assert b.due(1.05) == [("a", 2)]
    assert b.due(1.5) == []  # reported once
    assert b.admit("a", 1.6) == (True, 0)


def test_the_next_line_of_a_source_carries_the_count_it_missed() -> None:
    b = LineBudget(per_second=1)
    assert b.admit("a", 0.0) == (True, 0)
    assert b.admit("a", 0.5) == (False, 0)
    assert b.admit("a", 0.6) == (False, 0)
    assert b.admit("a", 1.2) == (True, 2)


def test_memory_stays_bounded_under_many_sources() -> None:
    b = LineBudget(per_second=1, max_keys=10)
    for i in range(10_000):
        b.admit(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(b._windows) <= 11


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.5)), max_size=300), st.integers(1, 5))
def test_nothing_is_lost_and_no_source_exceeds_its_budget(events: list[tuple[str, float]], per_second: int) -> None:
    b = LineBudget(per_second=per_second)
    now, written, reported = 0.0, {k: [] for k in "abc"}, 0
    for key, dt in events:
        now += dt
        ok, missed = b.admit(key, now)
        reported += missed
        if ok:
            written[key].append(now)
    reported += sum(n for _, n in b.due(now + 10))
    assert sum(map(len, written.values())) + reported == len(events)
    for times in written.values():  # within any window-long span, at most 2 budgets (two windows touch it)
        for i, t in enumerate(times):
            assert sum(1 for u in times[i:] if u - t < 1.0) <= 2 * per_second


def test_a_flood_on_a_running_loop_writes_its_budget_and_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("meshllm.test_logs")
    rlog = RateLimitedLog(logger, per_second=4)

    async def go() -> None:
        for i in range(1000):
            rlog.warning("10.0.0.9", "bad frame %d from %s", i, "10.0.0.9")
        await asyncio.sleep(1.3)  # the flood stopped: its summary still comes

    with caplog.at_level(logging.WARNING, logger="meshllm.test_logs"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "meshllm.test_logs"]
    assert lines == [f"bad frame {i} from 10.0.0.9" for i in range(4)] + \
        ["suppressed 996 similar lines from 10.0.0.9"]


def test_clip_escapes_and_cuts_what_a_peer_chose() -> None:
    assert clip("a\nWARNING forged") == "a\\nWARNING forged"
    assert clip("x" * 500, 20) == "x" * 20 + "..."
    assert clip(b"\x00") == "b'\\x00'"
    assert clip("caf\u00e9\x1b[2J") == "caf\\xe9\\x1b[2J"
