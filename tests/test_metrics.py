"""Metrics and health endpoints: scraped and parsed after real traffic."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Callable

import asyncpg
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, Postgres, free_port, run_sync
from tests.waiting import eventually
from tests.watching import WatchClient


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# Every metric family the acceptance criteria name, by prometheus_client's family name
# (a counter's family drops "_total").
FAMILIES = {
    "geminikv_grpc_requests": "counter",  # per-RPC counts, errors by code
    "geminikv_grpc_request_duration_seconds": "histogram",
    "geminikv_writer_batch_requests": "histogram",
    "geminikv_writer_batch_duration_seconds": "histogram",  # commit latency
    "geminikv_follower_lag_revisions": "gauge",
    "geminikv_follower_lag_seconds": "gauge",
    "geminikv_watch_streams": "gauge",
    "geminikv_watchers": "gauge",
    "geminikv_watchers_unsynced": "gauge",
    "geminikv_leases": "gauge",
    "geminikv_leases_expired": "counter",
    "geminikv_compaction_deleted_rows": "counter",
    "geminikv_compact_revision": "gauge",
    "geminikv_sql_duration_seconds": "histogram",
    "geminikv_db_size_bytes": "gauge",
}


def _wait_ready(base: str, expected: int = 200, timeout: float = 15.0) -> None:
    eventually(
        lambda: _get(base + "/readyz")[0] == expected, f"/readyz answering {expected}", timeout, 0.1
    )


def _wait_for(base: str, check: Callable[[Samples], bool], timeout: float = 15.0) -> Samples:
    """The scraped samples, once ``check`` holds for them."""

    def scraped() -> Samples | None:
        samples = _samples(_get(base + "/metrics")[1])
        return samples if check(samples) else None

    samples = eventually(scraped, "metrics reaching the expected values", timeout, 0.2)
    assert samples is not None
    return samples


def test_metrics_and_health_after_traffic(postgres: Postgres) -> None:
    port = free_port()
    server = GeminiServer(
        postgres.new_database("metrics"), metrics_bind_address=f"127.0.0.1:{port}"
    ).start()
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base)
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/readyz") == (200, "ok\n")
        # counters are per process (tests run several servers in one): compare differences
        before = _samples(_get(base + "/metrics")[1])
        stubs = server.stubs()
        watch = WatchClient(stubs)
        watch.create(key=b"/m/", range_end=b"/m0")
        for i in range(20):
            stubs.kv.Put(pb.PutRequest(key=b"/m/%d" % i, value=b"v"))
        for _ in range(5):  # history for compaction to delete
            stubs.kv.Put(pb.PutRequest(key=b"/m/0", value=b"again"))
        # so far plain puts, each batch in one write_batch statement (a put with a lease
        # locks the lease's row in a transaction instead)
        puts = _samples(_get(base + "/metrics")[1])
        ok = ("geminikv_sql_statements_total", (("result", "ok"), ("statement", "write_batch")))
        batches = ("geminikv_writer_batch_requests_count", ())
        assert puts[ok] - before.get(ok, 0.0) == puts[batches] - before.get(batches, 0.0)
        batched = ("geminikv_writer_batch_requests_sum", ())
        assert puts[batched] - before.get(batched, 0.0) == 25
        kept = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
        expiring = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        stubs.kv.Put(pb.PutRequest(key=b"/m/kept", value=b"v", lease=kept))
        stubs.kv.Put(pb.PutRequest(key=b"/m/expiring", value=b"v", lease=expiring))
        head = stubs.kv.Range(pb.RangeRequest(key=b"/m/1")).header.revision
        with pytest.raises(grpc.RpcError):
            stubs.kv.Range(pb.RangeRequest(key=b""))  # counted as INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=12345))  # NOT_FOUND
        stubs.kv.Compact(pb.CompactionRequest(revision=head, physical=True))

        # the expiring lease goes, and the next count (every 5 s) sees the one left
        def expired(s: Samples) -> bool:
            gone = s[("geminikv_leases_expired_total", ())] - before.get(
                ("geminikv_leases_expired_total", ()), 0.0
            )
            return gone >= 1 and s[("geminikv_leases", ())] == 1

        after = _wait_for(base, expired)
        families = {f.name: f for f in text_string_to_metric_families(_get(base + "/metrics")[1])}
        for name, kind in FAMILIES.items():
            assert name in families, name
            assert families[name].type == kind, name
            assert families[name].samples, name

        m = {k: v - before.get(k, 0.0) for k, v in after.items()}
        assert m[("geminikv_grpc_requests_total", (("code", "OK"), ("method", "Put")))] == 27
        assert (
            m[("geminikv_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Range")))]
            == 1
        )
        assert (
            m[("geminikv_grpc_requests_total", (("code", "NOT_FOUND"), ("method", "LeaseRevoke")))]
            == 1
        )
        assert m[("geminikv_grpc_request_duration_seconds_count", (("method", "Put"),))] == 27
        put_seconds = m[("geminikv_grpc_request_duration_seconds_sum", (("method", "Put"),))]
        assert 0 < put_seconds < 27 * 5
        infinite = (
            "geminikv_grpc_request_duration_seconds_bucket",
            (("le", "+Inf"), ("method", "Put")),
        )
        assert m[infinite] == 27
        # 27 puts, the two revokes (the unknown lease's and the expiry's) and the compaction,
        # in as many batches or fewer
        assert 1 <= m[batches] <= 30
        assert m[batched] >= 27
        assert m[("geminikv_writer_batch_duration_seconds_count", ())] >= 1
        assert m[("geminikv_writer_batch_duration_seconds_sum", ())] > 0
        # every statement is timed under its name (writes: one write_batch each; linearizable
        # reads: the confirmed revision; compaction: its deletes by id)
        for statement in ("write_batch", "confirmed_rev", "lease_grant", "delete_rows"):
            key = ("geminikv_sql_duration_seconds_count", (("statement", statement),))
            assert m[key] >= 1, statement
            assert m[("geminikv_sql_duration_seconds_sum", (("statement", statement),))] > 0
        assert m[("geminikv_leases_expired_total", ())] >= 1
        # the five superseded values of /m/0 (the lease keys are newer than the compaction)
        assert m[("geminikv_compaction_deleted_rows_total", ())] >= 5

        m = after  # gauges: absolute
        assert m[("geminikv_revision", ())] > head  # the expiry deleted /m/expiring
        assert m[("geminikv_compact_revision", ())] == head
        assert m[("geminikv_watch_streams", ())] == 1
        assert m[("geminikv_watchers", ())] == 1
        assert m[("geminikv_watchers_unsynced", ())] == 0
        assert m[("geminikv_leases", ())] == 1
        assert m[("geminikv_follower_lag_revisions", ())] == 0
        assert m[("geminikv_follower_lag_seconds", ())] == 0
        assert m[("geminikv_db_size_bytes", ())] > 8192
        assert m[("geminikv_leader", ())] == 1
        watch.close()
        stubs.close()
    finally:
        server.stop()


def test_readyz_and_lag_while_the_follower_is_behind(postgres: Postgres) -> None:
    """A row the follower cannot apply (it is paused; the row written as Go Kine
    writes, without a notification): /readyz turns 503 and the lag grows, then both
    recover once the follower runs again."""
    port = free_port()
    dsn = postgres.new_database("ready")
    server = GeminiServer(dsn, metrics_bind_address=f"127.0.0.1:{port}").start()
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base)
        stubs = server.stubs()
        head = stubs.kv.Put(pb.PutRequest(key=b"/ready/a", value=b"v")).header.revision
        assert server.app is not None and server.app.store is not None
        follower = server.app.store.follower
        server.call(follower.pause)

        async def insert_as_kine() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    "INSERT INTO kine (name, created, deleted, create_revision, prev_revision,"
                    " lease, value, old_value) VALUES ('/ready/kine', 1, 0, 0, 0, 0, 'v', NULL)"
                )
            finally:
                await conn.close()

        run_sync(insert_as_kine())
        _wait_ready(base, 503)
        assert _get(base + "/healthz")[0] == 200  # alive, only behind

        def lagging(s: Samples) -> bool:
            return s[("geminikv_follower_lag_seconds", ())] >= 1.0

        behind = _wait_for(base, lagging)
        assert behind[("geminikv_follower_lag_revisions", ())] == 1
        assert behind[("geminikv_revision", ())] == head

        server.call(follower.resume)
        _wait_ready(base)
        caught_up = _samples(_get(base + "/metrics")[1])
        assert caught_up[("geminikv_revision", ())] == head + 1
        assert caught_up[("geminikv_follower_lag_revisions", ())] == 0
        assert caught_up[("geminikv_follower_lag_seconds", ())] == 0
        stubs.close()
    finally:
        server.stop()


def test_slow_sql_is_logged_with_statement_name(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    server = GeminiServer(
        postgres.new_database("slowsql"), slow_sql_threshold=1e-9, slow_sql_warning_threshold=0.0
    ).start()
    try:
        caplog.set_level(logging.INFO, logger="geminikv.sql")
        stubs = server.stubs()
        stubs.kv.Put(pb.PutRequest(key=b"/slow/a", value=b"v"))
        rev = stubs.kv.Range(pb.RangeRequest(key=b"/slow/a")).header.revision
        stubs.kv.Compact(pb.CompactionRequest(revision=rev))  # commits a transaction
        stubs.close()
        eventually(
            lambda: any("statement=commit" in r.getMessage() for r in caplog.records),
            "the commit logged",
            5,
        )
        lines = [r.getMessage() for r in caplog.records if r.name == "geminikv.sql"]
        assert any("slow SQL: statement=write_batch duration=" in x for x in lines)
        assert any("statement=commit" in x for x in lines)
        # below the warning threshold (off here): info, one line each, no traceback
        assert {r.levelno for r in caplog.records if r.name == "geminikv.sql"} == {logging.INFO}
        assert all(r.exc_info is None for r in caplog.records if r.name == "geminikv.sql")
    finally:
        server.stop()
