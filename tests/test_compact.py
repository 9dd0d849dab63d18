"""Compaction: etcd's semantics (differential), physical deletion in short statements,
resumption after a crash, several processes, automatic compaction."""

from __future__ import annotations

import asyncpg
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Pair
from tests.servers import Etcd, GeminiServer, Postgres, range_once_rebuilt, run_sync
from tests.waiting import eventually
from tests.watching import WatchClient

R = pb.RangeRequest


def _rows(dsn: str, where: str = "TRUE") -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM kine WHERE {where}"))
        finally:
            await conn.close()

    return int(run_sync(count()))


@pytest.mark.etcd
def test_compaction_matches_etcd(postgres: Postgres) -> None:
    etcd = Etcd().start()
    gemini = GeminiServer(postgres.new_database("cdiff")).start()
    try:
        pair = Pair(etcd.stubs(), gemini.stubs())
        for i in range(6):
            pair.check("Put", lambda rev, i=i: pb.PutRequest(key=b"/c/a", value=b"%d" % i))
        pair.check("Put", lambda rev: pb.PutRequest(key=b"/c/b", value=b"b"))
        pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=b"/c/b"))
        pair.check("Put", lambda rev: pb.PutRequest(key=b"/c/a", value=b"last"))
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(4), physical=True))
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(4)))
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(3)))
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(40)))
        for rel in range(1, 10):
            pair.check("Range", lambda rev, r=rel: R(key=b"/c/", range_end=b"/c0", revision=rev(r)))
            pair.check(
                "Txn",
                lambda rev, r=rel: pb.TxnRequest(
                    success=[pb.RequestOp(request_range=R(key=b"/c/a", revision=rev(r)))]
                ),
            )
        pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(8), physical=True))
        for rel in range(7, 10):
            pair.check("Range", lambda rev, r=rel: R(key=b"/c/", range_end=b"/c0", revision=rev(r)))
        e, g = WatchClient(pair.etcd), WatchClient(pair.gk)
        for rel in (7, 8, 9):
            for client, rev in ((e, pair.etcd_rev), (g, pair.gk_rev)):
                client.send(
                    create_request=pb.WatchCreateRequest(
                        key=b"/c/", range_end=b"/c0", start_revision=rev(rel)
                    )
                )
        answers = [
            sorted(
                ((r.watch_id, i), pair.normalise(("ok", r), to_rel))
                for i, r in enumerate(client.drain(1.0))
            )
            for client, to_rel in ((e, pair.etcd_to_rel), (g, pair.gk_to_rel))
        ]
        # per watch id, in order (etcd interleaves watchers arbitrarily)
        got = [[(wid, resp) for (wid, _), resp in side] for side in answers]
        e.close()
        g.close()
        assert got[0] == got[1]
    finally:
        gemini.stop()
        etcd.stop()


def test_physical_compaction_removes_rows_and_keeps_reads(postgres: Postgres) -> None:
    dsn = postgres.new_database("cphys")
    server = GeminiServer(dsn).start()
    try:
        kv = server.stubs().kv
        for i in range(300):
            kv.Put(pb.PutRequest(key=b"/p/%02d" % (i % 30), value=b"%d" % i))
        for i in range(0, 30, 3):
            kv.DeleteRange(pb.DeleteRangeRequest(key=b"/p/%02d" % i))
        head = kv.Range(R(key=b"/p/", range_end=b"/p0")).header.revision
        before = kv.Range(R(key=b"/p/", range_end=b"/p0"))
        assert _rows(dsn, "name LIKE '/p/%'") == 310
        kv.Compact(pb.CompactionRequest(revision=head, physical=True))
        # only the live keys' latest rows remain (20 keys), and the newest row even though
        # it is a compacted tombstone: MAX(id), the current revision, never goes down
        assert _rows(dsn, "name LIKE '/p/%'") == 21
        assert _rows(dsn, f"id = {head} AND deleted = 1") == 1
        after = kv.Range(R(key=b"/p/", range_end=b"/p0"))
        assert after.kvs == before.kvs
        assert kv.Range(R(key=b"/p/", range_end=b"/p0", revision=head)).kvs == before.kvs
        # versions and create revisions survive, and writes continue the chains
        kv.Put(pb.PutRequest(key=b"/p/01", value=b"new"))
        got = kv.Range(R(key=b"/p/01")).kvs[0]
        old = next(k for k in before.kvs if k.key == b"/p/01")
        assert (got.version, got.create_revision) == (old.version + 1, old.create_revision)
        kv.Put(pb.PutRequest(key=b"/p/00", value=b"recreated"))  # was deleted and compacted
        assert kv.Range(R(key=b"/p/00")).kvs[0].version == 1
    finally:
        server.stop()


def test_interrupted_compaction_finishes_after_restart(postgres: Postgres) -> None:
    dsn = postgres.new_database("cresume")
    server = GeminiServer(dsn).start()
    kv = server.stubs().kv
    for i in range(100):
        kv.Put(pb.PutRequest(key=b"/r/%d" % (i % 10), value=b"%d" % i))
    head = kv.Range(R(key=b"/r/0")).header.revision
    server.stop()

    async def logical_only() -> None:
        # As if geminikv crashed right after the logical compaction.
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "UPDATE kine SET prev_revision = $1 WHERE name = 'compact_rev_key'", head
            )
        finally:
            await conn.close()

    run_sync(logical_only())
    assert _rows(dsn, "name LIKE '/r/%'") == 100
    server = GeminiServer(dsn).start()
    try:
        eventually(
            lambda: _rows(dsn, "name LIKE '/r/%'") == 10, "the interrupted compaction finished"
        )
        kv = server.stubs().kv
        assert len(kv.Range(R(key=b"/r/", range_end=b"/r0")).kvs) == 10
    finally:
        server.stop()


def test_compaction_through_any_process_runs_once(postgres: Postgres) -> None:
    dsn = postgres.new_database("cmulti")
    a = GeminiServer(dsn).start()
    _wait_leading(a)
    b = GeminiServer(dsn).start()
    try:
        kva, kvb = a.stubs().kv, b.stubs().kv
        for i in range(50):
            kva.Put(pb.PutRequest(key=b"/m/k", value=b"%d" % i))
        head = kvb.Range(R(key=b"/m/k")).header.revision
        kvb.Compact(pb.CompactionRequest(revision=head, physical=True))
        assert _rows(dsn, "name = '/m/k'") == 1
        assert a.app is not None and b.app is not None
        # a counts the purged rows after the purge's notification, which answers b
        purger = a.app.compactor
        eventually(lambda: purger.deleted_rows == 49, "a counted the purged rows")
        assert b.app.compactor.deleted_rows == 0
        for stubs in (kva, kvb):
            assert stubs.Range(R(key=b"/m/k")).kvs[0].version == 50
        assert a.app.store is not None and b.app.store is not None
        index_a, index_b = a.app.store.index, b.app.store.index
        eventually(lambda: len(index_b.history(b"/m/k")) == 1, "b's index compacted to one /m/k")
        eventually(lambda: len(index_a.history(b"/m/k")) == 1, "a's index compacted to one /m/k")
    finally:
        a.stop()
        b.stop()


def test_a_process_behind_compaction_rebuilds_instead_of_missing_a_delete(
    postgres: Postgres,
) -> None:
    """A process that had not applied a delete when compaction removed its tombstone
    must not go on serving the deleted key: it sees the missing revision is compacted
    and rebuilds its index (and cancels its watches) rather than filling a gap."""
    dsn = postgres.new_database("clag")
    a = GeminiServer(dsn).start()
    _wait_leading(a)  # so a purges
    b = GeminiServer(dsn, poll_interval=60.0).start()
    try:
        kva, kvb = a.stubs().kv, b.stubs().kv
        kva.Put(pb.PutRequest(key=b"/lag/k", value=b"v"))
        assert len(kvb.Range(R(key=b"/lag/k")).kvs) == 1  # b has applied the put
        assert b.app is not None and b.app.store is not None
        follower = b.app.store.follower
        watch = WatchClient(b.stubs())
        watch.create(key=b"/lag/", range_end=b"/lag0")
        # b hears nothing more: no notifications, no poll for a minute
        b.call(follower.pause_notifications)
        deleted = kva.DeleteRange(pb.DeleteRangeRequest(key=b"/lag/k")).header.revision
        head = kva.Put(pb.PutRequest(key=b"/lag/other", value=b"o")).header.revision
        kva.Compact(pb.CompactionRequest(revision=head, physical=True))
        assert _rows(dsn, f"id = {deleted}") == 0  # the tombstone is gone
        assert int(follower.applied) < deleted
        # b's next linearizable read finds the missing revision compacted and rebuilds
        got = range_once_rebuilt(kvb, R(key=b"/lag/", range_end=b"/lag0"), "fell behind compaction")
        assert [kv.key for kv in got.kvs] == [b"/lag/other"]
        assert got.header.revision == head
        canceled = watch.wait_canceled("b's watch cancelled", 10)
        assert f"revision {deleted} not applied, compacted to {head}" in canceled.cancel_reason
        watch.close()
        # and b writes on the current state
        put = kvb.Put(pb.PutRequest(key=b"/lag/k", value=b"again"))
        assert kva.Range(R(key=b"/lag/k")).kvs[0].create_revision == put.header.revision
    finally:
        a.stop()
        b.stop()


def test_a_lagging_leader_catches_up_before_it_purges(postgres: Postgres) -> None:
    """The leader plans the purge from its index: it first applies every revision up
    to the compaction, else rows it had not seen would stay in the table for good."""
    dsn = postgres.new_database("cleader")
    b = GeminiServer(dsn, poll_interval=60.0).start()
    _wait_leading(b)  # so b purges
    a = GeminiServer(dsn).start()
    try:
        assert b.app is not None and b.app.store is not None
        follower = b.app.store.follower
        # b hears of new rows only when something wakes its follower
        b.call(follower.pause_notifications)
        kva = a.stubs().kv
        for i in range(20):
            head = kva.Put(pb.PutRequest(key=b"/ll/k", value=b"%d" % i)).header.revision
        assert int(follower.applied) < head
        kva.Compact(pb.CompactionRequest(revision=head))
        b.call(lambda: _wake_leader(b))  # as its poll would: reads the compact revision
        eventually(lambda: _rows(dsn, "name = '/ll/k'") == 1, "b's compaction of /ll/k")
        # counted after the purge's commit and its notification
        purger = b.app.compactor
        eventually(lambda: purger.deleted_rows == 19, "b counted the purged rows")
    finally:
        a.stop()
        b.stop()


async def _wake_leader(server: GeminiServer) -> None:
    app = server.app
    assert app is not None and app.store is not None and app.leader is not None
    await app.store.compaction.refresh()
    app.leader.wake()


def test_automatic_compaction(postgres: Postgres) -> None:
    dsn = postgres.new_database("cauto")
    server = GeminiServer(
        dsn, compact_interval=0.5, compact_min_retain=20, compact_batch_size=100
    ).start()
    try:
        kv = server.stubs().kv
        for i in range(200):
            kv.Put(pb.PutRequest(key=b"/auto/k", value=b"%d" % i))
        head = kv.Range(R(key=b"/auto/k")).header.revision
        eventually(
            lambda: server.app.store.index.compact_rev >= head - 20,  # type: ignore[union-attr]
            "an automatic compaction to the retained revisions",
            10,
        )
        assert server.app.store.index.compact_rev <= head - 20  # type: ignore[union-attr]
        eventually(lambda: _rows(dsn, "name = '/auto/k'") <= 21, "the rows of /auto/k purged", 10)
    finally:
        server.stop()


def test_apiserver_compaction_cycle(postgres: Postgres) -> None:
    """kube-apiserver's compactor: a txn on compact_rev_key, then Compact(previous rev)."""
    server = GeminiServer(postgres.new_database("ccycle")).start()
    kv = server.stubs().kv
    version = 0
    previous = 0
    for _ in range(3):
        resp = kv.Txn(
            pb.TxnRequest(
                compare=[
                    pb.Compare(
                        key=b"compact_rev_key",
                        target=pb.Compare.VERSION,
                        result=pb.Compare.EQUAL,
                        version=version,
                    )
                ],
                success=[
                    pb.RequestOp(
                        request_put=pb.PutRequest(key=b"compact_rev_key", value=b"%d" % previous)
                    )
                ],
                failure=[pb.RequestOp(request_range=R(key=b"compact_rev_key"))],
            )
        )
        if not resp.succeeded:
            version = resp.responses[0].response_range.kvs[0].version
            continue
        version += 1
        if previous:
            kv.Compact(pb.CompactionRequest(revision=previous))
        previous = resp.header.revision
        kv.Put(pb.PutRequest(key=b"/cycle/x", value=b"v"))
    assert kv.Range(R(key=b"compact_rev_key")).kvs[0].version == version == 3
    assert int(server.app.store.index.compact_rev) > 0  # type: ignore[union-attr]
    server.stop()


def _wait_leading(server: GeminiServer) -> None:
    """Until ``server`` holds the leader lock (it takes it in the background)."""

    def leading() -> bool:
        leader = server.app.leader if server.app is not None else None
        return leader is not None and leader.is_leader

    eventually(leading, "leading")
