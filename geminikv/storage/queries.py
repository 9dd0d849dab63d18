"""Every SQL statement geminikv runs, each with a name (used in logs and metrics).

Only the modules of ``storage/`` run them, each through one typed function (``kine.py``,
``leases.py``, ``notify.py``, ``transaction.py``, ``schema.py``). Keys (``name``) travel as
bytes: connections decode text columns as raw UTF-8 bytes (see ``database.py``), because
the index orders and compares keys as bytes.
"""

from __future__ import annotations

from geminikv.storage.rows import INDEX_COLUMNS, Row

# Serialises geminikv writers across processes: ids are drawn and committed while it is
# held, so commit order equals id order (a follower that sees id N has seen all below N).
WRITER_LOCK_KEY = 0x6B696E65_00000002
NOTIFY_CHANNEL = "geminikv"
# Auth changes (users, roles, permissions, the enabled flag): payload the new auth revision.
AUTH_NOTIFY_CHANNEL = "geminikv_auth"
# SQLSTATEs geminikv_write_v3 raises: the caller's index is behind the table; a lease the
# batch attaches keys to is gone (revoked or expired).
WRITE_CONFLICT = "GK001"
LEASE_GONE = "GK002"
MAX_LEASE_ID = 2**31 - 1  # Kine's lease column is a 32-bit INTEGER

# Milliseconds since the epoch on the database server's clock.
NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
# Session lock held by the one process that expires leases and compacts automatically.
LEADER_LOCK_KEY = 0x6B696E65_00000003

# The columns of rows.Row (the index needs the first nine), in its order.
INDEX_ROW_COLUMNS = ", ".join(INDEX_COLUMNS)
ROW_COLUMNS = ", ".join(Row._fields)
SNAPSHOT_ROW_COLUMNS = ", ".join(f"k.{column}" for column in Row._fields[:-1])


def _kept_rows(last_up_to: str) -> str:
    """The rows up to $1 etcd's key bucket holds after compacting at $2: every row above
    $2, and at or below it a key's row that is its last put up to ``last_up_to``."""
    return f"""
        SELECT {SNAPSHOT_ROW_COLUMNS} FROM kine k
        WHERE k.id <= $1 AND k.name <> 'compact_rev_key'
          AND NOT (k.deleted = 1 AND k.created = 0 AND k.prev_revision = 0
                   AND k.name LIKE 'gap-%')
          AND (k.id > $2 OR (k.deleted = 0 AND NOT EXISTS (
                SELECT 1 FROM kine n
                WHERE n.name = k.name AND n.id > k.id AND n.id <= {last_up_to})))
        ORDER BY k.id
    """


SQL: dict[str, str] = {
    "begin_locked": f"BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})",
    "commit": "COMMIT",
    "rollback": "ROLLBACK",
    "current_rev": "SELECT COALESCE(MAX(id), 0) FROM kine",
    # A linearizable read's revision. With a synchronous standby, the statement also writes
    # a (transactional, empty) WAL message, so its commit waits for the standby: a
    # superseded primary (its standby promoted, before its failover manager fences it)
    # cannot confirm, and the read fails instead of answering from the old history
    # (docs/architecture.md#failover). An xid alone would commit without waiting.
    "confirmed_rev": "SELECT COALESCE(MAX(id), 0), CASE WHEN "
    "current_setting('synchronous_standby_names') <> '' "
    "THEN pg_logical_emit_message(true, 'geminikv-read-index', '') END FROM kine",
    # after a failover: the newest revision, whether row $1 is there, the compact revision
    "holds": (
        "SELECT COALESCE(MAX(id), 0), EXISTS (SELECT 1 FROM kine WHERE id = $1), "
        "(SELECT COALESCE(MAX(prev_revision), 0) FROM kine WHERE name = 'compact_rev_key') "
        "FROM kine"
    ),
    # the standbys a primary streams to, as it reports them (NULL lags when idle)
    "standbys": (
        "SELECT application_name || '@' || COALESCE(host(client_addr), 'local'), sync_state, "
        "EXTRACT(epoch FROM replay_lag)::float8, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 FROM pg_stat_replication"
    ),
    # what the server is: in recovery (a standby), read-only, and (on a primary) its
    # timeline, the first 8 hex digits of its current WAL file's name
    "role": (
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', "
        "CASE WHEN pg_is_in_recovery() THEN 0 "
        "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
    ),
    "compact_rev": (
        "SELECT COALESCE(MAX(prev_revision), 0) FROM kine WHERE name = 'compact_rev_key'"
    ),
    # Kine's compact row holds the row id compacted at (prev_revision, as Go Kine sets and
    # reads it); geminikv adds the etcd revision in `version`, with the id it goes with in
    # `create_revision`: once Go Kine moves prev_revision they differ and the revision is
    # unknown (NULL) (docs/architecture.md#compact-revision-row)
    "compact_revs": (
        "SELECT COALESCE(MAX(prev_revision), 0), MAX(CASE WHEN prev_revision > 0 "
        "AND create_revision = prev_revision THEN version END) "
        "FROM kine WHERE name = 'compact_rev_key'"
    ),
    "set_compact_rev": (
        "UPDATE kine SET prev_revision = $1, create_revision = $1, version = $2 "
        "WHERE name = 'compact_rev_key'"
    ),
    "next_ids": "SELECT nextval(pg_get_serial_sequence('kine', 'id')) FROM generate_series(1, $1)",
    "rows_with_values_after": (
        f"SELECT {ROW_COLUMNS} FROM kine WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
    ),
    "all_rows": f"SELECT {INDEX_ROW_COLUMNS} FROM kine ORDER BY id",
    "values_by_id": "SELECT id, value FROM kine WHERE id = ANY($1::bigint[])",
    "insert_rows": """
        INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease,
                          value, old_value, version, revision)
        SELECT t.id, convert_from(t.name, 'UTF8'), t.created, t.deleted, t.create_revision,
               t.prev_revision, t.lease, t.value,
               CASE WHEN t.old_known THEN t.old_value
                    ELSE (SELECT k.value FROM kine k WHERE k.id = t.prev_revision) END,
               t.version, t.revision
        FROM unnest($1::bigint[], $2::bytea[], $3::int[], $4::int[], $5::bigint[], $6::bigint[],
                    $7::int[], $8::bytea[], $9::bytea[], $10::bool[], $11::bigint[],
                    $12::bigint[])
          AS t(id, name, created, deleted, create_revision, prev_revision, lease,
               value, old_value, old_known, version, revision)
    """,
    "insert_rows_returning": "",  # insert_rows + RETURNING, set below
    # The writer's fast path (schema.py): $1 the index revision, $2 the leases keys are
    # attached to, then insert_rows' arrays.
    "write_batch": """
        SELECT out_id, out_old_value FROM geminikv_write_v3(
            $1::bigint, $2::bigint[], $3::bigint[], $4::bytea[], $5::int[], $6::int[],
            $7::bigint[], $8::bigint[], $9::int[], $10::bytea[], $11::bytea[], $12::bool[],
            $13::bigint[], $14::bigint[])
    """,
    "fill_gaps": """
        INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease,
                          value, old_value)
        SELECT g, 'gap-' || g::text, 0, 1, 0, 0, 0, NULL, NULL
        FROM generate_series($1::bigint, $2::bigint) AS g
        ON CONFLICT DO NOTHING
    """,
    "fill_gap": """
        INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease,
                          value, old_value)
        VALUES ($1::bigint, 'gap-' || ($1::bigint)::text, 0, 1, 0, 0, 0, NULL, NULL)
        ON CONFLICT DO NOTHING
    """,
    "has_key": "SELECT EXISTS (SELECT 1 FROM kine WHERE name = $1)",
    "insert_special": """
        INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value,
                          old_value, version)
        VALUES ($1, 1, 0, 0, 0, 0, $2, NULL, 1) RETURNING id
    """,
    "notify": f"SELECT pg_notify('{NOTIFY_CHANNEL}', $1)",
    # Leases: expiry is absolute, on PostgreSQL's clock (the same for every process).
    # concurrent grants in one statement: ids and TTLs side by side, no id twice
    "lease_grant": f"""
        INSERT INTO geminikv_lease (id, ttl, expiry_ms)
        SELECT g.id, g.ttl, {NOW_MS} + g.ttl * 1000
        FROM unnest($1::bigint[], $2::bigint[]) AS g (id, ttl)
        ON CONFLICT (id) DO NOTHING RETURNING id
    """,
    "lease_keepalive": f"""
        UPDATE geminikv_lease SET expiry_ms = {NOW_MS} + ttl * 1000
        WHERE id = $1::bigint AND expiry_ms > {NOW_MS} RETURNING ttl
    """,
    "lease_get": f"SELECT ttl, expiry_ms - {NOW_MS} FROM geminikv_lease WHERE id = $1",
    # etcd's Lessor.Promote: a process that starts expiring leases first gives every lease
    # its full TTL again, plus $1 ms (etcd: the election timeout)
    "leases_promote": f"UPDATE geminikv_lease SET expiry_ms = {NOW_MS} + ttl * 1000 + $1::bigint",
    "leases_for_update": f"""
        SELECT id, ttl, expiry_ms - {NOW_MS} FROM geminikv_lease
        WHERE id = ANY($1::bigint[]) FOR UPDATE
    """,
    "lease_delete": "DELETE FROM geminikv_lease WHERE id = ANY($1::bigint[])",
    "lease_list": "SELECT id FROM geminikv_lease ORDER BY id",
    "leases_existing": "SELECT id FROM geminikv_lease WHERE id = ANY($1::bigint[])",
    "leases_expired": f"""
        SELECT id FROM geminikv_lease WHERE expiry_ms <= {NOW_MS} ORDER BY expiry_ms LIMIT $1
    """,
    "lease_next_expiry_ms": f"SELECT MIN(expiry_ms) - {NOW_MS} FROM geminikv_lease",
    "lease_count": "SELECT count(*) FROM geminikv_lease",
    "try_leader_lock": "SELECT pg_try_advisory_lock($1)",
    "ping": "SELECT 1",  # keeps a session (and the session lock it holds) alive
    # Compaction: short statements by primary key, never one giant DELETE.
    "delete_rows": "DELETE FROM kine WHERE id = ANY($1::bigint[])",
    "delete_gap_rows": """
        DELETE FROM kine WHERE id IN (
            SELECT id FROM kine
            WHERE id <= $1 AND deleted = 1 AND created = 0 AND prev_revision = 0
              AND name LIKE 'gap-%' AND id < (SELECT MAX(id) FROM kine) LIMIT $2)
    """,
    # Maintenance.Snapshot, in one REPEATABLE READ READ ONLY transaction: the newest
    # revision and the compact revision; then the rows etcd keeps at a compaction at $2
    # (every row above it; at or below it, a key's last row if that is a put), without
    # Kine's compact_rev_key and gap rows, up to $1 (docs/architecture.md#snapshot-request)
    "snapshot_revisions": (
        "SELECT COALESCE(MAX(id), 0), "
        "(SELECT COALESCE(MAX(prev_revision), 0) FROM kine WHERE name = 'compact_rev_key') "
        "FROM kine"
    ),
    "snapshot_rows": _kept_rows(last_up_to="$2"),
    # Maintenance.HashKV at $1 (in a consistent_read, as the snapshot): the rows up to $1
    # etcd's key bucket holds after compacting at $2 (as snapshot_rows), of those at or
    # below $2 only a key's last row up to $3 (docs/architecture.md#hashkv-request)
    "hashkv_rows": _kept_rows(last_up_to="$3"),
    # whether any key is live at $1: its last row up to $1 is a put (gap rows are deletes)
    "hashkv_any_live": """
        SELECT EXISTS (
            SELECT 1 FROM kine k
            WHERE k.id <= $1 AND k.deleted = 0 AND k.name <> 'compact_rev_key'
              AND NOT EXISTS (
                SELECT 1 FROM kine n WHERE n.name = k.name AND n.id > k.id AND n.id <= $1))
    """,
    "snapshot_leases": f"SELECT id, ttl, expiry_ms - {NOW_MS} FROM geminikv_lease ORDER BY id",
    # `geminikv load-snapshot`, in one transaction under the writer lock: nobody else may
    # write while the table is filled; then whether it was empty
    "load_lock": "LOCK TABLE kine, geminikv_lease IN EXCLUSIVE MODE",
    "load_contents": (
        "SELECT COALESCE(MAX(id), 0), (SELECT count(*) FROM geminikv_lease) FROM kine"
    ),
    # the revisions arrive by COPY, without prev_revision and old_value, which need each
    # key's previous row: PostgreSQL sorts them by key (spilling to disk, not to memory)
    "load_staging": """
        CREATE TEMPORARY TABLE geminikv_load (
            id BIGINT, name text COLLATE "C", created INTEGER, deleted INTEGER,
            create_revision BIGINT, lease INTEGER, value bytea, version BIGINT,
            revision BIGINT
        ) ON COMMIT DROP
    """,
    "load_insert": """
        INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease,
                          value, old_value, version, revision)
        SELECT id, name, created, deleted, create_revision, COALESCE(lag(id) OVER w, 0),
               lease, value, lag(value) OVER w, version, revision
        FROM geminikv_load WINDOW w AS (PARTITION BY name ORDER BY id)
    """,
    "load_sequence": "SELECT setval(pg_get_serial_sequence('kine', 'id'), $1)",
    "load_leases": f"""
        INSERT INTO geminikv_lease (id, ttl, expiry_ms)
        SELECT t.id, t.ttl, {NOW_MS} + t.remaining_ms
        FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, ttl, remaining_ms)
    """,
    "db_size": "SELECT pg_total_relation_size('kine')",
    "member_announce": "INSERT INTO geminikv_member (id, name, client_urls, seen_ms) "
    f"VALUES ($1, $2, $3, {NOW_MS}) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, "
    "client_urls = EXCLUDED.client_urls, seen_ms = EXCLUDED.seen_ms",
    "member_withdraw": "DELETE FROM geminikv_member WHERE id = $1",
    "members_live": "SELECT id, name, client_urls FROM geminikv_member "
    f"WHERE seen_ms > {NOW_MS} - $1 ORDER BY id",
    "vacuum": "VACUUM (ANALYZE) kine, geminikv_lease",
    # pg_freespace() exists only where the extension could be created (schema.py tries)
    "has_freespace": "SELECT to_regprocedure('pg_freespace(regclass)') IS NOT NULL",
    # the free space of the table, its TOAST table (large values) and its indexes
    "db_size_in_use": """
        SELECT pg_total_relation_size('kine') - (
            SELECT COALESCE(sum(f.avail), 0)
            FROM (SELECT 'kine'::regclass::oid AS rel
                  UNION ALL SELECT reltoastrelid FROM pg_class
                            WHERE oid = 'kine'::regclass AND reltoastrelid <> 0
                  UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid = 'kine'::regclass
                 ) r, LATERAL pg_freespace(r.rel::regclass) f)""",
    "alarms": "SELECT member_id, alarm FROM geminikv_alarm ORDER BY member_id, alarm",
    "alarm_activate": "INSERT INTO geminikv_alarm (member_id, alarm) VALUES ($1, $2) "
    "ON CONFLICT DO NOTHING RETURNING 1",
    "alarm_deactivate": "DELETE FROM geminikv_alarm WHERE member_id = $1 AND alarm = $2 "
    "RETURNING 1",
    # Auth (storage/auth.py): one row of state, users, roles with their permissions, and
    # the simple tokens every process accepts. Changes run under the state row's lock.
    "auth_state": "SELECT enabled, revision FROM geminikv_auth WHERE id = 1",
    "auth_state_for_update": "SELECT enabled, revision FROM geminikv_auth WHERE id = 1 FOR UPDATE",
    "auth_set_state": "UPDATE geminikv_auth SET enabled = $1, revision = $2 WHERE id = 1",
    "auth_users": "SELECT name, password, no_password, roles FROM geminikv_auth_user ORDER BY name",
    "auth_roles": "SELECT name FROM geminikv_auth_role ORDER BY name",
    "auth_permissions": (
        "SELECT role, key, range_end, perm_type FROM geminikv_auth_permission "
        "ORDER BY role, key, range_end"
    ),
    "auth_put_user": """
        INSERT INTO geminikv_auth_user (name, password, no_password, roles)
        VALUES ($1, $2, $3, $4::bytea[])
        ON CONFLICT (name) DO UPDATE
        SET password = EXCLUDED.password, no_password = EXCLUDED.no_password,
            roles = EXCLUDED.roles
    """,
    "auth_delete_user": "DELETE FROM geminikv_auth_user WHERE name = $1",
    "auth_put_role": "INSERT INTO geminikv_auth_role (name) VALUES ($1) ON CONFLICT DO NOTHING",
    "auth_delete_role": "DELETE FROM geminikv_auth_role WHERE name = $1",
    "auth_clear_permissions": "DELETE FROM geminikv_auth_permission WHERE role = $1",
    "auth_put_permissions": """
        INSERT INTO geminikv_auth_permission (role, key, range_end, perm_type)
        SELECT $1, t.key, t.range_end, t.perm_type
        FROM unnest($2::bytea[], $3::bytea[], $4::int[]) AS t(key, range_end, perm_type)
    """,
    "auth_notify": f"SELECT pg_notify('{AUTH_NOTIFY_CHANNEL}', $1)",
    "auth_token_add": f"""
        INSERT INTO geminikv_auth_token (prefix, username, expiry_ms)
        VALUES ($1, $2, {NOW_MS} + $3::bigint) RETURNING id
    """,
    # (prefix, user, milliseconds left) of a live token; its expiry moved on by $2 ms
    "auth_token_use": f"""
        UPDATE geminikv_auth_token SET expiry_ms = {NOW_MS} + $2::bigint
        WHERE id = $1 AND expiry_ms > {NOW_MS} RETURNING prefix, username, $2::bigint
    """,
    "auth_tokens_drop_users": "DELETE FROM geminikv_auth_token WHERE username = ANY($1::bytea[])",
    "auth_tokens_drop_all": "DELETE FROM geminikv_auth_token",
    "auth_tokens_drop_expired": f"DELETE FROM geminikv_auth_token WHERE expiry_ms <= {NOW_MS}",
    # What identifies the cluster: the database, and this incarnation of Kine's table.
    "identity": "SELECT current_database()::text, 'kine'::regclass::oid::bigint",
}

SQL["insert_rows_returning"] = SQL["insert_rows"] + " RETURNING id, old_value"

# Statement text -> name, for timing every statement (see sqlstats.py).
NAMES: dict[str, str] = {text: name for name, text in SQL.items()}


def statement_name(query: str) -> str:
    """The name of a statement in SQL, else its first keyword (COMMIT, ROLLBACK, …)."""
    name = NAMES.get(query)
    if name is not None:
        return name
    head = query.split(None, 1)
    return head[0].lower() if head else "empty"
