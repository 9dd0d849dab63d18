"""The shapes a revision takes, one type each: a row of Kine's table, a row to insert, and a
key's state at a revision (what the index holds).

Rows are named tuples: tuples on the hot paths (unpacked as fast), with names for every
reader. The SQL column lists in ``queries.py`` are made from their fields, so a statement
and the type its rows arrive in cannot disagree. States are built in Cython, so they are
plain tuples with named positions.
"""

from __future__ import annotations

from typing import NamedTuple

State = tuple[int, int, int, int]
"""A key at one revision, as the index holds it (etcd's KeyValue without key and value):
(mod, create, version, lease). ``mod`` is the row id that wrote it (the index's map gives
its etcd revision: docs/architecture.md#revisions); ``create`` the create revision of the
key's generation, an etcd revision; ``version`` 1 on create, +1 per put, 0 on a tombstone.
The Cython index holds it as ``struct Rev`` (``_native/index.pxd``). A plain tuple: the
wire encoders (``_native/kvwire.pyx``) take exactly a tuple, and the index builds one per
read (a named tuple built from Cython costs 25 ns more per get)."""
MOD, CREATE, VERSION, LEASE = range(4)  # State's fields


Entry = tuple[bytes, int, int, int, int]
"""A key and its State, as ranges over the index return them: (key, mod, create, version,
lease). A plain tuple: a range builds one per key."""


class Row(NamedTuple):
    """A row of Kine's table as the follower applies it and the watch catch-up reads it.

    ``name`` is Kine's column (``keys.key_of`` gives the etcd key); ``version`` is NULL in
    Go Kine's rows; ``revision`` (its etcd revision) is NULL when it is the id (always in Go
    Kine's rows; docs/architecture.md#revisions); ``value`` is NULL
    on deletes and gap rows."""

    id: int
    name: bytes
    created: int
    deleted: int
    create_revision: int
    prev_revision: int
    lease: int
    version: int | None
    revision: int | None
    value: bytes | None
    old_value: bytes | None


class NewRow(NamedTuple):
    """A row a write batch inserts, and whether its ``old_value`` is known (False: the
    insert copies the value of the row ``prev_revision`` names)."""

    row: Row
    old_known: bool

    @property
    def id(self) -> int:
        return self.row.id

    def committed(self, old_value: bytes | None) -> Row:
        """The row as stored, with the old value the insert resolved."""
        return Row(*self.row[:10], old_value)  # not ``_replace``: half the cost, per row


# What the index needs of a row (it never holds values): Row's first nine columns.
INDEX_COLUMNS = Row._fields[:9]
