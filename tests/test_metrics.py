"""Metrics and health endpoints: scraped and parsed after real traffic."""

from __future__ import annotations

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
        assert m[("geminikv_sql_duration_seconds_count", (("statement", "insert_rows"),))] >= 1
        assert m[("geminikv_sql_duration_seconds_count", (("statement", "read_index"),))] >= 1
        m = after  # gauges: absolute
        assert m[("geminikv_revision", ())] == head
        assert m[("geminikv_watch_streams", ())] == 1
        assert m[("geminikv_watchers", ())] == 1
        assert m[("geminikv_leader", ())] == 1
        watch.close()
    finally:
        server.stop()
