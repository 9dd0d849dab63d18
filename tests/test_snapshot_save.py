"""``etcdctl snapshot save`` against geminikv, and a real etcd serving the restored file.

geminikv holds a Kubernetes-shaped data set written through its API (creates, updates,
deletes, multi-key Txns and a DeleteRange, leases with keys and a revoke, kube-apiserver's
compact_rev_key, a compaction, and a gap row as the newest revision). ``etcdctl snapshot
save`` fetches it from ``Maintenance.Snapshot``; ``snapshot status`` must accept the file
at geminikv's revision; ``snapshot restore`` and etcd 3.4 (and 3.5) on the restored data
must answer every Range as geminikv answers it at that revision (value, create/mod
revision, version, lease), at the current revision and at older ones down to the compact
revision, refuse the one below as compacted, replay the history after it through a watch,
and hold geminikv's leases with their TTLs and keys. A snapshot taken while writes go on
holds exactly geminikv's keys at one revision. A database Go Kine wrote (no versions in
its rows) is saved as geminikv serves it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import kine, schema
from tests.restored_etcd import (
    Etcd,
    as_tuples,
    binaries,
    etcd_binaries,
    range_all,
    serving,
    tool,
)
from tests.servers import GeminiServer, Postgres, Stubs, run_sync
from tests.test_storage_compat import VARIANTS as KINE_SCHEMAS
from tests.test_storage_compat import _build as build_kine_database
from tests.waiting import eventually
from tests.watching import WatchClient

__all__ = ["etcd_binaries"]  # a fixture, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.etcdctl, pytest.mark.slow]

# lease id -> TTL; none expires while the module runs
LEASES = {0x694D7A01 + i: ttl for i, ttl in enumerate([300, 600, 3600, 7200, 600, 900])}


@dataclass
class Written:
    """geminikv with the data set, its revision and compact revision when it was saved."""

    server: GeminiServer
    stubs: Stubs
    revision: int
    compacted: int
    leases: dict[int, int]  # the live ones: id -> TTL
    saved: Path  # etcdctl snapshot save's file, at ``revision``
    last_write: int  # the revision of the last write (the gap row's, a row id, is above)


def put(key: bytes, value: bytes, lease: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))


def write_kubernetes(stubs: Stubs, steps: int, seed: int = 19) -> tuple[int, dict[int, int]]:
    """A cluster's writes through the API; the compact revision and the live leases."""
    rng = random.Random(seed)
    kv = stubs.kv
    for lease_id, ttl in LEASES.items():
        stubs.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl))
    lease_ids = sorted(LEASES)
    namespaces = [f"ns-{i}" for i in range(4)]
    pods = [f"/registry/pods/{rng.choice(namespaces)}/pod-{i}".encode() for i in range(120)]

    def obj(kind: str, size: int) -> bytes:
        return b"k8s\x00" + kind.encode() + rng.randbytes(size)

    for i in range(10):
        kv.Put(pb.PutRequest(key=f"/registry/minions/node-{i}".encode(), value=obj("Node", 900)))
    kv.Put(
        pb.PutRequest(
            key=b"/registry/masterleases/10.0.0.1", value=obj("Endpoints", 60), lease=lease_ids[0]
        )
    )
    big = b"/registry/configmaps/ns-0/big"
    kv.Put(pb.PutRequest(key=big, value=obj("ConfigMap", 120_000)))  # overflow pages
    compacted = 0
    for step in range(steps):
        roll = rng.random()
        if roll < 0.35:
            kv.Put(pb.PutRequest(key=rng.choice(pods), value=obj("Pod", rng.choice([300, 2000]))))
        elif roll < 0.55:
            ns = rng.choice(namespaces)
            key = f"/registry/events/{ns}/ev-{step}".encode()
            lease = rng.choice(lease_ids[1:])
            kv.Put(pb.PutRequest(key=key, value=obj("Event", 400), lease=lease))
        elif roll < 0.7:
            kv.DeleteRange(pb.DeleteRangeRequest(key=rng.choice(pods)))
        elif roll < 0.78:  # a multi-key Txn
            keys = sorted(rng.sample(pods, 3))
            kv.Txn(pb.TxnRequest(success=[put(k, obj("Pod", 100)) for k in keys]))
        elif roll < 0.8:  # a DeleteRange over several keys
            ns = rng.choice(namespaces)
            prefix = f"/registry/pods/{ns}/pod-1".encode()
            kv.DeleteRange(pb.DeleteRangeRequest(key=prefix, range_end=prefix[:-1] + b"2"))
        elif roll < 0.82:  # kube-apiserver's compactor's key (Kine stores it under an alias)
            kv.Put(pb.PutRequest(key=b"compact_rev_key", value=b"%d" % step))
        else:
            kv.Put(pb.PutRequest(key=rng.choice(pods), value=obj("Pod", 800)))
        if step in (steps // 3, steps * 2 // 3):
            # the first compaction's rows are deleted before it returns; the second's may
            # still be in the table when the snapshot is read (the query leaves them out)
            compacted = int(range_all(stubs).header.revision)
            kv.Compact(pb.CompactionRequest(revision=compacted, physical=step < steps // 2))
    revoked = lease_ids[-1]  # a lease with keys, revoked: its keys deleted
    stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=revoked))
    return compacted, {i: ttl for i, ttl in LEASES.items() if i != revoked}


def add_gap(server: GeminiServer) -> int:
    """A gap row (Kine's filler of a missing id) as the newest revision; that revision."""
    assert server.app is not None and server.app.pool is not None
    pool = server.app.pool

    async def fill() -> int:
        async with pool.acquire() as conn:
            # an id drawn and never committed (a failed write), filled as Kine fills it
            (rev,) = await kine.next_ids(conn, 1)
            await kine.fill_gap(conn, rev)
            return rev

    return server.call(fill)


@pytest.fixture(scope="module")
def written(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Written]:
    # saved once, before any test writes more (etcd 3.4's etcdctl if installed; each etcd
    # restores the same file; the test writing during a save runs each version's etcdctl)
    etcdctl = binaries("3.4") or binaries("3.5")
    if etcdctl is None:
        pytest.skip("no etcdctl installed")
    server = GeminiServer(postgres.new_database("snapsave")).start()
    stubs = server.stubs()
    compacted, leases = write_kubernetes(stubs, 1200)
    last_write = range_all(stubs).header.revision
    gap = add_gap(server)
    revision = range_all(stubs).header.revision
    while revision < gap:  # the follower applies the gap row
        revision = range_all(stubs).header.revision
    assert revision == gap
    path = tmp_path_factory.mktemp("saved") / "geminikv.db"
    save(etcdctl, server.endpoint, path)
    yield Written(server, stubs, revision, compacted, leases, path, last_write)
    stubs.close()
    server.stop()


def save(binaries: Etcd, endpoint: str, path: Path) -> None:
    env = {**os.environ, "ETCDCTL_API": "3"}
    done = subprocess.run(
        [binaries.etcdctl, "--endpoints", endpoint, "snapshot", "save", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def status(binaries: Etcd, path: Path) -> dict[str, int]:
    done = tool(binaries, "snapshot", "status", str(path), "-w", "json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def saved(written: Written) -> Path:
    return written.saved


@pytest.fixture(scope="module")
def restored(etcd_binaries: Etcd, saved: Path) -> Iterator[Stubs]:
    with serving(etcd_binaries, saved) as stubs:
        yield stubs


Event = tuple[int, bytes, bytes, int, int, int, int]


def events(stubs: Stubs, start: int, upto: int) -> list[Event]:
    """Every event of every key from revision ``start`` to ``upto``, from a watch."""
    watch = WatchClient(stubs)
    watch.create(key=b"\0", range_end=b"\0", start_revision=start)
    seen: list[Event] = []
    while not seen or seen[-1][4] < upto:
        response = watch.next()
        assert response is not None, f"no events after {seen[-1:]}"
        for ev in response.events:
            kv = ev.kv
            seen.append(
                (
                    ev.type,
                    kv.key,
                    kv.value,
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.lease,
                )
            )
    watch.close()
    return [e for e in seen if e[4] <= upto]


def test_status_accepts_the_saved_file(etcd_binaries: Etcd, written: Written, saved: Path) -> None:
    found = status(etcd_binaries, saved)
    c, r = written.compacted, written.revision
    assert found["revision"] == r
    assert found["totalSize"] == saved.stat().st_size - 32
    # the key bucket: the keys live at the compact revision, every change after it, the
    # tombstone carrying the gap's revision; the leases; authRevision; the meta bucket's
    # consistent_index, term, confState and the two compaction marks
    w = written.last_write
    kept = len(range_all(written.stubs, c).kvs) + len(events(written.stubs, c + 1, w)) + 1
    assert found["totalKey"] == kept + len(written.leases) + 1 + 5


def test_every_key_as_geminikv_serves_it(restored: Stubs, written: Written) -> None:
    answer = range_all(restored)
    assert answer.header.revision == written.revision
    ours = range_all(written.stubs, written.revision)
    assert as_tuples(answer.kvs) == as_tuples(ours.kvs)
    assert len(answer.kvs) > 50
    assert b"compact_rev_key" in {kv.key for kv in answer.kvs}
    c, r = written.compacted, written.revision
    for revision in (c, c + 1, (c + r) // 2, written.last_write, r - 1):
        theirs = range_all(restored, revision)
        assert as_tuples(theirs.kvs) == as_tuples(range_all(written.stubs, revision).kvs), revision
    for stubs in (restored, written.stubs):
        with pytest.raises(grpc.RpcError) as err:
            range_all(stubs, c - 1)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "compacted" in (err.value.details() or "")


def test_watch_replays_the_history_after_the_compaction(restored: Stubs, written: Written) -> None:
    c = written.compacted
    ours = events(written.stubs, c + 1, written.last_write)
    assert len(ours) > 100
    assert events(restored, c + 1, written.last_write) == ours


def test_leases_with_their_ttls_and_keys(
    etcd_binaries: Etcd, restored: Stubs, written: Written
) -> None:
    listed = restored.lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=10)
    ours = written.stubs.lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=10)
    assert sorted(lease.ID for lease in listed.leases) == sorted(lease.ID for lease in ours.leases)
    assert sorted(lease.ID for lease in listed.leases) == sorted(written.leases)
    for lease_id, ttl in written.leases.items():
        request = pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True)
        theirs = restored.lease.LeaseTimeToLive(request, timeout=10)
        mine = written.stubs.lease.LeaseTimeToLive(request, timeout=10)
        assert theirs.grantedTTL == mine.grantedTTL == ttl
        left = mine.TTL if etcd_binaries.reads_remaining_ttl else ttl
        # etcd adds its election timeout when it becomes leader; some seconds have passed
        assert left - 60 <= theirs.TTL <= left + 5, (lease_id, theirs.TTL, left)
        assert sorted(theirs.keys) == sorted(mine.keys)


def test_snapshot_while_writing_is_one_revision(
    etcd_binaries: Etcd, written: Written, tmp_path: Path
) -> None:
    """Puts and multi-key Txns go on during the save: the file is geminikv at one revision."""
    stop = threading.Event()
    count = [0]

    def writing() -> None:
        stubs = written.server.stubs()
        i = 0
        while not stop.is_set():
            i += 1
            key = b"/registry/pods/ns-9/live-%d" % (i % 300)
            if i % 4:
                stubs.kv.Put(pb.PutRequest(key=key, value=b"v%d" % i), timeout=10)
            else:
                pair = [put(key + b"-a", b"a%d" % i), put(key + b"-b", b"b%d" % i)]
                stubs.kv.Txn(pb.TxnRequest(success=pair), timeout=10)
            count[0] = i
        stubs.close()

    before = range_all(written.stubs).header.revision
    writer = threading.Thread(target=writing)
    writer.start()
    try:
        eventually(lambda: count[0] >= 50, "writes going on", 30, 0.01)
        path = tmp_path / "live.db"
        save(etcd_binaries, written.server.endpoint, path)
        wrote_during = count[0]
    finally:
        stop.set()
        writer.join(30)
    after = range_all(written.stubs).header.revision
    at = status(etcd_binaries, path)["revision"]
    assert before < at < after, (before, at, after)
    assert wrote_during > 50
    with serving(etcd_binaries, path) as restored_live:
        answer = range_all(restored_live)
        assert answer.header.revision == at
        assert as_tuples(answer.kvs) == as_tuples(range_all(written.stubs, at).kvs)


def test_go_kine_rows_without_versions(
    etcd_binaries: Etcd, postgres: Postgres, tmp_path: Path
) -> None:
    """A database Go Kine wrote (NULL versions, both delete shapes, a gap row, a key with a
    TTL in its lease column): the restored etcd answers as geminikv does at every revision."""
    server = GeminiServer(build_kine_database(postgres, KINE_SCHEMAS["v0.13+"])).start()
    stubs = server.stubs()
    try:
        path = tmp_path / "kine.db"
        save(etcd_binaries, server.endpoint, path)
        assert status(etcd_binaries, path)["revision"] == 11
        with serving(etcd_binaries, path) as restored_kine:
            assert range_all(restored_kine).header.revision == 11
            for revision in range(2, 12):
                theirs = as_tuples(range_all(restored_kine, revision).kvs)
                assert theirs == as_tuples(range_all(stubs, revision).kvs), revision
            a = range_all(restored_kine).kvs[1]
            assert (a.key, a.version, a.create_revision) == (b"/registry/pods/a", 3, 3)
    finally:
        stubs.close()
        server.stop()


def test_rows_a_compaction_has_not_yet_deleted_are_left_out(postgres: Postgres) -> None:
    """The snapshot's read applies etcd's compaction rule itself: with Go Kine's rows all
    still in the table and the compact revision at 5, a row superseded at or below 5 (a1 at
    3), a tombstone at or below it, Kine's compact_rev_key and gap rows are left out."""
    dsn = build_kine_database(postgres, KINE_SCHEMAS["v0.13+"])

    async def read() -> tuple[tuple[int, int], list[int], list[int]]:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_schema(conn)  # geminikv's version column
            await kine.set_compact_rev(conn, 5, 5)
            async with kine.consistent_read(conn):
                revisions = await kine.snapshot_revisions(conn)
                at_5 = [row.id async for row in kine.snapshot_rows(conn, 11, 5)]
                at_6 = [row.id async for row in kine.snapshot_rows(conn, 11, 6)]
            return revisions, at_5, at_6
        finally:
            await conn.close()

    revisions, at_5, at_6 = run_sync(read())
    assert revisions == (11, 5)
    assert at_5 == [2, 4, 5, 6, 7, 9, 10, 11]
    # at 6, b's delete (6) is at or below the compact revision: b1 (4) and it go too
    assert at_6 == [2, 5, 7, 9, 10, 11]
