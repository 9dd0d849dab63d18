"""Hypothesis-generated request sequences, answered identically by etcd and geminikv."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.conftest import unique_prefix
from tests.differential import Build, Outcome, Pair
from tests.servers import Etcd, GeminiServer

pytestmark = pytest.mark.etcd

R = pb.RangeRequest
C = pb.Compare
NAMES = [b"a", b"b", b"c", b"d", b"e"]

Draw = Callable[..., Any]  # hypothesis's data.draw
REVISION_SORTS = {R.CREATE: "create_revision", R.MOD: "mod_revision"}


def _keys(draw: Draw, p: bytes) -> tuple[bytes, bytes]:
    start = p + draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(["one", "range", "open", "prefix"]))
    if kind == "one":
        return start, b""
    if kind == "open":
        return start, b"\x00"
    if kind == "prefix":
        return p, p[:-1] + b"0"
    return start, p + draw(st.sampled_from([*NAMES, b"z"]))


def _range(draw: Draw, p: bytes, top_rev: int) -> Build:
    key, end = _keys(draw, p)
    rel = draw(st.sampled_from([0, 0, 0, *list(range(1, top_rev + 2))]))
    fields: dict[str, Any] = dict(
        key=key,
        range_end=end,
        limit=draw(st.sampled_from([0, 0, 1, 2, 3])),
        count_only=draw(st.booleans()) and draw(st.booleans()),
        keys_only=draw(st.booleans()) and draw(st.booleans()),
        sort_order=draw(st.sampled_from([R.NONE, R.NONE, R.ASCEND, R.DESCEND])),
        sort_target=draw(st.sampled_from([R.KEY, R.KEY, R.VERSION, R.CREATE, R.MOD, R.VALUE])),
        serializable=draw(st.booleans()),
    )
    filt = draw(
        st.sampled_from(
            [
                "",
                "",
                "min_mod_revision",
                "max_mod_revision",
                "min_create_revision",
                "max_create_revision",
            ]
        )
    )
    frel = draw(st.integers(1, max(1, top_rev)))
    if fields["sort_target"] in REVISION_SORTS:
        # Keys written by one txn tie on etcd (one revision per txn) but not on geminikv
        # (one per key): a limit could cut the tie differently. See _ties_in_key_order.
        fields["limit"] = 0

    def build(rev: Callable[[int], int]) -> R:
        req = R(**fields)
        if rel:
            req.revision = rev(rel)
        if filt:
            setattr(req, filt, rev(frel))
        return req

    return build


def _put(draw: Draw, p: bytes, in_txn: bool = False) -> Build:
    key = p + draw(st.sampled_from(NAMES))
    # Inside a txn an earlier delete of the same key makes etcd 3.4 panic (it checks
    # ignore_value before the txn runs); that case is pinned in test_kv_errors.py.
    ignore_value = not in_txn and draw(st.booleans()) and draw(st.booleans())
    value = b"" if ignore_value else draw(st.sampled_from([b"", b"x", b"y", b"zz"]))
    prev_kv = draw(st.booleans())
    return lambda rev: pb.PutRequest(
        key=key, value=value, prev_kv=prev_kv, ignore_value=ignore_value
    )


def _delete(draw: Draw, p: bytes) -> Build:
    key, end = _keys(draw, p)
    prev_kv = draw(st.booleans())
    return lambda rev: pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=prev_kv)


def _compare(draw: Draw, p: bytes, top_rev: int) -> Callable[[Callable[[int], int]], C]:
    key, end = _keys(draw, p)
    if end == p[:-1] + b"0" or draw(st.booleans()):
        end = b""
    target = draw(st.sampled_from([C.VERSION, C.CREATE, C.MOD, C.VALUE, C.LEASE]))
    result = draw(st.sampled_from([C.EQUAL, C.GREATER, C.LESS, C.NOT_EQUAL]))
    number = draw(st.integers(0, top_rev + 1))
    value = draw(st.sampled_from([b"", b"x", b"y", b"zz"]))

    def build(rev: Callable[[int], int]) -> C:
        cmp = C(key=key, range_end=end, target=target, result=result)
        if target == C.VERSION:
            cmp.version = number
        elif target == C.CREATE:
            cmp.create_revision = rev(number) if number else 0
        elif target == C.MOD:
            cmp.mod_revision = rev(number) if number else 0
        elif target == C.VALUE:
            cmp.value = value
        else:
            cmp.lease = 0
        return cmp

    return build


def _op(draw: Draw, p: bytes, top_rev: int) -> Callable[[Callable[[int], int]], pb.RequestOp]:
    kind = draw(st.sampled_from(["range", "put", "put", "delete"]))
    if kind == "range":
        b = _range(draw, p, top_rev)
        return lambda rev: pb.RequestOp(request_range=b(rev))
    if kind == "put":
        b = _put(draw, p, in_txn=True)
        return lambda rev: pb.RequestOp(request_put=b(rev))
    b = _delete(draw, p)
    return lambda rev: pb.RequestOp(request_delete_range=b(rev))


def _txn(draw: Draw, p: bytes, top_rev: int) -> Build:
    cmps = [_compare(draw, p, top_rev) for _ in range(draw(st.integers(0, 2)))]
    succ = [_op(draw, p, top_rev) for _ in range(draw(st.integers(0, 3)))]
    fail = [_op(draw, p, top_rev) for _ in range(draw(st.integers(0, 2)))]
    return lambda rev: pb.TxnRequest(
        compare=[c(rev) for c in cmps],
        success=[o(rev) for o in succ],
        failure=[o(rev) for o in fail],
    )


TOP_REV = 16  # relative revisions drawn from 1..TOP_REV (beyond the history: FutureRev)


@given(data=st.data())
def test_random_sequences_match_etcd(etcd: Etcd, gemini: GeminiServer, data: st.DataObject) -> None:
    p = unique_prefix()
    draw = data.draw
    e, g = etcd.stubs(), gemini.stubs()
    try:
        pair = Pair(e, g)
        for _ in range(draw(st.integers(1, 14), label="length")):
            kind = draw(st.sampled_from(["put", "put", "range", "delete", "txn", "txn"]))
            method, build = {
                "put": lambda: ("Put", _put(draw, p)),
                "range": lambda: ("Range", _range(draw, p, TOP_REV)),
                "delete": lambda: ("DeleteRange", _delete(draw, p)),
                "txn": lambda: ("Txn", _txn(draw, p, TOP_REV)),
            }[kind]()
            want, got = pair.call(method, build)
            request = build(pair.etcd_rev)  # the sort fields are the same on both sides
            want, got = _ties_in_key_order(request, want), _ties_in_key_order(request, got)
            assert got == want, f"{method}: etcd {want} geminikv {got}"
    finally:
        e.close()
        g.close()


def _ties_in_key_order(request: object, outcome: Outcome) -> Outcome:
    """README's known difference: etcd gives all keys of a txn one revision, geminikv one
    each. Sorted by create or mod revision, etcd's ties stay in key order while geminikv's
    follow the txn's op order. Check the order by (mapped) revision, then put the keys of
    each tie in key order, on both sides alike."""
    if outcome[0] == "ok":
        _sort_ties(request, outcome[1])
    return outcome


def _sort_ties(request: object, response: dict[str, Any]) -> None:
    if isinstance(request, pb.TxnRequest):
        ops = request.success if response.get("succeeded") else request.failure
        for op, answer in zip(ops, response.get("responses", []), strict=True):
            if op.WhichOneof("request") == "request_range":
                _sort_ties(op.request_range, answer.get("response_range", {}))
        return
    if not isinstance(request, R) or request.sort_target not in REVISION_SORTS:
        return
    field = REVISION_SORTS[request.sort_target]
    kvs = response.get("kvs", [])
    descending = request.sort_order == R.DESCEND
    revisions = [int(kv.get(field, 0)) for kv in kvs]
    assert revisions == sorted(revisions, reverse=descending), (field, revisions)
    kvs.sort(key=lambda kv: base64.b64decode(kv["key"]))  # then by revision (stable)
    kvs.sort(key=lambda kv: int(kv.get(field, 0)), reverse=descending)
