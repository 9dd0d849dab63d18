"""What each KV, Txn, Watch and Lease request needs the user to be permitted, as etcd's
apply_auth.go and v3_server.go check it (etcd 3.5)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from geminikv.auth.store import AuthStore
from geminikv.auth.tokens import AuthInfo
from geminikv.proto.etcdserverpb import rpc_pb2 as pb

LeaseKeys = Callable[[int], Iterable[bytes]]  # the keys attached to a lease


def check_range(store: AuthStore, info: AuthInfo | None, req: pb.RangeRequest) -> None:
    store.check_op(info, req.key, req.range_end, write=False)


def check_put(
    store: AuthStore,
    info: AuthInfo | None,
    req: pb.PutRequest,
    lease_keys: LeaseKeys,
) -> None:
    """checkPutAuth: write the key; attach a lease only if every key already on it could
    be written (the user could not revoke it otherwise); read it for prev_kv."""
    store.check_op(info, req.key, b"", write=True)
    check_lease_writes(store, info, req.lease, lease_keys)
    if req.prev_kv:
        store.check_op(info, req.key, b"", write=False)


def check_delete(store: AuthStore, info: AuthInfo | None, req: pb.DeleteRangeRequest) -> None:
    store.check_op(info, req.key, req.range_end, write=True)
    if req.prev_kv:
        store.check_op(info, req.key, req.range_end, write=False)


def check_txn(
    store: AuthStore, info: AuthInfo | None, req: pb.TxnRequest, lease_keys: LeaseKeys
) -> None:
    """checkTxnAuth: read every compared range, then every op of both branches."""
    for cmp in req.compare:
        store.check_op(info, cmp.key, cmp.range_end, write=False)
    for op in (*req.success, *req.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range(store, info, op.request_range)
        elif kind == "request_put":
            check_put(store, info, op.request_put, lease_keys)
        elif kind == "request_delete_range":
            d = op.request_delete_range
            if d.prev_kv:
                store.check_op(info, d.key, d.range_end, write=False)
            store.check_op(info, d.key, d.range_end, write=True)
        elif kind == "request_txn":
            check_txn(store, info, op.request_txn, lease_keys)


def check_guarded_put(
    store: AuthStore,
    info: AuthInfo | None,
    key: bytes,
    lease: int,
    read_on_failure: bool,
    lease_keys: LeaseKeys,
) -> None:
    """check_txn for kube-apiserver's ``MOD(key) == rev → Put(key) else Range(key)``
    taken by the wire fast path, and for its delete (the same with ``DeleteRange(key)``,
    no prev_kv: ``lease`` 0)."""
    store.check_op(info, key, b"", write=False)
    store.check_op(info, key, b"", write=True)
    check_lease_writes(store, info, lease, lease_keys)
    if read_on_failure:
        store.check_op(info, key, b"", write=False)


def check_lease_writes(
    store: AuthStore, info: AuthInfo | None, lease: int, lease_keys: LeaseKeys
) -> None:
    """checkLeasePuts: root, or write permission on every key attached to the lease."""
    if not lease or store.is_admin(info):
        return
    for key in lease_keys(lease):
        store.check_op(info, key, b"", write=True)


def check_lease_reads(
    store: AuthStore, info: AuthInfo | None, leases: Iterable[int], lease_keys: LeaseKeys
) -> None:
    """checkLeaseTimeToLive and checkLeaseLeases: root, or read permission on every key
    attached to the leases."""
    if store.is_admin(info):
        return
    for lease in leases:
        for key in lease_keys(lease):
            store.check_op(info, key, b"", write=False)


def watch_range(key: bytes, range_end: bytes) -> tuple[bytes, bytes]:
    """The range etcd's watch server checks: an empty key is b"\\x00", and an open end
    (b"\\x00") becomes empty, so it is checked as the single key (etcd's recvLoop)."""
    return key or b"\x00", b"" if range_end == b"\x00" else range_end
