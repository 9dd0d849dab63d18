"""Watches across processes: writes through one geminikv, watchers on another, and rows
written without a notification (as Go Kine writes them) picked up by the poll."""

from __future__ import annotations

import statistics
import threading
import time

import asyncpg
from prometheus_client import REGISTRY

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, Postgres, run_sync
from tests.waiting import eventually
from tests.watching import WatchClient


def test_writes_on_one_process_reach_watchers_on_another(postgres: Postgres) -> None:
    dsn = postgres.new_database("xwatch")
    a = GeminiServer(dsn, poll_interval=5.0).start()  # a long poll: NOTIFY must carry it
    b = GeminiServer(dsn, poll_interval=5.0).start()
    try:
        kv = a.stubs().kv
        watch = WatchClient(b.stubs())
        watch.create(key=b"/x/", range_end=b"/x0", prev_kv=True)
        acked: list[int] = []
        arrived: dict[int, float] = {}
        received: list[pb.WatchResponse] = []
        done = threading.Event()
        sent_at: dict[int, float] = {}

        def read() -> None:
            while not done.is_set():
                resp = watch.next(0.5)
                if resp is None:
                    continue
                now = time.monotonic()
                received.append(resp)
                for e in resp.events:
                    arrived[e.kv.mod_revision] = now

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(300):
            key = b"/x/k%d" % (i % 17)
            start = time.monotonic()
            if i % 10 == 9:
                resp = kv.DeleteRange(pb.DeleteRangeRequest(key=key))
                if not resp.deleted:
                    continue
                rev = resp.header.revision
            else:
                rev = kv.Put(pb.PutRequest(key=key, value=b"%d" % i)).header.revision
            sent_at[rev] = start
            acked.append(rev)
            time.sleep(0.005)
        eventually(
            lambda: sum(len(r.events) for r in received) >= len(acked),
            "an event on the other process for every acknowledged write",
        )
        done.set()
        reader.join()
        watch.close()
        revs = [e.kv.mod_revision for r in received for e in r.events]
        assert revs == acked
        # from the moment the write was sent until its event arrived on the other process
        latencies = sorted(arrived[rev] - sent_at[rev] for rev in acked)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(
            f"cross-process watch latency p50 {statistics.median(latencies) * 1000:.1f} ms,"
            f" p99 {p99 * 1000:.1f} ms"
        )
        assert p99 < 1.0  # far below the 5 s poll interval: NOTIFY delivered them
    finally:
        a.stop()
        b.stop()


async def _fetch_int(dsn: str, sql: str) -> int:
    """One statement on a connection of its own (as another program would run it)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


def test_rows_without_notification_arrive_by_poll(postgres: Postgres) -> None:
    dsn = postgres.new_database("kinewrites")
    server = GeminiServer(dsn, poll_interval=0.3).start()
    try:
        watch = WatchClient(server.stubs())
        watch.create(key=b"/kine/", range_end=b"/kine0", prev_kv=True)

        # Go Kine's insert (docs/architecture.md#commit-order-is-id-order): no advisory
        # lock, no NOTIFY.
        rev = run_sync(
            _fetch_int(
                dsn,
                "INSERT INTO kine(name, created, deleted, create_revision, prev_revision,"
                " lease, value, old_value) VALUES ('/kine/a', 1, 0, 0, 0, 0, 'from-kine',"
                " NULL) RETURNING id",
            )
        )
        resp = watch.next(5)
        assert resp is not None and [e.kv.mod_revision for e in resp.events] == [rev]
        assert resp.events[0].kv.value == b"from-kine"
        assert resp.events[0].kv.create_revision == rev
        got = server.stubs().kv.Range(pb.RangeRequest(key=b"/kine/a"))
        assert got.kvs[0].value == b"from-kine" and got.kvs[0].version == 1
        watch.close()
    finally:
        server.stop()


def _fetches() -> float:
    """How many catch-up queries (the poll's) this process has run."""
    labels = {"statement": "rows_with_values_after", "result": "ok"}
    return REGISTRY.get_sample_value("geminikv_sql_statements_total", labels) or 0.0


def test_poll_batch_size_bounds_each_catch_up_query(postgres: Postgres) -> None:
    dsn = postgres.new_database("pollbatch")
    server = GeminiServer(dsn, poll_interval=0.3, poll_batch_size=7).start()
    try:
        kv = server.stubs().kv
        before = _fetches()

        # 30 rows in one transaction, Go Kine's way (no NOTIFY): found by the poll
        last = run_sync(
            _fetch_int(
                dsn,
                "WITH ins AS (INSERT INTO kine(name, created, deleted, create_revision,"
                " prev_revision, lease, value, old_value) SELECT '/pb/' || n, 1, 0, 0,"
                " 0, 0, 'v', NULL FROM generate_series(10, 39) n RETURNING id)"
                " SELECT max(id) FROM ins",
            )
        )
        eventually(
            lambda: (
                kv.Range(pb.RangeRequest(key=b"/pb/", range_end=b"/pb0", count_only=True)).count
                >= 30
            ),
            "the rows picked up",
            10,
            0.1,
        )
        assert kv.Range(pb.RangeRequest(key=b"/pb/39", serializable=True)).header.revision >= last
        assert _fetches() - before >= 30 // 7  # 7 rows at most per query
    finally:
        server.stop()


def test_gap_from_rolled_back_insert_is_filled(postgres: Postgres) -> None:
    dsn = postgres.new_database("gap")
    server = GeminiServer(dsn, poll_interval=0.2).start()
    try:
        kv = server.stubs().kv

        async def burn_and_write() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                # An id drawn by a transaction that never commits leaves a hole in the ids.
                async with conn.transaction():
                    await conn.execute("SELECT nextval(pg_get_serial_sequence('kine','id'))")
                    await conn.execute("SELECT 1/0")
            except asyncpg.DivisionByZeroError:
                pass
            try:
                return int(
                    await conn.fetchval(
                        "INSERT INTO kine(name, created, deleted, create_revision, prev_revision,"
                        " lease, value, old_value) VALUES ('/gap/b', 1, 0, 0, 0, 0, 'b', NULL)"
                        " RETURNING id"
                    )
                )
            finally:
                await conn.close()

        rev = run_sync(burn_and_write())
        got = eventually(
            lambda: kv.Range(pb.RangeRequest(key=b"/gap/b", serializable=True)).kvs,
            "the row written after the gap applied",
            5,
        )
        assert got[0].mod_revision == rev
        put = kv.Put(pb.PutRequest(key=b"/gap/c", value=b"c"))
        assert put.header.revision == rev + 1
    finally:
        server.stop()
