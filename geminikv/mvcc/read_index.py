"""The read index: linearizable reads learn the newest committed revision from
PostgreSQL and wait until it is applied here (etcd's ReadIndex, with PostgreSQL as the
leader).

Concurrent readers share one query; a reader never joins a query that started before it
arrived, so the answer reflects every write committed before the read began.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from geminikv import errors
from geminikv.mvcc.applier import Applier
from geminikv.mvcc.gather import Gather
from geminikv.mvcc.lag import Lag
from geminikv.mvcc.listener import Listener
from geminikv.mvcc.rewind import Rewind
from geminikv.storage import kine
from geminikv.storage.database import CONNECTION_ERRORS


class ReadIndex:
    def __init__(
        self,
        listener: Listener,
        applier: Applier,
        lag: Lag,
        rewind: Rewind,
        wait_for: Callable[[int], Awaitable[None]],
        wake: Callable[[], None],
        batch_wait: float,
    ) -> None:
        self.listener = listener
        self.applier = applier
        self.lag = lag
        self.rewind = rewind
        self._wait_for = wait_for  # the follower's: fetches what is not applied yet
        self._wake = wake  # the follower: listen again after a failure
        self._waiters: list[asyncio.Future[int]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self.gather = Gather(batch_wait, 1 << 30)
        self._urgent = False
        self._loop = asyncio.get_running_loop()
        # serializable reads: no query, but answered in groups all the same
        self._local: list[asyncio.Future[None]] = []
        self._local_gather = Gather(batch_wait, 1 << 30)
        self._local_task: asyncio.Task[None] | None = None

    async def together(self) -> None:
        """A serializable read's turn: it reads the index as it is, but with the reads that
        arrive meanwhile, as linearizable ones wait for their shared query. gRPC then
        sends their answers together, in fewer writes and thread wake-ups per call: a
        serializable get answered at once cost ~200 µs of CPU here, one in a group ~130
        (README, Performance)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._local.append(fut)
        self._local_gather.arrived(len(self._local) - 1)
        if self._local_task is None:
            self._local_task = asyncio.create_task(self._answer_local(), name="local-reads")
        await fut

    async def _answer_local(self) -> None:
        try:
            while self._local:
                await self._local_gather.fill(lambda: len(self._local) - 1)
                waiters, self._local = self._local, []
                self._local_gather.taken(len(waiters))
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._local_task = None

    async def read(self, urgent: bool = False) -> int:
        """The newest committed revision in PostgreSQL, applied locally before returning.

        An ``urgent`` caller (an expensive read, such as a list page, which gains little
        from sharing and pays any wait once per page) sends the query without waiting.
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append(fut)
        self.gather.arrived(len(self._waiters) - 1, urgent)
        self._urgent = self._urgent or urgent
        if not self._running:
            self._running = True
            self._task = asyncio.create_task(self._loop_reads(), name="read-index")
        rev = await fut
        if self.applier.applied < rev:
            await self._wait_for(rev)
        return rev

    async def _loop_reads(self) -> None:
        try:
            while self._waiters:
                if not self._urgent:
                    await self.gather.fill(lambda: len(self._waiters) - 1)
                self._urgent = False
                waiters, self._waiters = self._waiters, []
                self.gather.taken(len(waiters))
                try:
                    rev = await self._query()
                except Exception as err:  # handed to every waiting reader
                    if not isinstance(err, errors.EtcdError) and self.listener.conn is not None:
                        self.listener.broken()  # start afresh
                        self._wake()  # the follower listens again
                    if not isinstance(err, (*CONNECTION_ERRORS, errors.EtcdError)):
                        err = ConnectionError(f"PostgreSQL read failed: {err}")
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(rev)
        finally:
            self._running = False

    async def _query(self) -> int:
        # On the LISTEN connection: idle otherwise, and no pool round trip.
        conn = self.listener.conn
        if conn is None:
            raise ConnectionError("PostgreSQL connection lost")
        # Rows applied while the query runs may be newer than its answer: only what was
        # applied before it started must be in the table.
        floor = self.applier.applied
        rev = await kine.confirmed_rev(conn)
        self.rewind.check(rev, floor)
        self.lag.learned(rev)
        return rev
