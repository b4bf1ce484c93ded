"""Small asyncio rules the package keeps in one place.

- :func:`stop_task`: cancel a task we own and wait for its end, without swallowing a cancellation that is
  the caller's own (``contextlib.suppress(CancelledError)`` around ``await task`` does: a caller cancelled
  while it waits would carry on as if nothing happened).
"""

from __future__ import annotations

import asyncio
from typing import Any


async def stop_task(task: asyncio.Future[Any]) -> None:
    """Cancels ``task`` and waits until it has ended. The task's own cancellation is what we asked for and
    ends quietly; its other errors propagate; and if the *caller* is cancelled meanwhile (its
    ``cancelling()`` count is up), that cancellation propagates too."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
