"""Compaction as the store sees it (etcd's kvstore_compaction.go): setting the compact
revision, and dropping compacted history from the index once the rows are deleted.

Logical compaction (``compact``) raises Kine's compact revision at once: reads and
watches below it fail from then on. The leader process then deletes the rows
(``geminikv/compact.py``) and notifies every process; each drops the same history from
its index (``physically_compacted``), in slices, so requests keep being served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from geminikv import errors, tasks
from geminikv.config import INDEX_COMPACT_SLICE
from geminikv.mvcc.index import Index, set_compacted
from geminikv.storage import kine, locks, notify


class Compaction:
    def __init__(self, pool: asyncpg.Pool, index: Index) -> None:
        self.pool = pool
        self.index = index
        self.physical_rev = 0  # rows a compaction at this revision made unreachable are gone
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._slicing: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        await tasks.stop(self._slicing)

    def reset(self) -> None:
        """The index is rebuilt from the table: it holds no compacted history."""
        self.physical_rev = 0

    async def compact(self, rev: int, applied: Callable[[int], Awaitable[None]]) -> int:
        """Raise the compact revision to etcd revision ``rev``; returns the current
        revision. Kine's row holds the newest row id at that revision (Go Kine compacts
        by id), with the revision beside it (docs/architecture.md#compact-revision-row).
        ``applied(id)`` returns once the index has applied every row up to ``id``."""
        index = self.index
        async with self.pool.acquire() as pooled, locks.locked(pooled) as conn:
            current = await kine.current_rev(conn)
            compacted, revision = await kine.compact_revs(conn)
            # Under the lock every row up to current is committed; the map needs them.
            await applied(current)
            if revision is None:
                revision = index.revision_of(compacted)
            if rev <= revision:
                raise errors.Compacted()
            if rev > index.revision_of(current):
                raise errors.FutureRevision()
            rid = index.id_at(rev)
            await kine.set_compact_rev(conn, rid, rev)
            await notify.compact(conn)
        set_compacted(index, rid, rev)
        return index.revision_of(current)

    async def refresh(self) -> None:
        """Read the compact revision (another process may have raised it)."""
        async with self.pool.acquire() as conn:
            rid, revision = await kine.compact_revs(conn)
        set_compacted(self.index, rid, revision)

    async def wait_physical(self, rev: int) -> None:
        """Return once the rows a compaction at ``rev`` made unreachable are deleted."""
        if self.physical_rev >= rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((rev, fut))
        await fut

    def physically_compacted(self, rev: int) -> None:
        """The leader deleted the rows: drop the same history from the index."""
        if rev <= self.physical_rev:
            return
        self.physical_rev = rev
        set_compacted(self.index, rev, None)
        waiting = self._waiters
        self._waiters = [(r, f) for r, f in waiting if r > rev]
        for r, fut in waiting:
            if r <= rev and not fut.done():
                fut.set_result(None)
        if self._slicing is None or self._slicing.done():
            self._slicing = asyncio.create_task(self._slice_index(), name="index-compaction")

    async def _slice_index(self) -> None:
        # In slices, so reads and writes keep being served meanwhile.
        while not self.index.compact(self.physical_rev, INDEX_COMPACT_SLICE):
            await asyncio.sleep(0)
