"""PostgreSQL going away under load: requests fail with Unavailable (clients retry), the
health endpoints follow, and geminikv recovers by itself losing no acknowledged write."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer, free_port, start_postgres, stop_postgres
from tests.waiting import eventually
from tests.watching import WatchClient


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


@pytest.mark.parametrize("shutdown", [signal.SIGINT, signal.SIGQUIT], ids=["fast", "immediate"])
def test_postgres_restart_under_write_load(tmp_path: Path, shutdown: signal.Signals) -> None:
    """Fast shutdown (SIGINT) or immediate shutdown (SIGQUIT: crash recovery at start)."""
    data = tmp_path / "pg"
    dsn = start_postgres(data)
    port = free_port()
    server = GeminiServer(dsn, metrics_bind_address=f"127.0.0.1:{port}").start()
    ready = f"http://127.0.0.1:{port}/readyz"
    acked: dict[bytes, bytes] = {}
    every_ack: list[tuple[bytes, bytes]] = []
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
                every_ack.append((key, value))
            except grpc.RpcError as err:
                codes.add(err.code())
                time.sleep(0.05)
            i += 1

    try:
        eventually(lambda: _ready(ready) == 200, "/readyz answering 200", 30, 0.1)
        watcher = WatchClient(server.stubs())
        watcher.create(key=b"/outage/", range_end=b"/outage0")
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)
        before = len(acked)
        stop_postgres(data, shutdown)
        eventually(lambda: _ready(ready) == 503, "/readyz answering 503, PostgreSQL down", 30, 0.1)
        time.sleep(1.0)
        start_postgres(data)
        eventually(lambda: _ready(ready) == 200, "/readyz answering 200 again", 30, 0.1)
        at_restart = dict(acked)

        def changed() -> list[bytes]:
            return [k for k, v in dict(acked).items() if at_restart.get(k) != v]

        # writes succeed again after the restart, without restarting geminikv
        eventually(changed, "a write acknowledged after the restart", 15, 0.1)
        time.sleep(1.0)
        stop.set()
        writer.join(30)
        assert before > 0 and len(acked) > 0
        assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes  # clients retry these
        assert changed(), "no write succeeded after PostgreSQL came back"
        kv = server.stubs().kv
        for key, value in acked.items():
            # the last acknowledged value, or a later write whose answer was lost in the
            # outage (applied entirely or not at all, never an older one)
            stored = kv.Range(pb.RangeRequest(key=key)).kvs[0].value
            assert int(stored) >= int(value)
        # the watch opened before the outage saw every acknowledged write, in order, once
        responses = watcher.drain()
        assert watcher.error is None and not any(r.canceled for r in responses)
        events = [(e.kv.key, e.kv.value, e.kv.mod_revision) for r in responses for e in r.events]
        revisions = [rev for _, _, rev in events]
        assert revisions == sorted(set(revisions)), "watch events out of order or repeated"
        seen = {(k, v) for k, v, _ in events}
        assert all(ack in seen for ack in every_ack), "a watch missed an acknowledged write"
        watcher.close()
    finally:
        stop.set()
        server.stop()
        stop_postgres(data)
