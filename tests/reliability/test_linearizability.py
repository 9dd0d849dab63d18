"""The linearizability checker (linearizability.py, realtime.py) on synthetic histories: each
injected bug (a lost, partial or duplicated write, a stale or wrong read, a wrong response,
a lease misuse) is reported. No servers."""

from __future__ import annotations

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.reliability.check import check
from tests.reliability.convert import response_to_pb
from tests.reliability.history import Operation
from tests.reliability.model import Evaluation
from tests.reliability.simulated import (
    KEYS,
    MODES,
    PREFIX,
    PREFIX_END,
    Sim,
    answer,
    get,
    only,
    put,
    simple_history,
    simple_sim,
    txn,
)


@pytest.mark.parametrize("mode", MODES)
def test_lost_write(mode: str) -> None:
    sim = Sim(mode)
    sim.call(1, "put", put(KEYS[0], b"v1"))
    lost = sim.call(2, "put", put(KEYS[1], b"v2"), lose=True)
    sim.call(3, "put", put(KEYS[2], b"v3"))
    sim.call(1, "range", get(PREFIX, PREFIX_END))
    violations = check(sim.finish())
    assert answer(lost).header.revision == 3
    assert violations == [
        f"lost write: client 2 put {KEYS[1].decode()}=v2 (revision 3) was acknowledged but "
        f"is not in the history at revision 3: on that state the model would make "
        f"[PUT {KEYS[1].decode()}=v2 (create 3, mod 3, version 1)]"
    ]


@pytest.mark.parametrize("mode", MODES)
def test_stale_read_after_write_returned(mode: str) -> None:
    sim = Sim(mode)
    sim.call(1, "put", put(KEYS[0], b"v1"))
    sim.call(1, "put", put(KEYS[0], b"v2"))
    old = Evaluation(sim.store, 0, mode).range(get(KEYS[0], revision=2))
    after = sim.history.operations[-1].ret or 0
    for serializable, client in ((False, 2), (True, 3)):
        request = get(KEYS[0], serializable=serializable)
        stale = Operation(client, after + 5, after + 9, "range", request, response_to_pb(old, 2))
        sim.history.operations.append(stale)
    violations = check(sim.finish())
    # the serializable read may be stale; the linearizable one may not
    assert len(violations) == 1
    assert only(violations, "stale read", "client 2 range", "read revision 2", "revision 3")


@pytest.mark.parametrize("mode", MODES)
def test_write_ordered_before_an_earlier_returned_write(mode: str) -> None:
    sim = Sim(mode)
    first = sim.call(1, "put", put(KEYS[0], b"v1"))
    second = sim.call(2, "put", put(KEYS[1], b"v2"))
    second.call, second.ret = 100, 110  # returned at revision 3 ...
    first.call, first.ret = 120, 130  # ... before this one, at revision 2, was called
    violations = check(sim.finish())
    assert only(violations, "real-time order violated", "client 1 put", "wrote revision 2")


@pytest.mark.parametrize("mode", MODES)
def test_read_returning_a_wrong_value(mode: str) -> None:
    _, history = simple_history(mode)
    read = next(op for op in history.operations if op.kind == "range")
    answer(read).kvs[1].value = b"b0"
    violations = check(history)
    assert only(violations, "wrong read", "client 2 range", "kv #1", "=b0", "=b1")


@pytest.mark.parametrize("mode", MODES)
def test_event_no_operation_explains(mode: str) -> None:
    sim, history = simple_history(mode)
    assert history.complete is not None
    invented = kv_pb2.KeyValue(
        key=PREFIX + b"x", value=b"nobody", create_revision=sim.revision + 1,
        mod_revision=sim.revision + 1, version=1,
    )  # fmt: skip
    history.complete.responses.append(
        (0, pb.WatchResponse(events=[kv_pb2.Event(type=kv_pb2.Event.PUT, kv=invented)]))
    )
    violations = check(history)
    assert only(violations, "unexplained change", "PUT /t/x=nobody", f"mod {sim.revision + 1}")


@pytest.mark.parametrize("mode", MODES)
def test_unknown_write_applied_partly(mode: str) -> None:
    sim = simple_sim(mode)
    request = txn([], [put(KEYS[0], b"p1"), put(KEYS[1], b"p2")], [])
    sim.call(3, "txn", request, "UNAVAILABLE", applied=True)
    history = sim.finish()
    for record in [*history.watches, history.complete]:
        assert record is not None
        _, last = record.responses[-1]
        assert last.events[-1].kv.value == b"p2"
        del last.events[-1]
        if not last.events:
            del record.responses[-1]
    violations = check(history)
    assert only(violations, "partial write (not atomic)", "unknown-outcome", "client 3 txn")


@pytest.mark.parametrize("mode", MODES)
def test_failed_compare_txn_with_wrong_succeeded_flag(mode: str) -> None:
    sim = simple_sim(mode)
    never = pb.Compare(
        key=PREFIX + b"none", target=pb.Compare.VERSION, version=5, result=pb.Compare.EQUAL
    )
    op = sim.call(4, "txn", txn([never], [put(KEYS[0], b"s1")], [get(KEYS[0])]))
    assert not answer(op).succeeded
    answer(op).succeeded = True
    violations = check(sim.finish())
    assert only(violations, "wrong response", "client 4 txn", "succeeded=True")


@pytest.mark.parametrize("mode", MODES)
def test_definitely_failed_write_that_was_applied(mode: str) -> None:
    sim = simple_sim(mode)
    sim.call(4, "put", put(KEYS[3], b"f1"), "INVALID_ARGUMENT", applied=True)
    violations = check(sim.finish())
    assert only(violations, "failed write applied", "client 4 put")


@pytest.mark.parametrize("mode", MODES)
def test_lease_revoke_that_kept_its_keys(mode: str) -> None:
    sim = Sim(mode)
    lease = answer(sim.call(1, "lease_grant", pb.LeaseGrantRequest(TTL=60))).ID
    sim.call(1, "put", put(KEYS[0], b"l1", lease=lease))
    sim.call(1, "put", put(KEYS[1], b"l2", lease=lease))
    sim.call(2, "lease_revoke", pb.LeaseRevokeRequest(ID=lease), lose=True)
    violations = check(sim.finish())
    assert only(violations, "lost write", f"lease_revoke {lease}", f"DELETE {KEYS[0].decode()}")


@pytest.mark.parametrize("mode", MODES)
def test_put_attached_to_a_revoked_lease(mode: str) -> None:
    sim = Sim(mode)
    lease = answer(sim.call(1, "lease_grant", pb.LeaseGrantRequest(TTL=60))).ID
    sim.call(1, "put", put(KEYS[0], b"l1", lease=lease))
    sim.call(2, "lease_revoke", pb.LeaseRevokeRequest(ID=lease))
    sim.call(1, "put", put(KEYS[1], b"l2", lease=lease))
    violations = check(sim.finish())
    assert only(violations, "lease", f"{KEYS[1].decode()}=l2", f"lease {lease}, revoked")


def test_lease_granted_twice() -> None:
    sim = Sim("key")
    first = sim.call(1, "lease_grant", pb.LeaseGrantRequest(TTL=60))
    second = sim.call(2, "lease_grant", pb.LeaseGrantRequest(TTL=60))
    answer(second).ID = answer(first).ID
    assert only(check(sim.finish()), "lease", "client 2 lease_grant", "already granted")


@pytest.mark.parametrize("mode", MODES)
def test_unknown_write_applied_twice(mode: str) -> None:
    sim = simple_sim(mode)
    request = put(KEYS[0], b"twice")
    sim.call(3, "put", request, "UNAVAILABLE", applied=True)
    sim.execute("put", request)  # a retry inside the server
    violations = check(sim.finish())
    assert only(violations, "duplicate write", "client 3 put", "=twice")


@pytest.mark.parametrize("mode", MODES)
def test_acknowledged_write_with_wrong_prev_kv(mode: str) -> None:
    sim = simple_sim(mode)
    op = sim.call(3, "put", put(PREFIX + b"a", b"a4", prev_kv=True))
    answer(op).prev_kv.version = 7
    violations = check(sim.finish())
    assert only(violations, "wrong response", "client 3 put", "version 7")


def test_read_inside_a_write_of_several_keys() -> None:
    """In "key" mode a txn putting two keys takes two revisions; no read may be answered
    at the first of them (the state half-way through the txn)."""
    sim = simple_sim("key")
    write = next(op for op in sim.history.operations if op.kind == "txn")
    assert answer(write).header.revision == 6
    half = Evaluation(sim.store, 0, "key").range(get(PREFIX, PREFIX_END, revision=5))
    read = Operation(3, write.call, (write.ret or 0) + 1, "range", get(PREFIX, PREFIX_END))
    read.response = response_to_pb(half, 5)
    sim.history.operations.append(read)
    violations = check(sim.finish())
    assert only(violations, "not atomic", "client 3 range", "header revision 5", "revisions 5-6")
