"""Small asyncio rules the package keeps in one place.

- :func:`stop_task`: cancel a task we own and wait for its end, without swallowing a cancellation that is
  the caller's own (``contextlib.suppress(CancelledError)`` around ``await task`` does: a caller cancelled
  while it waits would carry on as if nothing happened).
- :class:`TaskOwner`: the one TaskGroup of an object whose tasks start from callbacks (a serving node, mDNS
  discovery), instead of a hand-made set of tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


async def stop_task(task: asyncio.Future[Any]) -> None:
    """Cancels ``task`` and waits until it has ended. The task's own cancellation is what we asked for and
    ends quietly; its other errors propagate. A cancellation of the *caller* while it waits propagates too,
    once the task has ended. (It is told apart by where it arrives, not by ``cancelling()``: a caller
    cleaning up after its own cancellation still has that count up, and must still stop its tasks quietly.)"""
    task.cancel()
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait({task})  # the task was told to stop: see it end, then pass the cancellation on
        raise
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


class TaskOwner:
    """One :class:`asyncio.TaskGroup` for an object whose tasks start from callbacks and handlers (a message
    arrived, a plan came), not from one ``async with`` block: the group is held open by a task of its own from
    ``__aenter__`` until ``__aexit__`` (or :meth:`stop`), which cancels every task in it and waits for their end.

    A task's failure is logged and costs only itself (one request's task must not end the others); once the
    owner is stopping, :meth:`spawn` starts nothing and hands back a cancelled future in its place.
    """

    def __init__(self, log: logging.Logger, name: str) -> None:
        self._log, self._name = log, name
        self._tg: asyncio.TaskGroup | None = None
        self._holder: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TaskOwner:
        up = asyncio.Event()
        self._holder = asyncio.get_running_loop().create_task(self._hold(up), name=self._name)
        try:
            await up.wait()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Cancels every task and waits for their end (again: nothing more to do)."""
        if self._holder is not None:
            await stop_task(self._holder)

    async def _hold(self, up: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            up.set()
            try:
                await asyncio.Event().wait()
            finally:
                self._tg = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Future[Any]:
        if self._tg is None:
            coro.close()
            self._log.debug("%s: not starting %s: stopping", self._name, name or coro)
            stand_in: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            stand_in.cancel()
            return stand_in
        return self._tg.create_task(self._logged(coro), name=name)

    async def _logged(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await coro
        except Exception:
            self._log.exception("%s: a task failed", self._name)
            return None
