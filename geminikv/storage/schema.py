"""Kine's table, exactly as Go Kine creates it, plus geminikv's compatible extras.

Go Kine reads and writes the same table, so nothing here may change a column Kine uses.
Extras: a nullable ``version`` column (etcd's per-key version; NULL in Go Kine's rows) and
the ``geminikv_lease`` table. Older Kine schemas (INTEGER ids, varchar names, default
collation) work unchanged: geminikv orders keys in its own index, never in SQL.
"""

from __future__ import annotations

import re

import asyncpg

# pkg/drivers/pgsql/pgsql.go
KINE_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS kine (
        id BIGSERIAL PRIMARY KEY,
        name text COLLATE "C",
        created INTEGER,
        deleted INTEGER,
        create_revision BIGINT,
        prev_revision BIGINT,
        lease INTEGER,
        value bytea,
        old_value bytea
    )""",
    "CREATE INDEX IF NOT EXISTS kine_name_index ON kine (name)",
    "CREATE INDEX IF NOT EXISTS kine_name_id_index ON kine (name,id)",
    "CREATE INDEX IF NOT EXISTS kine_id_deleted_index ON kine (id,deleted)",
    "CREATE INDEX IF NOT EXISTS kine_prev_revision_index ON kine (prev_revision)",
    "CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex "
    "ON kine (name, prev_revision)",
    "CREATE INDEX IF NOT EXISTS kine_list_query_index on kine(name, id DESC, deleted)",
]

GEMINIKV_EXTRAS = [
    "ALTER TABLE kine ADD COLUMN IF NOT EXISTS version BIGINT",
    """CREATE TABLE IF NOT EXISTS geminikv_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expiry_ms BIGINT NOT NULL
    )""",
]

# Serialises schema set-up between processes starting at the same time.
SCHEMA_LOCK_KEY = 0x6B696E65_00000001


INDEXES = [
    m.group(1) for m in map(re.compile(r"INDEX IF NOT EXISTS (\w+)").search, KINE_SCHEMA) if m
]

# Whether everything above is already there.
SCHEMA_COMPLETE = """
    SELECT to_regclass('kine') IS NOT NULL AND to_regclass('geminikv_lease') IS NOT NULL
       AND (SELECT count(*) FROM pg_indexes
            WHERE schemaname = current_schema() AND tablename = 'kine'
              AND indexname = ANY($1::text[])) = $2
       AND EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'kine'
                     AND column_name = 'version')
"""


async def ensure_schema(conn: asyncpg.Connection) -> None:
    """Create Kine's table and indexes if missing and add geminikv's extras.

    Only when something is missing: even a no-op ``CREATE INDEX IF NOT EXISTS`` or ``ALTER
    TABLE … IF NOT EXISTS`` takes a table lock that waits for running writes and holds
    every other reader and writer behind it, stalling processes already serving."""
    names = list(INDEXES)
    if await conn.fetchval(SCHEMA_COMPLETE, names, len(names)):
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        for statement in KINE_SCHEMA + GEMINIKV_EXTRAS:
            await conn.execute(statement)
