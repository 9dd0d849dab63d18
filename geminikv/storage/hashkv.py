"""Maintenance.HashKV's reads of Kine's table, each in a ``kine.consistent_read`` (one
snapshot with ``kine.snapshot_revisions``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg

from geminikv.config import SNAPSHOT_PREFETCH
from geminikv.storage.queries import SQL
from geminikv.storage.rows import Row


async def any_live(conn: asyncpg.Connection, revision: int) -> bool:
    """Whether some key exists at ``revision`` (its last row up to it is a put)."""
    return bool(await conn.fetchval(SQL["hashkv_any_live"], revision))


async def rows(
    conn: asyncpg.Connection, upto: int, compacted: int, keep_until: int
) -> AsyncIterator[Row]:
    """In id order, values included (``old_value`` None), through a server-side cursor: the
    rows up to ``upto`` that etcd keeps after compacting at ``compacted``, and of those at
    or below ``compacted`` only each key's last row up to ``keep_until`` (>= compacted);
    without Kine's compact_rev_key and gap rows."""
    query = SQL["hashkv_rows"]
    async for r in conn.cursor(query, upto, compacted, keep_until, prefetch=SNAPSHOT_PREFETCH):
        yield Row._make((*r, None))
