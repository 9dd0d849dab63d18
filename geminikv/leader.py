"""The one process that runs background duties for the whole cluster.

Lease expiry and compaction must each run in exactly one process at a time. The process
holding a PostgreSQL session advisory lock runs them; if it dies its session ends, the
lock is released, and another process takes over within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from geminikv import metrics, tasks
from geminikv.config import LEADER_MAX_SLEEP, LEADER_RETRY_LOCK
from geminikv.storage import locks

log = logging.getLogger(__name__)

# A duty runs once and returns how many seconds it may sleep before running again.
Duty = Callable[[], Awaitable[float]]


class Leader:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        duties: Sequence[Duty],
        on_change: Sequence[Callable[[bool], None]],
        wake: asyncio.Event | None = None,
    ) -> None:
        self._connect = connect
        self.duties = tuple(duties)
        self.on_change = tuple(on_change)  # told when this process starts or stops leading
        self.is_leader = False
        # set to run the duties now (e.g. by a compaction, before the leader exists)
        self._wake = asyncio.Event() if wake is None else wake
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader")

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None

    def _set(self, leading: bool) -> None:
        self.is_leader = leading
        metrics.LEADER.set(1 if leading else 0)
        for callback in self.on_change:
            callback(leading)

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                while not await locks.try_leader_lock(conn):
                    await asyncio.sleep(LEADER_RETRY_LOCK)
                log.info("this process now runs lease expiry and compaction")
                self._set(True)
                while True:
                    waits = [await duty() for duty in self.duties]
                    await locks.ping(conn)  # the lock lives as long as this session
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), max(0.01, min([LEADER_MAX_SLEEP, *waits]))
                        )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # str() of a statement timeout (--compact-timeout) is empty: name it
                log.warning("background duties interrupted (%r); retrying", err)
                await asyncio.sleep(LEADER_RETRY_LOCK)
            finally:
                if self.is_leader:
                    self._set(False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
