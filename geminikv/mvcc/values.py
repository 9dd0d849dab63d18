"""Values by row id: an in-memory cache in front of PostgreSQL, and one query for many.

A row's value never changes, so a cached value never goes stale; the cache only has to
stay within its byte budget (least recently used entries go first). Concurrent readers'
misses are fetched together in one statement.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

import asyncpg

from geminikv.storage import kine

_ENTRY_OVERHEAD = 100  # bytes object + dict entry, roughly


class Values:
    def __init__(self, pool: asyncpg.Pool, max_bytes: int) -> None:
        self.pool = pool
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._wanted: dict[int, asyncio.Future[bytes | None]] = {}
        self._fetching = False
        self._task: asyncio.Task[None] | None = None

    def clear(self) -> None:
        """Forget every cached value (row ids of a restored database mean other rows)."""
        self._cache.clear()
        self.bytes = 0

    def remember(self, rid: int, value: bytes) -> None:
        if self.max_bytes <= 0 or rid in self._cache:
            return
        self._cache[rid] = value
        self.bytes += len(value) + _ENTRY_OVERHEAD
        while self.bytes > self.max_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self.bytes -= len(old) + _ENTRY_OVERHEAD

    def get_cached(self, ids: Iterable[int]) -> dict[int, bytes]:
        """Only what the cache holds (no query)."""
        cache = self._cache
        return {rid: cache[rid] for rid in ids if rid in cache}

    async def get(self, ids: Iterable[int]) -> dict[int, bytes]:
        """Values of the given rows; a row that no longer exists (compacted) is absent."""
        found: dict[int, bytes] = {}
        missing: list[int] = []
        cache = self._cache
        for rid in ids:
            value = cache.get(rid)
            if value is None:
                missing.append(rid)
            else:
                cache.move_to_end(rid)
                found[rid] = value
        if missing:
            loop = asyncio.get_running_loop()
            futures = []
            for rid in missing:
                fut = self._wanted.get(rid)
                if fut is None:
                    fut = self._wanted[rid] = loop.create_future()
                futures.append(fut)
            if not self._fetching:
                self._fetching = True
                self._task = asyncio.create_task(self._fetch(), name="value-fetch")
            for rid, fut in zip(missing, futures, strict=True):
                value = await fut
                if value is not None:
                    found[rid] = value
        return found

    async def _fetch(self) -> None:
        """Fetch every wanted id, in rounds, until nobody waits."""
        try:
            while self._wanted:
                wanted, self._wanted = self._wanted, {}
                try:
                    async with self.pool.acquire() as conn:
                        got = await kine.values_by_id(conn, list(wanted))
                except Exception as err:
                    for fut in wanted.values():
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                for rid, fut in wanted.items():
                    value = got.get(rid)
                    if value is not None:
                        self.remember(rid, value)
                    if not fut.done():
                        fut.set_result(value)
        finally:
            self._fetching = False
