"""Small helpers for the background tasks every component runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from geminikv.config import TASK_CANCEL_AGAIN


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished (its exception, other than
    the cancellation, raised here). A task that lets a cancellation pass is cancelled again:
    Python 3.11's ``asyncio.wait_for`` drops one when what it waits for completes at that
    moment (as in asyncpg), and the task's loop then goes on."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=TASK_CANCEL_AGAIN)
    with contextlib.suppress(asyncio.CancelledError):
        await task


_spawned: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` in the background, held until done (the loop keeps only weak refs)."""
    task = asyncio.get_running_loop().create_task(coro)
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)
