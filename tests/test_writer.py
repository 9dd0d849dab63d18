"""The writer's one-round-trip batch (``geminikv_write_v3``) and its fallbacks: another
process wrote since the index was read, the sequence handed out other ids, and batches
filling up under load. Every case must keep revisions gap-free, ordered and never lost."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import grpc
from prometheus_client import REGISTRY

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.batching import batch_sizes
from tests.servers import GeminiServer, Postgres, run_sync
from tests.waiting import eventually
from tests.watching import WatchClient


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _retries(reason: str) -> float:
    return _sample("geminikv_writer_batch_retries_total", reason=reason)


def test_a_row_written_elsewhere_makes_the_batch_retry_under_the_lock(
    postgres: Postgres,
) -> None:
    dsn = postgres.new_database("behind")
    # no notification and no poll during the test: the index stays behind the table
    server = GeminiServer(dsn, poll_interval=60.0).start()
    try:
        kv = server.stubs().kv
        kv.Put(pb.PutRequest(key=b"/behind/other", value=b"x"))

        async def insert_as_kine() -> int:  # Go Kine's create: no NOTIFY
            conn = await asyncpg.connect(dsn)
            try:
                return int(
                    await conn.fetchval(
                        "INSERT INTO kine(name, created, deleted, create_revision,"
                        " prev_revision, lease, value, old_value)"
                        " VALUES ('/behind/k', 1, 0, 0, 0, 0, 'kine', NULL) RETURNING id"
                    )
                )
            finally:
                await conn.close()

        kine_rev = run_sync(insert_as_kine())
        before = _retries("index_behind")
        # create-if-absent on the key Go Kine just created: evaluated against the stale
        # index it would succeed; under the lock, caught up, it must fail
        create = pb.TxnRequest(
            compare=[pb.Compare(key=b"/behind/k", target=pb.Compare.MOD, result=pb.Compare.EQUAL)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=b"/behind/k", value=b"gk"))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=b"/behind/k"))],
        )
        resp = kv.Txn(create)
        assert _retries("index_behind") == before + 1
        assert not resp.succeeded
        got = resp.responses[0].response_range.kvs[0]
        assert (got.value, got.mod_revision) == (b"kine", kine_rev)
        assert resp.header.revision == kine_rev
        put = kv.Put(pb.PutRequest(key=b"/behind/k", value=b"gk"))
        assert put.header.revision == kine_rev + 1
    finally:
        server.stop()


def test_ids_taken_from_the_sequence_become_gap_rows(postgres: Postgres) -> None:
    dsn = postgres.new_database("idstaken")
    server = GeminiServer(dsn).start()
    try:
        kv = server.stubs().kv
        first = kv.Put(pb.PutRequest(key=b"/ids/a", value=b"1")).header.revision
        watch = WatchClient(server.stubs())
        watch.create(key=b"/ids/", range_end=b"/ids0", start_revision=first + 1)
        before = _retries("ids_taken")

        async def burn() -> None:  # as a rolled-back insert (or Go Kine) would
            conn = await asyncpg.connect(dsn)
            try:
                await conn.fetch(
                    "SELECT nextval(pg_get_serial_sequence('kine', 'id'))"
                    " FROM generate_series(1, 3)"
                )
            finally:
                await conn.close()

        run_sync(burn())
        second = kv.Put(pb.PutRequest(key=b"/ids/b", value=b"2")).header.revision
        assert _retries("ids_taken") == before + 1
        assert second > first + 3

        async def rows() -> list[tuple[int, str]]:
            conn = await asyncpg.connect(dsn)
            try:
                found = await conn.fetch(
                    "SELECT id, name FROM kine WHERE id > $1 AND id <= $2 ORDER BY id",
                    first,
                    second,
                )
                return [(int(r[0]), str(r[1])) for r in found]
            finally:
                await conn.close()

        # no revision is left missing: every id between the two writes is a gap row
        found = run_sync(rows())
        assert [rid for rid, _ in found] == list(range(first + 1, second + 1))
        assert all(name.startswith("gap-") for _, name in found[:-1])
        assert found[-1] == (second, "/ids/b")
        resp = watch.next(10)
        assert resp is not None
        assert [(e.kv.key, e.kv.mod_revision) for e in resp.events] == [(b"/ids/b", second)]
        watch.close()
    finally:
        server.stop()


def test_concurrent_writes_share_batches(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("gather"), batch_wait=0.05).start()
    try:
        count = "geminikv_writer_batch_requests_count"
        total = "geminikv_writer_batch_requests_sum"
        batches, requests = _sample(count), _sample(total)
        errors: list[Exception] = []

        def write(n: int) -> None:
            kv = server.stubs().kv
            try:
                for i in range(25):
                    kv.Put(pb.PutRequest(key=b"/gather/%d/%d" % (n, i), value=b"v"))
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        written = _sample(total) - requests
        assert written == 200
        # requests from concurrent clients were committed together (how many share
        # depends on how the in-process clients' requests interleave with the batches)
        assert _sample(count) - batches < written
        listed = server.stubs().kv.Range(
            pb.RangeRequest(key=b"/gather/", range_end=b"/gather0", count_only=True)
        )
        assert listed.count == 200
        # Writes that arrive together go in one batch, exactly.
        assert server.app is not None and server.app.store is not None
        store = server.app.store

        async def together() -> list[int]:
            puts = (store.put(pb.PutRequest(key=b"/gather/t%d" % i)) for i in range(32))
            return [put.header.revision for put in await asyncio.gather(*puts)]

        with batch_sizes(store.writer._gather) as sizes:
            revisions = server.call(together)
        assert sizes == [32]
        assert revisions == list(range(revisions[0], revisions[0] + 32))  # in submission order
    finally:
        server.stop()


def test_a_write_is_answered_only_once_committed_even_inside_a_stray_transaction(
    postgres: Postgres,
) -> None:
    """The one-round-trip batch relies on autocommit. A writer connection left inside a
    transaction (a failed batch whose ROLLBACK failed too) must not answer writes that
    are not committed: they would vanish with the transaction."""
    dsn = postgres.new_database("stray")
    server = GeminiServer(dsn).start()
    try:
        kv = server.stubs().kv
        kv.Put(pb.PutRequest(key=b"/stray/a", value=b"1"))
        writer = server.app.store.writer  # type: ignore[union-attr]
        server.call(lambda: writer.conn.execute("BEGIN"))
        assert writer.conn.is_in_transaction()
        rev = kv.Put(pb.PutRequest(key=b"/stray/b", value=b"2")).header.revision

        async def committed() -> list[tuple[int, bytes]]:
            conn = await asyncpg.connect(dsn)
            try:
                found = await conn.fetch("SELECT id, value FROM kine WHERE name = '/stray/b'")
                return [(int(r[0]), bytes(r[1])) for r in found]
            finally:
                await conn.close()

        assert run_sync(committed()) == [(rev, b"2")]
        assert not writer.conn.is_in_transaction()
    finally:
        server.stop()


def _statements(name: str) -> float:
    return _sample("geminikv_sql_duration_seconds_count", statement=name)


def _leased_create(key: bytes, lease: int) -> pb.TxnRequest:
    """kube-apiserver's create of a leased object (an Event)."""
    return pb.TxnRequest(
        compare=[pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v", lease=lease))],
    )


def test_leased_writes_take_one_round_trip(postgres: Postgres) -> None:
    server = GeminiServer(postgres.new_database("leased")).start()
    try:
        stubs = server.stubs()
        lease = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
        locked, at_once = _statements("begin_locked"), _statements("write_batch")
        for i in range(10):
            stubs.kv.Put(pb.PutRequest(key=b"/leased/put/%d" % i, value=b"v", lease=lease))
            assert stubs.kv.Txn(_leased_create(b"/leased/txn/%d" % i, lease)).succeeded
        assert _statements("begin_locked") == locked
        assert _statements("write_batch") == at_once + 20
        ttl = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
        assert len(ttl.keys) == 20
        listed = stubs.kv.Range(pb.RangeRequest(key=b"/leased/", range_end=b"/leased0"))
        assert {kv.lease for kv in listed.kvs} == {lease}
    finally:
        server.stop()


def test_a_lease_gone_since_sends_the_batch_under_the_lock(postgres: Postgres) -> None:
    """The one-round-trip path takes every lease a request names to be live: PostgreSQL
    must refuse the batch when one is not, and the locked path answer as etcd does."""
    dsn = postgres.new_database("leasegone")
    server = GeminiServer(dsn).start()
    try:
        stubs = server.stubs()
        revoked = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
        stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=revoked))
        expired = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID

        async def expire() -> None:  # as if its TTL had run out (before expiry revokes it)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("UPDATE geminikv_lease SET expiry_ms = 0 WHERE id = $1", expired)
            finally:
                await conn.close()

        run_sync(expire())
        for lease in (revoked, expired):
            before = _retries("lease_gone")
            key = b"/gone/%d" % lease
            requests = [
                (stubs.kv.Put, pb.PutRequest(key=key, value=b"v", lease=lease)),
                (stubs.kv.Txn, _leased_create(key, lease)),
            ]
            for call, request in requests:
                try:
                    call(request)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    assert err.details() == "etcdserver: requested lease not found"
                else:
                    raise AssertionError("a write attached to a dead lease succeeded")
            assert _retries("lease_gone") == before + 2
            assert stubs.kv.Range(pb.RangeRequest(key=key)).count == 0
    finally:
        server.stop()


def test_a_revoke_racing_leased_writes_leaves_no_key_on_the_lease(postgres: Postgres) -> None:
    """Writers on one process attach keys to a lease while another process revokes it:
    every key written before the revoke is deleted by it, every write after it fails."""
    dsn = postgres.new_database("leaserace")
    writer_side, revoker = GeminiServer(dsn).start(), GeminiServer(dsn).start()
    try:
        lease = writer_side.stubs().lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
        written: list[int] = []
        refused: list[int] = []
        failures: list[Exception] = []
        stop = threading.Event()

        def write(n: int) -> None:
            kv = writer_side.stubs().kv
            i = 0
            while not stop.is_set():
                key = b"/race/%d/%d" % (n, i)
                i += 1
                try:
                    resp = kv.Txn(_leased_create(key, lease))
                    written.append(resp.header.revision)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        failures.append(err)
                    refused.append(i)
                    return

        threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        eventually(lambda: len(written) >= 200, "200 leased creates written", 60, 0.01)
        revoke = revoker.stubs().lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease))
        for t in threads:
            t.join(60)
        stop.set()
        assert not failures
        assert len(refused) == len(threads)  # every writer ran into the revoke
        assert written and max(written) < revoke.header.revision
        fresh = GeminiServer(dsn).start()  # an index built from the table alone
        try:
            for server in (writer_side, revoker, fresh):
                listed = server.stubs().kv.Range(
                    pb.RangeRequest(
                        key=b"/race/", range_end=b"/race0", revision=revoke.header.revision
                    )
                )
                assert listed.count == 0
        finally:
            fresh.stop()
    finally:
        writer_side.stop()
        revoker.stop()
