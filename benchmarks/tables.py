"""Filling Kine's table quickly (in SQL) for the start-up and compaction benchmarks."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time

import asyncpg

from geminikv.storage.embedded import EmbeddedPostgres
from geminikv.storage.schema import ensure_schema


async def create_database(dsn: str) -> None:
    admin = await asyncpg.connect(re.sub(r"/[^/?]+\?", "/postgres?", dsn))
    name = re.search(r"/([^/?]+)\?", dsn).group(1)  # type: ignore[union-attr]
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await admin.close()


async def fill(dsn: str, prefix: str, keys: int, revisions: int) -> None:
    """``keys`` keys under ``prefix`` (1 KiB values), ``revisions`` revisions each, as
    Kine's rows: creates, then updates chained by prev_revision."""
    await create_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_schema(conn)
        await conn.execute(
            "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease,"
            " value, old_value, version) SELECT $1 || lpad(g::text, 8, '0'), 1, 0, 0, 0, 0,"
            " repeat('x', 1024)::bytea, NULL, 1 FROM generate_series(1, $2) g",
            prefix,
            keys,
        )
        await conn.execute("UPDATE kine SET create_revision = id WHERE created = 1")
        await add_revisions(conn, prefix, revisions - 1)
        await conn.execute("VACUUM ANALYZE kine")
    finally:
        await conn.close()


async def add_revisions(conn: asyncpg.Connection, prefix: str, rounds: int) -> None:
    """One more revision of every key under ``prefix``, ``rounds`` times."""
    for _ in range(rounds):
        await conn.execute(
            "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease,"
            " value, old_value, version) SELECT name, 0, 0, create_revision, id, 0, value,"
            " NULL, version + 1 FROM kine WHERE id IN (SELECT max(id) FROM kine"
            " WHERE name LIKE $1 || '%' GROUP BY name)",
            prefix,
        )


def filled(keys: int, history: int, prefix: str) -> tuple[EmbeddedPostgres, str]:
    """A fresh embedded PostgreSQL holding ``keys`` keys x ``history + 1`` revisions (the
    start-up and snapshot benchmarks): the server, to stop, and its DSN."""
    pg = EmbeddedPostgres(tempfile.mkdtemp(prefix="bench-filled-"))
    dsn = pg.start()
    started = time.monotonic()
    asyncio.run(fill(dsn, prefix, keys, history + 1))
    print(
        f"filled {keys} keys x {history + 1} revisions in {time.monotonic() - started:.1f}s",
        flush=True,
    )
    return pg, dsn
