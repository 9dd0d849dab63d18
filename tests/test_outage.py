"""PostgreSQL going away under load: requests fail with Unavailable (clients retry), the
health endpoints follow, and geminikv recovers by itself losing no acknowledged write."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage.embedded import EmbeddedPostgres
from tests.servers import GeminiServer, free_port


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _start_postgres(data: Path) -> str:
    # From a separate process: forking a process that runs gRPC (this one) can crash the
    # child in gRPC's fork handlers. The server outlives the helper.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from geminikv.storage.embedded import EmbeddedPostgres as E; "
            "E(sys.argv[1]).start()",
            str(data),
        ],
        check=True,
        timeout=120,
    )
    return EmbeddedPostgres(data).dsn()


def _stop_postgres(data: Path) -> None:
    """Fast shutdown (committed transactions are kept), and wait until it is down."""
    pidfile = data / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().split()[0])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    _until(lambda: not pidfile.exists())


def test_postgres_restart_under_write_load(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    dsn = _start_postgres(data)
    port = free_port()
    server = GeminiServer(dsn, metrics_bind_address=f"127.0.0.1:{port}").start()
    ready = f"http://127.0.0.1:{port}/readyz"
    acked: dict[bytes, bytes] = {}
    codes: set[grpc.StatusCode] = set()
    stop = threading.Event()

    def write() -> None:
        kv = server.stubs().kv
        i = 0
        while not stop.is_set():
            key, value = b"/outage/%d" % (i % 200), b"%d" % i
            try:
                kv.Put(pb.PutRequest(key=key, value=value), timeout=5)
                acked[key] = value
            except grpc.RpcError as err:
                codes.add(err.code())
                time.sleep(0.05)
            i += 1

    try:
        _until(lambda: _ready(ready) == 200)
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)
        before = len(acked)
        _stop_postgres(data)
        _until(lambda: _ready(ready) == 503)
        time.sleep(1.0)
        _start_postgres(data)
        _until(lambda: _ready(ready) == 200)
        at_restart = dict(acked)
        time.sleep(2.0)
        stop.set()
        writer.join(30)
        assert before > 0 and len(acked) > 0
        assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes  # clients retry these
        # writes succeed again after the restart, without restarting geminikv
        changed = [k for k, v in acked.items() if at_restart.get(k) != v]
        assert changed, "no write succeeded after PostgreSQL came back"
        kv = server.stubs().kv
        for key, value in acked.items():
            # the last acknowledged value, or a later write whose answer was lost in the
            # outage (applied entirely or not at all, never an older one)
            stored = kv.Range(pb.RangeRequest(key=key)).kvs[0].value
            assert int(stored) >= int(value)
    finally:
        stop.set()
        server.stop()
        _stop_postgres(data)
