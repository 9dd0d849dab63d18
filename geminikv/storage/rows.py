"""The shapes a revision takes, one type each: a row of Kine's table, a row to insert, and a
key's state at a revision (what the index holds).

All are named tuples: a tuple on the hot paths (built and unpacked as fast), with names
for every reader. The SQL column lists in ``queries.py`` are made from these fields, so a
statement and the type its rows arrive in cannot disagree.
"""

from __future__ import annotations

from typing import NamedTuple


class State(NamedTuple):
    """A key at one revision, as the index holds it (etcd's KeyValue without key and value).

    ``version`` 0 marks a tombstone (the key deleted at ``mod``). The Cython index
    (``_native/index.pyx``) returns these as plain 4-tuples in this order."""

    mod: int  # the row id that wrote it: the mod revision
    create: int  # create revision of the key's generation (0 on a tombstone)
    version: int  # 1 on create, +1 per put
    lease: int


class Row(NamedTuple):
    """A row of Kine's table as the follower applies it and the watch catch-up reads it.

    ``name`` is Kine's column (``keys.key_of`` gives the etcd key); ``version`` is NULL in
    Go Kine's rows; ``value`` is NULL on deletes and gap rows."""

    id: int
    name: bytes
    created: int
    deleted: int
    create_revision: int
    prev_revision: int
    lease: int
    version: int | None
    value: bytes | None
    old_value: bytes | None


class NewRow(NamedTuple):
    """A row a write batch inserts: ``Row``'s columns, and whether ``old_value`` is known
    (False: the insert copies the value of the row ``prev_revision`` names)."""

    id: int
    name: bytes
    created: int
    deleted: int
    create_revision: int
    prev_revision: int
    lease: int
    version: int
    value: bytes | None
    old_value: bytes | None
    old_known: bool

    def committed(self, old_value: bytes | None) -> Row:
        """The row as stored, with the old value the insert resolved."""
        return Row(
            self.id,
            self.name,
            self.created,
            self.deleted,
            self.create_revision,
            self.prev_revision,
            self.lease,
            self.version,
            self.value,
            old_value,
        )


# What the index needs of a row (it never holds values): Row's first eight columns.
INDEX_COLUMNS = Row._fields[:8]
