"""Metrics and health endpoints: scraped and parsed after real traffic."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, Postgres, free_port
from tests.watching import WatchClient


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_and_health_after_traffic(postgres: Postgres) -> None:
    port = free_port()
    server = GeminiServer(
        postgres.new_database("metrics"), metrics_bind_address=f"127.0.0.1:{port}"
    ).start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while _get(base + "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/readyz") == (200, "ok\n")
        # counters are per process (tests run several servers in one): compare differences
        before = _samples(_get(base + "/metrics")[1])
        stubs = server.stubs()
        watch = WatchClient(stubs)
        watch.create(key=b"/m/", range_end=b"/m0")
        for i in range(20):
            stubs.kv.Put(pb.PutRequest(key=b"/m/%d" % i, value=b"v"))
        head = stubs.kv.Range(pb.RangeRequest(key=b"/m/1")).header.revision
        with pytest.raises(grpc.RpcError):
            stubs.kv.Range(pb.RangeRequest(key=b""))  # counted as INVALID_ARGUMENT
        status, text = _get(base + "/metrics")
        assert status == 200
        after = _samples(text)
        m = {k: v - before.get(k, 0.0) for k, v in after.items()}
        assert m[("geminikv_grpc_requests_total", (("code", "OK"), ("method", "Put")))] == 20
        assert (
            m[("geminikv_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Range")))]
            == 1
        )
        assert m[("geminikv_grpc_request_duration_seconds_count", (("method", "Put"),))] == 20
        assert m[("geminikv_writer_batch_requests_count", ())] >= 1
        # every statement is timed under its name (writes: one write_batch each; linearizable
        # reads: the current revision)
        for statement in ("write_batch", "current_rev"):
            key = ("geminikv_sql_duration_seconds_count", (("statement", statement),))
            assert m[key] >= 1, statement
        ok = ("geminikv_sql_statements_total", (("result", "ok"), ("statement", "write_batch")))
        assert m[ok] == m[("geminikv_writer_batch_requests_count", ())]
        m = after  # gauges: absolute
        assert m[("geminikv_revision", ())] == head
        assert m[("geminikv_watch_streams", ())] == 1
        assert m[("geminikv_watchers", ())] == 1
        assert m[("geminikv_leader", ())] == 1
        watch.close()
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
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            "statement=commit" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records if r.name == "geminikv.sql"]
        assert any("slow SQL: statement=write_batch duration=" in x for x in lines)
        assert any("statement=commit" in x for x in lines)
        # below the warning threshold (off here): info, one line each, no traceback
        assert {r.levelno for r in caplog.records if r.name == "geminikv.sql"} == {logging.INFO}
        assert all(r.exc_info is None for r in caplog.records if r.name == "geminikv.sql")
    finally:
        server.stop()
