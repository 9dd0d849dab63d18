"""Linearizable reads check PostgreSQL's newest revision; under load concurrent reads share
one check (--batch-wait), and an expensive read (a list page) never waits for company."""

from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import REGISTRY

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.batching import batch_sizes
from tests.servers import GeminiServer, Postgres, run_sync


def _checks() -> float:
    name = "geminikv_sql_duration_seconds_count"
    return REGISTRY.get_sample_value(name, {"statement": "confirmed_rev"}) or 0.0


def test_concurrent_reads_share_revision_checks(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("shared"), batch_wait=0.05).start()
    try:
        kv = server.stubs().kv
        for i in range(8):
            newest = kv.Put(pb.PutRequest(key=b"/shared/%d" % i, value=b"v%d" % i)).header.revision
        before = _checks()
        wrong: list[bytes] = []

        async def read_all() -> None:
            async with grpc.aio.insecure_channel(server.endpoint) as channel:
                stub = rpc_pb2_grpc.KVStub(channel)

                async def read(n: int) -> None:
                    key = b"/shared/%d" % (n % 8)
                    for _ in range(20):
                        got = (await stub.Range(pb.RangeRequest(key=key))).kvs
                        if [k.value for k in got] != [b"v%d" % (n % 8)]:
                            wrong.append(key)

                await asyncio.gather(*(read(n) for n in range(32)))

        run_sync(read_all())
        assert not wrong
        checks = _checks() - before
        # How many share depends on how requests interleave with the checks (here the
        # client shares the server's process, and its GIL): some do, always.
        assert 0 < checks < 640
        # Reads that arrive together share one check, exactly (the server's health loop
        # reads too, once a second: it may join them, or have a check of its own).
        reads = server.app.store.reads  # type: ignore[union-attr]

        async def together() -> list[int]:
            return list(await asyncio.gather(*(reads.read() for _ in range(32))))

        with batch_sizes(reads.gather) as sizes:
            revisions = server.call(together)
        assert set(revisions) == {newest}
        assert max(sizes) >= 32 and len(sizes) <= 2, sizes
    finally:
        server.stop()


def test_a_list_page_does_not_wait_for_company(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("urgent"), batch_wait=2.0).start()
    try:
        kv = server.stubs().kv
        kv.Put(pb.PutRequest(key=b"/urgent/a", value=b"1"))
        reads = server.app.store.reads  # type: ignore[union-attr]

        def expect_company() -> None:  # as after a busy moment: 8 reads shared a check
            reads.gather.taken(8)

        expect_company()
        started = time.monotonic()
        page = kv.Range(pb.RangeRequest(key=b"/urgent/", range_end=b"/urgent0", limit=10))
        assert time.monotonic() - started < 1.0
        assert [k.key for k in page.kvs] == [b"/urgent/a"]
        # a point read in the same state waits (up to --batch-wait) for others to share
        expect_company()
        started = time.monotonic()
        got = kv.Range(pb.RangeRequest(key=b"/urgent/a"))
        assert time.monotonic() - started >= 1.5
        assert got.kvs[0].value == b"1"
    finally:
        server.stop()
