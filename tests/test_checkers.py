"""The reliability checkers (tests/reliability) on synthetic histories: valid ones pass,
and each injected bug is reported. No servers."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.reliability.check import check
from tests.reliability.convert import event_to_pb, response_to_pb
from tests.reliability.history import (
    DEFINITE_FAILURES,
    History,
    Operation,
    WatchRecord,
    load,
    save,
)
from tests.reliability.model import (
    KV,
    PUT,
    Change,
    Evaluation,
    RangeResult,
    Store,
    evaluate,
    in_range,
)

PREFIX = b"/t/"
PREFIX_END = b"/t0"
BASE = 1
MODES = ["key", "txn"]
KEYS = [PREFIX + b"k%d" % i for i in range(8)]


# -- a correct server, simulated with the model, and its recorded history -------------------


class Sim:
    """Runs requests one at a time on the model, as a correct server would, and records
    them as concurrent-looking clients would (call/return times overlapping the instant
    the request takes effect)."""

    def __init__(self, mode: str, seed: int = 0, spread: int = 0) -> None:
        self.mode = mode
        self.rnd = random.Random(seed)
        self.spread = spread
        self.store = Store()
        self.store.revision = BASE
        self.revision = BASE
        self.log: list[tuple[Change, KV | None]] = []
        self.time = 1_000
        self.next_lease = 100
        self.history = History(prefix=PREFIX, base_revision=BASE, revisions=mode)
        self.watchers: list[tuple[WatchRecord, int, int]] = []  # record, created at, progress

    def execute(self, kind: str, request: Any, lose: bool = False) -> Any:
        if kind == "lease_grant":
            self.next_lease += 1
            resp = pb.LeaseGrantResponse(ID=self.next_lease, TTL=request.TTL)
            resp.header.revision = self.revision
            return resp
        if kind == "range":
            result = Evaluation(self.store, 0, self.mode).range(request)
            return response_to_pb(result, self.revision)
        outcome = evaluate(self.store, kind, request, self.revision + 1, self.mode)
        revision = outcome.changes[-1].revision if outcome.changes else self.revision
        if not lose:
            for change in outcome.changes:
                self.log.append((change, self.store.apply(change)))
            self.revision = revision
        return response_to_pb(outcome.result, revision)

    def call(
        self,
        client: int,
        kind: str,
        request: Any,
        error: str | None = None,
        applied: bool = False,
        lose: bool = False,
    ) -> Operation:
        """One call. ``error``: it failed (``applied``: but took effect); ``lose``: it is
        acknowledged but not applied (a bug)."""
        self.time += 10
        call = self.time - self.rnd.randint(0, self.spread)
        ret = self.time + self.rnd.randint(0, self.spread)
        if error is None:
            op = Operation(client, call, ret, kind, request, self.execute(kind, request, lose))
        else:
            if applied:
                self.execute(kind, request)
            op = Operation(client, call, None, kind, request, None, error)
            if error in DEFINITE_FAILURES:
                op.ret = ret
        self.history.operations.append(op)
        return op

    def watch(
        self,
        client: int,
        key: bytes,
        range_end: bytes = b"",
        start: int = 0,
        prev_kv: bool = False,
        progress: int = 0,
    ) -> WatchRecord:
        """A watcher created now; its responses are filled by ``finish``. ``progress``: a
        progress notification after every that many event responses."""
        request = pb.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start, prev_kv=prev_kv
        )
        record = WatchRecord(client, request)
        self.watchers.append((record, self.revision, progress))
        self.history.watches.append(record)
        return record

    def finish(self) -> History:
        for record, created_at, progress in self.watchers:
            self.deliver(record, created_at, progress)
        complete = WatchRecord(
            0, pb.WatchCreateRequest(key=PREFIX, range_end=PREFIX_END, prev_kv=True)
        )
        complete.request.start_revision = BASE + 1
        self.deliver(complete, self.revision, 0)
        self.history.complete = complete
        return self.history

    def deliver(self, record: WatchRecord, created_at: int, progress: int) -> None:
        req = record.request
        created = pb.WatchResponse(created=True)
        created.header.revision = created_at
        t = self.time
        record.responses.append((t, created))
        start = req.start_revision or created_at + 1
        groups: list[list[kv_pb2.Event]] = []
        last = 0
        for change, prev in self.log:
            if change.revision < start or not in_range(change.key, req.key, req.range_end):
                continue
            if self.mode == "key" or change.revision != last:
                groups.append([])
            groups[-1].append(event_to_pb(change, prev if req.prev_kv else None))
            last = change.revision
        for n, events in enumerate(groups):
            resp = pb.WatchResponse(events=events)
            resp.header.revision = events[-1].kv.mod_revision
            t += 1
            record.responses.append((t, resp))
            if progress and n % progress == progress - 1:
                note = pb.WatchResponse()
                following = groups[n + 1][0].kv.mod_revision - 1 if n + 1 < len(groups) else 0
                note.header.revision = following or self.revision
                t += 1
                record.responses.append((t, note))


def answer(op: Operation) -> Any:
    """The response of an acknowledged operation."""
    assert op.response is not None
    return op.response


def put(key: bytes, value: bytes, lease: int = 0, prev_kv: bool = False) -> pb.PutRequest:
    return pb.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv)


def get(key: bytes, range_end: bytes = b"", **kw: Any) -> pb.RangeRequest:
    return pb.RangeRequest(key=key, range_end=range_end, **kw)


def txn(compare: list[pb.Compare], success: list[Any], failure: list[Any]) -> pb.TxnRequest:
    def op(r: Any) -> pb.RequestOp:
        if isinstance(r, pb.PutRequest):
            return pb.RequestOp(request_put=r)
        if isinstance(r, pb.RangeRequest):
            return pb.RequestOp(request_range=r)
        return pb.RequestOp(request_delete_range=r)

    return pb.TxnRequest(
        compare=compare, success=[op(r) for r in success], failure=[op(r) for r in failure]
    )


class Workload:
    """Random traffic on a few keys: unique values, overlapping calls, some failures."""

    def __init__(self, sim: Sim, seed: int = 1) -> None:
        self.sim = sim
        self.rnd = random.Random(seed)
        self.values = 0
        self.leases: list[int] = []

    def value(self) -> bytes:
        self.values += 1
        return b"v%d" % self.values

    def compare(self) -> pb.Compare:
        rnd = self.rnd
        key = rnd.choice(KEYS)
        result = rnd.choice(
            [pb.Compare.EQUAL, pb.Compare.NOT_EQUAL, pb.Compare.GREATER, pb.Compare.LESS]
        )
        target = rnd.choice(["version", "create_revision", "mod_revision", "value", "lease"])
        cmp = pb.Compare(key=key, result=result)
        if rnd.random() < 0.2:
            cmp.range_end = PREFIX_END
        kv = self.sim.store.get(key)
        if target == "value":
            cmp.target = pb.Compare.VALUE
            cmp.value = kv.value if kv and rnd.random() < 0.5 else b"v%d" % rnd.randint(1, 50)
        else:
            cmp.target = {
                "version": pb.Compare.VERSION,
                "create_revision": pb.Compare.CREATE,
                "mod_revision": pb.Compare.MOD,
                "lease": pb.Compare.LEASE,
            }[target]
            have = getattr(kv, target) if kv else 0
            setattr(cmp, target, have if rnd.random() < 0.5 else rnd.randint(0, 6))
        return cmp

    def branch(self) -> list[Any]:
        """Txn ops on distinct keys (etcd rejects a key put twice or put and deleted)."""
        rnd = self.rnd
        ops: list[Any] = []
        for key in rnd.sample(KEYS, rnd.randint(0, 3)):
            kind = rnd.random()
            if kind < 0.5:
                ops.append(put(key, self.value(), prev_kv=rnd.random() < 0.5))
            elif kind < 0.75:
                ops.append(pb.DeleteRangeRequest(key=key, prev_kv=rnd.random() < 0.5))
            else:
                ops.append(get(key))
        if rnd.random() < 0.2:
            ops.append(get(PREFIX, PREFIX_END, limit=2))
        return ops

    def request(self) -> tuple[str, Any]:
        rnd = self.rnd
        key = rnd.choice(KEYS)
        x = rnd.random()
        if x < 0.3:
            lease = rnd.choice(self.leases) if self.leases and rnd.random() < 0.2 else 0
            return "put", put(key, self.value(), lease, prev_kv=rnd.random() < 0.5)
        if x < 0.55:
            end = PREFIX_END if rnd.random() < 0.5 else b""
            revision = 0
            if rnd.random() < 0.2 and self.sim.revision > BASE:
                revision = rnd.randint(BASE, self.sim.revision)
            return "range", get(
                key if end == b"" else PREFIX,
                end,
                limit=rnd.choice([0, 0, 1, 3]),
                revision=revision,
                keys_only=rnd.random() < 0.1,
                count_only=rnd.random() < 0.1,
                serializable=rnd.random() < 0.2,
            )
        if x < 0.65:
            end = rnd.choice([b"", b"", PREFIX + b"k5", b"\0"])
            return "delete", pb.DeleteRangeRequest(
                key=key, range_end=end, prev_kv=rnd.random() < 0.5
            )
        if x < 0.92:
            compares = [self.compare() for _ in range(rnd.randint(0, 2))]
            return "txn", txn(compares, self.branch(), self.branch())
        if x < 0.96 or not self.leases:
            return "lease_grant", pb.LeaseGrantRequest(TTL=60)
        lease = self.leases.pop(rnd.randrange(len(self.leases)))
        return "lease_revoke", pb.LeaseRevokeRequest(ID=lease)

    def run(self, n: int, clients: int = 4, failures: float = 0.1) -> None:
        """``failures``: the share of writes that fail, 70 % of them with an unknown
        outcome (half of those applied), the rest definitely."""
        rnd = self.rnd
        for _ in range(n):
            kind, request = self.request()
            client = rnd.randrange(clients)
            fate = rnd.random()
            if kind in ("lease_grant", "range") or fate >= failures:
                op = self.sim.call(client, kind, request)
                if kind == "lease_grant":
                    self.leases.append(answer(op).ID)
            elif fate < 0.7 * failures:
                self.sim.call(client, kind, request, "UNAVAILABLE", applied=rnd.random() < 0.5)
            else:
                self.sim.call(client, kind, request, "NOT_FOUND")


def random_history(mode: str, n: int = 300, seed: int = 1, failures: float = 0.1) -> History:
    sim = Sim(mode, seed, spread=25)
    sim.watch(9, PREFIX, PREFIX_END, prev_kv=True, progress=4)
    sim.watch(8, KEYS[0])
    workload = Workload(sim, seed)
    workload.run(n // 2, failures=failures)
    sim.watch(7, PREFIX, b"\0", start=BASE + 3, prev_kv=True)
    sim.watch(6, KEYS[2], KEYS[5], progress=2)
    workload.run(n - n // 2, failures=failures)
    return sim.finish()


def simple_sim(mode: str) -> Sim:
    """A few sequential operations on /t/a and /t/b, watched with prev_kv."""
    sim = Sim(mode)
    sim.watch(5, PREFIX, PREFIX_END, prev_kv=True)
    a, b = PREFIX + b"a", PREFIX + b"b"
    sim.call(1, "put", put(a, b"a1"))
    sim.call(2, "put", put(b, b"b1"))
    sim.call(1, "put", put(a, b"a2", prev_kv=True))
    sim.call(2, "range", get(PREFIX, PREFIX_END))
    sim.call(1, "txn", txn([], [put(a, b"a3"), put(b, b"b2")], []))
    sim.call(2, "delete", pb.DeleteRangeRequest(key=b, prev_kv=True))
    sim.call(1, "range", get(a))
    sim.call(2, "put", put(b, b"b3"))
    return sim


def simple_history(mode: str) -> tuple[Sim, History]:
    sim = simple_sim(mode)
    return sim, sim.finish()


def event_responses(record: WatchRecord) -> list[int]:
    return [i for i, (_, r) in enumerate(record.responses) if r.events]


def mentions(violations: list[str], *words: str) -> bool:
    return any(all(w in v for w in words) for v in violations)


def only(violations: list[str], *words: str) -> bool:
    """Exactly one violation, and it mentions every word."""
    return len(violations) == 1 and mentions(violations, *words)


# -- the model on its own ---------------------------------------------------------------------


def test_model_follows_etcd_semantics() -> None:
    store = Store()
    a, b, c = PREFIX + b"a", PREFIX + b"b", PREFIX + b"c"
    for rev, (key, value) in enumerate([(a, b"1"), (b, b"2"), (a, b"3"), (c, b"4")], start=2):
        for change in evaluate(store, "put", put(key, value), rev, "key").changes:
            store.apply(change)
    assert store.get(a) == KV(a, 2, 4, 2, b"3", 0)
    # count is everything in the range, more says the limit cut it
    assert store.read(get(PREFIX, PREFIX_END, limit=2)) == RangeResult(
        (KV(a, 2, 4, 2, b"3", 0), KV(b, 3, 3, 1, b"2", 0)), 3, True
    )
    assert store.read(get(b, b"\0", count_only=True)) == RangeResult((), 2, False)
    # a VALUE compare on a missing key is false, a VERSION one compares with 0
    missing = PREFIX + b"zz"
    value_cmp = pb.Compare(key=missing, target=pb.Compare.VALUE, value=b"", result=pb.Compare.EQUAL)
    version_cmp = pb.Compare(
        key=missing, target=pb.Compare.VERSION, version=0, result=pb.Compare.EQUAL
    )
    ev = Evaluation(store, 6, "key")
    assert not ev.compare(value_cmp)
    assert ev.compare(version_cmp)
    # a compare over a range holds only if every key satisfies it
    ranged = pb.Compare(
        key=a, range_end=PREFIX_END, target=pb.Compare.VERSION, result=pb.Compare.EQUAL
    )
    ranged.version = 1
    assert not ev.compare(ranged)
    # one revision per changed key in "key" mode, one per request in "txn" mode
    delete_all = pb.DeleteRangeRequest(key=PREFIX, range_end=PREFIX_END)
    keyed = evaluate(store, "delete", delete_all, 6, "key")
    assert [ch.revision for ch in keyed.changes] == [6, 7, 8]
    shared = evaluate(store, "delete", delete_all, 6, "txn")
    assert [ch.revision for ch in shared.changes] == [6, 6, 6]
    assert keyed.changes[0] == Change("DELETE", KV(a, 0, 6, 0, b"", 0))
    # a key deleted and put again starts over at version 1
    for change in keyed.changes:
        store.apply(change)
    (again,) = evaluate(store, "put", put(a, b"5"), 9, "key").changes
    assert again == Change(PUT, KV(a, 9, 9, 1, b"5", 0))


# -- valid histories --------------------------------------------------------------------------


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


def test_a_saved_history_loads_back_and_checks_the_same(tmp_path: Path) -> None:
    _, history = simple_history("key")
    record = history.watches[0]
    del record.responses[event_responses(record)[1]]
    save(history, tmp_path / "history.pickle")
    loaded = load(tmp_path / "history.pickle")
    assert loaded.operations[0].request == history.operations[0].request
    assert check(loaded) == check(history) != []


# -- injected bugs ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_skipped_watch_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    dropped = event_responses(record)[1]
    del record.responses[dropped]
    violations = check(history)
    assert only(violations, "watch not reliable", "watch #0", "missed 1 events")


@pytest.mark.parametrize("mode", MODES)
def test_duplicated_watch_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i = event_responses(record)[2]
    record.responses.insert(i + 1, record.responses[i])
    assert only(check(history), "watch not unique", "watch #0", "twice")


@pytest.mark.parametrize("mode", MODES)
def test_watch_events_out_of_order(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i, j = event_responses(record)[1:3]
    record.responses[i], record.responses[j] = record.responses[j], record.responses[i]
    violations = check(history)
    assert only(violations, "watch not ordered", "watch #0")


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
def test_wrong_prev_kv_in_a_watch(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    event = next(e for _, r in record.responses for e in r.events if e.HasField("prev_kv"))
    event.prev_kv.value = b"wrong"
    violations = check(history)
    assert only(violations, "wrong prev_kv", "watch #0", "=wrong", "expected /t/a=a1")


@pytest.mark.parametrize("mode", MODES)
def test_progress_notification_followed_by_older_event(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    i = event_responses(record)[2]
    revision = record.responses[i][1].events[0].kv.mod_revision
    note = pb.WatchResponse()
    note.header.revision = revision
    record.responses.insert(i, (0, note))
    violations = check(history)
    assert only(violations, "not bookmarkable", "watch #0", f"at revision {revision}")


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
def test_resumed_watch(mode: str) -> None:
    sim, history = simple_history(mode)
    broken = history.watches[0]
    cut = event_responses(broken)[2] + 1
    broken.responses, broken.ended = broken.responses[:cut], "broken"
    seen = broken.responses[-1][1].events[-1].kv.mod_revision
    for start in (seen + 1, seen + 2):
        resumed = WatchRecord(5, pb.WatchCreateRequest(), resumed=True)
        resumed.request.CopyFrom(broken.request)
        resumed.request.start_revision = start
        sim.deliver(resumed, sim.revision, 0)
        history.watches[1:] = [resumed]
        violations = check(history)
        if start == seen + 1:
            assert violations == []
        else:
            assert only(violations, "not resumable", "watch #1", f"reached only revision {seen}")


@pytest.mark.parametrize("mode", MODES)
def test_watch_canceled_without_reason(mode: str) -> None:
    _, history = simple_history(mode)
    record = history.watches[0]
    canceled = pb.WatchResponse(canceled=True)
    record.responses.append((0, canceled))
    record.ended = "canceled"
    assert only(check(history), "watch canceled without reason", "watch #0")
    canceled.cancel_reason = "etcdserver: mvcc: required revision has been compacted"
    assert check(history) == []


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
