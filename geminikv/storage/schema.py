"""Kine's table, exactly as Go Kine creates it, plus geminikv's compatible extras.

Go Kine reads and writes the same table, so nothing here may change a column Kine uses.
Extras: a nullable ``version`` column (etcd's per-key version; NULL in Go Kine's rows), a
nullable ``revision`` column (a row's etcd revision where it is not the id), the
``geminikv_lease`` table, ``geminikv_write_v3``, the writer's one-round-trip batch, and the
auth tables (``geminikv_auth*``).
Older Kine schemas (INTEGER ids, varchar names, default collation) work unchanged:
geminikv orders keys in its own index, never in SQL.
"""

from __future__ import annotations

import re

import asyncpg

from geminikv.storage.queries import (
    LEASE_GONE,
    NOTIFY_CHANNEL,
    NOW_MS,
    WRITE_CONFLICT,
    WRITER_LOCK_KEY,
)

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
    # a row's etcd revision when it is not its id: the rows of one request share one
    # (docs/architecture.md#revisions); NULL in Go Kine's rows and wherever it is the id
    "ALTER TABLE kine ADD COLUMN IF NOT EXISTS revision BIGINT",
    # etcd's alarms, one set for every process on the database (member ids are etcd's
    # uint64, stored as the signed 64-bit integer with the same bits)
    """CREATE TABLE IF NOT EXISTS geminikv_alarm (
        member_id BIGINT NOT NULL,
        alarm INTEGER NOT NULL,
        PRIMARY KEY (member_id, alarm)
    )""",
    # every geminikv process serving the database, as etcd's member list (each refreshes
    # its row every second and removes it when it stops)
    """CREATE TABLE IF NOT EXISTS geminikv_member (
        id BIGINT PRIMARY KEY,
        name text NOT NULL,
        client_urls text[] NOT NULL,
        seen_ms BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS geminikv_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expiry_ms BIGINT NOT NULL
    )""",
    # A whole write batch in one statement (autocommit, so one round trip): take the
    # writer lock, check nobody committed since the caller's index revision and that the
    # leases the batch attaches keys to are live, draw the batch's ids and insert its rows.
    # Each statement in a volatile function takes a fresh snapshot, so MAX(id) and the
    # lease rows are as every batch committed before the lock was granted left them (a
    # lease row is only deleted by a batch holding the lock). A stale index raises
    # WRITE_CONFLICT, a lease revoked or expired LEASE_GONE (nothing written, no id drawn);
    # ids other than the planned ones (burned by a rollback, or taken by Go Kine) are
    # filled as Kine gap rows, so no revision is left missing, and no row comes back: the
    # caller retries.
    f"""CREATE OR REPLACE FUNCTION geminikv_write_v3(
        expected bigint, p_leases bigint[], p_id bigint[], p_name bytea[], p_created int[],
        p_deleted int[], p_create_revision bigint[], p_prev_revision bigint[], p_lease int[],
        p_value bytea[], p_old_value bytea[], p_old_known bool[], p_version bigint[],
        p_revision bigint[])
    RETURNS TABLE (out_id bigint, out_old_value bytea)
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        head bigint;
        drawn bigint[];
    BEGIN
        PERFORM pg_advisory_xact_lock({WRITER_LOCK_KEY});
        SELECT COALESCE(MAX(k.id), 0) INTO head FROM kine k;
        IF head <> expected THEN
            RAISE EXCEPTION USING ERRCODE = '{WRITE_CONFLICT}', MESSAGE = head::text;
        END IF;
        IF cardinality(p_leases) > 0 AND cardinality(p_leases) <> (
            SELECT count(*) FROM geminikv_lease l
            WHERE l.id = ANY(p_leases) AND l.expiry_ms > {NOW_MS}) THEN
            RAISE EXCEPTION USING ERRCODE = '{LEASE_GONE}', MESSAGE = 'lease not found';
        END IF;
        IF cardinality(p_id) = 0 THEN
            RETURN;
        END IF;
        SELECT array_agg(s.n ORDER BY s.n) INTO drawn
        FROM (SELECT nextval(pg_get_serial_sequence('kine', 'id')) AS n
              FROM generate_series(1, cardinality(p_id))) s;
        IF drawn <> p_id THEN
            INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision,
                              lease, value, old_value)
            SELECT d, 'gap-' || d::text, 0, 1, 0, 0, 0, NULL, NULL FROM unnest(drawn) d;
            PERFORM pg_notify('{NOTIFY_CHANNEL}', drawn[cardinality(drawn)]::text);
            RETURN;
        END IF;
        RETURN QUERY
        INSERT INTO kine AS k (id, name, created, deleted, create_revision, prev_revision,
                               lease, value, old_value, version, revision)
        SELECT t.id, convert_from(t.name, 'UTF8'), t.created, t.deleted, t.create_revision,
               t.prev_revision, t.lease, t.value,
               CASE WHEN t.old_known THEN t.old_value
                    ELSE (SELECT o.value FROM kine o WHERE o.id = t.prev_revision) END,
               t.version, t.revision
        FROM unnest(p_id, p_name, p_created, p_deleted, p_create_revision, p_prev_revision,
                    p_lease, p_value, p_old_value, p_old_known, p_version, p_revision)
          AS t(id, name, created, deleted, create_revision, prev_revision, lease,
               value, old_value, old_known, version, revision)
        RETURNING k.id::bigint, k.old_value;
        PERFORM pg_notify('{NOTIFY_CHANNEL}', p_id[cardinality(p_id)]::text);
    END
    $fn$""",
    # Auth, as etcd's auth buckets: one state row (etcd's authEnabled and authRevision;
    # revision 1 as a fresh etcd's), users with their sorted roles (password: the bcrypt
    # hash, NULL for a no-password user), roles, and each role's key-range permissions.
    # Names are bytes (etcd keys them bytewise); simple tokens live here too, so a token
    # one process issued is valid on every process.
    """CREATE TABLE IF NOT EXISTS geminikv_auth (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        enabled BOOLEAN NOT NULL,
        revision BIGINT NOT NULL
    )""",
    "INSERT INTO geminikv_auth (id, enabled, revision) VALUES (1, false, 1) "
    "ON CONFLICT (id) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS geminikv_auth_user (
        name bytea PRIMARY KEY,
        password bytea,
        no_password BOOLEAN NOT NULL,
        roles bytea[] NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS geminikv_auth_role (name bytea PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS geminikv_auth_permission (
        role bytea NOT NULL REFERENCES geminikv_auth_role (name) ON DELETE CASCADE,
        key bytea NOT NULL,
        range_end bytea NOT NULL,
        perm_type INTEGER NOT NULL,
        PRIMARY KEY (role, key, range_end)
    )""",
    """CREATE TABLE IF NOT EXISTS geminikv_auth_token (
        id BIGSERIAL PRIMARY KEY,
        prefix text NOT NULL,
        username bytea NOT NULL,
        expiry_ms BIGINT NOT NULL
    )""",
]

# Free space per table page, for Status's dbSizeInUse (a contrib extension: optional).
FREE_SPACE_MAP = "CREATE EXTENSION IF NOT EXISTS pg_freespacemap"

# Serialises schema set-up between processes starting at the same time.
SCHEMA_LOCK_KEY = 0x6B696E65_00000001


INDEXES = [
    m.group(1) for m in map(re.compile(r"INDEX IF NOT EXISTS (\w+)").search, KINE_SCHEMA) if m
]

# Whether everything above is already there.
SCHEMA_COMPLETE = """
    SELECT to_regclass('kine') IS NOT NULL AND to_regclass('geminikv_lease') IS NOT NULL
       AND to_regclass('geminikv_alarm') IS NOT NULL
       AND to_regclass('geminikv_member') IS NOT NULL
       AND (SELECT count(*) FROM pg_indexes
            WHERE schemaname = current_schema() AND tablename = 'kine'
              AND indexname = ANY($1::text[])) = $2
       AND to_regproc('geminikv_write_v3') IS NOT NULL
       AND to_regclass('geminikv_auth_token') IS NOT NULL
       AND (SELECT count(*) FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = 'kine'
              AND column_name IN ('version', 'revision')) = 2
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
        # a process that started at the same time may have made it while this one waited:
        # its no-op statements would lock tables that process is already writing to
        if await conn.fetchval(SCHEMA_COMPLETE, names, len(names)):
            return
        for statement in KINE_SCHEMA + GEMINIKV_EXTRAS:
            await conn.execute(statement)
        try:
            async with conn.transaction():  # a savepoint: its failure leaves the rest
                await conn.execute(FREE_SPACE_MAP)
        except asyncpg.PostgresError:
            pass  # not installed, or not allowed: Status then reports dbSizeInUse = dbSize
