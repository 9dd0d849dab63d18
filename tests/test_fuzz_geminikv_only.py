"""Hostile requests geminikv answers alone, with the answer spelled out: what etcd 3.4 cannot
answer (an unknown sort option crashes it) and a documented difference (keys that are not
UTF-8 or contain NUL cannot be written)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.fuzzing import TOP, C, Example, R, Requests, fewer, storable
from tests.servers import Etcd, GeminiServer

pytestmark = pytest.mark.etcd


SORT_VALUES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, -1, 99, 2**31 - 1, -(2**31)])


@fewer(3)
@given(data=st.data())
def test_unknown_sort_options_rejected(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    ex = Example(etcd, gemini, leases=False)
    try:
        make = Requests(data.draw, ex.p, ex.leases, TOP)
        ex.call("Put", lambda rev: pb.PutRequest(key=ex.p + b"a", value=b"1"))
        assert ex.checked == 1
        build = make.range(sort_values=SORT_VALUES, huge=False)
        req = build(ex.pair.gk_rev)
        valid = req.sort_order in R.SortOrder.values() and req.sort_target in R.SortTarget.values()
        in_txn = data.draw(st.booleans())
        if valid and req.key:  # etcd 3.4 would crash on the others
            if in_txn:
                ex.call(
                    "Txn",
                    lambda rev: pb.TxnRequest(success=[pb.RequestOp(request_range=build(rev))]),
                )
            else:
                ex.call("Range", build)
            assert ex.checked == 2  # compared with etcd
            return
        message = (
            "etcdserver: key is not provided" if not req.key else "etcdserver: invalid sort option"
        )
        if in_txn:
            txn = pb.TxnRequest(
                compare=[C(key=ex.p + b"a", target=C.VERSION, result=C.EQUAL, version=1)],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=ex.p + b"b", value=b"2")),
                    pb.RequestOp(request_range=req),
                ],
            )
            ex.gk_only("Txn", txn, "kv", grpc.StatusCode.INVALID_ARGUMENT, message)
        else:
            ex.gk_only("Range", req, "kv", grpc.StatusCode.INVALID_ARGUMENT, message)
        assert ex.checked == 2  # refused by geminikv as etcd refuses it
    finally:
        ex.close()


UNSTORABLE = st.one_of(
    st.binary(min_size=1, max_size=8).filter(lambda b: not storable(b)),
    st.binary(max_size=4).map(lambda b: b + b"\x00"),
)


@fewer(3)
@given(data=st.data())
def test_unstorable_keys_rejected_and_nothing_written(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    """geminikv keeps keys in a text column (Kine's layout): a key that is not UTF-8 or has
    a NUL cannot be written, anywhere in a request (etcd would store it); reading such
    keys, deleting them, comparing and watching them works as in etcd (the other tests)."""
    ex = Example(etcd, gemini, leases=False)
    try:
        key = ex.p + data.draw(UNSTORABLE)
        put = pb.PutRequest(key=key, value=b"v")
        where = data.draw(st.sampled_from(["put", "success", "failure", "nested"]))
        good = pb.RequestOp(request_put=pb.PutRequest(key=ex.p + b"ok", value=b"v"))
        bad = pb.RequestOp(request_put=put)
        if where == "put":
            ex.gk_only("Put", put, "kv", grpc.StatusCode.INVALID_ARGUMENT, "geminikv: key must")
            assert ex.checked == 1
            return
        if where == "nested":
            bad = pb.RequestOp(request_txn=pb.TxnRequest(failure=[bad]))
        txn = pb.TxnRequest(
            success=[good, bad] if where != "failure" else [good],
            failure=[bad] if where == "failure" else [],
        )
        ex.gk_only("Txn", txn, "kv", grpc.StatusCode.INVALID_ARGUMENT, "geminikv: key must")
        # the same key can be read, compared and deleted, as in etcd
        ex.call("Range", lambda rev: R(key=key))
        ex.call("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=key, prev_kv=True))
        assert ex.checked == 3
    finally:
        ex.close()
