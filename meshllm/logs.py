"""Log lines that a stranger can trigger, rate-limited per source.

Anything a peer can cause at will (a refused connection, a malformed frame or
message) must not let it flood the log: :class:`RateLimitedLog` writes at most
``per_second`` lines per source key in each one-second window and then one
summary, ``suppressed K similar lines from SOURCE``, when the window is over.
The window logic is pure (:class:`LineBudget`, fed a clock); the logger only
performs what it decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_KEYS = 1024  # sources tracked at once; beyond, the rest share one budget (memory stays bounded)
OTHER = "(other sources)"


@dataclass
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0


@dataclass
class LineBudget:
    """Per-key budget of ``per_second`` lines per window of ``window_s`` seconds (pure: the caller passes ``now``)."""

    per_second: int = 5
    window_s: float = 1.0
    max_keys: int = MAX_KEYS
    _windows: dict[str, _Window] = field(default_factory=dict)

    def admit(self, key: str, now: float) -> tuple[bool, int]:
        """Whether a line from ``key`` may be written now, and how many lines of ``key``'s previous
        window were suppressed (to be reported first, once)."""
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.max_keys:
                self._sweep(now)
            if len(self._windows) >= self.max_keys:
                key = OTHER
                w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(now)
        reported = 0
        if now - w.start >= self.window_s:
            reported, w.start, w.lines, w.suppressed = w.suppressed, now, 0, 0
        if w.lines < self.per_second:
            w.lines += 1
            return True, reported
        w.suppressed += 1
        return False, reported

    def due(self, now: float) -> list[tuple[str, int]]:
        """Keys whose window is over with suppressed lines, and how many (each reported once)."""
        out = []
        for key, w in self._windows.items():
            if w.suppressed and now - w.start >= self.window_s:
                out.append((key, w.suppressed))
                w.suppressed = 0
        self._sweep(now)
        return out

    def pending(self) -> bool:
        """Whether some window holds suppressed lines not yet reported."""
        return any(w.suppressed for w in self._windows.values())

    def _sweep(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if not w.suppressed and now - w.start >= self.window_s]:
            del self._windows[key]


class RateLimitedLog:
    """A logger's ``warning``/``info``/``exception`` with a per-source budget (see the module docstring)."""

    def __init__(self, logger: logging.Logger, per_second: int = 5, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.budget = LineBudget(per_second)
        self.clock = clock
        self._flush_scheduled = False

    def log(self, level: int, source: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        ok, suppressed = self.budget.admit(source, now)
        if suppressed:
            self._summary(level, source, suppressed)
        if ok:
            self.logger.log(level, msg, *args, exc_info=exc_info)
        else:
            self._schedule_flush(level)

    def warning(self, source: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, source, msg, *args)

    def info(self, source: str, msg: str, *args: Any) -> None:
        self.log(logging.INFO, source, msg, *args)

    def exception(self, source: str, msg: str, *args: Any) -> None:
        """An error with its traceback (the traceback counts as the line; suppressed ones lose theirs)."""
        self.log(logging.ERROR, source, msg, *args, exc_info=True)

    def flush(self, level: int = logging.WARNING) -> None:
        """Writes the summaries of windows that are over (also done by itself under a running event loop)."""
        self._flush_scheduled = False
        for source, n in self.budget.due(self.clock()):
            self._summary(level, source, n)
        if self.budget.pending():
            self._schedule_flush(level)

    def _summary(self, level: int, source: str, n: int) -> None:
        self.logger.log(level, "suppressed %d similar line%s from %s", n, "" if n == 1 else "s", source)

    def _schedule_flush(self, level: int) -> None:
        """When a flood stops, its summary is still written: a flush once the window is over."""
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the summary comes with the source's next line or an explicit flush()
        self._flush_scheduled = True
        loop.call_later(self.budget.window_s, self.flush, level)


def clip(text: object, n: int = 80) -> str:
    """A peer-chosen value for a log line: control and non-ASCII characters escaped, cut to ``n``
    characters, so that it can neither forge lines nor flood them."""
    s = text if isinstance(text, str) else repr(text)
    cut, more = s[:n], len(s) > n
    s = "".join(c if c.isascii() and c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return s + "..." if more else s
