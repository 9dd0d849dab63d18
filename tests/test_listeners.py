"""Several gRPC servers of one process on the listen address (--grpc-listeners,
server/listeners.py): they share it with each other only, serve every connection spread
over them as one server did, and stop together."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
from pathlib import Path

import psutil

from geminikv.config import GRPC_LISTENERS, parse_settings
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiProcess, Postgres, Stubs


def _listening_sockets(port: int) -> int:
    """Sockets in LISTEN on ``port`` (any process; gRPC's are IPv6, v4-mapped)."""
    return sum(
        1
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    )


def test_every_listener_shares_the_address_and_every_connection_is_served(
    postgres: Postgres,
) -> None:
    server = GeminiProcess(postgres.new_database("listeners"), "--grpc-listeners", "4").start()
    try:
        assert _listening_sockets(server.port) == 4
        # 24 connections, each its own channel: the kernel spreads them over the four
        connections = [Stubs(server.endpoint) for _ in range(24)]

        def write_and_read(number: int) -> tuple[int, bytes]:
            kv = connections[number].kv
            put = kv.Put(pb.PutRequest(key=f"/l/{number}".encode(), value=b"v%d" % number))
            got = kv.Range(pb.RangeRequest(key=f"/l/{number}".encode()))
            assert got.kvs[0].mod_revision == put.header.revision
            return put.header.revision, got.kvs[0].value

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(write_and_read, range(24)))
        assert [value for _, value in answers] == [b"v%d" % n for n in range(24)]
        # one revision per write, whichever listener took it: 2 (the first write) to 25
        assert sorted(revision for revision, _ in answers) == list(range(2, 26))
        listed = connections[0].kv.Range(pb.RangeRequest(key=b"/l/", range_end=b"/l0"))
        assert listed.count == 24
        for stubs in connections:
            stubs.close()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert _listening_sockets(server.port) == 0
    finally:
        server.stop()


def test_a_busy_address_is_refused_not_shared(postgres: Postgres) -> None:
    dsn = postgres.new_database("listeners")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for listeners in ("1", "4"):
            taken = GeminiProcess(dsn, "--grpc-listeners", listeners, port=port)
            assert taken.exit_code() == 1
            assert f"cannot listen on 127.0.0.1:{port}" in taken.output()
            assert _listening_sockets(port) == 1  # the other server's, still alone


def test_a_unix_socket_has_one_listener(postgres: Postgres, tmp_path: Path) -> None:
    path = tmp_path / "grpc.sock"
    server = GeminiProcess(postgres.new_database("listeners"), "--listen-address", f"unix://{path}")
    server.spawn()
    try:
        stubs = Stubs(f"unix:{path}")
        stubs.kv.Put(pb.PutRequest(key=b"/u", value=b"1"))
        assert stubs.kv.Range(pb.RangeRequest(key=b"/u")).kvs[0].value == b"1"
        stubs.close()
    finally:
        server.stop()


def test_listener_settings() -> None:
    assert parse_settings([]).grpc_listeners == GRPC_LISTENERS == 8
    assert parse_settings(["--grpc-listeners", "2"]).grpc_listeners == 2
