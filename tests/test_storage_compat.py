"""Kine compatibility: databases Go Kine created (every schema variant, both delete row
shapes) are served correctly, and rows geminikv writes read correctly through Kine's SQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from geminikv.mvcc.keys import ESCAPED
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import schema
from tests.servers import GeminiServer, Postgres, run_sync
from tests.waiting import eventually

R = pb.RangeRequest

# Kine's schema variants (docs/architecture.md#the-kine-table): pre-v0.11.5,
# v0.11.5-v0.12 (BIGINT, varchar), v0.13+ (text COLLATE "C").
VARIANTS = {
    "v0.11.4": """
        CREATE TABLE kine (id SERIAL PRIMARY KEY, name VARCHAR(630), created INTEGER,
            deleted INTEGER, create_revision INTEGER, prev_revision INTEGER, lease INTEGER,
            value bytea, old_value bytea);
        CREATE INDEX kine_name_index ON kine (name);
        CREATE INDEX kine_name_id_index ON kine (name,id);
        CREATE INDEX kine_id_deleted_index ON kine (id,deleted);
        CREATE INDEX kine_prev_revision_index ON kine (prev_revision);
        CREATE UNIQUE INDEX kine_name_prev_revision_uindex ON kine (name, prev_revision);
    """,
    "v0.12": """
        CREATE TABLE kine (id BIGSERIAL PRIMARY KEY, name VARCHAR(630), created INTEGER,
            deleted INTEGER, create_revision BIGINT, prev_revision BIGINT, lease INTEGER,
            value bytea, old_value bytea);
        CREATE INDEX kine_name_index ON kine (name);
        CREATE INDEX kine_name_id_index ON kine (name,id);
        CREATE INDEX kine_id_deleted_index ON kine (id,deleted);
        CREATE INDEX kine_prev_revision_index ON kine (prev_revision);
        CREATE UNIQUE INDEX kine_name_prev_revision_uindex ON kine (name, prev_revision);
    """,
    "v0.13+": """
        CREATE TABLE kine (id BIGSERIAL PRIMARY KEY, name text COLLATE "C", created INTEGER,
            deleted INTEGER, create_revision BIGINT, prev_revision BIGINT, lease INTEGER,
            value bytea, old_value bytea);
        CREATE INDEX kine_name_index ON kine (name);
        CREATE INDEX kine_name_id_index ON kine (name,id);
        CREATE INDEX kine_id_deleted_index ON kine (id,deleted);
        CREATE INDEX kine_prev_revision_index ON kine (prev_revision);
        CREATE UNIQUE INDEX kine_name_prev_revision_uindex ON kine (name, prev_revision);
        CREATE INDEX kine_list_query_index on kine(name, id DESC, deleted);
    """,
}

# Rows as Go Kine writes them (docs/architecture.md#row-shapes): (id, name, created,
# deleted, create_revision, prev_revision, lease, value, old_value).
KINE_ROWS = [
    (1, "compact_rev_key", 1, 0, 0, 0, 0, b"", None),
    (2, "/registry/health", 1, 0, 0, 0, 0, b'{"health":"true"}', None),
    (3, "/registry/pods/a", 1, 0, 0, 0, 0, b"a1", None),
    (4, "/registry/pods/b", 1, 0, 0, 0, 0, b"b1", None),
    (5, "/registry/pods/a", 0, 0, 3, 3, 0, b"a2", b"a1"),
    (6, "/registry/pods/b", 0, 1, 4, 4, 0, b"b1", b"b1"),  # delete, <= v0.15 shape
    (7, "/registry/pods/c", 1, 0, 0, 0, 60, b"c1", None),
    (8, "gap-8", 0, 1, 0, 0, 0, None, None),
    (9, "/registry/pods/c", 0, 1, 0, 7, 0, None, b"c1"),  # delete, v0.16 shape
    (10, "/registry/pods/b", 1, 0, 0, 6, 0, b"b2", b"b1"),  # create after delete
    (11, "/registry/pods/a", 0, 0, 3, 5, 0, b"a3", b"a2"),
]


def _build(postgres: Postgres, ddl: str) -> str:
    dsn = postgres.new_database("kine")

    async def fill() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(ddl)
            await conn.executemany(
                "INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision,"
                " lease, value, old_value) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                KINE_ROWS,
            )
            await conn.execute("SELECT setval(pg_get_serial_sequence('kine','id'), 11)")
        finally:
            await conn.close()

    asyncio.run(fill())
    return dsn


@pytest.fixture(params=sorted(VARIANTS))
def kine_db(request: pytest.FixtureRequest, postgres: Postgres) -> Iterator[str]:
    yield _build(postgres, VARIANTS[request.param])


def test_serves_go_kine_database(kine_db: str) -> None:
    server = GeminiServer(kine_db).start()
    try:
        kv = server.stubs().kv
        resp = kv.Range(R(key=b"/registry/pods/", range_end=b"/registry/pods0"))
        assert resp.header.revision == 11
        got = [
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.kvs
        ]
        assert got == [
            (b"/registry/pods/a", b"a3", 3, 11, 3),
            (b"/registry/pods/b", b"b2", 10, 10, 1),
        ]
        # history through both delete shapes
        at = lambda rev: [  # noqa: E731
            (k.key, k.value)
            for k in kv.Range(
                R(key=b"/registry/pods/", range_end=b"/registry/pods0", revision=rev)
            ).kvs
        ]
        assert at(5) == [(b"/registry/pods/a", b"a2"), (b"/registry/pods/b", b"b1")]
        assert at(6) == [(b"/registry/pods/a", b"a2")]
        assert at(8) == [(b"/registry/pods/a", b"a2"), (b"/registry/pods/c", b"c1")]
        assert at(9) == [(b"/registry/pods/a", b"a2")]
        # writes continue the chain Kine's unique index guards
        put = kv.Txn(
            pb.TxnRequest(
                compare=[
                    pb.Compare(
                        key=b"/registry/pods/a",
                        target=pb.Compare.MOD,
                        result=pb.Compare.EQUAL,
                        mod_revision=11,
                    )
                ],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=b"/registry/pods/a", value=b"a4"))
                ],
            )
        )
        assert put.succeeded and put.header.revision == 12
        a = kv.Range(R(key=b"/registry/pods/a")).kvs[0]
        assert (a.version, a.create_revision, a.mod_revision) == (4, 3, 12)
        # no second compact_rev_key or health row was added
        assert kv.Range(R(key=b"/registry/health")).kvs[0].mod_revision == 2
    finally:
        server.stop()


# Kine's own read of the current state (its "list current" query, with values).
KINE_LIST_CURRENT = """
    SELECT id, name, created, deleted, create_revision, prev_revision, lease, value, old_value
    FROM kine INNER JOIN (
        SELECT MAX(id) AS id FROM kine WHERE name >= $1 AND name < $2 GROUP BY name
    ) AS mkv USING (id)
    WHERE deleted = 0 ORDER BY name ASC
"""


def test_go_kine_reads_what_geminikv_wrote(postgres: Postgres) -> None:
    dsn = postgres.new_database("written")
    server = GeminiServer(dsn).start()
    try:
        kv = server.stubs().kv
        for i in range(3):
            kv.Put(pb.PutRequest(key=b"/registry/cm/k%d" % i, value=b"v%d" % i))
        kv.Put(pb.PutRequest(key=b"/registry/cm/k1", value=b"v1b"))
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"/registry/cm/k2"))
        kv.Put(pb.PutRequest(key=b"/registry/cm/k2", value=b"again"))
        ours = kv.Range(R(key=b"/registry/cm/", range_end=b"/registry/cm0"))
    finally:
        server.stop()

    async def kine_view() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(KINE_LIST_CURRENT, "/registry/cm/", "/registry/cm0"))
        finally:
            await conn.close()

    rows = asyncio.run(kine_view())
    # Kine derives create_revision = id for created rows, else the column.
    kine = [
        (r["name"].encode(), r["value"], r["id"] if r["created"] else r["create_revision"], r["id"])
        for r in rows
    ]
    assert kine == [(k.key, k.value, k.create_revision, k.mod_revision) for k in ours.kvs]
    # prev_revision chains and old_value as Kine fills them
    k1 = next(r for r in rows if r["name"] == "/registry/cm/k1")
    assert k1["old_value"] == b"v1" and k1["prev_revision"] > 0 and k1["created"] == 0


def test_restart_keeps_everything(postgres: Postgres) -> None:
    dsn = postgres.new_database("restart")
    first = GeminiServer(dsn).start()
    kv = first.stubs().kv
    for i in range(20):
        kv.Put(pb.PutRequest(key=b"/r/%02d" % (i % 7), value=b"%d" % i))
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"/r/03"))
    before = kv.Range(R(key=b"/r/", range_end=b"/r0"))
    history = kv.Range(R(key=b"/r/", range_end=b"/r0", revision=before.header.revision - 5))
    first.stop()
    second = GeminiServer(dsn).start()
    try:
        kv = second.stubs().kv
        now = kv.Range(R(key=b"/r/", range_end=b"/r0"))
        assert (now.kvs, now.count, now.header.revision) == (
            before.kvs,
            before.count,
            before.header.revision,
        )
        assert (
            kv.Range(R(key=b"/r/", range_end=b"/r0", revision=before.header.revision - 5)).kvs
            == history.kvs
        )
        resp = kv.Put(pb.PutRequest(key=b"/r/00", value=b"after"))
        assert resp.header.revision == before.header.revision + 1
        assert kv.Range(R(key=b"/r/00")).kvs[0].version == 4
    finally:
        second.stop()


def test_two_processes_agree(postgres: Postgres) -> None:
    dsn = postgres.new_database("pair")
    a = GeminiServer(dsn, poll_interval=5.0).start()
    b = GeminiServer(dsn, poll_interval=5.0).start()
    try:
        ka, kb = a.stubs().kv, b.stubs().kv
        for i in range(30):
            writer, reader = (ka, kb) if i % 2 else (kb, ka)
            put = writer.Put(pb.PutRequest(key=b"/two/k", value=b"%d" % i))
            got = reader.Range(R(key=b"/two/k")).kvs[0]  # linearizable: sees the write at once
            assert (got.value, got.mod_revision) == (b"%d" % i, put.header.revision)
        # optimistic concurrency across processes: exactly one of two racing updates wins
        rev = ka.Range(R(key=b"/two/k")).kvs[0].mod_revision
        update = lambda v: pb.TxnRequest(  # noqa: E731
            compare=[
                pb.Compare(
                    key=b"/two/k", target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=rev
                )
            ],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=b"/two/k", value=v))],
        )
        fa = ka.Txn.future(update(b"from-a"))
        fb = kb.Txn.future(update(b"from-b"))
        results = [fa.result().succeeded, fb.result().succeeded]
        assert sorted(results) == [False, True]
        assert ka.Range(R(key=b"/two/k")).kvs == kb.Range(R(key=b"/two/k")).kvs
        assert kb.Range(R(key=b"/two/k")).kvs[0].version == 31
        # serializable reads on the other process catch up through NOTIFY
        put = ka.Put(pb.PutRequest(key=b"/two/n", value=b"x"))
        got = eventually(
            lambda: kb.Range(R(key=b"/two/n", serializable=True)).kvs,
            "the other process's put seen through NOTIFY",
            2.0,  # was 100 tries 10 ms apart
            0.01,
        )
        assert got[0].mod_revision == put.header.revision
    finally:
        a.stop()
        b.stop()


def test_keys_postgres_cannot_hold_are_stored_escaped(gemini: GeminiServer, prefix: bytes) -> None:
    """A key text cannot hold is stored as ESCAPED + hex (ASCII); every other key as it
    is, as Go Kine stores it; both read back as written."""
    kv = gemini.stubs().kv
    keys = {
        prefix + b"\xff\xfe": None,
        prefix + b"a\x00b": None,
        ESCAPED + prefix: None,  # begins like the escape: escaped too, so no two collide
        prefix + "caf\u00e9".encode(): prefix + "caf\u00e9".encode(),  # UTF-8: as it is
    }
    for key in keys:
        kv.Put(pb.PutRequest(key=key, value=b"v"))
        assert [r.key for r in kv.Range(R(key=key)).kvs] == [key]

    async def names() -> set[bytes]:
        conn = await asyncpg.connect(gemini.settings.endpoint)
        try:
            rows = await conn.fetch("SELECT convert_to(name, 'UTF8') FROM kine")
            return {bytes(r[0]) for r in rows}
        finally:
            await conn.close()

    stored = run_sync(names())
    for key, as_is in keys.items():
        expected = as_is or ESCAPED + key.hex().encode()
        assert expected in stored, (key, expected)
        assert expected.isascii() or as_is
        # ESCAPED + prefix sorts above every test's prefix: leave no live key there
        kv.DeleteRange(pb.DeleteRangeRequest(key=key))


def test_starting_beside_a_busy_writer_takes_no_table_lock(postgres: Postgres) -> None:
    """A second process starting while a write transaction is open must not queue a
    table lock (every reader and writer would wait behind it)."""
    dsn = postgres.new_database("schemalock")
    GeminiServer(dsn).start().stop()  # creates the schema

    async def check() -> None:
        busy = await asyncpg.connect(dsn)
        fresh = await asyncpg.connect(dsn)
        try:
            await busy.execute("BEGIN")
            await busy.execute(
                "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, "
                "lease, value, old_value) VALUES ('/busy', 1, 0, 0, 0, 0, '', '')"
            )
            await asyncio.wait_for(schema.ensure_schema(fresh), 5)
            locks = await busy.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'kine'::regclass"
            )
            assert locks == 0
        finally:
            await busy.close()
            await fresh.close()

    run_sync(check())


def test_one_request_rows_with_go_kine(postgres: Postgres) -> None:
    """A multi-key Txn is consecutive rows to Go Kine's SQL and one revision to geminikv; a
    row Go Kine inserts afterwards (no revision column) is at its id; after a physical
    compaction and a restart, every revision and create revision is as before
    (docs/architecture.md#revisions)."""
    dsn = postgres.new_database("onerev")
    server = GeminiServer(dsn).start()
    try:
        kv = server.stubs().kv
        kv.Put(pb.PutRequest(key=b"/o/a", value=b"a1"))
        ops = [(b"/o/b", b"b1"), (b"/o/c", b"c1"), (b"/o/a", b"a2")]
        txn = kv.Txn(
            pb.TxnRequest(
                success=[pb.RequestOp(request_put=pb.PutRequest(key=k, value=v)) for k, v in ops]
            )
        )
        t = txn.header.revision
        got = kv.Range(R(key=b"/o/", range_end=b"/o0")).kvs
        assert [(k.key, k.mod_revision) for k in got] == [(b"/o/a", t), (b"/o/b", t), (b"/o/c", t)]
        assert kv.Put(pb.PutRequest(key=b"/o/b", value=b"b2")).header.revision == t + 1

        async def kine_insert() -> tuple[list[int], int]:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch(KINE_LIST_CURRENT, "/o/", "/o0")
                gk_id = await conn.fetchval(
                    "INSERT INTO kine (name, created, deleted, create_revision, prev_revision,"
                    " lease, value, old_value) VALUES ('/o/k', 1, 0, 0, 0, 0, 'k', NULL)"
                    " RETURNING id"
                )
                return sorted(r["id"] for r in rows), int(gk_id)
            finally:
                await conn.close()

        ids, kine_id = asyncio.run(kine_insert())
        assert len(set(ids)) == 3 and ids[-1] - ids[0] >= 2  # one row per key, by id
        eventually(lambda: bool(kv.Range(R(key=b"/o/k")).kvs), "Go Kine's row applied")
        assert kv.Range(R(key=b"/o/k")).kvs[0].mod_revision == kine_id
        after = kv.Put(pb.PutRequest(key=b"/o/z", value=b"z")).header.revision
        assert after == kine_id + 1
        kv.Compact(pb.CompactionRequest(revision=after, physical=True))
        before = kv.Range(R(key=b"/o/", range_end=b"/o0"))
    finally:
        server.stop()
    again = GeminiServer(dsn).start()
    try:
        kv = again.stubs().kv
        now = kv.Range(R(key=b"/o/", range_end=b"/o0"))
        assert (now.header.revision, now.kvs) == (before.header.revision, before.kvs)
        b = next(k for k in now.kvs if k.key == b"/o/b")
        assert (b.create_revision, b.mod_revision, b.version) == (t, t + 1, 2)
        assert kv.Put(pb.PutRequest(key=b"/o/y", value=b"y")).header.revision == after + 1
    finally:
        again.stop()
