"""A serving process leaves its event loop's thread under the normal policy and puts every
other thread, gRPC's among them, under SCHED_BATCH (server/scheduling.py), including the
threads gRPC starts while it serves. A server run inside another program (as the tests'
GeminiServer) leaves that program's threads alone."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiProcess, GeminiServer, Postgres, Stubs


def _policies(pid: int) -> dict[str, int]:
    """Each thread's ``tid name`` → its scheduling policy (a thread that ends meanwhile,
    as gRPC's pool retires idle ones, is left out)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            found[f"{tid} {name}"] = os.sched_getscheduler(int(tid))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def test_every_thread_but_the_event_loops_is_batch(postgres: Postgres) -> None:
    # the server inherits this thread's policy; the in-process servers of other tests
    # (GeminiServer) must not have changed it
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    server = GeminiProcess(postgres.new_database("scheduling")).start()
    try:
        assert server.process is not None
        pid = server.process.pid
        connections = [Stubs(server.endpoint) for _ in range(8)]

        def write(number: int) -> int:
            kv = connections[number % 8].kv
            return kv.Put(pb.PutRequest(key=b"/s/%d" % number, value=b"v")).header.revision

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            revisions = list(pool.map(write, range(400)))
        assert sorted(revisions) == list(range(2, 402))
        policies = _policies(pid)
        main = policies.pop(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        assert main == os.SCHED_OTHER
        # gRPC core's event engine threads and grpc.aio's poller among the others
        assert any("event_engine" in thread for thread in policies), policies
        assert len(policies) >= 3, policies
        assert {thread: os.SCHED_BATCH for thread in policies} == policies
        for stubs in connections:
            stubs.close()
    finally:
        server.stop()


def test_a_server_in_a_thread_leaves_the_process_threads_alone(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("scheduling_inside")).start()
    try:
        put = server.stubs().kv.Put(pb.PutRequest(key=b"/inside", value=b"v"))
        assert put.header.revision == 2
        policies = _policies(os.getpid())
        assert any("event_engine" in thread for thread in policies), policies
        assert {thread: os.SCHED_OTHER for thread in policies} == policies
    finally:
        server.stop()
