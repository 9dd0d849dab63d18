"""The watch hub: fans applied revisions out to watchers, and catches lagging ones up.

A watcher is *synced* when every event before the follower's applied revision has been
queued on its stream; the hub then hands it new events as the follower applies them
(synchronously, so nothing can slip between). A watcher that starts in the past, or
whose stream stopped reading and queued too much, is *unsynced*: the catch-up task reads
its events back from the table in chunks (like etcd's unsynced watcher group) until it
has reached the applied revision, then it rejoins the synced set. Memory per watcher is
bounded by ``MAX_QUEUED_EVENTS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg

from geminikv import tasks
from geminikv.mvcc.events import Event
from geminikv.mvcc.follower import Follower
from geminikv.mvcc.index import Index
from geminikv.storage.database import CONNECTION_ERRORS
from geminikv.storage.queries import SQL
from geminikv.watch.events import events_from_rows

if TYPE_CHECKING:
    from geminikv.watch.stream import WatchStream

log = logging.getLogger(__name__)

CATCH_UP_ROWS = 1000  # etcd batches at most 1000 revisions per catch-up response
MAX_QUEUED_EVENTS = 2000


class Watcher:
    __slots__ = (
        "end",
        "fragment",
        "id",
        "key",
        "next_rev",
        "no_delete",
        "no_put",
        "prev_kv",
        "progress_notify",
        "sent_since_tick",
        "stream",
        "synced",
    )

    def __init__(
        self,
        stream: WatchStream,
        watch_id: int,
        key: bytes,
        end: bytes | None,
        start_rev: int,
        prev_kv: bool,
        no_put: bool,
        no_delete: bool,
        fragment: bool,
        progress_notify: bool,
    ) -> None:
        self.stream = stream
        self.id = watch_id
        self.key = key
        self.end = end  # None: one key; b"": every key >= key
        self.next_rev = start_rev  # the first revision not yet queued
        self.prev_kv = prev_kv
        self.no_put = no_put
        self.no_delete = no_delete
        self.fragment = fragment
        self.progress_notify = progress_notify
        self.synced = False
        self.sent_since_tick = False

    def matches(self, event: Event) -> bool:
        key = event.key
        if self.end is None:
            inside = key == self.key
        else:
            inside = key >= self.key and (not self.end or key < self.end)
        if not inside:
            return False
        return not (self.no_delete if event.deleted else self.no_put)


class Hub:
    def __init__(self, pool: asyncpg.Pool, index: Index, follower: Follower) -> None:
        self.pool = pool
        self.index = index
        self.follower = follower
        self.synced: set[Watcher] = set()
        self.unsynced: set[Watcher] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # True while the index is rebuilt after the database lost revisions (KVStore)
        self.rebuilding: Callable[[], bool] = lambda: False
        follower.subscribers.append(self._publish)

    @property
    def revision(self) -> int:
        return self.follower.applied

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
        if watcher.next_rev > self.revision:
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

    def _publish(self, events: list[Event]) -> None:
        """Called by the follower, in the event loop, for every group of applied rows."""
        applied = self.revision
        for watcher in list(self.synced):
            first = watcher.next_rev
            matching = [e for e in events if e.revision >= first and watcher.matches(e)]
            if applied >= first:
                watcher.next_rev = applied + 1
            if matching:
                watcher.stream.queue_events(watcher, matching, matching[-1].revision)

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
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as err:
                log.warning("watch catch-up: PostgreSQL unavailable (%s); retrying", err)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("watch catch-up failed; retrying")
                await asyncio.sleep(0.5)

    async def _catch_up(self, watcher: Watcher) -> None:
        compact = int(self.index.compact_rev)
        if watcher.next_rev < compact or watcher.next_rev < 0:
            self.unsynced.discard(watcher)
            watcher.stream.cancel_compacted(watcher, compact if compact > 0 else -1)
            return
        upper = self.revision
        async with self.pool.acquire() as conn:
            records = await conn.fetch(
                SQL["rows_with_values_after"], watcher.next_rev - 1, upper, CATCH_UP_ROWS
            )
        if watcher not in self.unsynced:
            return  # canceled meanwhile
        if int(self.index.compact_rev) > watcher.next_rev:
            return  # compacted meanwhile: the next round cancels it
        events = [e for e in events_from_rows(self.index, records) if watcher.matches(e)]
        watcher.next_rev = (records[-1][0] + 1) if len(records) == CATCH_UP_ROWS else upper + 1
        if events:
            # May demote again (and rewind next_rev) if the stream is not reading.
            watcher.stream.queue_events(watcher, events, self.revision)
        if watcher.next_rev > self.revision and watcher in self.unsynced:
            self.unsynced.discard(watcher)
            watcher.synced = True
            self.synced.add(watcher)
