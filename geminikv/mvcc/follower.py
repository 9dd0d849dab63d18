"""The follower: finds the rows the table has and this process has not applied, and
hands them to the applier (``applier.py``), which applies them strictly in id order.

Rows arrive three ways: handed over by this process's writer right after commit, fetched
after a notification from another geminikv process (``listener.py``), and fetched by a
periodic poll (rows from writers that send no notification, such as Go Kine). A missing
id below a visible one is a gap (``gaps.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from geminikv import tasks
from geminikv.config import (
    FOLLOWER_FETCH_LIMIT,
    FOLLOWER_RETRY_MAX,
    FOLLOWER_RETRY_MIN,
    GAP_GRACE,
)
from geminikv.mvcc.applier import Applier
from geminikv.mvcc.compaction import Compaction
from geminikv.mvcc.gaps import Gap, Gaps
from geminikv.mvcc.lag import Lag
from geminikv.mvcc.listener import Listener
from geminikv.mvcc.rewind import Rewind
from geminikv.storage import kine, notify
from geminikv.storage.rows import Row

log = logging.getLogger(__name__)

_NO_UPPER = 2**62


class Follower:
    def __init__(
        self,
        pool: asyncpg.Pool,
        applier: Applier,
        lag: Lag,
        compaction: Compaction,
        gaps: Gaps,
        rewind: Rewind,
        writer_pid: Callable[[], int | None],
        poll_interval: float = 1.0,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        fetch_limit: int = FOLLOWER_FETCH_LIMIT,
        on_alarms: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.applier = applier
        self.lag = lag
        self.compaction = compaction
        self.gaps = gaps
        self.rewind = rewind
        # the backend pid of this process's writer: its notifications are skipped, since
        # the writer hands its rows over itself (a batch whose answer was lost is still
        # fetched, by the writer's catch_up or the next poll)
        self._writer_pid = writer_pid
        self.poll_interval = poll_interval
        self.fetch_limit = fetch_limit
        self._on_alarms = on_alarms  # another process raised or cleared an alarm
        self.listener = Listener(pool, self._on_notice, connect)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refresh_compact = False

    @property
    def applied(self) -> int:
        return int(self.applier.index.rev)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.listener.start()
        await self.resume()

    async def stop(self) -> None:
        await self.pause()
        await self.listener.stop()
        self.applier.cancel_waiters()

    async def pause(self) -> None:
        """Stop finding and applying rows; notifications and linearizable reads go on (they
        learn of revisions this process then lags behind): how a test makes it fall behind."""
        await tasks.stop(self._task)
        self._task = None

    async def resume(self) -> None:
        self._task = asyncio.create_task(self._run(), name="follower")

    # -- public ------------------------------------------------------------------------

    def apply_local(self, rows: list[Row]) -> None:
        """Rows this process's writer has just committed (ascending ids)."""
        self.applier.add(rows)
        if rows:
            self.lag.learned(rows[-1].id)
        if self.applier.pending:
            self._wake.set()

    async def wait_for(self, rev: int) -> None:
        """Return once every row up to ``rev`` is applied (fetching them if need be)."""
        if self.applied >= rev:
            return
        self._wake.set()
        await self.applier.wait_for(rev)

    def catch_up(self) -> None:
        """Look for new rows now (e.g. a batch may have committed without its answer)."""
        self._wake.set()

    async def pause_notifications(self) -> None:
        """Stop hearing other processes' notifications (the poll and reads go on): how a
        test makes a process fall behind."""
        await self.listener.pause()

    # -- internals ---------------------------------------------------------------------

    def _on_notice(self, pid: int, notice: notify.Notice) -> None:
        kind, rev = notice
        if kind is notify.Kind.COMPACTED:
            assert rev is not None
            self.compaction.physically_compacted(rev)
            return
        if kind is notify.Kind.COMPACT:
            self._refresh_compact = True
            self._wake.set()
            return
        if kind is notify.Kind.ALARMS:
            self._on_alarms()
            return
        if pid == self._writer_pid():
            return
        if rev is None:
            rev = _NO_UPPER
        else:
            self.lag.learned(rev)
        if rev > self.applied:
            self._wake.set()

    async def _run(self) -> None:
        retry = FOLLOWER_RETRY_MIN
        while True:
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                self._refresh_compact = True  # the poll also picks up other processes' compactions
            self._wake.clear()
            try:
                if not self.listener.listening:
                    await self.listener.listen_again()
                if self._refresh_compact:
                    self._refresh_compact = False
                    await self.compaction.refresh()
                await self._fetch()
                retry = FOLLOWER_RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if retry == FOLLOWER_RETRY_MIN:
                    log.warning("follower: fetching new rows failed (%s); retrying", err)
                # soon at first (a failover's new primary is usually there already),
                # then every FOLLOWER_RETRY_MAX while PostgreSQL stays away
                await asyncio.sleep(retry)
                retry = min(retry * 2, FOLLOWER_RETRY_MAX)
                await self.listener.listen_again()
                self._wake.set()

    async def _fetch(self) -> None:
        applier = self.applier
        while True:
            async with self.pool.acquire() as conn:
                # whole revisions: the index never holds part of a request
                rows, more = await kine.revisions_after(
                    conn, self.applied, _NO_UPPER, self.fetch_limit
                )
            applier.add(rows)
            if rows:
                self.lag.learned(rows[-1].id)
            if applier.pending:
                gap = self.applied + 1
                found, compacted = await self.gaps.found(gap, min(applier.pending) - 1)
                if found is Gap.FILLED:
                    continue
                if found is Gap.COMPACTED:
                    self.rewind.behind_compaction(gap, compacted)
                else:
                    asyncio.get_running_loop().call_later(GAP_GRACE / 2, self._wake.set)
                return
            self.gaps.clear()
            if not more:
                return
