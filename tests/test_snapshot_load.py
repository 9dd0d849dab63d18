"""``geminikv load-snapshot``: a real etcd's snapshot loaded into a new geminikv database.

A Kubernetes-shaped data set is written through a real etcd 3.4 (and 3.5): objects under
/registry/, created, updated and deleted one request at a time, events on leases (one
lease with an id chosen by the client, the others etcd's 64-bit ids), a lease revoked with
its one key, kube-apiserver's compact_rev_key, a physical compaction in the middle. Its
``etcdctl snapshot save`` file is loaded into a new database, and geminikv then serves
every key as etcd does, at the current revision and at every revision down to the compact
revision (the one below refused as compacted), the same history to a watch, the leases
with their TTLs, and a watch from etcd's last revision continues with the next write. The
same through ``--etcd`` (the snapshot taken from the live etcd; over TLS with a client
certificate, verified and with ``--insecure-skip-tls-verify``). Refused, with nothing
written: a database that is not empty, a truncated or corrupted file, a file that is not
an etcd snapshot. History in which one revision changed several keys loads exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from geminikv import cli, errors
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.snapshot.btree import DatabaseWriter
from geminikv.snapshot.pages import PAGE_HEADER, PAGE_SIZE
from geminikv.storage.queries import MAX_LEASE_ID
from tests.certs import CA
from tests.restored_etcd import Etcd, as_tuples, binaries, etcd_binaries, range_all, serving
from tests.servers import GeminiServer, Postgres, Stubs, free_port, run_sync
from tests.test_snapshot_save import events

__all__ = ["etcd_binaries"]  # a fixture, used by name

pytestmark = [pytest.mark.etcd, pytest.mark.etcdctl, pytest.mark.slow]

CLIENT_LEASE = 0x1234  # a lease id the client chose: fits Kine's column, kept


@dataclass
class Source:
    """A real etcd holding the data set, and its snapshot file."""

    binaries: Etcd
    stubs: Stubs
    endpoint: str
    saved: Path
    revision: int
    compacted: int
    leases: dict[int, int]  # id -> TTL, the live ones


def write_kubernetes(stubs: Stubs, steps: int, seed: int = 19) -> tuple[int, dict[int, int]]:
    """Requests as kube-apiserver makes them, and multi-key ones (a Txn, a DeleteRange over
    several keys, a lease revoke of several keys: one etcd revision each); the compact
    revision and the live leases."""
    rng = random.Random(seed)
    kv, lease = stubs.kv, stubs.lease
    leases = {CLIENT_LEASE: 600}
    leases[CLIENT_LEASE] = lease.LeaseGrant(pb.LeaseGrantRequest(ID=CLIENT_LEASE, TTL=600)).TTL
    for ttl in (300, 900, 3600):
        granted = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl))
        assert granted.ID > MAX_LEASE_ID  # etcd's own ids do not fit 31 bits
        leases[granted.ID] = granted.TTL
    ids = sorted(leases)
    doomed = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60)).ID  # revoked with its one key
    namespaces = [f"ns-{i}" for i in range(3)]
    pods = [f"/registry/pods/{rng.choice(namespaces)}/pod-{i}".encode() for i in range(40)]

    def obj(kind: str, size: int) -> bytes:
        return b"k8s\x00" + kind.encode() + rng.randbytes(size)

    for i in range(5):
        kv.Put(pb.PutRequest(key=f"/registry/minions/node-{i}".encode(), value=obj("Node", 900)))
    kv.Put(pb.PutRequest(key=b"/registry/masterleases/10.0.0.1", value=obj("Ep", 60), lease=ids[0]))
    for i in range(3):
        key = b"/registry/leases/doomed-%d" % i
        kv.Put(pb.PutRequest(key=key, value=obj("Lease", 50), lease=doomed))
    kv.Put(pb.PutRequest(key=b"/registry/configmaps/ns-0/big", value=obj("ConfigMap", 60_000)))
    compacted = 0
    for step in range(steps):
        roll = rng.random()
        if roll < 0.45:
            kv.Put(pb.PutRequest(key=rng.choice(pods), value=obj("Pod", rng.choice([300, 2000]))))
        elif roll < 0.65:
            key = f"/registry/events/{rng.choice(namespaces)}/ev-{step}".encode()
            kv.Put(pb.PutRequest(key=key, value=obj("Event", 400), lease=rng.choice(ids)))
        elif roll < 0.8:
            kv.DeleteRange(pb.DeleteRangeRequest(key=rng.choice(pods)))
        elif roll < 0.83:
            put = [pb.PutRequest(key=key, value=obj("Pod", 200)) for key in rng.sample(pods, 3)]
            kv.Txn(pb.TxnRequest(success=[pb.RequestOp(request_put=p) for p in put]))
        elif roll < 0.85:
            events = f"/registry/events/{rng.choice(namespaces)}/".encode()
            kv.DeleteRange(pb.DeleteRangeRequest(key=events, range_end=events[:-1] + b"0"))
        elif roll < 0.9:  # kube-apiserver's compactor's key (Kine's alias holds it)
            kv.Put(pb.PutRequest(key=b"compact_rev_key", value=b"%d" % step))
        else:
            kv.Put(pb.PutRequest(key=rng.choice(pods), value=obj("Pod", 800)))
        if step == steps // 2:
            compacted = int(range_all(stubs).header.revision)
            kv.Compact(pb.CompactionRequest(revision=compacted, physical=True))
        if step == steps * 3 // 4:
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=doomed))
    return compacted, leases


def save(binaries: Etcd, endpoint: str, path: Path) -> None:
    done = subprocess.run(
        [binaries.etcdctl, "--endpoints", endpoint, "snapshot", "save", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def source(etcd_binaries: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    with serving(etcd_binaries, None) as stubs:
        compacted, leases = write_kubernetes(stubs, 300)
        revision = int(range_all(stubs).header.revision)
        path = tmp_path_factory.mktemp("etcd") / "etcd.db"
        save(etcd_binaries, stubs.target, path)
        yield Source(etcd_binaries, stubs, stubs.target, path, revision, compacted, leases)


def load(dsn: str, *args: str) -> tuple[int, str, str]:
    """``geminikv load-snapshot --endpoint dsn args…``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["load-snapshot", "--endpoint", dsn, *args])
    return code, out.getvalue(), err.getvalue()


def renumbered(out: str) -> dict[int, int]:
    """etcd lease id -> geminikv lease id, from load-snapshot's report."""
    found = {}
    for line in out.splitlines():
        if line.startswith("lease "):
            words = line.split()
            found[int(words[1])] = int(words[5])
    return found


@dataclass
class Loaded:
    dsn: str
    server: GeminiServer
    stubs: Stubs
    lease_ids: dict[int, int]  # etcd's -> geminikv's
    started: float  # time.monotonic() once it serves: its leader renewed every lease


def mapped(kvs: object, lease_ids: dict[int, int]) -> list[tuple[bytes, bytes, int, int, int, int]]:
    """etcd's answer with its lease ids as geminikv numbers them."""
    return [(k, v, c, m, ver, lease_ids.get(le, le)) for k, v, c, m, ver, le in as_tuples(kvs)]


@pytest.fixture(scope="module")
def loaded(source: Source, postgres: Postgres) -> Iterator[Loaded]:
    dsn = postgres.new_database("snapload")
    code, out, err = load(dsn, str(source.saved))
    assert code == 0, err
    assert f"revision {source.revision}, compact revision {source.compacted}" in out
    server = GeminiServer(dsn).start()
    stubs = server.stubs()
    yield Loaded(dsn, server, stubs, renumbered(out), time.monotonic())
    stubs.close()
    server.stop()


def test_every_key_revision_and_lease_as_etcd_serves_it(source: Source, loaded: Loaded) -> None:
    ours = range_all(loaded.stubs)
    theirs = range_all(source.stubs, source.revision)
    assert ours.header.revision == source.revision
    assert len(theirs.kvs) > 30
    assert as_tuples(ours.kvs) == mapped(theirs.kvs, loaded.lease_ids)
    assert {kv.key for kv in ours.kvs} >= {b"compact_rev_key", b"/registry/configmaps/ns-0/big"}
    assert max(kv.version for kv in ours.kvs) > 2  # updated objects keep their versions
    # every revision from the compact revision on, as etcd answers it
    for rev in range(source.compacted, source.revision + 1):
        assert as_tuples(range_all(loaded.stubs, rev).kvs) == mapped(
            range_all(source.stubs, rev).kvs, loaded.lease_ids
        ), rev


def test_compact_revision_is_etcds(source: Source, loaded: Loaded) -> None:
    for stubs in (source.stubs, loaded.stubs):
        with pytest.raises(grpc.RpcError) as caught:
            range_all(stubs, source.compacted - 1)
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert caught.value.details() == errors.Compacted.message


def test_history_replays_as_on_etcd(source: Source, loaded: Loaded) -> None:
    start = source.compacted + 1
    ours = events(loaded.stubs, start, source.revision)
    theirs = events(source.stubs, start, source.revision)
    assert [(*e[:6], loaded.lease_ids.get(e[6], e[6])) for e in theirs] == ours
    assert len(ours) > 100


def test_leases_with_their_ttls(source: Source, loaded: Loaded) -> None:
    # etcd's 64-bit ids renumbered (the revoked lease's too: history names it), not the
    # client's
    assert set(loaded.lease_ids) > set(source.leases) - {CLIENT_LEASE}
    assert CLIENT_LEASE not in loaded.lease_ids
    ours = {lease.ID for lease in loaded.stubs.lease.LeaseLeases(pb.LeaseLeasesRequest()).leases}
    assert ours == {loaded.lease_ids.get(i, i) for i in source.leases}
    for etcd_id, ttl in source.leases.items():
        gk_id = loaded.lease_ids.get(etcd_id, etcd_id)
        answer = loaded.stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=gk_id, keys=True))
        etcd_answer = source.stubs.lease.LeaseTimeToLive(
            pb.LeaseTimeToLiveRequest(ID=etcd_id, keys=True)
        )
        assert answer.grantedTTL == ttl
        # a snapshot file holds no remaining TTL: the lease has its whole TTL again, as
        # etcd grants a lease it recovers from a snapshot (less the time the module's
        # tests have taken since the server started)
        assert ttl - 2 - (time.monotonic() - loaded.started) <= answer.TTL <= ttl
        assert sorted(answer.keys) == sorted(etcd_answer.keys)
        assert answer.keys
        # and it lives on: a keep-alive renews it
        renewed = next(
            loaded.stubs.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=gk_id)]))
        )
        assert ttl == renewed.TTL


def test_a_watch_from_etcds_last_revision_continues(source: Source, loaded: Loaded) -> None:
    from tests.watching import WatchClient

    watch = WatchClient(loaded.stubs)
    watch.create(key=b"/registry/", range_end=b"/registry0", start_revision=source.revision + 1)
    put = loaded.stubs.kv.Put(pb.PutRequest(key=b"/registry/pods/ns-0/new", value=b"after"))
    assert put.header.revision == source.revision + 1
    response = watch.next()
    assert response is not None
    assert [
        (e.kv.key, e.kv.mod_revision, e.kv.create_revision, e.kv.version) for e in response.events
    ] == [(b"/registry/pods/ns-0/new", source.revision + 1, source.revision + 1, 1)]
    watch.close()


def test_pulled_from_a_live_etcd(source: Source, postgres: Postgres) -> None:
    dsn = postgres.new_database("snappull")
    code, out, err = load(dsn, "--etcd", f"http://{source.endpoint}")
    assert code == 0, err
    assert f"loaded: revision {source.revision}, compact revision {source.compacted}" in out
    lease_ids = renumbered(out)
    server = GeminiServer(dsn).start()
    try:
        stubs = server.stubs()
        ours = range_all(stubs)
        assert ours.header.revision == source.revision
        assert as_tuples(ours.kvs) == mapped(range_all(source.stubs).kvs, lease_ids)
        for etcd_id in source.leases:
            # at least the TTL etcd had left when the snapshot was taken; at most the whole
            # TTL: the first leader renews every lease, as etcd's new leader does
            left = source.stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=etcd_id)).TTL
            gk_id = lease_ids.get(etcd_id, etcd_id)
            answer = stubs.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=gk_id))
            assert left - 2 <= answer.TTL <= answer.grantedTTL + 1
        stubs.close()
    finally:
        server.stop()


# -- refusals: nothing written -------------------------------------------------------------


def contents(dsn: str) -> tuple[int, int, int] | None:
    """(rows, newest revision, leases), or None when load-snapshot created no table."""

    async def read() -> tuple[int, int, int] | None:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SELECT to_regclass('kine') IS NULL"):
                return None
            row = await conn.fetchrow(
                "SELECT count(*), COALESCE(MAX(id), 0), "
                "(SELECT count(*) FROM geminikv_lease) FROM kine"
            )
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2])
        finally:
            await conn.close()

    return run_sync(read())


def refused(postgres: Postgres, path: Path, *args: str) -> str:
    """Load ``path`` into a new database: refused (exit 1), nothing in the database; the
    message."""
    dsn = postgres.new_database("snaprefused")
    code, out, err = load(dsn, str(path), *args)
    assert code == 1, out
    assert contents(dsn) in (None, (0, 0, 0))
    prefix = "geminikv load-snapshot: "
    last = err.strip().splitlines()[-1]  # after the log lines, the reason
    assert last.startswith(prefix), err
    return last.removeprefix(prefix)


def test_a_database_not_empty_is_refused(source: Source, loaded: Loaded) -> None:
    before = contents(loaded.dsn)
    assert before is not None and before[1] >= source.revision
    code, _out, err = load(loaded.dsn, str(source.saved))
    assert code == 1
    message = errors.LOAD_NOT_EMPTY.format(revision=before[1], leases=before[2])
    assert err.strip().splitlines()[-1] == f"geminikv load-snapshot: {message}"
    assert contents(loaded.dsn) == before


def with_trailer(path: Path, database: bytes) -> Path:
    path.write_bytes(database + hashlib.sha256(database).digest())
    return path


def test_truncated_and_corrupted_files_are_refused(
    source: Source, postgres: Postgres, tmp_path: Path
) -> None:
    data = source.saved.read_bytes()
    database = data[:-32]
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(data[:-1000])
    assert refused(postgres, truncated) == errors.LOAD_NO_TRAILER.format(
        path=truncated, size=len(data) - 1000
    )
    # the database without its trailer (etcd's data directory's db file): refused, unless
    # --skip-hash-check
    bare = tmp_path / "db"
    bare.write_bytes(database)
    assert refused(postgres, bare) == errors.LOAD_NO_TRAILER.format(path=bare, size=len(database))
    code, out, err = load(postgres.new_database("snapbare"), str(bare), "--skip-hash-check")
    assert code == 0, err
    assert f"loaded: revision {source.revision}, compact revision {source.compacted}" in out
    flipped = tmp_path / "flipped.db"
    middle = len(database) // 2
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
    assert refused(postgres, flipped) == errors.LOAD_HASH_MISMATCH.format(
        path=flipped, size=len(database)
    )
    # a valid trailer over a damaged database: bbolt's own checks
    metas = bytearray(database)
    for page in (0, 1):
        metas[page * PAGE_SIZE + 40] ^= 0xFF  # inside the checksummed meta fields
    bad_meta = with_trailer(tmp_path / "meta.db", bytes(metas))
    message = refused(postgres, bad_meta)
    assert message.startswith(errors.LOAD_CORRUPT.format(path=bad_meta, why=""))
    assert "page 0: meta page checksum mismatch; page 1: meta page checksum mismatch" in message
    pages = bytearray(database)
    last = len(database) // PAGE_SIZE - 1  # the freelist, then the data pages before it
    for page in range(2, last):
        page_id, _, _, _ = PAGE_HEADER.unpack_from(pages, page * PAGE_SIZE)
        if page_id == page:
            pages[page * PAGE_SIZE] ^= 0x40  # the page's id in its header
    bad_page = with_trailer(tmp_path / "page.db", bytes(pages))
    message = refused(postgres, bad_page)
    assert message.startswith(errors.LOAD_CORRUPT.format(path=bad_page, why="page "))
    assert "header says page" in message


def test_a_file_that_is_not_an_etcd_snapshot_is_refused(postgres: Postgres, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a snapshot\n")
    assert refused(postgres, text) == errors.LOAD_NO_TRAILER.format(path=text, size=15)
    noise = with_trailer(tmp_path / "noise.db", random.Random(5).randbytes(4 * PAGE_SIZE))
    assert refused(postgres, noise) == errors.LOAD_NOT_BBOLT.format(
        path=noise, why="page 0: bad magic; page 1: bad magic"
    )
    other = tmp_path / "other.db"
    with open(other, "w+b") as file:
        db = DatabaseWriter(file)
        with db.bucket(b"widgets") as bucket:
            bucket.put(b"a", b"1")
        db.finish()
    with_trailer(other, other.read_bytes())
    assert refused(postgres, other) == errors.LOAD_NOT_ETCD.format(path=other, bucket="key")


def test_multi_key_revisions_load_exactly(postgres: Postgres, tmp_path: Path) -> None:
    """etcd history never compacted, with a multi-key Txn and DeleteRange: every revision
    reads as on etcd, HashKV (which hashes sub revisions) equals etcd's at each, and the
    next write takes the next revision."""
    found = binaries("3.5") or binaries("3.4")
    if found is None:
        pytest.skip("no etcd installed")
    with serving(found, None) as stubs:
        kv = stubs.kv
        kv.Put(pb.PutRequest(key=b"/registry/a", value=b"1"))
        kv.Txn(
            pb.TxnRequest(
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=b"/registry/b", value=b"2")),
                    pb.RequestOp(request_put=pb.PutRequest(key=b"/registry/c", value=b"3")),
                    pb.RequestOp(request_put=pb.PutRequest(key=b"/registry/a", value=b"a2")),
                ]
            )
        )
        kv.Put(pb.PutRequest(key=b"/registry/c", value=b"4"))
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"/registry/a", range_end=b"/registry/c"))
        kv.Put(pb.PutRequest(key=b"/registry/d", value=b"5"))
        current = int(range_all(stubs).header.revision)
        saved = tmp_path / "history.db"
        save(found, stubs.target, saved)
        dsn = postgres.new_database("snapmulti")
        code, out, err = load(dsn, str(saved))
        assert code == 0, err
        assert f"loaded: revision {current}, compact revision 0" in out
        server = GeminiServer(dsn).start()
        try:
            gk = server.stubs()
            for rev in range(1, current + 1):
                ours, theirs = range_all(gk, rev), range_all(stubs, rev)
                assert as_tuples(ours.kvs) == as_tuples(theirs.kvs), rev
                ours_hash = gk.maintenance.HashKV(pb.HashKVRequest(revision=rev))
                theirs_hash = stubs.maintenance.HashKV(pb.HashKVRequest(revision=rev))
                assert (ours_hash.header.revision, ours_hash.hash) == (
                    theirs_hash.header.revision,
                    theirs_hash.hash,
                ), rev
            assert events(gk, 1, current) == events(stubs, 1, current)
            put = gk.kv.Put(pb.PutRequest(key=b"/registry/e", value=b"6"))
            assert put.header.revision == current + 1
            gk.close()
        finally:
            server.stop()


@contextlib.contextmanager
def etcd_with_tls(found: Etcd, work: Path) -> Iterator[tuple[str, Path, Path, Path]]:
    """A new etcd serving clients over TLS, client certificates required: (endpoint,
    CA, client certificate, client key)."""
    ca = CA("etcd-ca")
    ca_file = ca.write(work, "ca")
    server_cert, server_key = ca.issue(work, "server", server=True)
    client_cert, client_key = ca.issue(work, "client", server=False)
    client, peer = free_port(), free_port()
    log = open(work / "etcd.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            found.etcd,
            "--name=tls",
            f"--data-dir={work / 'data'}",
            f"--listen-client-urls=https://127.0.0.1:{client}",
            f"--advertise-client-urls=https://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=tls=http://127.0.0.1:{peer}",
            f"--cert-file={server_cert}",
            f"--key-file={server_key}",
            f"--trusted-ca-file={ca_file}",
            "--client-cert-auth",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"https://127.0.0.1:{client}", ca_file, client_cert, client_key
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_pulled_from_etcd_over_tls(postgres: Postgres, tmp_path: Path) -> None:
    found = binaries("3.4") or binaries("3.5")
    if found is None:
        pytest.skip("no etcd installed")
    with etcd_with_tls(found, tmp_path) as (endpoint, ca, cert, key):
        credentials = grpc.ssl_channel_credentials(
            ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        with grpc.secure_channel(endpoint.removeprefix("https://"), credentials) as channel:
            kv = rpc_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
            # serving once it has elected itself
            grpc.channel_ready_future(channel).result(timeout=30)
            put = kv.Put(pb.PutRequest(key=b"/registry/tls", value=b"x"), timeout=30)
        tls_args = ("--cacert", str(ca), "--cert", str(cert), "--key", str(key))
        dsn = postgres.new_database("snaptls")
        code, out, err = load(dsn, "--etcd", endpoint, *tls_args)
        assert code == 0, err
        assert f"loaded: revision {put.header.revision}, compact revision 0" in out
        # without the client certificate etcd refuses the connection
        refused_dsn = postgres.new_database("snaptls")
        code, _out, err = load(refused_dsn, "--etcd", endpoint, "--cacert", str(ca))
        assert code == 1
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith(
                "geminikv load-snapshot: "
                + errors.LOAD_ETCD_UNREACHABLE.format(endpoint=endpoint, why="UNAVAILABLE")
            )
        )
        assert contents(refused_dsn) is None
        # the server's certificate unverified (no --cacert), the client's still presented
        unverified = postgres.new_database("snaptls")
        code, out, err = load(
            unverified,
            "--etcd",
            endpoint,
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--insecure-skip-tls-verify",
        )
        assert code == 0, err
        assert f"loaded: revision {put.header.revision}, compact revision 0" in out
