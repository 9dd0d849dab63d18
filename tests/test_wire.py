"""kube-apiserver's create, update and delete txn and its single-key get, read and answered in
wire format: the same answers as etcd's, bytes protobuf itself would write, and every other
shape (a near miss included) left to the generic path, which answers it as etcd does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest

from geminikv._native.kvwire import (
    encode_header_prefix,
    encode_range_answer,
    parse_guarded_put,
    parse_key_get,
)
from geminikv.config import MAX_REQUEST_BYTES
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.differential import Pair
from tests.servers import Stubs

C = pb.Compare
R = pb.RangeRequest
Op = pb.RequestOp
M = TypeVar("M", pb.TxnResponse, pb.RangeResponse)


def guarded(
    key: bytes, rev: int, value: bytes = b"v", read: bool = True, **put: Any
) -> pb.TxnRequest:
    return pb.TxnRequest(
        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=rev)],
        success=[Op(request_put=pb.PutRequest(key=key, value=value, **put))],
        failure=[Op(request_range=R(key=key))] if read else [],
    )


def deleting(key: bytes, rev: int, read: bool = True) -> pb.TxnRequest:
    """kube-apiserver's delete (OptimisticDelete with GetOnFailure)."""
    return pb.TxnRequest(
        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=rev)],
        success=[Op(request_delete_range=pb.DeleteRangeRequest(key=key))],
        failure=[Op(request_range=R(key=key))] if read else [],
    )


def test_parses_kubernetes_create_update_and_delete() -> None:
    update = parse_guarded_put(guarded(b"/k", 7, b"x" * 1024).SerializeToString(), 1 << 20)
    assert update is not None
    assert (update.key, update.want_mod, update.value, update.read_on_failure) == (
        b"/k",
        7,
        b"x" * 1024,
        True,
    )
    create = parse_guarded_put(guarded(b"/k", 0, b"", read=False).SerializeToString(), 1 << 20)
    assert create is not None
    assert (create.want_mod, create.value, create.read_on_failure) == (0, b"", False)
    stale = parse_guarded_put(guarded(b"/k", -2).SerializeToString(), 1 << 20)
    assert stale is not None and stale.want_mod == -2
    assert update.lease == create.lease == 0
    for lease in (7, 2**31 - 1, -1, 2**63 - 1):  # an Event's create; ids no lease can have
        event = parse_guarded_put(
            guarded(b"/k", 0, read=False, lease=lease).SerializeToString(), 1 << 20
        )
        assert event is not None and event.lease == lease
    assert not (update.delete or create.delete)
    delete = parse_guarded_put(deleting(b"/k", 7).SerializeToString(), 1 << 20)
    assert delete is not None
    assert (delete.key, delete.want_mod, delete.value, delete.lease) == (b"/k", 7, b"", 0)
    assert delete.delete and delete.read_on_failure
    delete = parse_guarded_put(deleting(b"/k", 7, read=False).SerializeToString(), 1 << 20)
    assert delete is not None and delete.delete and not delete.read_on_failure


def near_misses(key: bytes) -> dict[str, pb.TxnRequest]:
    """Requests one step from the guarded put's shape, each valid for etcd."""
    put = Op(request_put=pb.PutRequest(key=key, value=b"v"))
    mod = C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=0)
    cases = {
        "prev_kv": guarded(key, 0, prev_kv=True),
        "put another key": pb.TxnRequest(
            compare=[mod], success=[Op(request_put=pb.PutRequest(key=key + b"2", value=b"v"))]
        ),
        "two compares": pb.TxnRequest(compare=[mod, mod], success=[put]),
        "compare version": pb.TxnRequest(
            compare=[C(key=key, target=C.VERSION, result=C.EQUAL, version=0)], success=[put]
        ),
        "compare not equal": pb.TxnRequest(
            compare=[C(key=key, target=C.MOD, result=C.NOT_EQUAL, mod_revision=0)],
            success=[put],
        ),
        "compare a range": pb.TxnRequest(
            compare=[C(key=key, range_end=key + b"\xff", target=C.MOD, mod_revision=0)],
            success=[put],
        ),
        "no compare": pb.TxnRequest(success=[put]),
        "two puts": pb.TxnRequest(
            compare=[mod],
            success=[put, Op(request_put=pb.PutRequest(key=key + b"2", value=b"w"))],
        ),
        "delete with prev_kv": pb.TxnRequest(
            compare=[mod],
            success=[Op(request_delete_range=pb.DeleteRangeRequest(key=key, prev_kv=True))],
        ),
        "delete a range": pb.TxnRequest(
            compare=[mod],
            success=[
                Op(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=key + b"\xff"))
            ],
        ),
        "delete another key": pb.TxnRequest(
            compare=[mod],
            success=[Op(request_delete_range=pb.DeleteRangeRequest(key=key + b"2"))],
        ),
        "delete and put": pb.TxnRequest(
            compare=[mod],
            success=[Op(request_delete_range=pb.DeleteRangeRequest(key=key)), put],
        ),
        "delete, failure delete": pb.TxnRequest(
            compare=[mod],
            success=[Op(request_delete_range=pb.DeleteRangeRequest(key=key))],
            failure=[Op(request_delete_range=pb.DeleteRangeRequest(key=key))],
        ),
        "failure range with limit": pb.TxnRequest(
            compare=[mod], success=[put], failure=[Op(request_range=R(key=key, limit=1))]
        ),
        "failure range keys only": pb.TxnRequest(
            compare=[mod], success=[put], failure=[Op(request_range=R(key=key, keys_only=True))]
        ),
        "failure range of another key": pb.TxnRequest(
            compare=[mod], success=[put], failure=[Op(request_range=R(key=key + b"2"))]
        ),
        "failure two ranges": pb.TxnRequest(
            compare=[mod],
            success=[put],
            failure=[Op(request_range=R(key=key)), Op(request_range=R(key=key))],
        ),
        "failure put": pb.TxnRequest(compare=[mod], success=[put], failure=[put]),
    }
    return cases


def test_near_misses_take_the_generic_path_and_answer_as_etcd(pair: Pair, prefix: bytes) -> None:
    key = prefix + b"near"
    for name, request in near_misses(key).items():
        assert parse_guarded_put(request.SerializeToString(), 1 << 20) is None, name
    pair.check("Put", lambda rev: pb.PutRequest(key=key, value=b"0"))
    for _round in range(2):  # the key present, then absent
        for _name, request in near_misses(key).items():
            pair.check("Txn", lambda rev, r=request: r)
        pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=key, range_end=key + b"3"))


def test_non_canonical_or_unknown_bytes_take_the_generic_path() -> None:
    data = guarded(b"/k", 3).SerializeToString()
    assert parse_guarded_put(data, 1 << 20) is not None
    compare = C(key=b"/k", target=C.MOD, mod_revision=3).SerializeToString()
    twice = b"\x0a" + bytes([len(compare)]) + compare  # a second compare field
    assert parse_guarded_put(twice + data, 1 << 20) is None
    assert parse_guarded_put(data + b"\x20\x01", 1 << 20) is None  # field 4: unknown to Txn
    assert parse_guarded_put(data, len(data) - 1) is None  # over the size limit
    for cut in range(1, len(data)):
        got = parse_guarded_put(data[:cut], 1 << 20)
        if got is None:
            continue
        # cut between fields: a valid, shorter request, read as protobuf reads it
        msg = pb.TxnRequest.FromString(data[:cut])
        put = msg.success[0].request_put
        assert (got.key, got.value) == (put.key, put.value)
        assert got.want_mod == msg.compare[0].mod_revision
        assert got.read_on_failure == bool(msg.failure)
    assert parse_guarded_put(data[:-2], 1 << 20) is None  # cut inside a field


def test_answers_match_etcd(pair: Pair, prefix: bytes) -> None:
    key = prefix + b"pods/ns/p\xc3\xa9"  # UTF-8 beyond ASCII
    big = bytes(range(256)) * 400  # 100 KiB
    checks: list[Callable[[Callable[[int], int]], pb.TxnRequest]] = [
        lambda rev: guarded(key, 0, b"v1", read=False),  # create
        lambda rev: guarded(key, 0, b"v1", read=False),  # already exists: no responses
        lambda rev: guarded(key, 0, b"v1"),  # already exists: the current object
        lambda rev: guarded(key, rev(1), b""),  # update to an empty value
        lambda rev: guarded(key, rev(1), b"stale"),  # conflict: the current object
        lambda rev: guarded(key, rev(2), big),
        lambda rev: guarded(key, rev(3), b"v4", read=False),
        lambda rev: guarded(key, -1, b"never"),
        lambda rev: guarded(key + b"/absent", 5, b"never"),  # absent, read: no kvs
        lambda rev: guarded(key + b"/absent", 5, b"never", read=False),
    ]
    for build in checks:
        pair.check("Txn", build)
    pair.check("Range", lambda rev: R(key=key))


def test_delete_answers_match_etcd(pair: Pair, prefix: bytes) -> None:
    key = prefix + b"pods/ns/gone"
    checks: list[Callable[[Callable[[int], int]], pb.TxnRequest]] = [
        lambda rev: guarded(key, 0, b"v1", read=False),  # created at rev(1)
        lambda rev: deleting(key, 0),  # conflict: the current object
        lambda rev: deleting(key, 0, read=False),  # conflict: no responses
        lambda rev: deleting(key, rev(1)),  # deleted at rev(2)
        lambda rev: deleting(key, rev(1)),  # gone: the compare fails, no kvs
        lambda rev: deleting(key, 0),  # gone: the compare holds, nothing deleted
        lambda rev: guarded(key, 0, b"v2", read=False),  # created again at rev(3)
        lambda rev: deleting(key, rev(3), read=False),  # deleted at rev(4)
        lambda rev: deleting(key + b"/never", 0, read=False),
    ]
    for build in checks:
        assert parse_guarded_put(build(pair.etcd_rev).SerializeToString(), 1 << 20) is not None
        pair.check("Txn", build)
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))


def test_leased_answers_match_etcd(pair: Pair, prefix: bytes) -> None:
    """kube-apiserver's Events: created attached to a lease, which expiry then revokes."""
    live = (int(prefix[1:-1]) // 1000 % 10**8) * 10 + 1  # an explicit id, both accept it
    pair.check("LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=live, TTL=600), "lease")
    key = prefix + b"events/ns/e1"
    checks: list[Callable[[Callable[[int], int]], pb.TxnRequest]] = [
        lambda rev: guarded(key, 0, b"e1", read=False, lease=live),  # create
        lambda rev: guarded(key, 0, b"again", lease=live),  # exists: the current object
        lambda rev: guarded(key, rev(1), b"e2", lease=live),  # update, still leased
        lambda rev: guarded(key, rev(2), b"e3"),  # update detaches it
        lambda rev: guarded(key, rev(3), b"e4", lease=live + 1),  # no such lease
        lambda rev: guarded(key, 0, b"e4", lease=live + 1),  # compare fails: no lease check
        lambda rev: guarded(key + b"/2", 0, b"x", read=False, lease=-1),
        lambda rev: guarded(key + b"/3", 0, b"x", read=False, lease=2**63 - 1),
        lambda rev: guarded(key + b"/4", 0, b"x", read=False, lease=live),
    ]
    for build in checks:
        assert parse_guarded_put(build(pair.etcd_rev).SerializeToString(), 1 << 20) is not None
        pair.check("Txn", build)
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))
    pair.check("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=live), "lease")
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))


def assert_canonical(message: type[M], answer: bytes, status: pb.ResponseHeader) -> M:
    """``answer`` is exactly what protobuf writes for it, with this server's header."""
    parsed = message.FromString(answer)
    assert parsed.SerializeToString() == answer
    header = parsed.header  # type: ignore[attr-defined]
    assert (header.cluster_id, header.member_id, header.raft_term) == (
        status.cluster_id,
        status.member_id,
        status.raft_term,
    )
    return parsed


def test_answer_bytes_are_canonical_protobuf(gk: Stubs, prefix: bytes) -> None:
    txn = gk.channel.unary_unary("/etcdserverpb.KV/Txn")  # raw bytes both ways
    key = prefix + b"raw"
    created = txn(guarded(key, 0, b"a").SerializeToString(), timeout=30)
    stale = txn(guarded(key, 0, b"b").SerializeToString(), timeout=30)
    status = gk.maintenance.Status(pb.StatusRequest(), timeout=30).header
    for answer in (created, stale):
        assert_canonical(pb.TxnResponse, answer, status)
    first, second = pb.TxnResponse.FromString(created), pb.TxnResponse.FromString(stale)
    assert first.succeeded and first.responses[0].response_put.header.revision > 0
    assert not second.succeeded
    (kv,) = second.responses[0].response_range.kvs
    assert (kv.key, kv.value, kv.version) == (key, b"a", 1)
    assert kv.mod_revision == kv.create_revision == first.header.revision
    stale = txn(deleting(key, 1).SerializeToString(), timeout=30)
    deleted = txn(deleting(key, first.header.revision).SerializeToString(), timeout=30)
    nothing = txn(deleting(key, 0).SerializeToString(), timeout=30)
    for answer in (stale, deleted, nothing):
        assert_canonical(pb.TxnResponse, answer, status)
    (kv,) = pb.TxnResponse.FromString(stale).responses[0].response_range.kvs
    assert kv.value == b"a"
    gone = pb.TxnResponse.FromString(deleted)
    assert gone.succeeded and gone.responses[0].response_delete_range.deleted == 1
    assert gone.responses[0].response_delete_range.header.revision == gone.header.revision
    assert pb.TxnResponse.FromString(nothing).responses[0].response_delete_range.deleted == 0


def test_any_key_and_malformed_bytes_as_before(gk: Stubs) -> None:
    # a key text cannot hold takes the fast path too (stored escaped, mvcc/keys.py)
    key = b"/nul\x00key/%d" % time.time_ns()
    assert gk.kv.Txn(guarded(key, 0), timeout=30).succeeded
    assert [kv.key for kv in gk.kv.Range(R(key=key)).kvs] == [key]
    txn = gk.channel.unary_unary("/etcdserverpb.KV/Txn")
    with pytest.raises(grpc.RpcError) as truncated:
        txn(guarded(b"/k", 0).SerializeToString()[:-2], timeout=30)
    assert truncated.value.code() == grpc.StatusCode.INTERNAL
    assert truncated.value.details().startswith("grpc: error unmarshalling request")
    assert len(guarded(b"/k", 0, b"x" * MAX_REQUEST_BYTES).SerializeToString()) > MAX_REQUEST_BYTES
    with pytest.raises(grpc.RpcError) as too_large:
        gk.kv.Txn(guarded(b"/k", 0, b"x" * MAX_REQUEST_BYTES), timeout=30)
    assert too_large.value.details() == "etcdserver: request is too large"


# -- single-key gets -----------------------------------------------------------------------


def test_parses_a_get_of_one_key() -> None:
    got = parse_key_get(R(key=b"/k").SerializeToString())
    assert got is not None and (got.key, got.serializable) == (b"/k", False)
    got = parse_key_get(R(key=b"/k", serializable=True).SerializeToString())
    assert got is not None and (got.key, got.serializable) == (b"/k", True)
    assert parse_key_get(b"") is None  # no key: the generic path's EmptyKey
    data = R(key=b"/k").SerializeToString()
    assert parse_key_get(data + data) is None  # the key twice
    assert parse_key_get(data[:-1]) is None


def get_near_misses(key: bytes, rev: Callable[[int], int]) -> dict[str, R]:
    return {
        "range": R(key=key, range_end=key + b"\xff"),
        "limit": R(key=key, limit=1),
        "revision": R(key=key, revision=rev(1)),
        "keys only": R(key=key, keys_only=True),
        "count only": R(key=key, count_only=True),
        "sort": R(key=key, sort_order=R.DESCEND, sort_target=R.MOD),
        "min mod revision": R(key=key, min_mod_revision=rev(2)),
        "max create revision": R(key=key, max_create_revision=rev(1)),
    }


def test_get_answers_match_etcd_and_near_misses_take_the_generic_path(
    pair: Pair, prefix: bytes
) -> None:
    key = prefix + b"configmaps/ns/c\xc3\xa9"
    for name, request in get_near_misses(key, lambda rel: 1).items():
        assert parse_key_get(request.SerializeToString()) is None, name
    gets = [R(key=key), R(key=key, serializable=True), R(key=key + b"/absent")]
    for value in (b"v1", b"", bytes(range(256)) * 400):
        pair.check("Put", lambda rev, v=value: pb.PutRequest(key=key, value=v))
        for request in gets:
            pair.check("Range", lambda rev, r=request: r)
        for name in get_near_misses(key, lambda rel: 1):
            pair.check("Range", lambda rev, n=name: get_near_misses(key, rev)[n])
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=key))
    for request in gets:
        pair.check("Range", lambda rev, r=request: r)
    pair.check("Range", lambda rev: R(key=b""))  # no key: etcd's error, from the generic path


def test_get_answer_bytes_are_canonical_protobuf(gk: Stubs, prefix: bytes) -> None:
    get = gk.channel.unary_unary("/etcdserverpb.KV/Range")  # raw bytes both ways
    key = prefix + b"raw-get"
    put = gk.kv.Put(pb.PutRequest(key=key, value=b"a"), timeout=30)
    status = gk.maintenance.Status(pb.StatusRequest(), timeout=30).header
    for request in (R(key=key), R(key=key + b"/absent")):
        parsed = assert_canonical(
            pb.RangeResponse, get(request.SerializeToString(), timeout=30), status
        )
        assert parsed.header.revision >= put.header.revision
    found = pb.RangeResponse.FromString(get(R(key=key).SerializeToString(), timeout=30))
    assert found.count == 1
    (kv,) = found.kvs
    assert (kv.key, kv.value, kv.version, kv.mod_revision) == (key, b"a", 1, put.header.revision)
    with pytest.raises(grpc.RpcError) as truncated:
        get(R(key=key).SerializeToString()[:-1], timeout=30)
    assert truncated.value.code() == grpc.StatusCode.INTERNAL


# -- any other range -------------------------------------------------------------------------


def test_range_answers_are_the_bytes_protobuf_writes() -> None:
    """Every Range the generic path evaluates is answered by encode_range_answer."""
    header = pb.ResponseHeader(cluster_id=2**64 - 1, member_id=7, revision=0, raft_term=2)
    entries = [
        (b"/a", 5, 3, 2, 0),
        (b"/b\x00\xff", 2**40, 2**40, 1, 2**31 - 1),
        (b"/c", 9, 9, 1, -1),  # a lease id no lease can have, as protobuf writes int64
        (b"/d", 12, 4, 3, 7),
    ]
    values = {5: b"v" * 300, 2**40: b"", 9: bytes(range(256)) * 100, 12: b"x"}
    prefix = encode_header_prefix(header.cluster_id, header.member_id)
    cases = [([], None, 0, False), ([], None, 42, False), (entries, values, 4, False)]
    cases += [
        (entries[:2], values, 4, True),
        (entries, None, 9, True),
        (entries[1:2], values, 1, False),
    ]
    for revision in (1, 2**33):
        for chosen, vals, count, more in cases:
            expected = pb.RangeResponse(header=header, count=count, more=more)
            expected.header.revision = revision
            for key, mod, create, version, lease in chosen:
                expected.kvs.append(
                    kv_pb2.KeyValue(
                        key=key,
                        mod_revision=mod,
                        create_revision=create,
                        version=version,
                        lease=lease,
                        value=b"" if vals is None else vals[mod],
                    )
                )
            got = encode_range_answer(prefix, 2, revision, chosen, vals, count, more)
            assert got == expected.SerializeToString()
