"""Hostile requests geminikv answers alone, with the answer spelled out (what etcd 3.4 cannot
answer: an unknown sort option crashes it), and keys Kine's text column cannot hold,
answered as etcd answers them."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.mvcc.keys import ESCAPED
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.fuzzing import TOP, C, Example, R, Requests, fewer, prefix_end
from tests.servers import Etcd, GeminiServer
from tests.watching import WatchClient

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


def _text(key: bytes) -> bool:
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in key


# keys PostgreSQL's text cannot hold, and keys that begin like geminikv's escape of them
ANY_BYTES = st.one_of(
    st.binary(min_size=1, max_size=8).filter(lambda b: not _text(b)),
    st.binary(max_size=4).map(lambda b: b + b"\x00"),
    st.binary(max_size=4).map(lambda b: b"\x00" + b),
    st.binary(max_size=4).map(lambda b: ESCAPED + b),
    st.just(b"\xff" * 3),
)


@fewer(3)
@given(data=st.data())
def test_keys_of_any_bytes_as_etcd(etcd: Etcd, gemini: GeminiServer, data: st.DataObject) -> None:
    """etcd keys are any bytes; Kine's name column is text. Keys it cannot hold are stored
    escaped (mvcc/keys.py): written, read in etcd's order, compared, watched from history
    and deleted exactly as etcd does."""
    ex = Example(etcd, gemini, leases=False)
    try:
        keys = sorted({ex.p + data.draw(ANY_BYTES) for _ in range(3)} | {ex.p + b"plain"})
        for key in keys:
            ex.call("Put", lambda rev, key=key: pb.PutRequest(key=key, value=key, prev_kv=True))
        first = keys[0]
        compare = C(key=first, target=C.VALUE, result=C.EQUAL, value=first)
        update = pb.RequestOp(request_put=pb.PutRequest(key=first, value=b"again"))
        txn = pb.TxnRequest(compare=[compare], success=[update])
        ex.call("Txn", lambda rev: txn)
        everything = R(key=ex.p, range_end=prefix_end(ex.p))
        ex.call("Range", lambda rev: everything)
        ex.call(
            "Range",
            lambda rev: R(
                key=ex.p,
                range_end=prefix_end(ex.p),
                keys_only=True,
                sort_order=R.DESCEND,
                sort_target=R.KEY,
            ),
        )
        ex.call("Range", lambda rev: R(key=keys[-1]))
        ex.call(
            "DeleteRange",
            lambda rev: pb.DeleteRangeRequest(key=ex.p, range_end=prefix_end(ex.p), prev_kv=True),
        )
        assert ex.checked == len(keys) + 5
    finally:
        ex.close()


def test_watch_and_history_of_any_bytes_keys(etcd: Etcd, gemini: GeminiServer) -> None:
    """Events of escaped keys carry the etcd key, live and replayed from the table."""
    keys = [b"\x00", b"a\x00b", b"\xff\xfe", ESCAPED + b"x", b"caf\xc3\xa9"]
    seen = []
    for server in (etcd, gemini):
        stubs = server.stubs()
        p = b"/anybytes/%d/" % time.time_ns()
        start = stubs.kv.Put(pb.PutRequest(key=p + b"start")).header.revision + 1
        for key in keys:
            stubs.kv.Put(pb.PutRequest(key=p + key, value=key))
        stubs.kv.DeleteRange(pb.DeleteRangeRequest(key=p, range_end=prefix_end(p)))
        watcher = WatchClient(stubs)
        watcher.create(key=p, range_end=prefix_end(p), start_revision=start)
        events: list[tuple[int, bytes, bytes]] = []
        while len(events) < 2 * len(keys) + 1:
            response = watcher.next()
            assert response is not None
            events += [(e.type, e.kv.key[len(p) :], e.kv.value) for e in response.events]
        watcher.close()
        stubs.close()
        seen.append(events)
    assert seen[1] == seen[0]
