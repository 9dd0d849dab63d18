"""Compaction as the store sees it (etcd's kvstore_compaction.go): setting the compact
revision, and dropping compacted history from the index once the rows are deleted.

Logical compaction (``compact``) raises Kine's compact revision at once: reads and
watches below it fail from then on. The leader process then deletes the rows
(``geminikv/compact.py``) and notifies every process; each drops the same history from
its index (``physically_compacted``), in slices, so requests keep being served.
"""

from __future__ import annotations

import asyncio

import asyncpg

from geminikv import errors, tasks
from geminikv.config import INDEX_COMPACT_SLICE
from geminikv.mvcc.index import Index
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

    async def compact(self, rev: int) -> int:
        """Raise the compact revision to ``rev``; returns the current revision."""
        async with self.pool.acquire() as pooled, locks.locked(pooled) as conn:
            current = await kine.current_rev(conn)
            if rev <= await kine.compact_rev(conn):
                raise errors.Compacted()
            if rev > current:
                raise errors.FutureRevision()
            await kine.set_compact_rev(conn, rev)
            await notify.compact(conn)
        self.index.compact_rev = max(int(self.index.compact_rev), rev)
        return current

    async def refresh(self) -> None:
        """Read the compact revision (another process may have raised it)."""
        async with self.pool.acquire() as conn:
            rev = await kine.compact_rev(conn)
        if rev > self.index.compact_rev:
            self.index.compact_rev = rev

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
        if rev > self.index.compact_rev:
            self.index.compact_rev = rev
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
