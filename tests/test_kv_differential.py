"""KV semantics, differential: the same requests to a real etcd and to geminikv."""

from __future__ import annotations

from typing import Any

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.differential import Pair

pytestmark = pytest.mark.etcd

R = pb.RangeRequest
C = pb.Compare


def put(pair: Pair, key: bytes, value: bytes = b"v", **kw: Any) -> None:
    """A Put with the given fields (``prev_kv``, ``lease``, ...) on both servers."""
    pair.check("Put", lambda rev: pb.PutRequest(key=key, value=value, **kw))


def seed(pair: Pair, p: bytes) -> None:
    for i, name in enumerate([b"a", b"b", b"c", b"d", b"e"]):
        put(pair, p + name, b"value-%d" % (5 - i))
    put(pair, p + b"b", b"b-2")
    put(pair, p + b"d", b"d-2")
    put(pair, p + b"d", b"d-3")


def test_put_and_get(pair: Pair, prefix: bytes) -> None:
    put(pair, prefix + b"k", b"one")
    put(pair, prefix + b"k", b"two", prev_kv=True)
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"k", value=b"3", prev_kv=True))
    pair.check("Range", lambda rev: R(key=prefix + b"k"))
    pair.check("Range", lambda rev: R(key=prefix + b"missing"))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"empty", value=b""))
    pair.check("Range", lambda rev: R(key=prefix + b"empty"))


def test_range_options(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    end = prefix[:-1] + b"0"  # prefix end of ".../"
    cases = [
        R(key=prefix, range_end=end),
        R(key=prefix, range_end=end, limit=2),
        R(key=prefix, range_end=end, limit=5),
        R(key=prefix, range_end=end, limit=6),
        R(key=prefix, range_end=end, count_only=True),
        R(key=prefix, range_end=end, count_only=True, limit=1),
        R(key=prefix, range_end=end, keys_only=True),
        R(key=prefix + b"b", range_end=prefix + b"d"),
        R(key=prefix + b"d", range_end=prefix + b"b"),
        R(key=prefix + b"c", range_end=b"\x00", limit=2),
        R(key=prefix, range_end=end, serializable=True),
        R(key=prefix + b"b\x00", range_end=end, limit=2),
    ]
    for target in (R.KEY, R.VERSION, R.CREATE, R.MOD, R.VALUE):
        for order in (R.NONE, R.ASCEND, R.DESCEND):
            cases.append(R(key=prefix, range_end=end, sort_target=target, sort_order=order))
            cases.append(
                R(key=prefix, range_end=end, sort_target=target, sort_order=order, limit=3)
            )
    for case in cases:
        pair.check("Range", lambda rev, case=case: case)


def test_range_revision_filters(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    end = prefix[:-1] + b"0"
    for field in (
        "min_mod_revision",
        "max_mod_revision",
        "min_create_revision",
        "max_create_revision",
    ):
        for rel in (1, 3, 6, 8):
            pair.check(
                "Range",
                lambda rev, f=field, r=rel: R(key=prefix, range_end=end, **{f: rev(r)}),
            )
            pair.check(
                "Range",
                lambda rev, f=field, r=rel: R(key=prefix, range_end=end, limit=2, **{f: rev(r)}),
            )


def test_range_history(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    put(pair, prefix + b"a", b"later")
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=prefix + b"c"))
    end = prefix[:-1] + b"0"
    for rel in range(1, 11):
        pair.check("Range", lambda rev, r=rel: R(key=prefix, range_end=end, revision=rev(r)))
        pair.check(
            "Range",
            lambda rev, r=rel: R(key=prefix, range_end=end, revision=rev(r), limit=2),
        )
        pair.check(
            "Range",
            lambda rev, r=rel: R(key=prefix, range_end=end, revision=rev(r), count_only=True),
        )
    pair.check("Range", lambda rev: R(key=prefix + b"a", revision=rev(20)))
    pair.check("Range", lambda rev: R(key=prefix + b"a", revision=-5))


def test_errors(pair: Pair, prefix: bytes) -> None:
    pair.check("Range", lambda rev: R(key=b""))
    pair.check("Put", lambda rev: pb.PutRequest(key=b"", value=b"x"))
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=b""))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", ignore_value=True))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", ignore_lease=True))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", value=b"v", ignore_value=True))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", lease=5, ignore_lease=True))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", value=b"v", lease=12345))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"x", value=b"x" * (1536 * 1024)))
    pair.check("Range", lambda rev: R(key=prefix + b"x"))


def test_ignore_value_and_lease(pair: Pair, prefix: bytes) -> None:
    put(pair, prefix + b"k", b"kept")
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"k", ignore_value=True, prev_kv=True))
    pair.check("Put", lambda rev: pb.PutRequest(key=prefix + b"k", value=b"new", ignore_lease=True))
    pair.check("Range", lambda rev: R(key=prefix + b"k"))


def test_delete_range(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=prefix + b"zz"))
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=prefix + b"a", prev_kv=True))
    pair.check("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=prefix + b"a", prev_kv=True))
    pair.check(
        "DeleteRange",
        lambda rev: pb.DeleteRangeRequest(key=prefix + b"b", range_end=prefix + b"d", prev_kv=True),
    )
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))
    pair.check(
        "DeleteRange", lambda rev: pb.DeleteRangeRequest(key=prefix + b"d", range_end=b"\x00")
    )
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix[:-1] + b"0"))
    put(pair, prefix + b"a", b"again")
    pair.check("Range", lambda rev: R(key=prefix + b"a"))


def _cmp(
    key: bytes, target: pb.Compare.CompareTarget, result: pb.Compare.CompareResult, **value: Any
) -> pb.Compare:
    """A Compare; ``value``: the one field the target reads (``version=3``, ...)."""
    return C(key=key, target=target, result=result, **value)


def test_txn_compares(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    k = prefix + b"d"
    absent = prefix + b"nope"
    results = (C.EQUAL, C.GREATER, C.LESS, C.NOT_EQUAL)
    compares = []
    for res in results:
        compares += [
            lambda rev, res=res: _cmp(k, C.VERSION, res, version=3),
            lambda rev, res=res: _cmp(k, C.CREATE, res, create_revision=rev(4)),
            lambda rev, res=res: _cmp(k, C.MOD, res, mod_revision=rev(8)),
            lambda rev, res=res: _cmp(k, C.VALUE, res, value=b"d-3"),
            lambda rev, res=res: _cmp(k, C.VALUE, res, value=b"d-2"),
            lambda rev, res=res: _cmp(k, C.LEASE, res, lease=0),
            lambda rev, res=res: _cmp(absent, C.MOD, res, mod_revision=0),
            lambda rev, res=res: _cmp(absent, C.VALUE, res, value=b""),
            lambda rev, res=res: _cmp(absent, C.VERSION, res, version=0),
            lambda rev, res=res: _cmp(
                prefix + b"a", C.VERSION, res, version=1, range_end=prefix + b"c"
            ),
            lambda rev, res=res: _cmp(
                prefix + b"a", C.VALUE, res, value=b"value-5", range_end=prefix + b"z"
            ),
            lambda rev, res=res: _cmp(prefix, C.CREATE, res, create_revision=0, range_end=b"\x00"),
            lambda rev, res=res: _cmp(k, C.MOD, res, version=3),  # mismatched union
        ]
    for cmp in compares:
        pair.check(
            "Txn",
            lambda rev, cmp=cmp: pb.TxnRequest(
                compare=[cmp(rev)],
                success=[pb.RequestOp(request_range=R(key=k))],
                failure=[pb.RequestOp(request_range=R(key=prefix + b"a"))],
            ),
        )


def test_txn_kubernetes_shapes(pair: Pair, prefix: bytes) -> None:
    key = prefix + b"pods/default/web"
    create = lambda rev: pb.TxnRequest(  # noqa: E731
        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=0)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v1"))],
    )
    pair.check("Txn", create)
    pair.check("Txn", create)  # AlreadyExists: succeeded=false, no responses
    update = lambda rev, r: pb.TxnRequest(  # noqa: E731
        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=rev(r))],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v%d" % r))],
        failure=[pb.RequestOp(request_range=R(key=key))],
    )
    pair.check("Txn", lambda rev: update(rev, 1))
    pair.check("Txn", lambda rev: update(rev, 1))  # conflict: current object returned
    delete = lambda rev, r: pb.TxnRequest(  # noqa: E731
        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=rev(r))],
        success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))],
        failure=[pb.RequestOp(request_range=R(key=key))],
    )
    pair.check("Txn", lambda rev: delete(rev, 1))
    pair.check("Txn", lambda rev: delete(rev, 2))
    pair.check("Range", lambda rev: R(key=key))
    # the compactor's txn on compact_rev_key (exact per-key version)
    compact = lambda rev, t, v: pb.TxnRequest(  # noqa: E731
        compare=[C(key=b"compact_rev_key", target=C.VERSION, result=C.EQUAL, version=t)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"compact_rev_key", value=v))],
        failure=[pb.RequestOp(request_range=R(key=b"compact_rev_key"))],
    )
    _e, _g = pair.call("Txn", lambda rev: compact(rev, 0, b"x"))
    e_version = pair.etcd.kv.Range(R(key=b"compact_rev_key")).kvs
    g_version = pair.gk.kv.Range(R(key=b"compact_rev_key")).kvs
    assert [kv.version for kv in e_version] == [kv.version for kv in g_version]
    t = e_version[0].version if e_version else 0
    pair.check("Txn", lambda rev: compact(rev, t, b"1"))
    pair.check("Txn", lambda rev: compact(rev, t, b"2"))
    pair.check("Txn", lambda rev: compact(rev, t + 1, b"3"))


def test_txn_ops_see_earlier_ops(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    end = prefix[:-1] + b"0"
    pair.check(
        "Txn",
        lambda rev: pb.TxnRequest(
            success=[
                pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"n1", value=b"1")),
                pb.RequestOp(request_range=R(key=prefix, range_end=end, count_only=True)),
                pb.RequestOp(
                    request_put=pb.PutRequest(key=prefix + b"a", value=b"2", prev_kv=True)
                ),
                pb.RequestOp(request_range=R(key=prefix + b"a")),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=prefix + b"zz")),
            ]
        ),
    )
    pair.check(
        "Txn",
        lambda rev: pb.TxnRequest(
            success=[
                pb.RequestOp(request_range=R(key=prefix + b"a", revision=rev(2))),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=prefix + b"zz")),
                pb.RequestOp(request_range=R(key=prefix, range_end=end, limit=1)),
            ]
        ),
    )


def test_txn_nested(pair: Pair, prefix: bytes) -> None:
    seed(pair, prefix)
    inner = lambda rev, v: pb.TxnRequest(  # noqa: E731
        compare=[C(key=prefix + b"a", target=C.VERSION, result=C.EQUAL, version=v)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"in", value=b"yes"))],
        failure=[pb.RequestOp(request_range=R(key=prefix + b"a"))],
    )
    for outer_ok in (True, False):
        for v in (1, 2):
            pair.check(
                "Txn",
                lambda rev, ok=outer_ok, v=v: pb.TxnRequest(
                    compare=[
                        C(
                            key=prefix + b"b",
                            target=C.VERSION,
                            result=C.EQUAL if ok else C.NOT_EQUAL,
                            version=2,
                        )
                    ],
                    success=[
                        pb.RequestOp(request_txn=inner(rev, v)),
                        pb.RequestOp(request_range=R(key=prefix + b"in")),
                    ],
                    failure=[pb.RequestOp(request_txn=inner(rev, 3 - v))],
                ),
            )


def test_txn_errors(pair: Pair, prefix: bytes) -> None:
    k = prefix + b"k"
    put(pair, k, b"v")
    P = lambda key, **kw: pb.RequestOp(request_put=pb.PutRequest(key=key, **kw))  # noqa: E731
    D = lambda key, **kw: pb.RequestOp(  # noqa: E731
        request_delete_range=pb.DeleteRangeRequest(key=key, **kw)
    )
    bad = [
        pb.TxnRequest(success=[P(k, value=b"1"), P(k, value=b"2")]),
        pb.TxnRequest(success=[D(prefix, range_end=prefix + b"z"), P(k, value=b"2")]),
        pb.TxnRequest(success=[D(prefix, range_end=b"\x00"), P(k, value=b"2")]),
        pb.TxnRequest(success=[P(k), pb.RequestOp(request_txn=pb.TxnRequest(success=[P(k)]))]),
        pb.TxnRequest(
            success=[pb.RequestOp(request_txn=pb.TxnRequest(success=[P(k)], failure=[P(k)]))]
        ),
        pb.TxnRequest(success=[pb.RequestOp()]),
        pb.TxnRequest(success=[P(b"")]),
        pb.TxnRequest(compare=[C(key=b"", target=C.VERSION)]),
        pb.TxnRequest(success=[P(k, value=b"x")] * 0 + [P(prefix + b"%d" % i) for i in range(129)]),
        pb.TxnRequest(success=[P(prefix + b"%d" % i) for i in range(128)]),
        pb.TxnRequest(success=[P(prefix + b"absent", ignore_value=True)]),
        pb.TxnRequest(failure=[P(prefix + b"absent", ignore_value=True)]),
        pb.TxnRequest(success=[P(k, lease=777)]),
        pb.TxnRequest(success=[P(k, value=b"v", ignore_value=True)]),
    ]
    for req in bad:
        pair.check("Txn", lambda rev, req=req: req)
    pair.check(
        "Txn",
        lambda rev: pb.TxnRequest(success=[pb.RequestOp(request_range=R(key=k, revision=rev(50)))]),
    )
    pair.check("Range", lambda rev: R(key=prefix, range_end=prefix + b"z", count_only=True))
