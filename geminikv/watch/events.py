"""Turning applied revisions into etcd watch events."""

from __future__ import annotations

from collections.abc import Iterable

from geminikv.mvcc.events import Event
from geminikv.mvcc.index import Index, is_special
from geminikv.mvcc.keys import key_of
from geminikv.mvcc.ranges import key_value
from geminikv.proto.mvccpb import kv_pb2
from geminikv.storage.rows import Row

PUT = kv_pb2.Event.PUT
DELETE = kv_pb2.Event.DELETE


def events_from_rows(index: Index, rows: Iterable[Row]) -> list[Event]:
    """Events for table rows that the index has already applied."""
    out = []
    for row in rows:
        rid, name, value, old = row.id, row.name, row.value, row.old_value
        if is_special(name, row.created, row.deleted, row.prev_revision):
            continue
        revision = rid if row.revision is None else row.revision
        key = key_of(name)
        prev = index.get(key, rid - 1)
        if prev is not None and index.has_anchors:
            prev = (index.revision_of(prev[0]), *prev[1:])
        prev_value = (old or b"") if prev is not None else None
        if row.deleted:
            out.append(Event(rid, revision, key, True, 0, 0, 0, None, prev, prev_value))
            continue
        state = index.get(key, rid)
        if state is None or state[0] != rid:
            continue  # history no longer held (compacted meanwhile)
        out.append(
            Event(
                rid,
                revision,
                key,
                False,
                state[1],
                state[2],
                state[3],
                value or b"",
                prev,
                prev_value,
            )
        )
    return out


def to_pb(event: Event, with_prev: bool, compact_rev: int) -> kv_pb2.Event:
    """The wire event; like etcd, prev_kv is left out when revision-1 is compacted."""
    if event.deleted:  # etcd's tombstone: the key and the delete's revision
        ev = kv_pb2.Event(type=DELETE, kv=key_value(event.key, event.revision, 0, 0, 0, b""))
    else:
        kv = key_value(
            event.key,
            event.revision,
            event.create_revision,
            event.version,
            event.lease,
            event.value or b"",
        )
        ev = kv_pb2.Event(type=PUT, kv=kv)
    is_create = not event.deleted and event.create_revision == event.revision
    if with_prev and not is_create and event.prev is not None and event.revision > compact_rev:
        ev.prev_kv.CopyFrom(key_value(event.key, *event.prev, event.prev_value or b""))
    return ev
