"""An independent model of etcd's key-value store: its state, and requests applied to it.

Written from etcd's documented semantics (not from geminikv's code), so that checking
geminikv against it is not circular. It covers what the reliability traffic sends: Put,
Range, DeleteRange, Txn (compares; put/range/delete ops) and lease revoke.

A write is evaluated without changing the store (``evaluate``): it yields its result and
the ``Change`` list it would make; the caller decides whether to ``apply`` those changes.
Revisions: in "txn" mode (etcd, and geminikv) all changes of one request share one
revision; in "key" mode (Kine's) every change takes the next revision.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, NamedTuple

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

PUT = "PUT"
DELETE = "DELETE"
WRITE_KINDS = frozenset({"put", "delete", "txn", "lease_revoke"})


class KV(NamedTuple):
    """A key's state, as etcd's mvccpb.KeyValue."""

    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int


class Change(NamedTuple):
    """One change to one key: a watch event without its prev_kv.

    A DELETE's kv is ``KV(key, 0, deletion revision, 0, b"", 0)`` as etcd sends it."""

    type: str  # PUT | DELETE
    kv: KV

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @property
    def key(self) -> bytes:
        return self.kv.key


# -- results (what a response says, without its header) ------------------------------------


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: tuple[KV, ...]
    count: int
    more: bool


@dataclass(frozen=True, slots=True)
class PutResult:
    prev_kv: KV | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    prev_kvs: tuple[KV, ...]


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    responses: tuple[RangeResult | PutResult | DeleteResult, ...]


@dataclass(frozen=True, slots=True)
class RevokeResult:
    pass


Result = RangeResult | PutResult | DeleteResult | TxnResult | RevokeResult


@dataclass(frozen=True, slots=True)
class Outcome:
    """A request evaluated on a state: its result and the changes it makes (in order)."""

    result: Result
    changes: tuple[Change, ...]


# -- key ranges ------------------------------------------------------------------------------


def range_bounds(key: bytes, range_end: bytes) -> tuple[bytes, bytes | None, bool]:
    """(first key, end key or None for "to the end", single key?) as etcd reads them:
    an empty range_end is the one key, ``"\\0"`` is every key >= key."""
    if not range_end:
        return key, None, True
    if range_end == b"\0":
        return key, None, False
    return key, range_end, False


def in_range(k: bytes, key: bytes, range_end: bytes) -> bool:
    start, end, single = range_bounds(key, range_end)
    if single:
        return k == start
    return k >= start and (end is None or k < end)


# -- the store --------------------------------------------------------------------------------


class Store:
    """The live keys (sorted), which keys each lease holds, and every key's past states
    (for reads at an earlier revision inside a txn)."""

    def __init__(self) -> None:
        self.kvs: dict[bytes, KV] = {}
        self.keys: list[bytes] = []  # sorted live keys
        self.lease_keys: dict[int, set[bytes]] = {}
        self.revision = 0  # revision of the last applied change
        self.past: dict[bytes, list[tuple[int, KV | None]]] = {}  # key -> [(revision, state)]
        self.ever: list[bytes] = []  # sorted keys that ever existed

    def get(self, key: bytes) -> KV | None:
        return self.kvs.get(key)

    def span(self, key: bytes, range_end: bytes) -> tuple[int, int]:
        """Index range in ``self.keys`` of the live keys in [key, range_end)."""
        start, end, single = range_bounds(key, range_end)
        lo = bisect.bisect_left(self.keys, start)
        if single:
            hi = lo + 1 if lo < len(self.keys) and self.keys[lo] == start else lo
        elif end is None:
            hi = len(self.keys)
        else:
            hi = max(lo, bisect.bisect_left(self.keys, end))
        return lo, hi

    def keys_in(self, key: bytes, range_end: bytes) -> list[bytes]:
        lo, hi = self.span(key, range_end)
        return self.keys[lo:hi]

    def read(self, req: pb.RangeRequest) -> RangeResult:
        """A Range on the current state (request.revision is the caller's business)."""
        lo, hi = self.span(req.key, req.range_end)
        count = hi - lo
        if req.count_only:
            return RangeResult((), count, False)
        stop = hi if req.limit <= 0 else min(hi, lo + req.limit)
        kvs = [self.kvs[k] for k in self.keys[lo:stop]]
        return range_result(kvs, count, stop < hi, req.keys_only)

    def get_at(self, key: bytes, revision: int) -> KV | None:
        """The key's state after every change up to ``revision``."""
        states = self.past.get(key)
        if not states:
            return None
        i = bisect.bisect_right(states, revision, key=lambda s: s[0])
        return states[i - 1][1] if i else None

    def keys_at(self, key: bytes, range_end: bytes, revision: int) -> list[KV]:
        start, end, single = range_bounds(key, range_end)
        lo = bisect.bisect_left(self.ever, start)
        out = []
        for k in self.ever[lo:]:
            if (single and k != start) or (end is not None and k >= end):
                break
            kv = self.get_at(k, revision)
            if kv is not None:
                out.append(kv)
            if single:
                break
        return out

    def apply(self, change: Change) -> KV | None:
        """Apply one change; returns the key's previous state."""
        key = change.key
        prev = self.kvs.get(key)
        if prev is not None and prev.lease:
            held = self.lease_keys.get(prev.lease)
            if held is not None:
                held.discard(key)
        if change.type == PUT:
            if prev is None:
                bisect.insort(self.keys, key)
            self.kvs[key] = change.kv
            if change.kv.lease:
                self.lease_keys.setdefault(change.kv.lease, set()).add(key)
            state: KV | None = change.kv
        else:
            if prev is not None:
                del self.kvs[key]
                del self.keys[bisect.bisect_left(self.keys, key)]
            state = None
        if key not in self.past:
            self.past[key] = []
            bisect.insort(self.ever, key)
        self.past[key].append((change.revision, state))
        self.revision = max(self.revision, change.revision)
        return prev


def range_result(kvs: list[KV], count: int, more: bool, keys_only: bool) -> RangeResult:
    if keys_only:
        kvs = [kv._replace(value=b"") for kv in kvs]
    return RangeResult(tuple(kvs), count, more)


# -- evaluating a request ----------------------------------------------------------------------


class Evaluation:
    """One request applied to an overlay over the store (the store is not changed)."""

    def __init__(self, store: Store, start_revision: int, mode: str) -> None:
        self.store = store
        self.start = start_revision
        self.per_key = mode == "key"
        self.overlay: dict[bytes, KV | None] = {}
        self.changes: list[Change] = []

    def get(self, key: bytes) -> KV | None:
        if key in self.overlay:
            return self.overlay[key]
        return self.store.get(key)

    def live_in(self, key: bytes, range_end: bytes) -> list[KV]:
        """Live keys in the range, sorted, with this request's earlier changes."""
        if not self.overlay:
            return [self.store.kvs[k] for k in self.store.keys_in(key, range_end)]
        keys = set(self.store.keys_in(key, range_end))
        keys.update(k for k in self.overlay if in_range(k, key, range_end))
        found = (self.get(k) for k in sorted(keys))
        return [kv for kv in found if kv is not None]

    def _next_revision(self) -> int:
        return self.start + len(self.changes) if self.per_key else self.start

    def _change(self, change: Change) -> None:
        self.changes.append(change)
        self.overlay[change.key] = change.kv if change.type == PUT else None

    # -- requests

    def put(self, req: pb.PutRequest) -> PutResult:
        prev = self.get(req.key)
        rev = self._next_revision()
        kv = KV(
            key=req.key,
            create_revision=prev.create_revision if prev else rev,
            mod_revision=rev,
            version=prev.version + 1 if prev else 1,
            value=req.value,
            lease=req.lease,
        )
        self._change(Change(PUT, kv))
        return PutResult(prev if req.prev_kv else None)

    def delete(self, req: pb.DeleteRangeRequest) -> DeleteResult:
        found = self.live_in(req.key, req.range_end)
        for kv in found:
            self._delete(kv.key)
        return DeleteResult(len(found), tuple(found) if req.prev_kv else ())

    def _delete(self, key: bytes) -> None:
        self._change(Change(DELETE, KV(key, 0, self._next_revision(), 0, b"", 0)))

    def range(self, req: pb.RangeRequest) -> RangeResult:
        if req.revision > 0:
            kvs = self.store.keys_at(req.key, req.range_end, req.revision)
        else:
            kvs = self.live_in(req.key, req.range_end)
        count = len(kvs)
        if req.count_only:
            return RangeResult((), count, False)
        more = 0 < req.limit < count
        if more:
            kvs = kvs[: req.limit]
        return range_result(kvs, count, more, req.keys_only)

    def compare(self, cmp: pb.Compare) -> bool:
        """etcd's applyCompare: every key of the range must satisfy it; a missing key is
        an all-zero KeyValue, except that a VALUE compare on it is false."""
        if cmp.range_end:
            kvs = self.live_in(cmp.key, cmp.range_end)
        else:
            one = self.get(cmp.key)
            kvs = [one] if one is not None else []
        if not kvs:
            if cmp.target == pb.Compare.VALUE:
                return False
            kvs = [KV(cmp.key, 0, 0, 0, b"", 0)]
        return all(compare_kv(cmp, kv) for kv in kvs)

    def txn(self, req: pb.TxnRequest) -> TxnResult:
        succeeded = all(self.compare(c) for c in req.compare)
        responses: list[RangeResult | PutResult | DeleteResult] = []
        for op in req.success if succeeded else req.failure:
            which = op.WhichOneof("request")
            if which == "request_put":
                responses.append(self.put(op.request_put))
            elif which == "request_delete_range":
                responses.append(self.delete(op.request_delete_range))
            elif which == "request_range":
                responses.append(self.range(op.request_range))
            else:
                raise ValueError(f"txn op {which} is not modelled")
        return TxnResult(succeeded, tuple(responses))

    def revoke(self, lease_id: int) -> RevokeResult:
        """Delete every key attached to the lease, in key order."""
        for key in sorted(self.store.lease_keys.get(lease_id, ())):
            self._delete(key)
        return RevokeResult()


def compare_kv(cmp: pb.Compare, kv: KV) -> bool:
    target = cmp.target
    have: int | bytes
    want: int | bytes
    if target == pb.Compare.VALUE:
        have, want = kv.value, cmp.value
    elif target == pb.Compare.VERSION:
        have, want = kv.version, cmp.version
    elif target == pb.Compare.CREATE:
        have, want = kv.create_revision, cmp.create_revision
    elif target == pb.Compare.MOD:
        have, want = kv.mod_revision, cmp.mod_revision
    else:
        have, want = kv.lease, cmp.lease
    result = cmp.result
    if result == pb.Compare.EQUAL:
        return have == want
    if result == pb.Compare.NOT_EQUAL:
        return have != want
    if result == pb.Compare.GREATER:
        return have > want  # type: ignore[operator]
    return have < want  # type: ignore[operator]


def evaluate(store: Store, kind: str, request: Any, start_revision: int, mode: str) -> Outcome:
    """The result of a request on the store's current state and the changes it makes,
    its first change at ``start_revision``."""
    ev = Evaluation(store, start_revision, mode)
    result: Result
    if kind == "put":
        result = ev.put(request)
    elif kind == "delete":
        result = ev.delete(request)
    elif kind == "txn":
        result = ev.txn(request)
    elif kind == "range":
        result = store.read(request)
    elif kind == "lease_revoke":
        result = ev.revoke(request.ID)
    else:
        raise ValueError(f"request kind {kind} is not modelled")
    return Outcome(result, tuple(ev.changes))


def can_write(kind: str, request: Any) -> bool:
    """Whether a request could change anything (a txn with a write in some branch)."""
    if kind == "txn":
        ops = (*request.success, *request.failure)
        return any(op.WhichOneof("request") != "request_range" for op in ops)
    return kind in WRITE_KINDS


def put_values(kind: str, request: Any) -> list[bytes]:
    """The values a request may put (all txn branches)."""
    if kind == "put":
        return [request.value]
    if kind == "txn":
        ops = (*request.success, *request.failure)
        return [op.request_put.value for op in ops if op.WhichOneof("request") == "request_put"]
    return []


def may_delete(kind: str, request: Any, key: bytes, store: Store) -> bool:
    """Whether a request could delete ``key`` from the store's current state."""
    if kind == "delete":
        return in_range(key, request.key, request.range_end)
    if kind == "lease_revoke":
        kv = store.get(key)
        return kv is not None and kv.lease == request.ID
    if kind == "txn":
        return any(
            op.WhichOneof("request") == "request_delete_range"
            and in_range(key, op.request_delete_range.key, op.request_delete_range.range_end)
            for op in (*request.success, *request.failure)
        )
    return False
