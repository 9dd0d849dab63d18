"""The writer: turns concurrent write requests into batches, one PostgreSQL txn each.

Usually a batch is evaluated against the index as it stands and sent in one round trip
(``geminikv_write_v3``, autocommit): under the cluster-wide advisory lock PostgreSQL checks
that the table holds no row the index lacks and that the leases keys are attached to are
live, then inserts and notifies. Otherwise (another process wrote, a lease is gone, a lease
is revoked) the batch takes the lock first, makes sure the index has every committed row,
evaluates each request in order against the index plus the batch's earlier writes,
inserts all rows with one statement, notifies and commits. Callers
are answered once the follower has applied their rows (read-your-writes).

Row ids are drawn from Kine's sequence after evaluation. The evaluation first assumes
they follow the newest id; if the sequence hands out others (ids burned by a rollback,
or taken by Go Kine) the batch is evaluated again with the real ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import asyncpg

from geminikv import errors, metrics, tasks
from geminikv.config import WRITER_MAX_BATCH, WRITER_RECONNECT_MAX_DELAY
from geminikv.mvcc.follower import Follower
from geminikv.mvcc.gather import Gather
from geminikv.mvcc.index import Index
from geminikv.mvcc.rewind import Rebuilding, Rewind
from geminikv.mvcc.txn import Evaluator, Leases
from geminikv.mvcc.values import Values
from geminikv.mvcc.view import BatchView, OutOfIds, gap_row
from geminikv.storage import kine, leases, locks, notify
from geminikv.storage.database import CONNECTION_ERRORS
from geminikv.storage.queries import MAX_LEASE_ID
from geminikv.storage.rows import NewRow
from geminikv.storage.session import Session

log = logging.getLogger(__name__)


# An operation: evaluated against the view, returns the caller's response.
Operation = Callable[[Evaluator], Awaitable[Any]]


@dataclass(slots=True)
class _Request:
    operation: Operation
    future: asyncio.Future[Any]
    leases: Collection[int] = ()  # keys may be attached to these
    revokes: Collection[int] = ()  # these may be revoked
    result: Any = None
    error: BaseException | None = None


class BatchLeases:
    """Leases read with FOR UPDATE at the start of a batch: id → milliseconds left."""

    def __init__(self, remaining: dict[int, int]) -> None:
        self._remaining = remaining

    def exists(self, lease_id: int) -> bool:
        left = self._remaining.get(lease_id)
        return left is not None and left > 0

    def remaining_ms(self, lease_id: int) -> int | None:
        return self._remaining.get(lease_id)

    def forget(self, lease_id: int) -> None:
        self._remaining.pop(lease_id, None)

    def copy(self) -> BatchLeases:
        """A fresh copy for one evaluation pass (revokes forget leases as they go)."""
        return BatchLeases(dict(self._remaining))


class LiveLeases:
    """The one-round-trip path's leases: every lease a request names is taken to be live,
    and ``write_batch`` checks under the lock that the ones used are (else the batch
    takes the locked path). Revoking batches never come here."""

    def __init__(self, named: set[int]) -> None:
        # no other id can be granted (nor stored in Kine's lease column)
        self._named = {lease for lease in named if 0 < lease <= MAX_LEASE_ID}
        self.used: set[int] = set()

    def exists(self, lease_id: int) -> bool:
        if lease_id not in self._named:
            return False
        self.used.add(lease_id)
        return True

    def remaining_ms(self, lease_id: int) -> int | None:
        raise AssertionError("revokes take the locked path")

    def forget(self, lease_id: int) -> None:
        raise AssertionError("revokes take the locked path")


class Writer:
    def __init__(
        self,
        session: Session,
        index: Index,
        follower: Follower,
        rewind: Rewind,
        rebuilding: Rebuilding,
        values: Values,
        batch_wait: float,
    ) -> None:
        self.session = session
        self.index = index
        self.follower = follower
        self.rewind = rewind
        self.rebuilding = rebuilding
        self.values = values
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._last_id = 0
        self._generation = rebuilding.generation
        self._answering: set[asyncio.Task[None]] = set()
        self._gather = Gather(batch_wait, WRITER_MAX_BATCH)
        # Python 3.11's get_running_loop() makes a getpid() system call: once here, not per call.
        self._loop = asyncio.get_running_loop()

    @property
    def conn(self) -> asyncpg.Connection:
        return self.session.conn

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="writer")

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None
        while not self._queue.empty():
            req = self._queue.get_nowait()
            if not req.future.done():
                req.future.set_exception(errors.ServerStopped())

    async def submit(
        self, operation: Operation, leases: Collection[int] = (), revokes: Collection[int] = ()
    ) -> Any:
        """Run ``operation`` in the next batch; it may attach keys to ``leases`` and
        revoke ``revokes``."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put_nowait(_Request(operation, fut, leases, revokes))
        self._gather.arrived(self._queue.qsize())
        return await fut

    # -- the batch loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            try:
                await self._fill(batch)
                last = await self._run_batch(batch)
            except asyncio.CancelledError:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(errors.ServerStopped())
                raise
            except Exception as err:
                log.warning("write batch of %d failed: %s", len(batch), err)
                self.follower.catch_up()  # it may have committed all the same
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(_as_etcd_error(err))
                # a one-round-trip batch sent on a connection left in a transaction
                # would answer before committing
                # (or lost, or timed out: its outcome unknown, the connection not reusable)
                if self.session.unusable() or isinstance(err, CONNECTION_ERRORS):
                    self.conn.terminate()
                    await self._reconnect()
                continue
            if self.follower.applied >= last:
                _answer(batch)
            else:
                task = asyncio.create_task(self._answer_when_applied(batch, last))
                self._answering.add(task)  # held until done (the loop keeps weak refs)
                task.add_done_callback(self._answering.discard)

    async def _fill(self, batch: list[_Request]) -> None:
        """Take the queued requests into ``batch`` (under load, once more have come)."""
        await self._gather.fill(self._queue.qsize)
        while len(batch) < WRITER_MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._gather.taken(len(batch))

    async def _reconnect(self) -> None:
        """PostgreSQL went away: fail what waits (clients retry), reconnect with backoff."""
        delay = 0.2
        while True:
            while not self._queue.empty():
                req = self._queue.get_nowait()
                if not req.future.done():
                    req.future.set_exception(errors.Unavailable())
            if not self.session.can_reconnect:
                raise errors.Unavailable()
            try:
                await self.session.reconnect()
                log.info("writer reconnected to PostgreSQL")
                return
            except Exception as err:
                log.warning("writer: PostgreSQL still unavailable (%s); retrying", err)
                await asyncio.sleep(delay)
                # capped low: PostgreSQL back after a restart (or a standby promoted)
                # should mean writes back within a second; an attempt costs nothing
                delay = min(delay * 2, WRITER_RECONNECT_MAX_DELAY)

    async def _answer_when_applied(self, batch: list[_Request], last: int) -> None:
        try:
            await self.follower.wait_for(last)
        except asyncio.CancelledError:
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(errors.ServerStopped())
            raise
        _answer(batch)

    async def _run_batch(self, batch: list[_Request]) -> int:
        """Evaluate and commit one batch; returns the last revision the callers must see."""
        metrics.WRITER_BATCH.observe(len(batch))
        if self.conn.is_closed() and self.session.can_reconnect:
            # dropped by the heartbeat (the primary is gone): one attempt at the new one
            await self.session.reconnect()
        if self._generation != self.rebuilding.generation:
            # the index was rebuilt: forget the last id drawn (only a guess anyway)
            self._generation = self.rebuilding.generation
            self._last_id = 0
        if (
            self._last_id <= self.follower.applied
            and not self.conn.is_in_transaction()  # autocommit is what makes it durable
            and not any(req.revokes for req in batch)
        ):
            last = await self._run_batch_at_once(batch)
            if last is not None:
                return last
        return await self._run_batch_locked(batch)

    async def _run_batch_at_once(self, batch: list[_Request]) -> int | None:
        """The common case in one round trip: evaluate against the index as it is, then
        let ``write_batch`` check under the lock that the table holds nothing newer and
        insert. None when it did (another process wrote, a lease used is gone, or the ids
        were taken): the caller evaluates again under the lock. Revoking batches delete
        lease rows, so they always take the locked path."""
        started = time.perf_counter()
        expected = self.follower.applied
        live = LiveLeases({lease for req in batch for lease in req.leases})
        view = await self._evaluate(batch, expected + 1, {}, live)
        rows = view.rows
        try:
            old_values = await kine.write_batch(self.conn, expected, live.used, rows)
        except kine.WriteRefused as refused:
            metrics.WRITER_RETRIES.labels(refused.reason).inc()
            return None
        if rows and not old_values:
            metrics.WRITER_RETRIES.labels("ids_taken").inc()
            return None
        metrics.WRITER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        if not rows:
            return view.rev
        self._last_id = rows[-1].id
        self.follower.apply_local([row.committed(old_values.get(row.id)) for row in rows])
        return rows[-1].id

    async def _run_batch_locked(self, batch: list[_Request]) -> int:
        """Lock first, catch up with the table, evaluate, insert, commit."""
        started = time.perf_counter()
        async with locks.locked(self.conn) as conn:
            current = await kine.current_rev(conn)
            # Under the writer lock every applied row is committed: current >= applied.
            self.rewind.check(current, self.follower.applied)
            await self.follower.wait_for(current)
            batch_leases = await self._leases(batch)
            view, rows = await self._evaluate_with_ids(
                batch, max(current, self._last_id) + 1, batch_leases
            )
            if rows:
                old_values = await kine.insert_rows(conn, rows)
                await notify.committed(conn, rows[-1].id)
            if view.revoked_leases:
                await leases.delete(conn, view.revoked_leases)
        metrics.WRITER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        if not rows:
            return view.rev
        self.follower.apply_local([row.committed(old_values.get(row.id)) for row in rows])
        return rows[-1].id

    async def _leases(self, batch: list[_Request]) -> BatchLeases:
        ids = sorted({lease for req in batch for lease in (*req.leases, *req.revokes)})
        if not ids:
            return BatchLeases({})
        return BatchLeases(await leases.remaining_for_update(self.conn, ids))

    async def _evaluate_with_ids(
        self, batch: list[_Request], guess: int, leases: BatchLeases
    ) -> tuple[BatchView, list[NewRow]]:
        """Evaluate the batch and draw its row ids; returns the view and the rows to insert.

        Ids drawn but not used (a re-evaluation needed fewer) become Kine gap rows, so the
        sequence of revisions stays gap-free for followers.
        """
        values: dict[int, bytes] = {}
        ids: int | list[int] = guess  # first, assume the ids follow the newest row
        drawn: list[int] = []
        while True:
            try:
                view = await self._evaluate(batch, ids, values, leases.copy())
            except OutOfIds:
                await self._draw(drawn, len(drawn) + 1)
                continue
            used = [row.id for row in view.rows]
            if not used:
                return view, []
            if len(drawn) < len(used):
                await self._draw(drawn, len(used) - len(drawn))
            if used == drawn[: len(used)]:
                gaps = [gap_row(rid) for rid in drawn[len(used) :]]
                return view, sorted(view.rows + gaps)
            ids = drawn

    async def _draw(self, drawn: list[int], count: int) -> None:
        drawn.extend(await kine.next_ids(self.conn, count))
        drawn.sort()
        self._last_id = drawn[-1]

    async def _evaluate(
        self,
        batch: list[_Request],
        ids: int | list[int],
        values: dict[int, bytes],
        leases: Leases,
    ) -> BatchView:
        view = BatchView(self.index, ids, self._fetch_values, values)
        evaluator = Evaluator(view, leases, int(self.index.compact_revision))
        for req in batch:
            mark = view.mark()
            try:
                req.result = await req.operation(evaluator)
                req.error = None
            except errors.EtcdError as err:
                view.rollback(mark)  # all or nothing
                req.result, req.error = None, err
        return view

    async def _fetch_values(self, ids: list[int]) -> dict[int, bytes]:
        # Inside the batch's transaction, on the writer's connection (the pool's
        # connections could be busy; the batch holds the lock until it commits).
        found = self.values.get_cached(ids)
        missing = [rid for rid in ids if rid not in found]
        if missing:
            found.update(await kine.values_by_id(self.conn, missing))
        return found


def _answer(batch: list[_Request]) -> None:
    for req in batch:
        if req.future.done():
            continue
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            req.future.set_result(req.result)


def _as_etcd_error(err: Exception) -> errors.EtcdError:
    if isinstance(err, errors.EtcdError):
        return err
    return errors.Unavailable()
