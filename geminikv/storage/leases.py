"""geminikv's lease table (``geminikv_lease``): one typed function per statement.

Expiry is absolute, in milliseconds on PostgreSQL's clock, so every process and every
restart agrees on it; "remaining" below is measured on that clock too.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from geminikv.storage.queries import SQL


async def grant(conn: asyncpg.Connection, ids: Sequence[int], ttls: Sequence[int]) -> set[int]:
    """Create the leases (``ids`` distinct, each with its TTL); those created, without
    the ids already taken."""
    return {r[0] for r in await conn.fetch(SQL["lease_grant"], ids, ttls)}


async def keep_alive(conn: asyncpg.Connection, lease_id: int) -> int | None:
    """Renew a live lease; its granted TTL, or None if it is unknown or expired."""
    ttl = await conn.fetchval(SQL["lease_keepalive"], lease_id)
    return None if ttl is None else int(ttl)


async def promote(conn: asyncpg.Connection, extend_ms: int) -> int:
    """Every lease's expiry set to its full TTL plus ``extend_ms`` from now; how many."""
    status: str = await conn.execute(SQL["leases_promote"], extend_ms)
    return int(status.split()[-1])


async def get(conn: asyncpg.Connection, lease_id: int) -> tuple[int, int] | None:
    """(granted TTL in seconds, milliseconds left, <= 0 once expired), or None if unknown."""
    row = await conn.fetchrow(SQL["lease_get"], lease_id)
    return None if row is None else (int(row[0]), int(row[1]))


async def remaining_for_update(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, int]:
    """Lease id → milliseconds left, for those of ``ids`` that exist, locked until the
    caller's transaction ends."""
    return {r[0]: r[2] for r in await conn.fetch(SQL["leases_for_update"], ids)}


async def delete(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    await conn.execute(SQL["lease_delete"], ids)


async def all_ids(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch(SQL["lease_list"])]


async def existing(conn: asyncpg.Connection, ids: Sequence[int]) -> set[int]:
    """Those of ``ids`` that have a lease row (expired or not)."""
    return {r[0] for r in await conn.fetch(SQL["leases_existing"], ids)}


async def expired(conn: asyncpg.Connection, limit: int) -> list[int]:
    """At most ``limit`` expired leases, the longest expired first."""
    return [r[0] for r in await conn.fetch(SQL["leases_expired"], limit)]


async def next_expiry_ms(conn: asyncpg.Connection) -> int | None:
    """Milliseconds until the next lease expires (negative if overdue); None if no lease."""
    ms = await conn.fetchval(SQL["lease_next_expiry_ms"])
    return None if ms is None else int(ms)


async def count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(SQL["lease_count"]))


async def snapshot(conn: asyncpg.Connection) -> list[tuple[int, int, int]]:
    """Every lease by id: (id, granted TTL in seconds, milliseconds left, <= 0 once expired)."""
    return [(r[0], r[1], r[2]) for r in await conn.fetch(SQL["snapshot_leases"])]
