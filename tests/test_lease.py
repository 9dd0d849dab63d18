"""Leases: differential against etcd, expiry, restarts, failover, scale, Kine TTL rows."""

from __future__ import annotations

import time

import asyncpg
import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Pair
from tests.servers import Etcd, GeminiProcess, GeminiServer, Postgres, run_sync
from tests.waiting import eventually
from tests.watching import WatchClient

R = pb.RangeRequest


def _lease_id(prefix: bytes, n: int) -> int:
    # explicit ids, distinct per test: both servers must accept the same ones
    return (int(prefix[1:-1]) // 1000 % 10**8) * 10 + n


@pytest.mark.etcd
def test_lease_rpcs_match_etcd(pair: Pair, prefix: bytes) -> None:
    a, b = _lease_id(prefix, 1), _lease_id(prefix, 2)
    lease = "lease"
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=a, TTL=60), lease)
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=a, TTL=60), lease)  # exists
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=b, TTL=1), lease)  # min TTL
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=b + 100, TTL=9_000_000_001), lease)
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", value=b"1", lease=a))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"y", value=b"1", lease=a))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"z", value=b"1", lease=a))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"z", value=b"2"))  # detaches
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"y", value=b"2", ignore_lease=True))
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))
    e, g = pair.call(
        "LeaseTimeToLive", lambda rev: pb.LeaseTimeToLiveRequest(ID=a, keys=True), lease
    )
    assert e[1]["grantedTTL"] == g[1]["grantedTTL"] == "60"
    assert sorted(e[1]["keys"]) == sorted(g[1]["keys"]) and len(e[1]["keys"]) == 2
    assert abs(int(e[1]["TTL"]) - int(g[1]["TTL"])) <= 1
    pair.check("LeaseTimeToLive", lambda rev: pb.LeaseTimeToLiveRequest(ID=b + 7), lease)
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=b + 7), lease)
    pair.check(
        "Txn",
        lambda rev: pb.TxnRequest(
            success=[
                pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"w", value=b"v", lease=b + 7))
            ]
        ),
    )
    pair.check(
        "Txn",
        lambda rev: pb.TxnRequest(
            compare=[
                pb.Compare(
                    key=prefix + b"x", target=pb.Compare.LEASE, result=pb.Compare.EQUAL, lease=a
                )
            ],
            success=[pb.RequestOp(request_range=R(key=prefix + b"x"))],
        ),
    )
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=a), lease)
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=a), lease)
    pair.check("LeaseTimeToLive", lambda rev: pb.LeaseTimeToLiveRequest(ID=a), lease)
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=b), lease)


@pytest.mark.etcd
def test_keepalive_matches_etcd(etcd: Etcd, gemini: GeminiServer, prefix: bytes) -> None:
    lease = _lease_id(prefix, 3)
    answers = []
    for server in (etcd, gemini):
        stubs = server.stubs()
        stubs.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease, TTL=30))
        replies = list(
            stubs.lease.LeaseKeepAlive(
                iter(
                    [
                        pb.LeaseKeepAliveRequest(ID=lease),
                        pb.LeaseKeepAliveRequest(ID=lease + 999),
                    ]
                )
            )
        )
        answers.append([(r.ID, r.TTL) for r in replies])
        listed = stubs.lease.LeaseLeases(pb.LeaseLeasesRequest())
        assert lease in [status.ID for status in listed.leases]
        stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease))
        stubs.close()
    assert answers[0] == answers[1] == [(lease, 30), (lease + 999, 0)]


def test_lease_ids_fit_kines_column(gemini: GeminiServer) -> None:
    lease = gemini.stubs().lease
    with pytest.raises(grpc.RpcError) as err:
        lease.LeaseGrant(pb.LeaseGrantRequest(ID=2**31, TTL=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    picked = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=10))
    assert 0 < picked.ID < 2**31 and picked.TTL == 10
    lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=picked.ID))


def test_expiry_deletes_keys_with_events(gemini: GeminiServer, prefix: bytes) -> None:
    stubs = gemini.stubs()
    granted = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2))
    for name in (b"b", b"a", b"c"):
        stubs.kv.Put(pb.PutRequest(key=prefix + name, value=b"v", lease=granted.ID))
    watch = WatchClient(stubs)
    watch.create(key=prefix, range_end=prefix[:-1] + b"0", prev_kv=True)
    start = time.monotonic()
    resp = watch.next(10)
    late = time.monotonic() - start
    assert resp is not None
    deletes = [(e.type, e.kv.key, e.prev_kv.lease) for e in resp.events]
    assert deletes == [
        (1, prefix + b"a", granted.ID),
        (1, prefix + b"b", granted.ID),
        (1, prefix + b"c", granted.ID),
    ]  # one write, keys sorted
    assert late < 3.0  # TTL 2 s, expired within a second of it
    assert stubs.kv.Range(R(key=prefix, range_end=prefix[:-1] + b"0")).count == 0
    assert stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted.ID)).TTL == -1
    watch.close()


def test_keyless_expired_leases_are_collected(gemini: GeminiServer) -> None:
    lease = gemini.stubs().lease
    ids = [lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID for _ in range(20)]
    eventually(
        lambda: not set(ids) & {s.ID for s in lease.LeaseLeases(pb.LeaseLeasesRequest()).leases},
        "the expired leases collected",
    )


def test_leases_survive_restart(postgres: Postgres) -> None:
    dsn = postgres.new_database("leaserestart")
    server = GeminiServer(dsn).start()
    stubs = server.stubs()
    short = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3)).ID
    long = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
    stubs.kv.Put(pb.PutRequest(key=b"/l/short", value=b"v", lease=short))
    stubs.kv.Put(pb.PutRequest(key=b"/l/long", value=b"v", lease=long))
    stubs.close()
    server.stop()
    time.sleep(3.5)  # the short lease expires while geminikv is down
    server = GeminiServer(dsn).start()
    try:
        stubs = server.stubs()
        start = time.monotonic()
        eventually(lambda: not stubs.kv.Range(R(key=b"/l/short")).kvs, "/l/short expired", 5)
        assert time.monotonic() - start < 2.0
        remaining = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=long, keys=True))
        assert 590 <= remaining.TTL <= 600 and remaining.keys == [b"/l/long"]
        assert stubs.kv.Range(R(key=b"/l/long")).kvs[0].lease == long
    finally:
        server.stop()


def test_expiry_and_compaction_move_to_the_surviving_process(postgres: Postgres) -> None:
    dsn = postgres.new_database("leasefail")
    compaction = ("--compact-interval", "1s", "--compact-min-retain", "5")
    first = GeminiProcess(dsn, *compaction).start()
    time.sleep(1.0)  # the first process takes the expiry (and compaction) lock
    second = GeminiProcess(dsn, *compaction).start()
    try:
        kv1 = first.stubs()
        kv2 = second.stubs()
        lease = kv2.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=4)).ID
        kv2.kv.Put(pb.PutRequest(key=b"/fo/k", value=b"v", lease=lease))
        # keep-alives through either process count
        kv1.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease)])).next()
        assert "now runs lease expiry" in first.output()
        first.kill()
        start = time.monotonic()
        eventually(lambda: not kv2.kv.Range(R(key=b"/fo/k")).kvs, "/fo/k expired", 15)
        assert time.monotonic() - start < 7  # 4 s TTL, then the takeover within seconds
        assert "now runs lease expiry" in second.output()
        # automatic compaction moved with it: revisions written after the kill get compacted
        after_kill = kv2.kv.Put(pb.PutRequest(key=b"/fo/c", value=b"0")).header.revision
        for i in range(10):
            kv2.kv.Put(pb.PutRequest(key=b"/fo/c", value=b"%d" % i))

        def compacted() -> bool:
            try:
                kv2.kv.Range(R(key=b"/fo/c", revision=after_kill))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.OUT_OF_RANGE
                return True
            return False

        eventually(compacted, "the revisions written after the kill compacted", 10)
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_ten_thousand_leases_expiring_together(postgres: Postgres) -> None:
    server = GeminiProcess(postgres.new_database("leasemany")).start()
    try:
        stubs = server.stubs()
        ids = list(range(1, 10_001))
        for wave in range(0, 10_000, 500):  # concurrent requests, 500 at a time
            grants = [
                stubs.lease.LeaseGrant.future(pb.LeaseGrantRequest(ID=i, TTL=15))
                for i in ids[wave : wave + 500]
            ]
            assert all(g.result().TTL == 15 for g in grants)
        for wave in range(0, 10_000, 500):
            puts = [
                stubs.kv.Put.future(pb.PutRequest(key=b"/many/%05d" % i, value=b"v", lease=i))
                for i in ids[wave : wave + 500]
            ]
            assert all(p.result().header.revision for p in puts)
        watch = WatchClient(stubs)
        watch.create(key=b"/many/", range_end=b"/many0")
        deleted: set[bytes] = set()
        served = 0
        first_delete = 0.0

        def all_deleted() -> bool:
            nonlocal served, first_delete
            resp = watch.next(0.2)
            if resp is not None:
                deleted.update(e.kv.key for e in resp.events if e.type == 1)
                first_delete = first_delete or time.monotonic()
            stubs.kv.Range(R(key=b"/many/00000"), timeout=5)  # still answering
            served += 1
            return len(deleted) == 10_000

        eventually(all_deleted, "a delete event for each of the 10,000 keys", 90, interval=0)
        took = time.monotonic() - first_delete
        watch.close()
        assert stubs.kv.Range(R(key=b"/many/", range_end=b"/many0", count_only=True)).count == 0
        assert not stubs.lease.LeaseLeases(pb.LeaseLeasesRequest()).leases
        print(
            f"10000 leases expired: first to last delete event {took:.1f}s, "
            f"{served} reads served meanwhile"
        )
    finally:
        server.stop()


def test_go_kine_ttl_rows_expire(gemini: GeminiServer, prefix: bytes) -> None:
    dsn = gemini.settings.endpoint

    async def kine_put() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            # Go Kine stores the TTL in seconds in the lease column, with no lease row.
            await conn.execute(
                "INSERT INTO kine(name, created, deleted, create_revision, prev_revision,"
                " lease, value, old_value) VALUES ($1, 1, 0, 0, 0, 2, 'v', NULL)",
                (prefix + b"kine").decode(),
            )
        finally:
            await conn.close()

    run_sync(kine_put())
    kv = gemini.stubs().kv
    eventually(lambda: kv.Range(R(key=prefix + b"kine")).kvs, "Kine's row applied", 5)
    start = time.monotonic()
    eventually(lambda: not kv.Range(R(key=prefix + b"kine")).kvs, "Kine's row expired", 10)
    assert 1.0 < time.monotonic() - start < 4.0
