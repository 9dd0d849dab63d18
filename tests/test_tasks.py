"""Stopping background tasks: a task that lets a cancellation pass still ends.

Python 3.11's ``asyncio.wait_for`` returns the result instead of raising when the task is
cancelled just as what it waits for completes; a background loop around it then goes on,
and a shutdown that cancelled it once waited forever (seen as a server that could not
listen and never exited)."""

from __future__ import annotations

import asyncio
import sys
import time

from geminikv import tasks


async def test_a_task_whose_wait_for_dropped_the_cancellation_is_stopped() -> None:
    loop = asyncio.get_running_loop()
    awaited: list[asyncio.Future[None]] = []

    async def background() -> None:
        while True:
            awaited.append(loop.create_future())
            await asyncio.wait_for(awaited[-1], 10)

    task = asyncio.create_task(background())
    await asyncio.sleep(0)  # it waits for the first future
    awaited[-1].set_result(None)  # which completes as the task is cancelled
    started = time.monotonic()
    await asyncio.wait_for(tasks.stop(task), 10)
    assert task.cancelled()
    # on 3.11 the first cancellation was dropped and the loop went round again
    assert len(awaited) == (2 if sys.version_info < (3, 12) else 1)
    assert time.monotonic() - started < 5


async def test_stop_raises_what_the_task_failed_with() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    try:
        await tasks.stop(task)
    except RuntimeError as err:
        assert str(err) == "cleanup failed"
    else:
        raise AssertionError("stop() swallowed the task's error")


async def test_stopping_nothing_or_a_finished_task_returns() -> None:
    await tasks.stop(None)
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await tasks.stop(task)
    assert task.done() and not task.cancelled()
