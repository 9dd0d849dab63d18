"""Compaction: the index says which rows a compaction at R made unreachable, and the
compactor deletes them from PostgreSQL in short batches (Kine's single giant DELETE is
its best-known failure in the field).

Logical compaction (Compact RPC, the apiserver's compaction, automatic compaction) sets
Kine's compact revision at once. The leader process then deletes the rows; when it is
done it notifies every process, and each drops the same history from its index. A
crash midway is harmless: the leader re-plans from the index on its next run and
deletes what is left; nothing readable at or after R is ever planned.
"""

from __future__ import annotations

import logging
import time

from geminikv import metrics
from geminikv.config import COMPACT_DELETE_BATCH, Settings
from geminikv.mvcc.follower import Follower
from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import kine, notify

log = logging.getLogger(__name__)


class Compactor:
    def __init__(self, store: KVStore, follower: Follower, settings: Settings) -> None:
        self.store = store
        self.follower = follower
        self.interval = settings.compact_interval
        self.min_retain = settings.compact_min_retain
        self.batch_revisions = max(settings.compact_batch_size, 100)
        # Kine's --compact-timeout, per DELETE; one that times out is retried by the
        # leader's next run (the plan comes from the index again)
        self.timeout = settings.compact_timeout or None
        self.done = 0  # rows up to this revision are gone (in this leadership)
        self.longest_statement = 0.0
        self.deleted_rows = 0
        self._previous_tick_rev = 0
        self._next_tick = 0.0

    def leadership(self, leading: bool) -> None:
        self.done = 0
        self._next_tick = time.monotonic() + self.interval

    async def run(self) -> float:
        """Leader duty: finish physical compaction, then automatic compaction if due."""
        target = int(self.store.index.compact_rev)
        if target > self.done:
            if self.follower.applied < target:
                # the plan comes from the index: rows it has yet to apply would be left
                # in the table for good (the index forgets compacted history)
                self.follower.catch_up()
                return 0.2
            await self.purge(target)
        if self.interval > 0:
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + self.interval
                await self._automatic()
            return max(0.0, self._next_tick - now)
        return 60.0

    async def purge(self, target: int) -> None:
        """Delete every row a compaction at ``target`` made unreachable."""
        started = time.monotonic()
        # The newest row stays even when it is a compacted tombstone: MAX(id) is the
        # current revision, and it must never go down (a lower one means a restored
        # database, see KVStore.rewound).
        newest = int(self.store.index.rev)
        ids = [i for i in self.store.index.plan_compaction(target) if i != newest]
        pool = self.store.pool
        for i in range(0, len(ids), COMPACT_DELETE_BATCH):
            await self._delete(ids[i : i + COMPACT_DELETE_BATCH])
        gaps = 0
        while True:
            async with pool.acquire() as conn:
                count = await kine.delete_gap_rows(conn, target, COMPACT_DELETE_BATCH, self.timeout)
            gaps += count
            if count < COMPACT_DELETE_BATCH:
                break
        async with pool.acquire() as conn:
            await notify.compacted(conn, target)
        self.done = target
        self.deleted_rows += len(ids) + gaps
        metrics.COMPACTED_ROWS.inc(len(ids) + gaps)
        if ids or gaps:
            log.info(
                "compacted to revision %d: %d rows and %d gap rows deleted in %.2fs "
                "(longest statement %.3fs)",
                target,
                len(ids),
                gaps,
                time.monotonic() - started,
                self.longest_statement,
            )

    async def _delete(self, ids: list[int]) -> None:
        start = time.monotonic()
        async with self.store.pool.acquire() as conn:
            await kine.delete_rows(conn, ids, self.timeout)
        took = time.monotonic() - start
        self.longest_statement = max(self.longest_statement, took)

    async def _automatic(self) -> None:
        """Kine's --compact-interval: compact to the revision seen at the previous tick,
        keeping --compact-min-retain revisions, --compact-batch-size at a time."""
        index = self.store.index
        current = index.revision_of(index.rev)
        target = min(self._previous_tick_rev, current - self.min_retain)
        self._previous_tick_rev = current
        compacted = int(index.compact_revision)
        while target > compacted:
            step = min(target, compacted + self.batch_revisions)
            await self.store.compact(pb.CompactionRequest(revision=step))
            await self.purge(int(index.compact_rev))
            compacted = step
