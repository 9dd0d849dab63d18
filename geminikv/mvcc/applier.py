"""Applying rows to the index, strictly in id order, and telling who waits for them.

Rows may arrive out of order and more than once (the writer's hand-over, fetches after
a notification, the poll): they wait in ``pending`` until every lower id is applied.
Each applied group of rows becomes events for the subscribers (the watch hub, lease
expiry of Go Kine's TTL keys).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from geminikv import errors
from geminikv.mvcc.events import Event
from geminikv.mvcc.index import Index, apply_row
from geminikv.mvcc.lag import Lag
from geminikv.mvcc.values import Values
from geminikv.storage.rows import CREATE, LEASE, VERSION, Row

Subscriber = Callable[[list[Event]], None]


class Applier:
    def __init__(
        self, index: Index, values: Values, lag: Lag, subscribers: Sequence[Subscriber] = ()
    ) -> None:
        self.index = index
        self.values = values
        self.lag = lag
        # a list: the watch hub still subscribes itself (see watch/hub.py)
        self.subscribers: tuple[Subscriber, ...] = tuple(subscribers)
        self.pending: dict[int, Row] = {}
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        # Python 3.11's get_running_loop() makes a getpid() system call: once, not per read.
        self._loop = asyncio.get_running_loop()

    @property
    def applied(self) -> int:
        return int(self.index.rev)

    def add(self, rows: Iterable[Row]) -> None:
        """Apply ``rows`` (ascending ids) as far as they follow the applied revision; keep
        the rest pending."""
        applied = self.applied
        pending = self.pending
        for row in rows:
            if row.id > applied:
                pending[row.id] = row
        self._drain()

    async def wait_for(self, rev: int) -> None:
        """Return once every row up to ``rev`` is applied."""
        if self.applied >= rev:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(rev, []).append(fut)
        await fut

    def reset(self, message: str) -> None:
        """Forget everything pending (before the index is rebuilt from the table); who
        waits for a revision fails with Unavailable and ``message``."""
        self.pending.clear()
        self.lag.reset()
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(errors.Rewound(message))
        self._waiters.clear()

    def cancel_waiters(self) -> None:
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    def _drain(self) -> None:
        """Apply every pending row that directly follows the applied revision."""
        events: list[Event] = []
        pending = self.pending
        index = self.index
        while pending:
            row = pending.pop(self.applied + 1, None)
            if row is None:
                break
            rid, name, created, deleted, create_rev, prev_rev, lease, version, rev, value, old = row
            if value is not None and not deleted:
                self.values.remember(rid, value)
            applied = apply_row(
                index, rid, name, created, deleted, create_rev, prev_rev, lease, version, rev
            )
            if applied is not None and self.subscribers:
                key, prev = applied
                latest = index.latest(key)
                assert latest is not None  # the row was just applied
                if prev is not None and index.has_anchors:
                    prev = (index.revision_of(prev[0]), *prev[1:])
                events.append(
                    Event(
                        rid,
                        rid if rev is None else rev,
                        key,
                        bool(deleted),
                        latest[CREATE],
                        latest[VERSION],
                        latest[LEASE],
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
        self.lag.applied()
        self._release_waiters()

    def _release_waiters(self) -> None:
        if not self._waiters:
            return
        applied = self.applied
        for rev in [r for r in self._waiters if r <= applied]:
            for fut in self._waiters.pop(rev):
                if not fut.done():
                    fut.set_result(None)
