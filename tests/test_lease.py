"""Leases: differential against etcd, expiry, restarts and leader changes (etcd's
Lessor.Promote), scale, Kine TTL rows."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from geminikv.config import LEADER_MAX_SLEEP
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2 as mvccpb
from tests.differential import Pair
from tests.ha.keepalive import KeepAlive
from tests.servers import (
    Etcd,
    GeminiProcess,
    GeminiServer,
    Postgres,
    Stubs,
    run_sync,
    start_postgres,
    stop_postgres,
)
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


def test_concurrent_grants_each_get_their_own_lease(gemini: GeminiServer, prefix: bytes) -> None:
    """Grants arriving together are inserted together: every random one still gets an
    id of its own, and of two grants of one explicit id exactly one succeeds."""
    stubs = gemini.stubs()
    same, other = _lease_id(prefix, 1), _lease_id(prefix, 2)
    requests = [pb.LeaseGrantRequest(TTL=30 + n % 3) for n in range(40)]
    requests += [pb.LeaseGrantRequest(ID=i, TTL=40) for i in (same, other, same)]
    calls = [stubs.lease.LeaseGrant.future(r, timeout=30) for r in requests]
    granted, refused = [], []
    for call in calls:
        try:
            granted.append(call.result())
        except grpc.RpcError as err:
            refused.append(err.details())
    assert refused == ["etcdserver: lease already exists"]
    ids = [g.ID for g in granted]
    assert len(set(ids)) == len(ids) == 42 and {same, other} <= set(ids)
    assert sorted(g.TTL for g in granted) == sorted([30 + n % 3 for n in range(40)] + [40, 40])
    for g in granted:
        ttl = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=g.ID), timeout=30)
        assert ttl.grantedTTL == g.TTL and 0 < ttl.TTL <= g.TTL
        stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=g.ID), timeout=30)
    stubs.close()


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
    # TTL 2 s; the leader looks for expired leases every LEADER_MAX_SLEEP at most, and the
    # deleting write and its event take the rest (a second on a loaded machine)
    assert late < 2.0 + LEADER_MAX_SLEEP + 1.0
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


@pytest.mark.etcd
def test_a_restart_gives_every_lease_its_ttl_again_as_etcd_does(postgres: Postgres) -> None:
    """etcd recovers leases with no expiry and its leader renews each to its TTL plus the
    election timeout before expiring any (Lessor.Promote): a lease that ran out while the
    server was down lives a TTL more after the restart. geminikv's process taking the
    leader lock does the same."""
    short, long = 7001, 7002
    etcd = Etcd()
    gemini = GeminiProcess(postgres.new_database("leaserestart"))
    servers: list[Etcd | GeminiProcess] = [etcd, gemini]
    try:
        for server in servers:
            stubs = server.start().stubs()
            stubs.lease.LeaseGrant(pb.LeaseGrantRequest(ID=short, TTL=3))
            stubs.lease.LeaseGrant(pb.LeaseGrantRequest(ID=long, TTL=600))
            stubs.kv.Put(pb.PutRequest(key=b"/l/short", value=b"v", lease=short))
            stubs.kv.Put(pb.PutRequest(key=b"/l/long", value=b"v", lease=long))
            stubs.close()
            server.kill()
        time.sleep(3.5)  # the short lease runs out while both are down
        restarted, clients = [], []
        for server in servers:  # each asked at once: the other's start takes seconds
            stubs = server.start().stubs()
            restarted.append(time.monotonic())
            clients.append(stubs)
            alive = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=short, keys=True))
            assert 1 <= alive.TTL <= 4 and alive.grantedTTL == 3, (server.name, alive)
            assert list(alive.keys) == [b"/l/short"]
        expired_after = []
        for stubs, at in zip(clients, restarted, strict=True):

            def expired(s: Stubs = stubs) -> bool:
                return not s.kv.Range(R(key=b"/l/short")).kvs

            eventually(expired, "the short lease expired", 15)
            expired_after.append(time.monotonic() - at)
            remaining = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=long, keys=True))
            assert 590 <= remaining.TTL <= 601 and remaining.keys == [b"/l/long"]
            assert stubs.kv.Range(R(key=b"/l/long")).kvs[0].lease == long
            stubs.close()
        print(
            "\nlease of TTL 3 s run out while down expired after the restart: "
            f"etcd {expired_after[0]:.1f} s, geminikv {expired_after[1]:.1f} s"
        )
    finally:
        for server in servers:
            server.stop()


def _stop_signal(process: GeminiProcess) -> None:
    assert process.process is not None
    os.kill(process.process.pid, signal.SIGSTOP)


def test_a_new_leader_renews_every_lease_before_expiring_any(postgres: Postgres) -> None:
    """The leading process hangs (SIGSTOP, its session and lock held) longer than a lease's
    TTL, then dies: the other takes the lock, renews every lease (etcd's Lessor.Promote)
    and only then expires: the overdue lease lives its TTL again and is deleted once; a
    lease kept alive through the survivor never expires; a keep-alive of an overdue lease
    sent while nobody leads waits for the new leader and renews it (etcd's Renew waits);
    automatic compaction moves to the survivor."""
    dsn = postgres.new_database("leasefail")
    compaction = ("--compact-interval", "1s", "--compact-min-retain", "5")
    first = GeminiProcess(dsn, *compaction).start()
    eventually(lambda: "now runs lease expiry" in first.output(), "the first process leads")
    second = GeminiProcess(dsn, *compaction).start()
    kept: KeepAlive | None = None
    try:
        kv2 = second.stubs()
        leases = {}
        for name in (b"a", b"b", b"c"):
            leases[name] = kv2.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
            kv2.kv.Put(pb.PutRequest(key=b"/fo/" + name, value=b"v", lease=leases[name]))
        watch = WatchClient(kv2)
        watch.create(key=b"/fo/", range_end=b"/fo0")
        kept = KeepAlive(second.endpoint, leases[b"b"]).start()
        # keep-alives through either process count
        first.stubs().lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=leases[b"a"])])).next()
        _stop_signal(first)
        time.sleep(3.0)  # a and c overdue, nobody to expire them
        assert kv2.kv.Range(R(key=b"/fo/", range_end=b"/fo0")).count == 3
        late: list[int] = []
        request = pb.LeaseKeepAliveRequest(ID=leases[b"c"])
        thread = threading.Thread(
            target=lambda: late.extend(r.TTL for r in kv2.lease.LeaseKeepAlive(iter([request])))
        )
        thread.start()
        first.kill()
        eventually(lambda: "now runs lease expiry" in second.output(), "the second leads", 10)
        took_over = time.monotonic()
        assert kv2.kv.Range(R(key=b"/fo/a")).kvs  # renewed, not expired at once
        thread.join(10)
        assert late == [2]  # waited for the new leader, then renewed (not TTL 0)
        deleted: dict[bytes, float] = {}

        def both_deleted() -> bool:
            resp = watch.next(0.2)
            for event in resp.events if resp is not None else ():
                assert event.type == mvccpb.Event.DELETE and event.kv.key not in deleted
                deleted[event.kv.key] = time.monotonic()
            return len(deleted) == 2

        eventually(both_deleted, "a and c expired", 15, interval=0)
        assert set(deleted) == {b"/fo/a", b"/fo/c"}
        # not before its TTL counted from the take-over (plus etcd's 1 s extension)
        assert deleted[b"/fo/a"] - took_over >= 2.0
        assert watch.drain(quiet=1.0) == []  # b, kept alive, never expires; nothing twice
        assert kv2.kv.Range(R(key=b"/fo/b")).kvs
        assert kept.gone() == [] and len(kept.answers) > 10
        print(
            f"\noverdue lease of TTL 2 s deleted {deleted[b'/fo/a'] - took_over:.2f} s after "
            f"the take-over; {len(kept.answers)} keep-alives of the other answered, "
            f"{len(kept.errors)} streams ended"
        )
        assert "renewed to their TTL" in second.output()
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
        if kept is not None:
            kept.stop()
        first.kill()
        second.stop()


def test_a_lease_kept_alive_across_a_postgresql_outage_never_expires(tmp_path: Path) -> None:
    """PostgreSQL down for longer than a lease's TTL: keep-alive streams end Unavailable
    with etcd's "request timed out" (etcd's answer without a leader) and the client opens
    them again, as clientv3 does; once PostgreSQL is back the leader takes its lock again
    and renews every lease first (etcd's Promote), so neither the kept lease nor the one
    left alone expires because of the outage; the one left alone expires a TTL later."""
    data = tmp_path / "pg"
    dsn = start_postgres(data)
    server = GeminiProcess(dsn).start()
    kept: KeepAlive | None = None
    try:
        stubs = server.stubs()
        kept_id = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        left = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        stubs.kv.Put(pb.PutRequest(key=b"/po/kept", value=b"v", lease=kept_id))
        stubs.kv.Put(pb.PutRequest(key=b"/po/left", value=b"v", lease=left))
        kept = KeepAlive(server.endpoint, kept_id).start()
        eventually(lambda: kept is not None and len(kept.answers) >= 2, "keep-alives answered")
        stop_postgres(data)
        time.sleep(3.0)  # both leases' TTLs run out meanwhile
        start_postgres(data)
        back = time.monotonic()
        eventually(lambda: any(at > back for at, _ in kept.answers), "keep-alives again", 30)
        # renewed, not expired (a read may first find its connection broken: Unavailable)
        assert eventually(lambda: _count_retrying(stubs, b"/po/left"), "a read answered") == [1]
        eventually(lambda: _count_retrying(stubs, b"/po/left") == [0], "the one left expired", 15)
        left_after = time.monotonic() - back
        time.sleep(2.5)  # longer than the kept lease's TTL
        kept.stop()
        assert kept.gone() == []
        assert {code for _, code in kept.errors} == {grpc.StatusCode.UNAVAILABLE}
        assert stubs.kv.Range(R(key=b"/po/kept")).count == 1
        assert "PostgreSQL unavailable" in server.output()
        print(
            f"\noutage: {len(kept.errors)} keep-alive streams ended Unavailable and reopened; "
            f"the lease left alone expired {left_after:.2f} s after PostgreSQL was back"
        )
    finally:
        if kept is not None:
            kept.stop()
        server.stop()
        stop_postgres(data)


def _count_retrying(stubs: Stubs, key: bytes) -> list[int]:
    """[how many keys ``key`` is], or [] while geminikv answers Unavailable."""
    try:
        return [stubs.kv.Range(R(key=key)).count]
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return []


def test_leases_expire_while_compaction_keeps_failing(postgres: Postgres) -> None:
    """A failing duty does not give the leader lock up: if it did, every take-over would
    renew every lease again (etcd's Promote) and a compaction failing every second would
    keep leases from ever expiring. Here the rows to compact are locked by another session,
    so every purge times out (--compact-timeout), and a lease still expires on time."""
    dsn = postgres.new_database("leasecompactfail")
    server = GeminiServer(dsn, compact_timeout=0.3).start()

    async def hold_rows(locked: threading.Event, release: threading.Event) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute("SELECT id FROM kine WHERE name = '/cf/k' FOR UPDATE")
                locked.set()
                while not release.is_set():
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=run_sync, args=(hold_rows(locked, release),))
    try:
        stubs = server.stubs()
        for i in range(3):
            head = stubs.kv.Put(pb.PutRequest(key=b"/cf/k", value=b"%d" % i)).header.revision
        holder.start()
        assert locked.wait(10)
        stubs.kv.Compact(pb.CompactionRequest(revision=head))  # the purge now blocks
        lease = stubs.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        stubs.kv.Put(pb.PutRequest(key=b"/cf/leased", value=b"v", lease=lease))
        granted = time.monotonic()
        eventually(lambda: not stubs.kv.Range(R(key=b"/cf/leased")).kvs, "the lease expired", 15)
        expired_after = time.monotonic() - granted
        assert _rows_named(dsn, "/cf/k") == 3  # the purge did fail all along
        release.set()
        holder.join(10)
        eventually(lambda: _rows_named(dsn, "/cf/k") == 1, "the compaction done once unlocked")
        print(f"\nlease of TTL 2 s expired {expired_after:.2f} s after its grant")
    finally:
        release.set()
        server.stop()


def _rows_named(dsn: str, name: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM kine WHERE name = $1", name))
        finally:
            await conn.close()

    return run_sync(count())


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
