"""``--workers 2``: two serving processes on one gRPC address, sharing one database.

Which worker answers a connection is read from the kernel: the worker process that holds
the connection's server end (psutil, /proc). A worker's own figures come from its
metrics port (the base port + its number).
"""

from __future__ import annotations

import functools
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from geminikv.config import parse_settings
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.workers import count, metrics_address
from tests.ha.reliability import BackgroundTraffic
from tests.servers import GeminiProcess, Postgres, alive, free_port, postgres_pid
from tests.waiting import eventually

WORKERS = 2
# Each channel its own connection: channels to one target otherwise share one (gRPC's
# global subchannel pool), and so one worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Workers:
    """A geminikv started with --workers 2 and the embedded PostgreSQL, seen from outside."""

    def __init__(self, data: Path) -> None:
        self.metrics_port = _two_free_ports()
        self.gateway_port = free_port()
        self.data = data
        self.server = GeminiProcess(
            "",
            "--workers",
            str(WORKERS),
            "--data-dir",
            str(data),
            "--metrics-bind-address",
            f"127.0.0.1:{self.metrics_port}",
            "--http-listen-address",
            f"127.0.0.1:{self.gateway_port}",
        )
        self.server.start(timeout=120)
        self.wait_serving(1)

    @property
    def supervisor(self) -> psutil.Process:
        assert self.server.process is not None
        return psutil.Process(self.server.process.pid)

    def wait_serving(self, times: int) -> None:
        """Until the supervisor has logged every worker serving ``times`` times."""
        eventually(
            lambda: self.server.output().count(f"all {WORKERS} workers serving") >= times,
            lambda: f"all workers serving: {self.server.output()}",
            60,
            0.1,
        )

    def pids(self) -> list[int]:
        """The worker processes, by number (each listens on its own metrics port)."""
        found: dict[int, int] = {}
        for child in self.supervisor.children():
            for conn in child.net_connections("tcp"):
                number = conn.laddr.port - self.metrics_port
                if conn.status == psutil.CONN_LISTEN and 0 <= number < WORKERS:
                    found[number] = child.pid
        return [found[n] for n in sorted(found)]

    def answering(self, pid: int) -> set[int]:
        """Client ports of the connections worker ``pid`` holds on the gRPC address."""
        return {
            c.raddr.port
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.server.port
        }

    def channel_to(self) -> tuple[grpc.Channel, int]:
        """A new channel with a connection of its own, and the worker that holds it."""
        before = {pid: self.answering(pid) for pid in self.pids()}
        channel = grpc.insecure_channel(self.server.endpoint, options=OWN_CONNECTION)
        rpc_pb2_grpc.KVStub(channel).Range(pb.RangeRequest(key=b"/"), timeout=10)
        new = [pid for pid, ports in before.items() if self.answering(pid) - ports]
        assert len(new) == 1, f"the new connection is held by {new}"
        return channel, new[0]

    def channels_on_each(self) -> dict[int, grpc.Channel]:
        """One channel answered by each worker (opening new ones until both have one)."""
        by_worker: dict[int, grpc.Channel] = {}
        spare = []
        for _ in range(64):  # the kernel picks by a hash: both within a few, almost surely
            channel, pid = self.channel_to()
            if pid in by_worker:
                spare.append(channel)
            else:
                by_worker[pid] = channel
            if len(by_worker) == WORKERS:
                break
        for channel in spare:
            channel.close()
        return by_worker

    def metric(self, number: int, name: str) -> float:
        """The sum of a metric's samples on worker ``number``'s metrics port."""
        url = f"http://127.0.0.1:{self.metrics_port + number}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + " ", name + "{"))
        )

    def leaders(self) -> list[float]:
        return [self.metric(n, "geminikv_leader") for n in range(WORKERS)]


def _two_free_ports() -> int:
    """A port whose successor is free too (the workers' metrics ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    server = Workers(tmp_path_factory.mktemp("workers") / "data")
    yield server
    server.server.stop()


@pytest.fixture(scope="module")
def on_each(workers: Workers) -> Iterator[dict[int, grpc.Channel]]:
    """A channel answered by each worker, by worker pid."""
    by_worker = workers.channels_on_each()
    assert sorted(by_worker) == sorted(workers.pids()), "not every worker answered"
    yield by_worker
    for channel in by_worker.values():
        channel.close()


def test_both_workers_answer_on_one_address(
    workers: Workers, on_each: dict[int, grpc.Channel]
) -> None:
    pids = workers.pids()
    assert len(pids) == WORKERS and workers.supervisor.pid not in pids
    for pid in pids:  # the one gRPC address and the one gateway address, held by both
        listening = {
            c.laddr.port
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert {workers.server.port, workers.gateway_port} <= listening, (pid, listening)
    for number in range(WORKERS):  # each worker's own probes
        url = f"http://127.0.0.1:{workers.metrics_port + number}/readyz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    url = f"http://127.0.0.1:{workers.gateway_port}/v3/kv/range"
    request = urllib.request.Request(url, data=b'{"key": "Lw=="}', method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert b'"header"' in response.read()
    statuses = [
        rpc_pb2_grpc.MaintenanceStub(c).Status(pb.StatusRequest()) for c in on_each.values()
    ]
    assert len({s.header.cluster_id for s in statuses}) == 1  # one member, one cluster


def test_writes_through_one_are_read_and_watched_through_the_other(
    on_each: dict[int, grpc.Channel],
) -> None:
    one, other = on_each.values()
    a, b = rpc_pb2_grpc.KVStub(one), rpc_pb2_grpc.KVStub(other)
    watch = rpc_pb2_grpc.WatchStub(other)
    start = a.Range(pb.RangeRequest(key=b"/w/")).header.revision + 1
    create = pb.WatchRequest(
        create_request=pb.WatchCreateRequest(key=b"/w/", range_end=b"/w0", start_revision=start)
    )
    stream = watch.Watch(iter([create]), timeout=30)
    assert next(stream).created
    written = []
    for i in range(20):  # each write read back at once, linearizably, by the other worker
        put = a.Put(pb.PutRequest(key=b"/w/%d" % (i % 5), value=b"v%d" % i))
        got = b.Range(pb.RangeRequest(key=b"/w/%d" % (i % 5)))
        assert got.header.revision >= put.header.revision
        assert got.kvs[0].value == b"v%d" % i and got.kvs[0].mod_revision == put.header.revision
        written.append((put.header.revision, b"v%d" % i))
    seen: list[tuple[int, bytes]] = []
    while len(seen) < len(written):
        seen += [(e.kv.mod_revision, e.kv.value) for e in next(stream).events]
    assert seen == written
    stream.cancel()


def test_a_lease_granted_by_one_is_kept_alive_by_the_other(
    on_each: dict[int, grpc.Channel],
) -> None:
    one, other = on_each.values()
    kv_a, kv_b = rpc_pb2_grpc.KVStub(one), rpc_pb2_grpc.KVStub(other)
    lease_a, lease_b = rpc_pb2_grpc.LeaseStub(one), rpc_pb2_grpc.LeaseStub(other)
    lease = lease_a.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
    kv_a.Put(pb.PutRequest(key=b"/lease/kept", value=b"x", lease=lease))
    for _ in range(8):  # 4 s: twice its TTL, kept alive through the other worker
        [answer] = lease_b.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease)]))
        kept = answer.ID, answer.TTL
        assert kept == (lease, 2)
        time.sleep(0.5)
    assert kv_b.Range(pb.RangeRequest(key=b"/lease/kept")).count == 1
    ttl = lease_b.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
    assert ttl.grantedTTL == 2 and list(ttl.keys) == [b"/lease/kept"]
    # left alone it expires: the one leader revokes it, both workers see the key gone
    for kv in (kv_a, kv_b):
        eventually(functools.partial(_gone, kv, b"/lease/kept"), "the lease's key gone", 10)


def _gone(kv: rpc_pb2_grpc.KVStub, key: bytes) -> bool:
    return kv.Range(pb.RangeRequest(key=key)).count == 0


def test_exactly_one_worker_expires_leases_and_compacts(workers: Workers) -> None:
    assert sorted(workers.leaders()) == [0.0, 1.0]


def test_reliability_checker_finds_nothing_on_two_workers(workers: Workers) -> None:
    before = [workers.metric(n, "geminikv_grpc_requests_total") for n in range(WORKERS)]
    # Each client its own connection, each connection's worker picked by the kernel from a
    # hash of its ports: with 16 clients and 3 watchers, all on one worker ~ 1 run in 2**18
    # (8 clients did land on one worker in one CI run).
    traffic = BackgroundTraffic([workers.server.endpoint], seed=22, seconds=12, clients=16)
    traffic.start()
    time.sleep(6)
    connections = {pid: len(workers.answering(pid)) for pid in workers.pids()}
    violations, summary = traffic.finish()
    print(summary)
    assert not violations, "\n".join(violations[:30])
    after = [workers.metric(n, "geminikv_grpc_requests_total") for n in range(WORKERS)]
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert all(n > 100 for n in served), f"requests per worker: {served}; {connections=}"


def test_a_killed_worker_is_started_again(
    workers: Workers, on_each: dict[int, grpc.Channel]
) -> None:
    pids = workers.pids()
    leading = workers.leaders().index(1.0)
    victim, survivor = pids[leading], pids[1 - leading]
    psutil.Process(victim).kill()
    # the survivor takes over the leader's duties; its clients never notice
    eventually(lambda: workers.metric(1 - leading, "geminikv_leader") == 1.0, "a new leader", 10)
    kv = rpc_pb2_grpc.KVStub(on_each[survivor])  # the connection it held all along
    assert kv.Put(pb.PutRequest(key=b"/killed", value=b"1")).header.revision > 0
    # the supervisor starts the worker again, with the same number (metrics port)
    workers.wait_serving(2)
    new = workers.pids()
    assert new[1 - leading] == survivor and new[leading] not in pids
    assert sorted(workers.leaders()) == [0.0, 1.0]
    assert "exited with code -9; starting it again" in workers.server.output()
    # new connections reach both again, and the restarted worker sees the write
    by_worker = workers.channels_on_each()
    assert sorted(by_worker) == sorted(new)
    got = rpc_pb2_grpc.KVStub(by_worker[new[leading]]).Range(pb.RangeRequest(key=b"/killed"))
    assert got.kvs[0].value == b"1"
    for channel in by_worker.values():
        channel.close()


def test_sigterm_stops_every_worker_and_postgres(workers: Workers) -> None:
    pids = workers.pids()
    postmaster = postgres_pid(workers.data)
    assert postmaster is not None and alive(postmaster)
    process = workers.server.process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, workers.server.output()
    for pid in [*pids, postmaster]:
        assert not alive(pid), f"{pid} outlived the server"
    assert workers.server.output().rstrip().endswith("stopped")


def test_a_killed_supervisor_leaves_no_worker(postgres: Postgres) -> None:
    server = GeminiProcess(postgres.new_database("workers"), "--workers", "2").start()
    try:
        eventually(lambda: "all 2 workers serving" in server.output(), lambda: server.output(), 60)
        assert server.process is not None
        children = psutil.Process(server.process.pid).children()
        assert len(children) >= 2
        server.kill()  # SIGKILL: the kernel tells each worker (PR_SET_PDEATHSIG)
        eventually(
            lambda: not any(c.is_running() and c.status() != "zombie" for c in children),
            "every worker ended",
            30,
            0.1,
        )
    finally:
        server.stop()


def test_refused_or_failed_start_exits_with_an_error(postgres: Postgres, tmp_path: Path) -> None:
    dsn = postgres.new_database("workers")
    # a worker that cannot start (here: no certificate) ends the whole server
    missing = [str(tmp_path / "none.pem"), str(tmp_path / "none.key")]
    failing = GeminiProcess(
        dsn, "--workers", "2", "--server-cert-file", missing[0], "--server-key-file", missing[1]
    )
    assert failing.exit_code() == 1
    assert "worker 0 exited with code 1 before serving" in failing.output()
    # a busy address is refused, as by a single process, not shared
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = GeminiProcess(dsn, "--workers", "2", port=port)
        assert taken.exit_code() == 1
        assert f"cannot listen on 127.0.0.1:{port}" in taken.output()
    # unix sockets cannot be shared
    unix = GeminiProcess(dsn, "--workers", "2", "--listen-address", f"unix://{tmp_path}/s")
    assert unix.exit_code() == 1
    assert "needs a TCP --listen-address" in unix.output()


def test_worker_settings() -> None:
    assert parse_settings([]).workers == 1  # one process unless asked
    assert parse_settings([], {"GEMINIKV_WORKERS": "3"}).workers == 3
    assert count(0) >= 1 and count(4) == 4
    assert metrics_address(":8080", 2) == ":8082"
    assert metrics_address("0", 1) == "0"
    with pytest.raises(SystemExit):
        parse_settings(["--workers", "-1"])
