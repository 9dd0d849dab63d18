"""Prometheus metrics, and the HTTP endpoints /metrics, /healthz and /readyz.

The HTTP server runs in a thread (prometheus-client's WSGI app behind wsgiref), so it
answers even while the event loop is busy; health and readiness are judged from
timestamps the event loop refreshes every second.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RpcMethodStats:
    """One method's request count by status code and latency histogram.

    Plain counters touched only by the event loop, read at scrape time: prometheus
    client's labelled metrics take a lock and walk the buckets in Python on every
    observation, which a profile showed as ~3 % of the event loop under load.
    """

    __slots__ = ("buckets", "codes", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(RPC_BUCKETS) + 1)  # the last one is +Inf
        self.codes: dict[str, int] = {}
        self.sum = 0.0

    def ok(self, seconds: float) -> None:
        self.buckets[bisect_left(RPC_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.codes["OK"] = self.codes.get("OK", 0) + 1

    def failed(self, code: str) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


class RpcStats(Collector):
    """geminikv_grpc_request_duration_seconds (successful calls) and
    geminikv_grpc_requests_total (every call, by status code), per method."""

    def __init__(self) -> None:
        self.methods: dict[str, RpcMethodStats] = {}

    def method(self, name: str) -> RpcMethodStats:
        return self.methods.setdefault(name, RpcMethodStats())

    def collect(self) -> Iterable[Metric]:
        seconds = HistogramMetricFamily(
            "geminikv_grpc_request_duration_seconds", "Unary etcd RPC latency", labels=["method"]
        )
        total = CounterMetricFamily(
            "geminikv_grpc_requests", "etcd RPCs handled", labels=["method", "code"]
        )
        for name, stats in list(self.methods.items()):
            counts = list(stats.buckets)  # a snapshot: the event loop keeps counting
            cumulative, running = [], 0
            for bound, count in zip((*map(str, RPC_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            seconds.add_metric([name], cumulative, stats.sum)
            for code, count in list(stats.codes.items()):
                total.add_metric([name, code], count)
        yield seconds
        yield total


RPC = RpcStats()
REGISTRY.register(RPC)
WRITER_BATCH = Histogram(
    "geminikv_writer_batch_requests",
    "Requests per write batch (one PostgreSQL transaction)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
WRITER_RETRIES = Counter(
    "geminikv_writer_batch_retries_total",
    "Write batches evaluated again under the lock: the index was behind, a lease used was "
    "gone, or ids were taken",
    ["reason"],
)
WRITER_COMMIT_SECONDS = Histogram(
    "geminikv_writer_batch_duration_seconds",
    "Time from lock to commit of a write batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SQL_SECONDS = Histogram(
    "geminikv_sql_duration_seconds",
    "SQL statement time by statement name",
    ["statement"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
SQL_TOTAL = Counter(
    "geminikv_sql_statements_total",
    "SQL statements run, by name and result",
    ["statement", "result"],
)
REVISION = Gauge("geminikv_revision", "Newest revision applied to this process's index")
COMPACT_REVISION = Gauge("geminikv_compact_revision", "The compact revision")
FOLLOWER_LAG = Gauge(
    "geminikv_follower_lag_revisions",
    "Committed revisions known to this process but not yet applied to its index",
)
FOLLOWER_LAG_SECONDS = Gauge(
    "geminikv_follower_lag_seconds",
    "How long the oldest committed revision not yet applied here has been known to exist "
    "(from a NOTIFY, a poll, a writer hand-over or a linearizable read's head revision); "
    "0 when caught up. Refreshed when the follower learns of the head or applies rows, "
    "including at each readiness check",
)
WATCH_STREAMS = Gauge("geminikv_watch_streams", "Open Watch streams")
WATCHERS = Gauge("geminikv_watchers", "Watchers, synced and catching up")
UNSYNCED_WATCHERS = Gauge("geminikv_watchers_unsynced", "Watchers catching up from the table")
LEASES = Gauge("geminikv_leases", "Leases in geminikv_lease, all processes (counted every 5 s)")
LEASES_EXPIRED = Counter("geminikv_leases_expired_total", "Leases revoked because they expired")
COMPACTED_ROWS = Counter("geminikv_compaction_deleted_rows_total", "Rows deleted by compaction")
DB_SIZE = Gauge("geminikv_db_size_bytes", "Size of the kine table with its indexes")
TASKS = Gauge("geminikv_asyncio_tasks", "asyncio tasks in the event loop (a leak shows here)")
LEADER = Gauge("geminikv_leader", "1 if this process expires leases and compacts")
POSTGRES_PRIMARY = Gauge(
    "geminikv_postgres_primary",
    "1 for the PostgreSQL host (host:port from --endpoint) this process writes to",
    ["host"],
)
POSTGRES_FAILOVERS = Counter(
    "geminikv_postgres_failovers_total",
    "Times this process found the primary on another host or timeline (a promotion)",
)
POSTGRES_RECONNECT_SECONDS = Histogram(
    "geminikv_postgres_reconnect_seconds",
    "From the primary found gone (the heartbeat, or a failed connection attempt) to a "
    "connection to a primary again",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
POSTGRES_STANDBY_LAG_SECONDS = Gauge(
    "geminikv_postgres_standby_replay_lag_seconds",
    "Each standby's replay lag as the primary reports it (pg_stat_replication.replay_lag; "
    "0 when idle), read by the heartbeat",
    ["standby", "sync_state"],
)
POSTGRES_STANDBY_LAG_BYTES = Gauge(
    "geminikv_postgres_standby_lag_bytes",
    "WAL the primary has written that each standby has not replayed (pg_stat_replication)",
    ["standby", "sync_state"],
)
POSTGRES_REACHABLE = Gauge(
    "geminikv_postgres_primary_reachable", "1 while the heartbeat reaches a primary"
)


class Health:
    """What /healthz and /readyz report; refreshed by the event loop."""

    STALE = 5.0

    def __init__(self) -> None:
        self.loop_beat = time.monotonic()
        self.database_ok = 0.0  # when PostgreSQL last answered
        self.caught_up = False
        self.primary_reachable: Callable[[], bool] = lambda: True  # the heartbeat's view

    def healthy(self) -> bool:
        return time.monotonic() - self.loop_beat < self.STALE

    def ready(self) -> bool:
        fresh = time.monotonic() - self.database_ok < self.STALE
        return self.healthy() and fresh and self.caught_up and self.primary_reachable()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_http(address: str, health: Health) -> WSGIServer | None:
    """Serve /metrics, /healthz and /readyz on ``address`` (``0`` or empty: off)."""
    if address in ("", "0"):
        return None
    host, _, port = address.rpartition(":")
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = health.healthy() if path == "/healthz" else health.ready()
            start("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        result: Iterable[bytes] = metrics_app(environ, start)
        return result

    server = make_server(host or "0.0.0.0", int(port), app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s/metrics, /healthz, /readyz", address)
    return server
