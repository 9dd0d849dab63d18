"""etcd's Range rules shared by top-level Range and ranges inside a Txn (apply.go Range),
and the one builder of etcd's KeyValue from a key's state (watch events use it too; the
wire-format answers of _native/kvwire.pyx write the same fields)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from geminikv import errors
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from geminikv.storage.rows import Entry

RevisionOf = Callable[[int], int] | None
"""A row id's etcd revision (``Index.revision_of``); None when every revision is its id
(docs/architecture.md#revisions), so the common case costs nothing."""

MAX_FETCH = 2**62  # a larger limit (up to int64's) means "all" and must fit the index's C integer

_SORT_KEYS = {
    pb.RangeRequest.KEY: lambda e: e[0],
    pb.RangeRequest.VERSION: lambda e: e[3],
    pb.RangeRequest.CREATE: lambda e: e[2],
    pb.RangeRequest.MOD: lambda e: e[1],
}


def range_end(end: bytes) -> bytes | None:
    """etcd's range_end forms as the index takes them: b"" → one key; b"\\0" → unbounded."""
    if not end:
        return None
    if end == b"\x00":
        return b""
    return end


def read_revision(current: int, compact: int, revision: int) -> int:
    """The revision a top-level Range reads at: ``revision``, or ``current`` for 0. etcd
    refuses a future one and one below the compact revision (the single-key get of the
    wire path is a Range at 0)."""
    if revision > current:
        raise errors.FutureRevision()
    at = revision if revision > 0 else current
    if at < compact:
        raise errors.Compacted()
    return at


def in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None:
        return key == start
    return key >= start and (not end or key < end)


def needs_everything(req: pb.RangeRequest) -> bool:
    """Sorting and revision filters look at every key before the limit applies."""
    return bool(
        req.sort_order != pb.RangeRequest.NONE
        or req.min_mod_revision
        or req.max_mod_revision
        or req.min_create_revision
        or req.max_create_revision
    )


def fetch_limit(req: pb.RangeRequest) -> int:
    if needs_everything(req) or req.limit <= 0:
        return 0
    return min(req.limit, MAX_FETCH) + 1


def needs_values_to_sort(req: pb.RangeRequest) -> bool:
    return req.sort_target == pb.RangeRequest.VALUE and _sort_order(req) != pb.RangeRequest.NONE


def _sort_order(req: pb.RangeRequest) -> int:
    order = req.sort_order
    if req.sort_target != pb.RangeRequest.KEY and order == pb.RangeRequest.NONE:
        order = pb.RangeRequest.ASCEND
    return order


def select(
    req: pb.RangeRequest,
    entries: list[Entry],
    values: dict[int, bytes] | None = None,
    revision_of: RevisionOf = None,
) -> tuple[list[Entry], bool]:
    """Filter, sort and limit fetched entries as etcd does; returns (entries, more).

    ``values`` (row id → value) is needed only when sorting by value. Entries hold row
    ids, in the order of their revisions (sorting by MOD sorts by id).
    """
    mod = (lambda e: e[1]) if revision_of is None else (lambda e: revision_of(e[1]))
    if req.max_mod_revision:
        entries = [e for e in entries if mod(e) <= req.max_mod_revision]
    if req.min_mod_revision:
        entries = [e for e in entries if mod(e) >= req.min_mod_revision]
    if req.max_create_revision:
        entries = [e for e in entries if e[2] <= req.max_create_revision]
    if req.min_create_revision:
        entries = [e for e in entries if e[2] >= req.min_create_revision]
    order = _sort_order(req)
    if order != pb.RangeRequest.NONE:
        if req.sort_target == pb.RangeRequest.VALUE:
            assert values is not None
            entries = sorted(
                entries, key=lambda e: values[e[1]], reverse=order == pb.RangeRequest.DESCEND
            )
        else:
            entries = sorted(
                entries, key=_SORT_KEYS[req.sort_target], reverse=order == pb.RangeRequest.DESCEND
            )
    more = False
    if req.limit > 0 and len(entries) > req.limit:
        entries = entries[: req.limit]
        more = True
    return entries, more


def key_value(
    key: bytes, mod: int, create: int, version: int, lease: int, value: bytes
) -> kv_pb2.KeyValue:
    """One KeyValue: ``key_value(*entry, value)`` or ``key_value(key, *state, value)``."""
    return kv_pb2.KeyValue(
        key=key, create_revision=create, mod_revision=mod, version=version, lease=lease, value=value
    )


def add_key_values(
    into: Any, entries: list[Entry], values: dict[int, bytes] | None, revision_of: RevisionOf
) -> None:
    """Append a KeyValue per entry to the repeated field ``into``; ``values`` None means
    keys only; ``revision_of`` turns the entries' row ids into mod revisions. ``key_value``'s
    fields, built in place with ``add``: no second copy of a large response (a 100 MB list)
    and about a third faster than building messages and extending with them (so the loop
    does not call ``key_value`` either)."""
    add = into.add
    if revision_of is not None:
        for key, mod, create, version, lease in entries:
            add(
                key=key,
                create_revision=create,
                mod_revision=revision_of(mod),
                version=version,
                lease=lease,
                value=b"" if values is None else values[mod],
            )
        return
    if values is None:
        for key, mod, create, version, lease in entries:
            add(key=key, create_revision=create, mod_revision=mod, version=version, lease=lease)
        return
    for key, mod, create, version, lease in entries:
        add(
            key=key,
            create_revision=create,
            mod_revision=mod,
            version=version,
            lease=lease,
            value=values[mod],
        )
