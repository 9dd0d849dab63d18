"""Requests etcd itself mishandles: geminikv fails them cleanly, writing nothing."""

from __future__ import annotations

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiServer

R = pb.RangeRequest


def test_ignore_value_after_delete_in_same_txn(gemini: GeminiServer, prefix: bytes) -> None:
    # etcd 3.4 checks ignore_value against the state before the txn, then panics when an
    # earlier op of the txn has deleted the key. geminikv rejects the whole txn.
    kv = gemini.stubs().kv
    kv.Put(pb.PutRequest(key=prefix + b"d", value=b"x"))
    before = kv.Range(R(key=prefix, range_end=prefix[:-1] + b"0"))
    with pytest.raises(grpc.RpcError) as err:
        kv.Txn(
            pb.TxnRequest(
                success=[
                    pb.RequestOp(
                        request_delete_range=pb.DeleteRangeRequest(
                            key=prefix + b"a", range_end=b"\x00"
                        )
                    ),
                    pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"d", ignore_value=True)),
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "etcdserver: key not found"
    after = kv.Range(R(key=prefix, range_end=prefix[:-1] + b"0"))
    assert after.kvs == before.kvs and after.header.revision == before.header.revision
    # the same batch machinery keeps serving
    assert kv.Put(pb.PutRequest(key=prefix + b"d", value=b"y")).header.revision > 0


def test_failed_request_in_a_batch_leaves_no_gap(gemini: GeminiServer, prefix: bytes) -> None:
    # A request that fails midway (after writing into the batch) is undone, and the
    # requests batched after it get consecutive revisions.
    kv = gemini.stubs().kv
    kv.Put(pb.PutRequest(key=prefix + b"d", value=b"x"))
    bad = pb.TxnRequest(
        success=[
            pb.RequestOp(
                request_delete_range=pb.DeleteRangeRequest(key=prefix + b"d", range_end=b"\x00")
            ),
            pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"d", ignore_value=True)),
        ]
    )
    futures = []
    for i in range(30):
        futures.append(kv.Txn.future(bad))
        futures.append(kv.Put.future(pb.PutRequest(key=prefix + b"k%d" % i, value=b"v")))
    revisions = []
    for f in futures:
        try:
            revisions.append(f.result().header.revision)
        except grpc.RpcError as err:
            assert err.details() == "etcdserver: key not found"
    assert len(revisions) == 30
    # every bad txn deletes d (and later keys) before failing, and is undone entirely
    assert sorted(revisions) == list(range(min(revisions), min(revisions) + 30))
