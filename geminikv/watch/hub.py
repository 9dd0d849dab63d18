"""The watch hub: fans applied revisions out to watchers, and catches lagging ones up.

A watcher is *synced* when every event before the follower's applied revision has been
queued on its stream; the hub then hands it new events as the follower applies them
(synchronously, so nothing can slip between). A watcher that starts in the past, or
whose stream stopped reading and queued too much, is *unsynced*: the catch-up task reads
its events back from the table in chunks (like etcd's unsynced watcher group) until it
has reached the applied revision, then it rejoins the synced set. Memory per watcher is
bounded by ``config.WATCH_MAX_QUEUED_EVENTS``.

The hub reaches a stream only through its watchers' ``Sink`` (watch/watcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from geminikv import tasks
from geminikv.config import WATCH_CATCH_UP_ROWS, WATCH_IDLE_RECHECK, WATCH_RETRY_DELAY
from geminikv.mvcc.events import Event
from geminikv.mvcc.index import MAX_REVISION, Index
from geminikv.storage import kine
from geminikv.storage.database import CONNECTION_ERRORS
from geminikv.watch.events import events_from_rows
from geminikv.watch.watcher import Watcher

log = logging.getLogger(__name__)


class Hub:
    def __init__(
        self,
        pool: asyncpg.Pool,
        index: Index,
        rebuilding: Callable[[], bool],
    ) -> None:
        """``rebuilding``: True while the index is rebuilt after the database lost
        revisions. The applier hands the hub each group of applied rows (``publish``)."""
        self.pool = pool
        self.index = index
        self.synced: set[Watcher] = set()
        self.unsynced: set[Watcher] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rebuilding = rebuilding

    @property
    def revision(self) -> int:
        """The applied etcd revision (the applier advances the index)."""
        return self.index.revision_of(self.index.rev)

    def first_id(self, revision: int) -> int:
        """The first row id a watch from ``revision`` wants (docs/architecture.md#revisions);
        watchers' ``next_rev`` and events' ``rid`` are row ids."""
        if revision <= 0:
            return revision
        return min(int(self.index.id_at(revision - 1)), MAX_REVISION - 1) + 1

    def _compacted_below(self) -> int:
        """The row ids a compaction took from watchers: up to the last one below the
        compact revision (etcd cancels a watch from below it, not from it)."""
        compact = int(self.index.compact_revision)
        return self.index.id_at(compact - 1) if compact > 0 else 0

    def rebuilding(self) -> bool:
        return self._rebuilding()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._catch_up_loop(), name="watch-catch-up")

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None
        self.synced.clear()
        self.unsynced.clear()

    def cancel_all(self, reason: str) -> None:
        """End every watcher with ``reason`` (the database lost revisions they saw)."""
        for watcher in list(self.synced) + list(self.unsynced):
            watcher.stream.cancel_with_reason(watcher, reason)
        self.synced.clear()
        self.unsynced.clear()

    # -- membership --------------------------------------------------------------------

    def add(self, watcher: Watcher) -> None:
        if watcher.next_rev > self.index.rev:
            watcher.synced = True
            self.synced.add(watcher)
        else:
            self.demote(watcher)

    def remove(self, watcher: Watcher) -> None:
        self.synced.discard(watcher)
        self.unsynced.discard(watcher)

    def wake(self) -> None:
        """A stream drained its queue: lagging watchers may continue."""
        if self.unsynced:
            self._wake.set()

    def demote(self, watcher: Watcher) -> None:
        """Move a watcher to catch-up reads from ``watcher.next_rev``."""
        watcher.synced = False
        self.synced.discard(watcher)
        self.unsynced.add(watcher)
        self._wake.set()

    # -- live delivery -----------------------------------------------------------------

    def publish(self, events: list[Event]) -> None:
        """Called by the follower, in the event loop, for every group of applied rows."""
        applied = int(self.index.rev)
        compact = int(self.index.compact_revision)
        for watcher in list(self.synced):
            first = watcher.next_rev
            matching = [e for e in events if e.rid >= first and watcher.matches(e)]
            if applied >= first:
                watcher.next_rev = applied + 1
            if matching:
                watcher.stream.queue_events(watcher, matching, matching[-1].revision, compact)

    # -- catch-up ----------------------------------------------------------------------

    async def _catch_up_loop(self) -> None:
        while True:
            if not self.unsynced:
                self._wake.clear()
                await self._wake.wait()
            try:
                progressed = False
                for watcher in list(self.unsynced):
                    # A stream that is not reading gets no more until it drains.
                    if watcher in self.unsynced and not watcher.stream.backlogged(watcher):
                        await self._catch_up(watcher)
                        progressed = True
                if not progressed and self.unsynced:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WATCH_IDLE_RECHECK):
                            await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as err:
                log.warning("watch catch-up: PostgreSQL unavailable (%s); retrying", err)
                await asyncio.sleep(WATCH_RETRY_DELAY)
            except Exception:
                log.exception("watch catch-up failed; retrying")
                await asyncio.sleep(WATCH_RETRY_DELAY)

    async def _catch_up(self, watcher: Watcher) -> None:
        if watcher.next_rev <= self._compacted_below() or watcher.next_rev < 0:
            self.unsynced.discard(watcher)
            compact = int(self.index.compact_revision)
            watcher.stream.cancel_compacted(watcher, compact if compact > 0 else -1)
            return
        upper = int(self.index.rev)
        async with self.pool.acquire() as conn:
            # whole revisions: a request's events are never split between responses
            records, more = await kine.revisions_after(
                conn, watcher.next_rev - 1, upper, WATCH_CATCH_UP_ROWS
            )
        if watcher not in self.unsynced:
            return  # canceled meanwhile
        if watcher.next_rev <= self._compacted_below():
            return  # compacted meanwhile: the next round cancels it
        events = [e for e in events_from_rows(self.index, records) if watcher.matches(e)]
        watcher.next_rev = (records[-1].id + 1) if more else upper + 1
        if events:
            # May demote again (and rewind next_rev) if the stream is not reading.
            watcher.stream.queue_events(
                watcher, events, self.revision, int(self.index.compact_revision)
            )
        if watcher.next_rev > self.index.rev and watcher in self.unsynced:
            self.unsynced.discard(watcher)
            watcher.synced = True
            self.synced.add(watcher)
