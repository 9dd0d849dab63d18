"""The one process that runs background duties for the whole cluster.

Lease expiry and compaction must each run in exactly one process at a time. The process
holding a PostgreSQL session advisory lock runs them; if it dies its session ends, the
lock is released, and another process takes over within a second. After a failover of
PostgreSQL the old session is gone with the old primary, and the lock is taken again on
the new one (by this process or another).

Taking the lock is etcd's leader change: the ``promote`` steps run first, on the lock's
session, before any duty (leases get their TTL again, as etcd's Lessor.Promote, so none
expires because of the outage). A duty that fails is retried while the session lives;
only a lost session ends the leadership (each new one renews every lease).
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
# A step run once on taking the lock, on the lock's session, before any duty.
Promote = Callable[[asyncpg.Connection], Awaitable[None]]


class Leader:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        duties: Sequence[Duty],
        on_change: Sequence[Callable[[bool], None]],
        wake: asyncio.Event | None = None,
        promote: Sequence[Promote] = (),
    ) -> None:
        self._connect = connect
        self.duties = tuple(duties)
        self.promote = tuple(promote)
        self.on_change = tuple(on_change)  # told when this process starts or stops leading
        self.is_leader = False
        # set to run the duties now (e.g. by a compaction, before the leader exists)
        self._wake = asyncio.Event() if wake is None else wake
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._lead(), name="leader")

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None

    def _set(self, leading: bool) -> None:
        self.is_leader = leading
        metrics.LEADER.set(1 if leading else 0)
        for callback in self.on_change:
            callback(leading)

    async def _run_duty(self, duty: Duty) -> float:
        """Seconds until ``duty`` wants to run again; a failure is logged and retried
        (keeping the lock: letting it go would renew every lease at the next take-over)."""
        try:
            return await duty()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # str() of a statement timeout (--compact-timeout) is empty: name it
            log.warning("background duty %s failed (%r); retrying", duty.__qualname__, err)
            return LEADER_RETRY_LOCK

    async def _lead(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                while not await locks.try_leader_lock(conn):
                    await asyncio.sleep(LEADER_RETRY_LOCK)
                for step in self.promote:
                    await step(conn)
                log.info("this process now runs lease expiry and compaction")
                self._set(True)
                while True:
                    waits = [await self._run_duty(duty) for duty in self.duties]
                    await locks.ping(conn)  # the lock lives as long as this session
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.01, min([LEADER_MAX_SLEEP, *waits]))):
                            await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("leader session lost (%r); taking the lock again", err)
                await asyncio.sleep(LEADER_RETRY_LOCK)
            finally:
                if self.is_leader:
                    self._set(False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
