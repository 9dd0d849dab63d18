"""The follower: the only thing that applies rows to the index, strictly in id order.

Rows arrive three ways: handed over by this process's writer right after commit, fetched
after a NOTIFY from another geminikv process, and fetched by a periodic poll (rows from
writers that send no notification, such as Go Kine). A missing id below a visible one is
a gap: geminikv writers commit in id order, so it is either a Go Kine insert still in
flight or an id burned by a rolled-back transaction. After a short grace period it is
filled with Kine's ``gap-N`` row (kine.md §3.2); a late insert then fails and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg

from geminikv import errors, metrics, tasks
from geminikv.mvcc.events import Event
from geminikv.mvcc.gather import Gather
from geminikv.mvcc.index import Index, apply_row
from geminikv.mvcc.values import Values
from geminikv.storage import kine, notify
from geminikv.storage.database import CONNECTION_ERRORS
from geminikv.storage.rows import Row

log = logging.getLogger(__name__)

FETCH_LIMIT = 1000  # rows per catch-up query (Kine's --poll-batch-size)
GAP_GRACE = 0.05  # seconds a missing id may stay missing before it is filled
COMPACT_SLICE = 20_000  # superseded revisions dropped from the index per event-loop turn
LAG_MARKS = 1024  # (revision, first known) pairs kept for the lag-in-seconds metric
_NO_UPPER = 2**62


class Follower:
    def __init__(
        self,
        pool: asyncpg.Pool,
        index: Index,
        values: Values,
        poll_interval: float = 1.0,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        batch_wait: float = 0.0,
        fetch_limit: int = FETCH_LIMIT,
    ) -> None:
        self.pool = pool
        self.fetch_limit = fetch_limit
        # LISTEN needs a connection of its own; without a factory it comes from the pool.
        self._connect = connect
        self.index = index
        self.values = values
        self.poll_interval = poll_interval
        self.subscribers: list[Callable[[list[Event]], None]] = []
        self._pending: dict[int, Row] = {}
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        # Python 3.11's get_running_loop() makes a getpid() system call: once, not per read.
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._receiver = notify.Receiver(self._on_notice)
        self._gap_seen: tuple[int, float] | None = None
        self._read_waiters: list[asyncio.Future[int]] = []
        self._read_running = False
        self._read_task: asyncio.Task[None] | None = None
        self._read_gather = Gather(batch_wait, 1 << 30)
        self._read_urgent = False
        self._refresh_compact = False
        self.physical_rev = 0
        self._compact_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._compacting: asyncio.Task[None] | None = None
        # For the lag metrics: the newest committed revision known here, and when each
        # newer head became known, oldest first, while not yet applied.
        self._known = 0
        self._unapplied: deque[tuple[int, float]] = deque()
        # told when PostgreSQL's newest revision is below the applied one (see KVStore)
        self.on_rewind: Callable[[int], None] | None = None
        # told (missing revision, compact revision) when a missing row may have been
        # deleted by compaction before this process applied it (see KVStore)
        self.on_behind_compaction: Callable[[int, int], None] | None = None
        # the backend pid of this process's writer: its notifications are skipped, since
        # the writer hands its rows over itself (a batch whose answer was lost is still
        # fetched, by the writer's catch_up or the next poll)
        self.own_writer_pid: Callable[[], int | None] = lambda: None

    @property
    def applied(self) -> int:
        return int(self.index.rev)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._listen_conn = await self._new_listen_conn()
        await self._receiver.attach(self._listen_conn)
        self._task = asyncio.create_task(self._run(), name="follower")

    async def stop(self) -> None:
        await tasks.stop(self._compacting)
        await tasks.stop(self._task)
        self._task = None
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await self._receiver.detach(self._listen_conn)
                await self._close_listen_conn(self._listen_conn)
            self._listen_conn = None
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    async def pause_notifications(self) -> None:
        """Stop hearing other processes' notifications (the poll and reads go on): how a
        test makes a process fall behind."""
        if self._listen_conn is not None:
            await self._receiver.detach(self._listen_conn)

    # -- public ------------------------------------------------------------------------

    def apply_local(self, rows: list[Row]) -> None:
        """Rows this process's writer has just committed (ascending ids)."""
        for row in rows:
            if row.id > self.applied:
                self._pending[row.id] = row
        self._drain()
        if rows:
            self._learned(rows[-1].id)
        if self._pending:
            self._wake.set()

    async def wait_for(self, rev: int) -> None:
        """Return once every row up to ``rev`` is applied."""
        if self.applied >= rev:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(rev, []).append(fut)
        self._wake.set()
        await fut

    async def read_index(self, urgent: bool = False) -> int:
        """The newest committed revision in PostgreSQL, applied locally before returning.

        Concurrent callers share one query; a caller never joins a query that started
        before it arrived, so the answer reflects every write committed before the call.
        An ``urgent`` caller (an expensive read, such as a list page, which gains little
        from sharing and pays any wait once per page) sends the query without waiting.
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        self._read_waiters.append(fut)
        self._read_gather.arrived(len(self._read_waiters) - 1, urgent)
        self._read_urgent = self._read_urgent or urgent
        if not self._read_running:
            self._read_running = True
            self._read_task = asyncio.create_task(self._read_loop(), name="read-index")
        rev = await fut
        if self.applied < rev:
            await self.wait_for(rev)
        return rev

    async def _read_loop(self) -> None:
        try:
            while self._read_waiters:
                if not self._read_urgent:
                    await self._read_gather.fill(lambda: len(self._read_waiters) - 1)
                self._read_urgent = False
                waiters, self._read_waiters = self._read_waiters, []
                self._read_gather.taken(len(waiters))
                try:
                    # On the LISTEN connection: idle otherwise, and no pool round trip.
                    if self._listen_conn is None:
                        raise ConnectionError("PostgreSQL connection lost")
                    # Rows applied while the query runs may be newer than its answer:
                    # only what was applied before it started must be in the table.
                    floor = self.applied
                    rev = await kine.current_rev(self._listen_conn)
                    self.check_not_rewound(rev, floor)
                    self._learned(rev)
                except Exception as err:  # handed to every waiting reader
                    if not isinstance(err, errors.EtcdError) and self._listen_conn is not None:
                        # e.g. asyncpg's "another operation is in progress" on a
                        # connection broken mid-query by an outage: start afresh
                        self._listen_conn.terminate()
                        self._wake.set()  # the follower listens again
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
            self._read_running = False

    def check_not_rewound(self, newest: int, applied: int) -> None:
        """``newest`` is PostgreSQL's newest revision, read after ``applied`` was applied
        here: if it is lower, the database has lost revisions this process served."""
        if newest < applied:
            if self.on_rewind is not None:
                self.on_rewind(newest)
            raise errors.Rewound()

    def reset(self, message: str = errors.Rewound.message) -> None:
        """Forget everything applied (before the index is rebuilt from the table); who
        waits for a revision fails with Unavailable and ``message``."""
        self._pending.clear()
        self._gap_seen = None
        self.physical_rev = 0
        self._known = 0
        self._unapplied.clear()
        self._report_lag()
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(errors.Rewound(message))
        self._waiters.clear()

    async def wait_compacted(self, rev: int) -> None:
        """Return once the rows a compaction at ``rev`` made unreachable are deleted."""
        if self.physical_rev >= rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._compact_waiters.append((rev, fut))
        await fut

    def _physically_compacted(self, rev: int) -> None:
        """The leader deleted the rows: drop the same history from the index."""
        if rev <= self.physical_rev:
            return
        self.physical_rev = rev
        if rev > self.index.compact_rev:
            self.index.compact_rev = rev
        waiting = self._compact_waiters
        self._compact_waiters = [(r, f) for r, f in waiting if r > rev]
        for r, fut in waiting:
            if r <= rev and not fut.done():
                fut.set_result(None)
        if self._compacting is None or self._compacting.done():
            self._compacting = asyncio.create_task(self._compact_index(), name="index-compaction")

    async def _compact_index(self) -> None:
        # In slices, so reads and writes keep being served meanwhile.
        while not self.index.compact(self.physical_rev, COMPACT_SLICE):
            await asyncio.sleep(0)

    # -- internals ---------------------------------------------------------------------

    def catch_up(self) -> None:
        """Look for new rows now (e.g. a batch may have committed without its answer)."""
        self._wake.set()

    def _on_notice(self, pid: int, notice: notify.Notice) -> None:
        kind, rev = notice
        if kind is notify.Kind.COMPACTED:
            assert rev is not None
            self._physically_compacted(rev)
            return
        if kind is notify.Kind.COMPACT:
            self._refresh_compact = True
            self._wake.set()
            return
        if pid == self.own_writer_pid():
            return
        if rev is None:
            rev = _NO_UPPER
        else:
            self._learned(rev)
        if rev > self.applied:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                self._refresh_compact = True  # the poll also picks up other processes' compactions
            self._wake.clear()
            try:
                if self._listen_conn is None or self._listen_conn.is_closed():
                    await self._listen_again()
                if self._refresh_compact:
                    self._refresh_compact = False
                    await self._read_compact_rev()
                await self._fetch()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("follower: fetching new rows failed (%s); retrying", err)
                await asyncio.sleep(0.5)
                await self._listen_again()
                self._wake.set()

    async def _new_listen_conn(self) -> asyncpg.Connection:
        if self._connect is not None:
            return await self._connect()
        return await self.pool.acquire()

    async def _close_listen_conn(self, conn: asyncpg.Connection) -> None:
        if self._connect is not None:
            await conn.close()
        else:
            await self.pool.release(conn)

    async def _listen_again(self) -> None:
        """After an outage the LISTEN connection is gone: open a new one."""
        conn = self._listen_conn
        if conn is not None and not conn.is_closed():
            return
        self._listen_conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._close_listen_conn(conn)
        try:
            fresh = await self._new_listen_conn()
            await self._receiver.attach(fresh)
        except Exception as err:
            log.warning("follower: cannot listen yet (%s)", err)
            return
        self._listen_conn = fresh
        log.info("follower listening again")

    async def _read_compact_rev(self) -> None:
        async with self.pool.acquire() as conn:
            rev = await kine.compact_rev(conn)
        if rev > self.index.compact_rev:
            self.index.compact_rev = rev

    async def _fetch(self) -> None:
        while True:
            async with self.pool.acquire() as conn:
                records = await kine.rows_after(conn, self.applied, _NO_UPPER, self.fetch_limit)
            for r in records:
                if r.id > self.applied:
                    self._pending[r.id] = r
            self._drain()
            if records:
                self._learned(records[-1].id)
            if self._pending:
                if await self._gap_waits():
                    return
                continue
            self._gap_seen = None
            if len(records) < self.fetch_limit:
                return

    async def _gap_waits(self) -> bool:
        """A gap at applied+1: True if we should wait for it, False if it was just filled."""
        gap = self.applied + 1
        now = time.monotonic()
        if self._gap_seen is None or self._gap_seen[0] != gap:
            self._gap_seen = (gap, now)
        if now - self._gap_seen[1] < GAP_GRACE:
            asyncio.get_running_loop().call_later(GAP_GRACE / 2, self._wake.set)
            return True
        async with self.pool.acquire() as conn:
            compacted = await kine.compact_rev(conn)
            if gap <= compacted:
                # not a burned id to fill: compaction may have deleted the row (and with
                # it a delete this index would never see)
                if self.on_behind_compaction is not None:
                    self.on_behind_compaction(gap, compacted)
                self._gap_seen = None
                return True
            log.info("filling gap at revision %d", gap)
            await kine.fill_gap(conn, gap)
        self._gap_seen = None
        return False

    def _drain(self) -> None:
        """Apply every pending row that directly follows the applied revision."""
        events: list[Event] = []
        pending = self._pending
        while pending:
            row = pending.pop(self.applied + 1, None)
            if row is None:
                break
            rid, name, created, deleted, create_rev, prev_rev, lease, version, value, old = row
            if value is not None and not deleted:
                self.values.remember(rid, value)
            applied = apply_row(
                self.index, rid, name, created, deleted, create_rev, prev_rev, lease, version
            )
            if applied is not None and self.subscribers:
                key, prev = applied
                latest = self.index.latest(key)
                assert latest is not None  # the row was just applied
                events.append(
                    Event(
                        rid,
                        key,
                        bool(deleted),
                        latest[1],
                        latest[2],
                        latest[3],
                        None if deleted else (value or b""),
                        prev,
                        (old or b"") if prev is not None else None,
                    )
                )
        # Rows at or below the applied revision (seen twice) are dropped.
        for rid in [r for r in pending if r <= self.applied]:
            del pending[rid]
        if events:
            for subscriber in self.subscribers:
                subscriber(events)
        if self._unapplied:
            self._report_lag()
        self._release_waiters()

    def _learned(self, rev: int) -> None:
        """``rev`` is committed in PostgreSQL: note when it became known, for the lag."""
        marks = self._unapplied
        if rev > self._known:
            self._known = rev
            if rev > self.applied:
                if len(marks) < LAG_MARKS:
                    marks.append((rev, time.monotonic()))
                else:
                    # merged into the newest mark, whose older time can only overstate lag
                    marks[-1] = (rev, marks[-1][1])
        if marks:
            self._report_lag()  # also refreshes the seconds of a follower that is stuck

    def _report_lag(self) -> None:
        applied = self.applied
        marks = self._unapplied
        while marks and marks[0][0] <= applied:
            marks.popleft()
        # the oldest unapplied revision, applied + 1, became known with the first mark above
        metrics.FOLLOWER_LAG.set(max(0, self._known - applied))
        metrics.FOLLOWER_LAG_SECONDS.set(time.monotonic() - marks[0][1] if marks else 0.0)

    def _release_waiters(self) -> None:
        if not self._waiters:
            return
        applied = self.applied
        for rev in [r for r in self._waiters if r <= applied]:
            for fut in self._waiters.pop(rev):
                if not fut.done():
                    fut.set_result(None)
