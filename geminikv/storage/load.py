"""Loading an etcd snapshot into an empty database: one typed function per statement.

All of it runs in one transaction under the writer lock (``locks.locked``), so a refused
or failed load leaves nothing behind and no geminikv process writes meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Sequence

import asyncpg

from geminikv.storage.queries import SQL

# The staging table's columns, in the order records give them (queries.py, load_staging).
STAGING_COLUMNS = (
    "id",
    "name",
    "created",
    "deleted",
    "create_revision",
    "lease",
    "value",
    "version",
    "revision",
)
StagedRow = tuple[int, bytes, int, int, int, int, "bytes | None", int, "int | None"]


async def lock_and_measure(conn: asyncpg.Connection) -> tuple[int, int]:
    """Lock Kine's table and the lease table against every writer (Go Kine included);
    (the newest revision, how many leases) — both 0 in an empty database."""
    await conn.execute(SQL["load_lock"])
    row = await conn.fetchrow(SQL["load_contents"])
    assert row is not None
    return int(row[0]), int(row[1])


async def copy_rows(
    conn: asyncpg.Connection, rows: Iterable[StagedRow] | AsyncIterable[StagedRow]
) -> None:
    """COPY the rows into a staging table (dropped at commit), then into Kine's table
    with each key's previous row (``prev_revision``) and its value (``old_value``)."""
    await conn.execute(SQL["load_staging"])
    await conn.copy_records_to_table("geminikv_load", records=rows, columns=STAGING_COLUMNS)
    await conn.execute(SQL["load_insert"])


async def set_sequence(conn: asyncpg.Connection, revision: int) -> None:
    """Kine's id sequence continues after ``revision``."""
    await conn.fetchval(SQL["load_sequence"], revision)


async def insert_leases(conn: asyncpg.Connection, leases: Sequence[tuple[int, int, int]]) -> None:
    """Leases as (id, granted TTL in seconds, milliseconds left), expiring that far from
    now on PostgreSQL's clock."""
    if not leases:
        return
    ids, ttls, left = (list(column) for column in zip(*leases, strict=True))
    await conn.execute(SQL["load_leases"], ids, ttls, left)
