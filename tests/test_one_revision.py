"""One revision per request, as etcd: a multi-key Txn, a DeleteRange over several keys and a
lease revoke of several keys each take one revision on geminikv as on a real etcd (the
pair checks every header revision exactly, relative to its start), and what can be read or
watched at and around that revision is etcd's (docs/architecture.md#revisions)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Pair
from tests.servers import Etcd, GeminiServer, Postgres
from tests.test_watch_differential import WatchPair
from tests.watching import WatchClient

pytestmark = pytest.mark.etcd

R = pb.RangeRequest
W = pb.WatchCreateRequest


def _txn(p: bytes) -> pb.TxnRequest:
    """Creates two keys, updates one, deletes one: four keys at one revision."""
    return pb.TxnRequest(
        success=[
            pb.RequestOp(request_put=pb.PutRequest(key=p + b"a", value=b"a2")),
            pb.RequestOp(request_put=pb.PutRequest(key=p + b"n1", value=b"n")),
            pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=p + b"b")),
            pb.RequestOp(request_put=pb.PutRequest(key=p + b"n2", value=b"n")),
        ]
    )


def _shapes(pair: Pair, p: bytes) -> list[int]:
    """Each multi-key shape once, with single-key writes around; the relative revisions
    of the multi-key ones."""
    end = p[:-1] + b"0"
    multi = []
    for key in (b"a", b"b", b"c", b"d"):
        pair.check("Put", lambda rev, key=key: pb.PutRequest(key=p + key, value=b"1"))
    pair.check("Txn", lambda rev: _txn(p))
    multi.append(pair.etcd_to_rel(pair._etcd_revs[-1]))
    pair.check("Put", lambda rev: pb.PutRequest(key=p + b"c", value=b"c2"))
    pair.check(
        "DeleteRange", lambda rev: pb.DeleteRangeRequest(key=p + b"c", range_end=end, prev_kv=True)
    )
    multi.append(pair.etcd_to_rel(pair._etcd_revs[-1]))
    lease = 7_700_000 + int.from_bytes(p[-3:], "big") % 1_000_000
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=lease, TTL=600), "lease")
    for key in (b"l1", b"l2", b"l3"):
        pair.check("Put", lambda rev, key=key: pb.PutRequest(key=p + key, value=b"l", lease=lease))
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=lease), "lease")
    multi.append(pair.etcd_to_rel(pair._etcd_revs[-1]))
    pair.check("Put", lambda rev: pb.PutRequest(key=p + b"z", value=b"after"))
    return multi


def _watch_from(p: bytes, end: bytes, rel: int) -> Callable[[Callable[[int], int]], W]:
    return lambda rev: W(key=p, range_end=end, start_revision=rev(rel))


@pytest.fixture
def fresh_pair(postgres: Postgres) -> Iterator[Pair]:
    """An etcd and a geminikv of their own (a compaction would reach other tests)."""
    etcd = Etcd().start()
    server = GeminiServer(postgres.new_database("onerev")).start()
    e, g = etcd.stubs(), server.stubs()
    try:
        yield Pair(e, g)
    finally:
        e.close()
        g.close()
        server.stop()
        etcd.stop()


def test_each_shape_is_one_revision(pair: Pair, prefix: bytes) -> None:
    """Header revisions (checked by the pair), every key's mod and create revision, and a
    Range of everything at every revision from before the first write to after the last:
    never half a request."""
    p, end = prefix, prefix[:-1] + b"0"
    multi = _shapes(pair, p)
    assert [b - a for a, b in itertools.pairwise(multi)] == [2, 4]
    # kube-apiserver's get and guarded update (the wire paths), on a key the Txn created
    pair.check("Range", lambda rev: R(key=p + b"n1"))
    for rel in (multi[0] - 1, multi[0], multi[0] + 1):
        pair.check(
            "Txn",
            lambda rev, rel=rel: pb.TxnRequest(
                compare=[pb.Compare(key=p + b"n2", target=pb.Compare.MOD, mod_revision=rev(rel))],
                success=[pb.RequestOp(request_put=pb.PutRequest(key=p + b"n2", value=b"u"))],
                failure=[pb.RequestOp(request_range=R(key=p + b"n2"))],
            ),
        )
    # and its guarded delete, of a key the Txn created
    for rel in (multi[0] - 1, multi[0]):
        pair.check(
            "Txn",
            lambda rev, rel=rel: pb.TxnRequest(
                compare=[pb.Compare(key=p + b"n1", target=pb.Compare.MOD, mod_revision=rev(rel))],
                success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=p + b"n1"))],
                failure=[pb.RequestOp(request_range=R(key=p + b"n1"))],
            ),
        )
    top = pair.etcd_to_rel(pair._etcd_revs[-1])
    for rel in range(0, top + 1):
        pair.check("Range", lambda rev, rel=rel: R(key=p, range_end=end, revision=rev(rel)))
        pair.check("Range", lambda rev, rel=rel: R(key=p, range_end=end, min_mod_revision=rev(rel)))
        pair.check(
            "Txn",
            lambda rev, rel=rel: pb.TxnRequest(
                compare=[pb.Compare(key=p + b"n1", target=pb.Compare.MOD, mod_revision=rev(rel))],
                success=[pb.RequestOp(request_range=R(key=p, range_end=end, revision=rev(rel)))],
            ),
        )


def test_watches_from_inside_and_live(pair: Pair, prefix: bytes) -> None:
    """A live watcher gets each request's events in one response at its revision; a watch
    from every revision around them replays the same responses as etcd's."""
    p, end = prefix, prefix[:-1] + b"0"
    w = WatchPair(pair)
    try:
        w.create(lambda rev: W(key=p, range_end=end, prev_kv=True))
        w.compare()
        multi = _shapes(pair, p)
        live = w.compare()
        sizes = [len(r[1].get("events", [])) for r in live if isinstance(r, tuple)]
        assert [n for n in sizes if n > 1] == [4, 4, 3]
        for rel in range(multi[0] - 1, multi[-1] + 2):
            w.create(_watch_from(p, end, rel))
        # the farthest revision maps past every row, not around (found by test_fuzz_watch)
        w.create(lambda rev: W(key=p, range_end=end, start_revision=2**63 - 1))
        w.compare()
        pair.check("Range", lambda rev: R(key=p, range_end=end, max_mod_revision=2**63 - 1))
    finally:
        w.close()


def test_compaction_at_a_multi_key_revision(fresh_pair: Pair, prefix: bytes) -> None:
    """Compacting at a multi-key request's revision: reads at it work, below it fail, a
    watch from it replays, from below it is cancelled, as on etcd."""
    pair, p, end = fresh_pair, prefix, prefix[:-1] + b"0"
    multi = _shapes(pair, p)
    # HashKV hashes each change with its sub revision: the same at every revision
    assert pair.base_e == pair.base_g == 1  # both fresh: revisions are the same numbers
    for rel in range(0, pair.etcd_to_rel(pair._etcd_revs[-1]) + 1):
        got = [
            stubs.maintenance.HashKV(pb.HashKVRequest(revision=pair.etcd_rev(rel)))
            for stubs in (pair.etcd, pair.gk)
        ]
        assert got[0].hash == got[1].hash and got[0].header.revision == got[1].header.revision
    at = multi[1]
    pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(at), physical=True))
    for rel in (at - 1, at, at + 1):
        pair.check("Range", lambda rev, rel=rel: R(key=p, range_end=end, revision=rev(rel)))
    w = WatchPair(pair)
    try:
        for rel in (at - 1, at, at + 1):
            w.create(_watch_from(p, end, rel))
        w.compare()
    finally:
        w.close()
    pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(at)))
    pair.check("Compact", lambda rev: pb.CompactionRequest(revision=rev(multi[2])))
    pair.check("Range", lambda rev: R(key=p, range_end=end, revision=rev(multi[2])))


def test_a_request_is_never_half_applied(postgres: Postgres) -> None:
    """Another process fetching 2 rows at a time (a request's rows arrive in several
    fetches) never shows part of a request: every Range it answers holds all the txn's
    keys or none, and its watcher gets them in one response at one revision."""
    dsn = postgres.new_database("halves")
    writer = GeminiServer(dsn).start()
    reader = GeminiServer(dsn, poll_batch_size=2).start()
    watch = None
    try:
        kv, other = writer.stubs().kv, reader.stubs().kv
        watch = WatchClient(reader.stubs())
        watch.create(key=b"/h/", range_end=b"/h0")
        for round_ in range(3):
            keys = [b"/h/%d/%d" % (round_, i) for i in range(7)]
            txn = kv.Txn(
                pb.TxnRequest(
                    success=[
                        pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"v")) for k in keys
                    ]
                )
            )
            seen = set()
            while txn.header.revision not in seen:
                got = other.Range(
                    R(key=b"/h/%d/" % round_, range_end=b"/h/%d0" % round_, serializable=True)
                )
                assert got.count in (0, 7), got.count
                seen.add(got.header.revision)
            response = watch.next()
            assert response is not None
            assert [e.kv.key for e in response.events] == keys
            assert {e.kv.mod_revision for e in response.events} == {txn.header.revision}
            assert response.header.revision == txn.header.revision
    finally:
        if watch is not None:
            watch.close()
        reader.stop()
        writer.stop()
