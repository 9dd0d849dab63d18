"""Kine's table: one typed function for every statement that reads or writes it.

The MVCC layer calls these and never SQL (as Kine's log layer calls its driver's
Dialect). Errors the statements raise on purpose are translated here into the
exceptions below; anything else (a lost connection) goes through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import asyncpg
from asyncpg.transaction import Transaction

from geminikv.config import LOAD_PREFETCH, SNAPSHOT_PREFETCH
from geminikv.storage.queries import LEASE_GONE, SQL, WRITE_CONFLICT
from geminikv.storage.rows import NewRow, Row


class WriteRefused(Exception):
    """``write_batch`` wrote nothing; the caller evaluates the batch again under the lock.
    ``reason`` is a short name for metrics."""

    reason = "refused"


class IndexBehind(WriteRefused):
    """The table holds a row the caller's index has not applied."""

    reason = "index_behind"


class LeaseGone(WriteRefused):
    """A lease the batch attaches keys to is revoked or expired."""

    reason = "lease_gone"


_REFUSALS: dict[str, type[WriteRefused]] = {WRITE_CONFLICT: IndexBehind, LEASE_GONE: LeaseGone}

# (id, name, created, deleted, create_revision, prev_revision, lease, version, revision):
# a row as the index applies it (rows.INDEX_COLUMNS)
ApplyRow = Callable[[int, bytes, int, int, int, int, int, "int | None", "int | None"], object]


# -- revisions -------------------------------------------------------------------------


async def current_rev(conn: asyncpg.Connection) -> int:
    """The newest revision: the highest id in the table (0 when empty)."""
    return int(await conn.fetchval(SQL["current_rev"]))


async def confirmed_rev(conn: asyncpg.Connection) -> int:
    """The newest revision, confirmed by the synchronous standby when there is one: the
    statement commits a WAL message, which waits for the standby's acknowledgement."""
    row = await conn.fetchrow(SQL["confirmed_rev"])
    assert row is not None
    return int(row[0])


async def holds(conn: asyncpg.Connection, rev: int) -> tuple[int, bool, int]:
    """(newest revision, whether row ``rev`` is in the table, the compact revision)."""
    row = await conn.fetchrow(SQL["holds"], rev)
    assert row is not None
    return int(row[0]), bool(row[1]), int(row[2])


async def compact_rev(conn: asyncpg.Connection) -> int:
    """Kine's compact revision (held in the compact_rev_key row): a row id."""
    return int(await conn.fetchval(SQL["compact_rev"]))


async def compact_revs(conn: asyncpg.Connection) -> tuple[int, int | None]:
    """(the row id compacted at, its etcd revision or None when not recorded: set by Go
    Kine, or by a geminikv before revisions were kept apart from ids)."""
    row = await conn.fetchrow(SQL["compact_revs"])
    assert row is not None
    return int(row[0]), None if row[1] is None else int(row[1])


async def set_compact_rev(conn: asyncpg.Connection, rid: int, revision: int) -> None:
    """Compacted at row ``rid``, etcd revision ``revision``."""
    await conn.execute(SQL["set_compact_rev"], rid, revision)


async def next_ids(conn: asyncpg.Connection, count: int) -> list[int]:
    """``count`` ids drawn from Kine's sequence, ascending."""
    return sorted(int(r[0]) for r in await conn.fetch(SQL["next_ids"], count))


# -- reading rows ----------------------------------------------------------------------


async def rows_after(conn: asyncpg.Connection, after: int, upto: int, limit: int) -> list[Row]:
    """Rows with ``after`` < id <= ``upto``, values included, in id order, at most ``limit``."""
    records = await conn.fetch(SQL["rows_with_values_after"], after, upto, limit)
    return [Row._make(r) for r in records]


async def revisions_after(
    conn: asyncpg.Connection, after: int, upto: int, limit: int
) -> tuple[list[Row], bool]:
    """``rows_after``, extended to the end of the last row's revision (a request's rows,
    consecutive ids, share one: docs/architecture.md#revisions), so a reader never holds
    part of a request; and whether rows may follow (the first read was full)."""
    rows = await rows_after(conn, after, upto, limit)
    if len(rows) < limit:
        return rows, False
    last = rows[-1]
    revision = last.id if last.revision is None else last.revision
    while True:
        more = await rows_after(conn, rows[-1].id, upto, limit)
        same = [r for r in more if (r.id if r.revision is None else r.revision) == revision]
        rows.extend(same)
        if len(same) < len(more) or len(more) < limit:
            return rows, True


async def load_all(conn: asyncpg.Connection, apply: ApplyRow) -> tuple[int, int | None]:
    """In one snapshot: hand every row to ``apply`` in id order (without values), and
    return the compact revision as of that snapshot (``compact_revs``)."""
    async with conn.transaction(isolation="repeatable_read"):
        compacted = await compact_revs(conn)
        async for r in conn.cursor(SQL["all_rows"], prefetch=LOAD_PREFETCH):
            apply(*r)
    return compacted


def consistent_read(conn: asyncpg.Connection) -> Transaction:
    """A REPEATABLE READ READ ONLY transaction: every statement in it reads one snapshot."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def snapshot_revisions(conn: asyncpg.Connection) -> tuple[int, int]:
    """(newest revision, compact revision), read together (in a ``consistent_read``)."""
    row = await conn.fetchrow(SQL["snapshot_revisions"])
    assert row is not None
    return int(row[0]), int(row[1])


async def snapshot_rows(conn: asyncpg.Connection, upto: int, compacted: int) -> AsyncIterator[Row]:
    """In id order, values included (``old_value`` None), through a server-side cursor (in a
    ``consistent_read``): the rows up to ``upto`` that etcd keeps after compacting at
    ``compacted``, without Kine's compact_rev_key and gap rows."""
    async for r in conn.cursor(SQL["snapshot_rows"], upto, compacted, prefetch=SNAPSHOT_PREFETCH):
        yield Row._make((*r, None))


async def values_by_id(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, bytes]:
    """Row id → value for those of ``ids`` still in the table (NULL values as b"")."""
    if not ids:
        return {}
    records = await conn.fetch(SQL["values_by_id"], ids)
    return {r[0]: r[1] if r[1] is not None else b"" for r in records}


async def db_size(conn: asyncpg.Connection) -> int:
    """Bytes the table takes, indexes included."""
    return int(await conn.fetchval(SQL["db_size"]))


async def db_size_in_use(conn: asyncpg.Connection) -> int:
    """Bytes of the table and its indexes holding data: ``db_size`` less the free space
    PostgreSQL's free space map records (pg_freespacemap), when that extension is there."""
    if not await conn.fetchval(SQL["has_freespace"]):
        return await db_size(conn)
    return int(await conn.fetchval(SQL["db_size_in_use"]))


async def vacuum(conn: asyncpg.Connection, timeout: float) -> None:
    """Make the space compaction freed reusable, without blocking writes (not FULL)."""
    await conn.execute(SQL["vacuum"], timeout=timeout)


async def identity(conn: asyncpg.Connection) -> tuple[str, int]:
    """(database name, the oid of Kine's table): what tells one cluster from another."""
    row = await conn.fetchrow(SQL["identity"])
    assert row is not None
    return bytes(row[0]).decode(), int(row[1])


# -- writing rows ----------------------------------------------------------------------


def _insert_args(rows: Sequence[NewRow]) -> list[list[Any]]:
    """Column arrays in ``insert_rows``' parameter order (version and revision last)."""
    if not rows:
        return [[] for _ in range(12)]
    rid, name, created, deleted, create_rev, prev_rev, lease, version, revision, value, old = (
        list(column) for column in zip(*(r.row for r in rows), strict=True)
    )
    known = [r.old_known for r in rows]
    return [
        rid,
        name,
        created,
        deleted,
        create_rev,
        prev_rev,
        lease,
        value,
        old,
        known,
        version,
        revision,
    ]


async def write_batch(
    conn: asyncpg.Connection, expected: int, leases: Iterable[int], rows: Sequence[NewRow]
) -> dict[int, bytes | None]:
    """The one-round-trip batch (``geminikv_write_v3``, autocommit): insert ``rows`` if the
    table's newest revision is still ``expected`` and ``leases`` are live. Returns row id →
    the old value stored; empty when the ids were taken by someone else (nothing written).
    Raises ``IndexBehind`` or ``LeaseGone`` when refused."""
    try:
        records = await conn.fetch(
            SQL["write_batch"], expected, sorted(leases), *_insert_args(rows)
        )
    except asyncpg.PostgresError as err:
        refusal = _REFUSALS.get(err.sqlstate)
        if refusal is None:
            raise
        raise refusal(str(err)) from None
    return {r[0]: r[1] for r in records}


async def insert_rows(conn: asyncpg.Connection, rows: Sequence[NewRow]) -> dict[int, bytes | None]:
    """Insert ``rows`` (in the caller's locked transaction); returns id → old value stored."""
    records = await conn.fetch(SQL["insert_rows_returning"], *_insert_args(rows))
    return {r[0]: r[1] for r in records}


async def fill_gap(conn: asyncpg.Connection, rev: int) -> None:
    """Kine's ``gap-N`` row at a missing revision (nothing if the row exists by now)."""
    await conn.execute(SQL["fill_gap"], rev)


async def fill_gaps(conn: asyncpg.Connection, first: int, last: int) -> None:
    """Kine's ``gap-N`` rows at every missing revision from ``first`` to ``last``."""
    await conn.execute(SQL["fill_gaps"], first, last)


async def insert_if_missing(conn: asyncpg.Connection, name: bytes, value: bytes) -> bool:
    """A special row (Kine's compact_rev_key) unless one exists; whether it was inserted."""
    if await conn.fetchval(SQL["has_key"], name):
        return False
    await conn.fetchval(SQL["insert_special"], name, value)
    return True


# -- compaction ------------------------------------------------------------------------


async def delete_rows(conn: asyncpg.Connection, ids: Sequence[int], timeout: float | None) -> None:
    await conn.execute(SQL["delete_rows"], ids, timeout=timeout)


async def delete_gap_rows(
    conn: asyncpg.Connection, upto: int, limit: int, timeout: float | None
) -> int:
    """Delete at most ``limit`` gap rows at or below ``upto`` (never the newest row);
    returns how many went."""
    status = await conn.execute(SQL["delete_gap_rows"], upto, limit, timeout=timeout)
    return int(status.split()[-1])
