"""Letting a batch fill up under load before it goes to PostgreSQL.

Clients of a busy server send again soon after being answered, so about as many requests
as the last batch had are expected shortly. Waiting for them (at most ``wait`` seconds)
makes fewer, larger batches: one statement and one wake-up of PostgreSQL and of this
process for many requests, which is what bounds throughput on a loaded machine. After a
batch of one (a lone client) there is no wait at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Gather:
    def __init__(self, wait: float, limit: int) -> None:
        self.wait = wait
        self.limit = limit
        self._last = 1
        self._want = 0
        self._filled: asyncio.Future[None] | None = None

    def arrived(self, queued: int, urgent: bool = False) -> None:
        """A request was queued; ``queued`` are now waiting (the batch's first excluded).
        An ``urgent`` one sends the batch at once."""
        filled = self._filled
        if filled is not None and (urgent or queued >= self._want) and not filled.done():
            filled.set_result(None)

    async def fill(self, queued: Callable[[], int]) -> None:
        """Return once ``queued()`` reaches the last batch's size less one, or on time-out."""
        want = min(self._last, self.limit) - 1
        if want <= 0 or self.wait <= 0 or queued() >= want:
            return
        loop = asyncio.get_running_loop()
        self._filled = filled = loop.create_future()
        self._want = want
        timer = loop.call_later(self.wait, _finish, filled)
        try:
            await filled
        finally:
            timer.cancel()
            self._filled = None

    def taken(self, size: int) -> None:
        """The batch that went out had ``size`` requests."""
        self._last = size


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
