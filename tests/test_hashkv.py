"""``Maintenance.HashKV`` against real etcd (3.4, and 3.5 when installed): the same requests
sent to a new etcd and a new geminikv give the same hash at every revision.

Only single-key requests are sent (puts, updates, deletes, kube-apiserver's
compact_rev_key, a lease revoke of a lease with one key, compactions): geminikv gives each
key of a multi-key Txn or DeleteRange its own revision, so after one of those the two
histories are no longer the same (issue 19, item 1). Every write's
header revision is asserted equal on both sides. At several points of the history the hash
at every revision (negative, 0, each one, and past the current one) is compared: before
any compaction, after compactions (one at a tombstone), with keys superseded after the
compact revision, and with no key left (where etcd keeps every compacted entry in the
hash). ``etcdctl endpoint hashkv`` shows the same answers; ``Maintenance.Hash`` answers
HashKV's hash at the current revision, and a database whose rows carry no version (Go
Kine's) hashes the same.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.restored_etcd import Etcd, etcd_binaries, serving
from tests.servers import GeminiServer, Postgres, Stubs, run_sync

__all__ = ["etcd_binaries"]  # a fixture, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.etcdctl]

LEASES = {0x4841_5301: 600, 0x4841_5302: 900, 0x4841_5303: 1200}

Outcome = tuple[str, tuple[Any, ...]]  # ("ok", (revision, hash, compact)) or ("error", ...)


def hashkv(stubs: Stubs, revision: int) -> Outcome:
    try:
        got = stubs.maintenance.HashKV(pb.HashKVRequest(revision=revision), timeout=30)
    except grpc.RpcError as err:
        return "error", (err.code(), err.details())
    return "ok", (got.header.revision, got.hash, got.compact_revision)


@dataclass
class Both:
    """A new etcd and a new geminikv, sent the same requests."""

    binaries: Etcd
    etcd: Stubs
    gk: Stubs
    server: GeminiServer
    revision: int = 1
    # (what had happened, revision asked, etcd's outcome, geminikv's)
    seen: list[tuple[str, int, Outcome, Outcome]] = field(default_factory=list)

    def write(self, call: Callable[[Stubs], Any]) -> int:
        e, g = call(self.etcd), call(self.gk)
        assert e.header.revision == g.header.revision, (e, g)
        self.revision = int(e.header.revision)
        return self.revision

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        request = pb.PutRequest(key=key, value=value, lease=lease)
        return self.write(lambda s: s.kv.Put(request))

    def delete(self, key: bytes) -> int:
        request = pb.DeleteRangeRequest(key=key)
        return self.write(lambda s: s.kv.DeleteRange(request))

    def compact(self, revision: int) -> None:
        request = pb.CompactionRequest(revision=revision, physical=True)
        self.write(lambda s: s.kv.Compact(request))

    def record(self, when: str) -> None:
        """HashKV at every revision from -1 to two past the current one, on both."""
        for revision in range(-1, self.revision + 3):
            e, g = hashkv(self.etcd, revision), hashkv(self.gk, revision)
            self.seen.append((when, revision, e, g))


def history(both: Both) -> tuple[int, int]:
    """Single-key writes with HashKV recorded along the way; the two compact revisions."""
    # both new stores are empty at revision 1
    assert hashkv(both.etcd, 0)[1][0] == hashkv(both.gk, 0)[1][0] == 1
    both.revision = 1
    both.record("new")
    for lease_id, ttl in LEASES.items():
        request = pb.LeaseGrantRequest(ID=lease_id, TTL=ttl)
        both.etcd.lease.LeaseGrant(request)
        both.gk.lease.LeaseGrant(request)
    first, revoked, kept = LEASES
    both.put(b"/a", b"a1")
    both.put(b"/b", b"b1")
    both.put(b"/c", b"c1", lease=kept)
    both.put(b"/a", b"a2")
    both.put(b"/d", b"d1", lease=revoked)
    both.delete(b"/b")
    both.put(b"/e", b"e" * 20_000)
    both.put(b"/b", b"b2")  # a second generation
    both.put(b"compact_rev_key", b"7")  # kube-apiserver's key (Kine stores it aliased)
    both.put(b"/a", b"a3")
    both.put(b"/l", b"l1", lease=first)
    # one key: one revision on both
    both.write(lambda s: s.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=revoked)))
    at_tombstone = both.revision  # /d's deletion
    both.put(b"/f", b"f1")
    both.delete(b"/f")
    both.record("history")
    both.compact(at_tombstone)
    both.record("compacted at a tombstone")
    both.put(b"/c", b"c2", lease=kept)  # supersedes /c's entry kept by the compaction
    both.delete(b"/e")
    both.put(b"/g", b"g1")
    both.record("writes after the compaction")
    for key in (b"/a", b"/b", b"/c", b"/g", b"/l", b"compact_rev_key"):
        both.delete(key)
    both.record("no key left")
    both.put(b"/h", b"h1")
    second = both.put(b"/a", b"a4")
    both.compact(second)
    both.put(b"/h", b"h2")
    both.record("compacted again")
    return at_tombstone, second


@pytest.fixture(scope="module")
def both(etcd_binaries: Etcd, postgres: Postgres) -> Iterator[Both]:
    server = GeminiServer(postgres.new_database("hashkv")).start()
    with serving(etcd_binaries, None) as etcd:
        gk = server.stubs()
        pair = Both(etcd_binaries, etcd, gk, server)
        history(pair)
        yield pair
        gk.close()
    server.stop()


def test_same_hash_at_every_revision(both: Both) -> None:
    differ = [seen for seen in both.seen if seen[2] != seen[3]]
    assert not differ, "\n".join(f"{w} at {r}: etcd {e}, geminikv {g}" for w, r, e, g in differ)
    # what was compared: hashes before and after compactions, both errors
    outcomes = {(when, e[0]) for when, _, e, _ in both.seen}
    for when in ("new", "history", "compacted at a tombstone", "no key left", "compacted again"):
        assert (when, "ok") in outcomes and (when, "error") in outcomes
    codes = {e[1][0] for _, _, e, _ in both.seen if e[0] == "error"}
    assert codes == {grpc.StatusCode.OUT_OF_RANGE}
    messages = {e[1][1] for _, _, e, _ in both.seen if e[0] == "error"}
    assert messages == {
        "etcdserver: mvcc: required revision has been compacted",
        "etcdserver: mvcc: required revision is a future revision",
    }
    hashes = {e[1][1] for _, _, e, _ in both.seen if e[0] == "ok"}
    assert len(hashes) > 20  # revisions hash differently
    # a negative revision hashes the bucket name alone, crc32c(b"key"); -1: not compacted
    new = [e for when, r, e, _ in both.seen if when == "new" and r == -1]
    assert new == [("ok", (1, 0x40A4756D, -1))]


def test_compacted_revisions(both: Both) -> None:
    """At and below the compact revision: etcd's ErrCompacted; above it, the hash."""
    compacted = hashkv(both.gk, 0)[1][2]
    for revision in (1, compacted - 1, compacted):
        assert hashkv(both.gk, revision) == hashkv(both.etcd, revision)
        assert hashkv(both.gk, revision)[1][0] == grpc.StatusCode.OUT_OF_RANGE
    assert hashkv(both.gk, compacted + 1) == hashkv(both.etcd, compacted + 1)
    assert hashkv(both.gk, compacted + 1)[0] == "ok"


def etcdctl(both: Both, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [both.binaries.etcdctl, "--endpoints", endpoint, "endpoint", "hashkv", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=60,
    )


def test_etcdctl_endpoint_hashkv(both: Both) -> None:
    compacted = hashkv(both.gk, 0)[1][2]
    for revision in (0, both.revision, compacted + 1):
        answers = []
        for endpoint in (both.etcd.target, both.gk.target):
            done = etcdctl(both, endpoint, f"--rev={revision}", "-w", "json")
            assert done.returncode == 0, done.stderr
            (answer,) = json.loads(done.stdout)
            header = answer["HashKV"].pop("header")
            answers.append((header["revision"], answer["HashKV"]))
        assert answers[0] == answers[1]
        assert answers[1][1]["compact_revision"] == compacted
    refused = []
    for endpoint in (both.etcd.target, both.gk.target):
        done = etcdctl(both, endpoint, f"--rev={compacted}")
        assert done.returncode != 0
        # its last line (a log line with a timestamp precedes it)
        refused.append(done.stderr.strip().splitlines()[-1].replace(endpoint, "ENDPOINT"))
    assert refused[0] == refused[1]
    assert refused[1] == "Error: etcdserver: mvcc: required revision has been compacted"


def test_hash_is_hashkv_at_the_current_revision(both: Both) -> None:
    first = both.gk.maintenance.Hash(pb.HashRequest(), timeout=30)
    again = both.gk.maintenance.Hash(pb.HashRequest(), timeout=30)
    assert (first.header.revision, first.hash) == (again.header.revision, again.hash)
    assert hashkv(both.gk, 0)[1][:2] == (first.header.revision, first.hash)
    both.put(b"/i", b"i1")
    changed = both.gk.maintenance.Hash(pb.HashRequest(), timeout=30)
    assert changed.header.revision == first.header.revision + 1
    assert changed.hash != first.hash
    assert hashkv(both.gk, 0) == hashkv(both.etcd, 0)


def test_rows_without_versions(both: Both, postgres: Postgres) -> None:
    """Go Kine writes no version: a geminikv started on those rows takes versions from its
    index and hashes as before."""
    before = [hashkv(both.gk, revision) for revision in range(both.revision + 1)]
    dsn = both.server.settings.endpoint

    async def forget_versions() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE kine SET version = NULL")
        finally:
            await conn.close()

    run_sync(forget_versions())
    other = GeminiServer(dsn).start()
    try:
        stubs = other.stubs()
        after = [hashkv(stubs, revision) for revision in range(both.revision + 1)]
        stubs.close()
    finally:
        other.stop()
    assert after == before
    assert sum(outcome == "ok" for outcome, _ in after) >= 3  # the revisions above compaction
