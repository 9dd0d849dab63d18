"""SIGTERM under load: in-flight calls finish or fail with Unavailable, watch streams end
with etcd's "server stopped", the embedded PostgreSQL stops, and nothing acknowledged is lost."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage.embedded import EmbeddedPostgres
from tests.servers import GeminiProcess, postgres_pid
from tests.waiting import eventually
from tests.watching import WatchClient


def test_sigterm_under_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = GeminiProcess("", "--data-dir", str(data)).start(timeout=120)
    acked: dict[bytes, bytes] = {}
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def write(worker: int) -> None:
        stubs = server.stubs()
        i = 0
        while not stop.is_set():
            key, value = b"/sigterm/%d/%d" % (worker, i % 50), b"%d" % i
            try:
                stubs.kv.Put(pb.PutRequest(key=key, value=value), timeout=10)
                acked[key] = value
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    break  # the server is gone
            i += 1
        stubs.close()

    try:
        watcher = WatchClient(server.stubs())
        watcher.create(key=b"/sigterm/", range_end=b"/sigterm0")
        writers = [threading.Thread(target=write, args=(w,)) for w in range(8)]
        for t in writers:
            t.start()
        time.sleep(1.5)
        pg_pid = postgres_pid(data)
        assert pg_pid is not None and len(acked) > 0
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.output()
        stop.set()
        for t in writers:
            t.join(30)
            assert not t.is_alive(), "a call hung across shutdown"
        # Every call succeeded or failed as on a stopping etcd: Unavailable (refused), or,
        # for a call that reached gRPC in the instant it shut down and before a handler
        # took it, Cancelled by gRPC itself (never applied: no handler ran).
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
        assert grpc.StatusCode.UNAVAILABLE in codes
        # the watch stream ended with Unavailable (clients resume elsewhere), not silently
        eventually(lambda: watcher.error is not None, "the watch stream ended with an error")
        assert watcher.error is not None
        assert watcher.error.code() == grpc.StatusCode.UNAVAILABLE
        assert watcher.error.details() == "etcdserver: server stopped"
        # geminikv stopped the PostgreSQL it started
        assert postgres_pid(data) is None
        assert "Traceback" not in server.output(), server.output()
        # and every acknowledged write is there after a restart
        server = GeminiProcess("", "--data-dir", str(data)).start(timeout=120)
        stubs = server.stubs()
        got = stubs.kv.Range(pb.RangeRequest(key=b"/sigterm/", range_end=b"/sigterm0"))
        stored = {kv.key: kv.value for kv in got.kvs}
        for key, value in acked.items():
            # the acknowledged value, or a later one whose answer was cut off by shutdown
            assert int(stored[key]) >= int(value)
        stubs.close()
    finally:
        stop.set()
        server.stop()
        EmbeddedPostgres(data).stop()
