"""Evaluating write requests (Put, DeleteRange, Txn) as etcd's applier does.

Request checks mirror etcd's v3rpc (key.go: checkPutRequest, checkTxnRequest,
checkIntervals) and the applier's pre-apply checks (apply.go: checkRequests); nothing is
written unless every check passes. Compares are evaluated on the state before the txn.

kube-apiserver's create, update and delete arrive parsed from wire format as a GuardedPut
(_native/kvwire.pyx), which recognises only shapes no request check refuses: its
evaluation is ``Evaluator.guarded_put`` below, built from the same rules as a Txn's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from geminikv import errors
from geminikv._native.kvwire import GuardedPut
from geminikv.config import MAX_REQUEST_BYTES, MAX_TXN_OPS
from geminikv.mvcc import ranges
from geminikv.mvcc.view import BatchView
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage.rows import Entry, State

# A missing key compares as a KeyValue of zeros (etcd's compareKV on an empty one).
ABSENT: State = (0, 0, 0, 0)
SORT_ORDERS = frozenset(pb.RangeRequest.SortOrder.values())
SORT_TARGETS = frozenset(pb.RangeRequest.SortTarget.values())


class Leases(Protocol):
    """The leases a batch may use, as read (and row-locked) at the start of the batch."""

    def exists(self, lease_id: int) -> bool: ...

    def remaining_ms(self, lease_id: int) -> int | None: ...

    def forget(self, lease_id: int) -> None: ...


# -- request checks (before anything is evaluated) ------------------------------------------


def check_size(req: pb.PutRequest | pb.DeleteRangeRequest | pb.TxnRequest) -> None:
    """etcd's max request size, which limits raft proposals: a request is validated first
    (v3rpc's checks come before the proposal), and a read-only txn is never proposed."""
    if req.ByteSize() <= MAX_REQUEST_BYTES:
        return
    if isinstance(req, pb.PutRequest):
        check_put(req)
    elif isinstance(req, pb.DeleteRangeRequest):
        check_delete(req)
    else:
        check_txn(req)
        check_intervals(req.success)
        check_intervals(req.failure)
        if is_read_only(req):
            return
    raise errors.RequestTooLarge()


def is_read_only(req: pb.TxnRequest) -> bool:
    """etcd's isTxnReadonly: every op of both branches is a Range (nested txns are not)."""
    return all(op.WhichOneof("request") == "request_range" for op in (*req.success, *req.failure))


def check_range(req: pb.RangeRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()
    if req.sort_order not in SORT_ORDERS or req.sort_target not in SORT_TARGETS:
        raise errors.InvalidSortOption()


def check_put(req: pb.PutRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()
    if req.ignore_value and req.value:
        raise errors.ValueProvided()
    if req.ignore_lease and req.lease:
        raise errors.LeaseProvided()


def check_delete(req: pb.DeleteRangeRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()


def check_txn(req: pb.TxnRequest, max_ops: int = MAX_TXN_OPS) -> set[int]:
    """etcd's checkTxnRequest; returns every lease the txn's puts could attach (all
    branches, nested txns included), which the writer locks for the batch."""
    ops = max(len(req.compare), len(req.success), len(req.failure))
    if ops > max_ops:
        raise errors.TooManyOps()
    for cmp in req.compare:
        if not cmp.key:
            raise errors.EmptyKey()
    leases: set[int] = set()
    for branch in (req.success, req.failure):
        for op in branch:
            kind = op.WhichOneof("request")
            if kind == "request_range":
                check_range(op.request_range)
            elif kind == "request_put":
                put = op.request_put
                check_put(put)
                if put.lease:
                    leases.add(put.lease)
            elif kind == "request_delete_range":
                check_delete(op.request_delete_range)
            elif kind == "request_txn":
                leases |= check_txn(op.request_txn, max_ops - ops)
            else:
                raise errors.KeyNotFound()
    return leases


def _point(key: bytes) -> tuple[bytes, bytes]:
    return key, key + b"\x00"


def _intersects(intervals: list[tuple[bytes, bytes]], key: bytes) -> bool:
    # Intervals are [begin, end) with an empty end meaning +infinity (etcd's adt affine).
    return any(begin <= key and (not end or key < end) for begin, end in intervals)


def check_branch(ops: Sequence[pb.RequestOp]) -> None:
    """check_intervals for one branch of a txn; a lone put, delete or range (the common
    case) cannot collide with itself."""
    if len(ops) > 1 or (ops and ops[0].WhichOneof("request") == "request_txn"):
        check_intervals(ops)


def check_intervals(
    ops: Sequence[pb.RequestOp],
) -> tuple[set[bytes], list[tuple[bytes, bytes]]]:
    """etcd's checkIntervals: no key put twice, or put inside a deleted range, per branch."""
    dels: list[tuple[bytes, bytes]] = []
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            d = op.request_delete_range
            dels.append((d.key, d.range_end) if d.range_end else _point(d.key))
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = check_intervals(op.request_txn.success)
        puts_else, dels_else = check_intervals(op.request_txn.failure)
        for k in puts_then:
            if k in puts or _intersects(dels, k):
                raise errors.DuplicateKey()
            puts.add(k)
        for k in puts_else:
            if (k in puts and k not in puts_then) or _intersects(dels, k):
                raise errors.DuplicateKey()
            puts.add(k)
        dels.extend(dels_then)
        dels.extend(dels_else)
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or _intersects(dels, k):
            raise errors.DuplicateKey()
        puts.add(k)
    return puts, dels


# -- evaluation --------------------------------------------------------------------------


class Evaluator:
    """Applies requests to a BatchView, producing etcd's responses (headers: revision only)."""

    def __init__(self, view: BatchView, leases: Leases, compact_rev: int) -> None:
        self.view = view
        self.leases = leases
        self.compact_rev = compact_rev

    # -- top-level requests

    async def put(self, req: pb.PutRequest) -> pb.PutResponse:
        # etcd's applier looks a top-level Put's lease up before the key (in a txn,
        # checkRequestPut does the key first)
        self._check_lease(req.lease)
        self._check_put_state(req)
        return await self._put(req, pb.PutResponse())

    async def delete_range(self, req: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return await self._delete_range(req, pb.DeleteRangeResponse())

    async def revoke(self, lease_id: int, only_if_expired: bool) -> pb.LeaseRevokeResponse | None:
        """Delete every key attached to the lease, then the lease itself.

        ``only_if_expired``: expiry's revoke, skipped (None) if the lease was renewed or
        revoked meanwhile.
        """
        remaining = self.leases.remaining_ms(lease_id)
        if remaining is None:
            if only_if_expired:
                return None
            raise errors.LeaseNotFound()
        if only_if_expired and remaining > 0:
            return None
        view = self.view
        keys = set(view.index.lease_keys(lease_id)) | set(view.overlay)
        for key in sorted(keys):
            state = view.get(key)
            if state is not None and state[3] == lease_id:
                view.delete(key)
        view.revoked_leases.append(lease_id)
        self.leases.forget(lease_id)
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = view.revision
        return resp

    async def delete_if_unchanged(self, key: bytes, mod: int) -> bool:
        """Kine's TTL expiry: delete the key only if it is still at revision ``mod``."""
        state = self.view.get(key)
        if state is None or state[0] != mod:
            return False
        self.view.delete(key)
        return True

    async def txn(self, req: pb.TxnRequest) -> pb.TxnResponse:
        path: list[bool] = []
        await self._compare_path(req, path)
        self._check_requests(req, list(path), self._check_put_op)
        self._check_requests(req, list(path), self._check_range_op)
        resp = pb.TxnResponse()
        await self._apply_txn(req, path, resp)
        resp.header.revision = self.view.revision
        return resp

    async def guarded_put(self, request: GuardedPut) -> tuple[bool, int, State | None, bytes]:
        """``txn`` for kube-apiserver's create and update, ``MOD(key) == want_mod →
        Put(key, value, lease)`` else ``Range(key)`` (or nothing), and its delete (the
        same with ``DeleteRange(key)``), without messages: (succeeded, revision, on
        failure the key's state (None: absent), its value; after a delete, the deleted
        key's state, None if there was none). The compare as ``_compare_kv`` (MOD,
        EQUAL), the put's check as ``_check_put_state`` (no ignore_*), the delete as
        ``_delete_range`` (one key, no prev_kv), the range as ``range`` (one key, now)."""
        view = self.view
        key, lease = request.key, request.lease
        state = view.get(key)
        if (0 if state is None else view.revision_of(state[0])) == request.want_mod:
            if request.delete:
                if state is None:
                    return True, view.revision, None, b""
                mod, create, version, held = state
                found = (view.revision_of(mod), create, version, held)
                view.delete(key)
                return True, view.revision, found, b""
            self._check_lease(lease)
            view.put(key, request.value, lease)
            return True, view.revision, None, b""
        if state is None or not request.read_on_failure:
            return False, view.revision, None, b""
        values = await view.values_of((state[0],))
        mod, create, version, lease = state
        return False, view.revision, (view.revision_of(mod), create, version, lease), values[mod]

    # -- compares

    async def _compare_path(self, req: pb.TxnRequest, path: list[bool]) -> None:
        """Pre-order branch choices of the txn and the nested txns it will run."""
        ok = True
        for cmp in req.compare:
            if not await self._compare(cmp):
                ok = False
                break
        path.append(ok)
        for op in req.success if ok else req.failure:
            if op.WhichOneof("request") == "request_txn":
                await self._compare_path(op.request_txn, path)

    async def _compare(self, cmp: pb.Compare) -> bool:
        entries = self.view.range(cmp.key, ranges.range_end(cmp.range_end))
        if not entries:
            if cmp.target == pb.Compare.VALUE:
                return False  # a missing key has no value to compare (etcd applyCompare)
            return _compare_kv(cmp, (cmp.key, *ABSENT), b"")
        values: dict[int, bytes] = {}
        if cmp.target == pb.Compare.VALUE:
            values = await self.view.values_of(e[1] for e in entries)
        revision_of = self.view.revision_of
        return all(
            _compare_kv(cmp, (e[0], revision_of(e[1]), *e[2:]), values.get(e[1], b""))
            for e in entries
        )

    # -- checks on the state (apply.go checkRequests)

    def _check_requests(self, req: pb.TxnRequest, path: list[bool], check: object) -> None:
        ops = req.success if path.pop(0) else req.failure
        for op in ops:
            if op.WhichOneof("request") == "request_txn":
                self._check_requests(op.request_txn, path, check)
            else:
                check(op)  # type: ignore[operator]

    def _check_put_op(self, op: pb.RequestOp) -> None:
        if op.WhichOneof("request") == "request_put":
            self._check_put_state(op.request_put)

    def _check_put_state(self, req: pb.PutRequest) -> None:
        if (req.ignore_value or req.ignore_lease) and self.view.get(req.key) is None:
            raise errors.KeyNotFound()
        self._check_lease(req.lease)

    def _check_lease(self, lease: int) -> None:
        """A put may attach a lease (0: none) only if it exists."""
        if lease and not self.leases.exists(lease):
            raise errors.LeaseNotFound()

    def _check_range_op(self, op: pb.RequestOp) -> None:
        if op.WhichOneof("request") == "request_range":
            self._check_revision(op.request_range.revision)

    def _check_revision(self, rev: int) -> None:
        # etcd's checkRequestRange: any revision but 0 below the store's first revision
        # (its compact revision, -1 before the first compaction) is compacted, negative
        # ones included.
        if rev > self.view.base_revision:
            raise errors.FutureRevision()
        first = self.compact_rev if self.compact_rev > 0 else -1
        if rev != 0 and rev < first:
            raise errors.Compacted()

    # -- ops

    async def _apply_txn(self, req: pb.TxnRequest, path: list[bool], resp: pb.TxnResponse) -> None:
        succeeded = path.pop(0)
        resp.succeeded = succeeded
        for op in req.success if succeeded else req.failure:
            out = resp.responses.add()
            kind = op.WhichOneof("request")
            if kind == "request_range":
                await self.range(op.request_range, out.response_range)
            elif kind == "request_put":
                await self._put(op.request_put, out.response_put)
            elif kind == "request_delete_range":
                await self._delete_range(op.request_delete_range, out.response_delete_range)
            elif kind == "request_txn":
                nested = out.response_txn
                nested.header.SetInParent()
                await self._apply_txn(op.request_txn, path, nested)

    async def range(self, req: pb.RangeRequest, resp: pb.RangeResponse) -> pb.RangeResponse:
        """A Range inside a txn: at the current state (own writes included) or at a revision."""
        end = ranges.range_end(req.range_end)
        view = self.view
        if req.revision > 0:
            at = view.base_rev
            if req.revision < view.base_revision:
                at = view.index.id_at(req.revision)
            all_entries, count = view.index.range(req.key, end, at, 0)
        else:
            all_entries = view.range(req.key, end)
            count = len(all_entries)
        resp.count = count
        resp.header.revision = view.revision
        if req.count_only:
            return resp
        limit = ranges.fetch_limit(req)
        entries = all_entries[:limit] if limit else all_entries
        values = None
        if ranges.needs_values_to_sort(req):
            values = await view.values_of(e[1] for e in entries)
        entries, resp.more = ranges.select(req, entries, values, view.revision_of)
        if not req.keys_only:
            values = await view.values_of(e[1] for e in entries)
        ranges.add_key_values(
            resp.kvs, entries, None if req.keys_only else values, view.revision_of
        )
        return resp

    # The ops below fill the response they are given: in a txn, the one inside its
    # ResponseOp (building it apart and copying it in costs a copy of every value).

    async def _put(self, req: pb.PutRequest, resp: pb.PutResponse) -> pb.PutResponse:
        view = self.view
        prev = view.get(req.key)
        if prev is None and (req.ignore_value or req.ignore_lease):
            # Checked before the txn ran, but an earlier op of this txn deleted the key
            # (etcd 3.4 panics here): the whole request fails, nothing is written.
            raise errors.KeyNotFound()
        value, lease = req.value, req.lease
        if prev is not None and (req.ignore_value or req.prev_kv):
            prev_value = (await view.values_of((prev[0],)))[prev[0]]
            if req.ignore_value:
                value = prev_value
            if req.prev_kv:
                mod, create, version, prev_lease = prev
                resp.prev_kv.CopyFrom(
                    ranges.key_value(
                        req.key, view.revision_of(mod), create, version, prev_lease, prev_value
                    )
                )
        if req.ignore_lease and prev is not None:
            lease = prev[3]
        view.put(req.key, value, lease)
        resp.header.revision = view.revision
        return resp

    async def _delete_range(
        self, req: pb.DeleteRangeRequest, resp: pb.DeleteRangeResponse
    ) -> pb.DeleteRangeResponse:
        view = self.view
        entries = view.range(req.key, ranges.range_end(req.range_end))
        resp.deleted = len(entries)
        if req.prev_kv and entries:
            values = await view.values_of(e[1] for e in entries)
            ranges.add_key_values(resp.prev_kvs, entries, values, view.revision_of)
        for entry in entries:
            view.delete(entry[0])
        resp.header.revision = view.revision
        return resp


def _compare_kv(cmp: pb.Compare, entry: Entry, value: bytes) -> bool:
    """etcd's compareKV; a target union that doesn't match the target compares against 0."""
    target = cmp.target
    union = cmp.WhichOneof("target_union")
    result: int
    if target == pb.Compare.VALUE:
        want = cmp.value if union == "value" else b""
        result = (value > want) - (value < want)
    else:
        if target == pb.Compare.CREATE:
            have, want_i = entry[2], cmp.create_revision if union == "create_revision" else 0
        elif target == pb.Compare.MOD:
            have, want_i = entry[1], cmp.mod_revision if union == "mod_revision" else 0
        elif target == pb.Compare.VERSION:
            have, want_i = entry[3], cmp.version if union == "version" else 0
        elif target == pb.Compare.LEASE:
            have, want_i = entry[4], cmp.lease if union == "lease" else 0
        else:
            have = want_i = 0  # an unknown target compares as equal
        result = (have > want_i) - (have < want_i)
    op = cmp.result
    if op == pb.Compare.EQUAL:
        return result == 0
    if op == pb.Compare.NOT_EQUAL:
        return result != 0
    if op == pb.Compare.GREATER:
        return result > 0
    if op == pb.Compare.LESS:
        return result < 0
    return True
