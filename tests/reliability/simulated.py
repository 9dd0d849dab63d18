"""A correct server, simulated with the model (model.py), and its recorded history: the
synthetic histories the checkers' tests (test_*.py here) check as recorded, or with one
bug injected."""

from __future__ import annotations

import random
from typing import Any

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.reliability.convert import event_to_pb, response_to_pb
from tests.reliability.history import DEFINITE_FAILURES, History, Operation, WatchRecord
from tests.reliability.model import KV, Change, Evaluation, Store, evaluate, in_range

PREFIX = b"/t/"
PREFIX_END = b"/t0"
BASE = 1
MODES = ["key", "txn"]
KEYS = [PREFIX + b"k%d" % i for i in range(8)]


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
