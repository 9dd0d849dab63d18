"""The checkers together (check.py) on valid histories, hand-written and simulated: no
violation is reported. No servers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.reliability.check import check
from tests.reliability.history import DEFINITE_FAILURES, History, Operation, WatchRecord
from tests.reliability.simulated import (
    BASE,
    MODES,
    PREFIX,
    PREFIX_END,
    get,
    put,
    random_history,
    simple_history,
)


def test_hand_written_history_is_valid() -> None:
    """Written out by hand (not by the model): puts, a prev_kv, a limited range."""
    a, b = PREFIX + b"a", PREFIX + b"b"

    def resp(msg: Any, revision: int) -> Any:
        msg.header.revision = revision
        return msg

    kv_a1 = kv_pb2.KeyValue(key=a, value=b"x", create_revision=2, mod_revision=2, version=1)
    kv_a2 = kv_pb2.KeyValue(key=a, value=b"y", create_revision=2, mod_revision=4, version=2)
    kv_b = kv_pb2.KeyValue(key=b, value=b"z", create_revision=3, mod_revision=3, version=1)
    limited = get(PREFIX, PREFIX_END, limit=1)
    nothing = pb.DeleteRangeRequest(key=PREFIX + b"q")
    ops = [
        Operation(1, 10, 20, "put", put(a, b"x"), resp(pb.PutResponse(), 2)),
        Operation(2, 15, 30, "put", put(b, b"z"), resp(pb.PutResponse(), 3)),
        Operation(
            1, 25, 40, "put", put(a, b"y", prev_kv=True), resp(pb.PutResponse(prev_kv=kv_a1), 4)
        ),
        Operation(
            2, 45, 50, "range", limited, resp(pb.RangeResponse(kvs=[kv_a2], count=2, more=True), 4)
        ),
        Operation(
            3, 46, 52, "range", get(a, revision=2), resp(pb.RangeResponse(kvs=[kv_a1], count=1), 4)
        ),
        Operation(3, 55, 60, "delete", nothing, resp(pb.DeleteRangeResponse(), 4)),
    ]
    events = [
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_a1),
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_b),
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_a2),
    ]
    complete = WatchRecord(0, pb.WatchCreateRequest(key=PREFIX, range_end=PREFIX_END))
    complete.responses = [(100, resp(pb.WatchResponse(created=True), 4))] + [
        (101 + i, resp(pb.WatchResponse(events=[e]), e.kv.mod_revision))
        for i, e in enumerate(events)
    ]
    history = History(PREFIX, BASE, ops, [], complete, "key")
    assert check(history) == []
    assert check(History(PREFIX, BASE, ops, [], complete, "txn")) == []


@pytest.mark.parametrize("mode", MODES)
def test_revoke_answered_at_the_revision_of_a_delete_of_its_key(mode: str) -> None:
    """A delete and a lease revoke applied together (one write batch), the delete first:
    the revoke finds the key gone and deletes nothing, and both answer at the delete's
    revision. The DELETE is the delete's (its response says deleted=1), not the revoke's,
    though the revoke, evaluated just before, would make the same change."""
    a = PREFIX + b"a"

    def resp(msg: Any, revision: int) -> Any:
        msg.header.revision = revision
        return msg

    kv_a = kv_pb2.KeyValue(key=a, value=b"x", create_revision=2, mod_revision=2, version=1, lease=7)
    ops = [
        Operation(
            1,
            10,
            20,
            "lease_grant",
            pb.LeaseGrantRequest(TTL=60, ID=7),
            resp(pb.LeaseGrantResponse(ID=7, TTL=60), 1),
        ),
        Operation(1, 21, 30, "put", put(a, b"x", lease=7), resp(pb.PutResponse(), 2)),
        Operation(
            1,
            31,
            50,
            "lease_revoke",
            pb.LeaseRevokeRequest(ID=7),
            resp(pb.LeaseRevokeResponse(), 3),
        ),
        Operation(
            2,
            32,
            49,
            "delete",
            pb.DeleteRangeRequest(key=a, prev_kv=True),
            resp(pb.DeleteRangeResponse(deleted=1, prev_kvs=[kv_a]), 3),
        ),
    ]
    events = [
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv_a),
        kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=a, mod_revision=3)),
    ]
    complete = WatchRecord(0, pb.WatchCreateRequest(key=PREFIX, range_end=PREFIX_END))
    complete.responses = [(100, resp(pb.WatchResponse(created=True), 1))] + [
        (101 + i, resp(pb.WatchResponse(events=[e]), e.kv.mod_revision))
        for i, e in enumerate(events)
    ]
    assert check(History(PREFIX, BASE, ops, [], complete, mode)) == []


@pytest.mark.parametrize("mode", MODES)
def test_simple_history_is_valid(mode: str) -> None:
    _, history = simple_history(mode)
    assert len(history.complete.responses) > 1 if history.complete else False
    assert check(history) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_concurrent_history_is_valid(mode: str, seed: int) -> None:
    history = random_history(mode, 300, seed)
    ops = history.operations
    assert any(op.unknown for op in ops)
    assert any(op.error in DEFINITE_FAILURES for op in ops)
    assert any(op.kind == "lease_revoke" and op.response for op in ops)
    # calls overlap: some call starts before the previous one returned
    assert any(b.call < (a.ret or 0) for a, b in itertools.pairwise(ops))
    assert check(history) == []
