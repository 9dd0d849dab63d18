"""A fresh store is etcd's: empty at revision 1, the first write at revision 2, the same
counts; a database Go Kine created keeps its rows (tests/test_storage_compat.py)."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import Etcd, GeminiServer, Postgres, Stubs


def _fresh_view(stubs: Stubs) -> tuple[int, int, list[bytes], int, int]:
    everything = pb.RangeRequest(key=b"\0", range_end=b"\0")
    empty = stubs.kv.Range(everything)
    put = stubs.kv.Put(pb.PutRequest(key=b"/first", value=b"v"))
    after = stubs.kv.Range(everything)
    counted = stubs.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0", count_only=True))
    assert after.header.revision == put.header.revision
    return (
        empty.header.revision,
        empty.count,
        [kv.key for kv in after.kvs],
        put.header.revision,
        counted.count,
    )


def test_a_fresh_store_is_empty_at_revision_one_like_etcd(postgres: Postgres) -> None:
    gemini = GeminiServer(postgres.new_database("fresh")).start()
    etcd = Etcd().start()
    try:
        gk, ref = gemini.stubs(), etcd.stubs()
        ours, theirs = _fresh_view(gk), _fresh_view(ref)
        assert ours == theirs == (1, 0, [b"/first"], 2, 1)
        gk.close()
        ref.close()
    finally:
        etcd.stop()
        gemini.stop()


def test_processes_starting_at_once_on_a_missing_database_all_serve(postgres: Postgres) -> None:
    """Two control-plane nodes started together on a database that does not exist yet:
    one creates it, and every process serves the one store."""
    dsn = postgres.server.dsn(f"together_{uuid.uuid4().hex[:12]}")
    servers = [GeminiServer(dsn) for _ in range(3)]
    together = threading.Barrier(len(servers))

    def start(server: GeminiServer) -> GeminiServer:
        together.wait()
        return server.start()

    with ThreadPoolExecutor(len(servers)) as pool:
        results = list(pool.map(start, servers))
    try:
        stubs = [server.stubs() for server in results]
        put = stubs[0].kv.Put(pb.PutRequest(key=b"/together", value=b"v"))
        for s in stubs:
            got = s.kv.Range(pb.RangeRequest(key=b"/together"))
            assert [(kv.value, kv.mod_revision) for kv in got.kvs] == [(b"v", put.header.revision)]
            s.close()
    finally:
        for server in servers:
            server.stop()
