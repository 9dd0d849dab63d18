"""The MVCC index (Cython) and how it is rebuilt from the table at start-up."""

from __future__ import annotations

import functools

import asyncpg

from geminikv._native.index import Index, KeyHistory
from geminikv.mvcc.keys import COMPACT_KEY, GAP_PREFIX, key_of
from geminikv.storage import kine
from geminikv.storage.rows import State

__all__ = [
    "MAX_REVISION",
    "Index",
    "KeyHistory",
    "apply_row",
    "is_special",
    "load",
    "set_compacted",
]

MAX_REVISION = 2**63 - 1  # revisions and row ids are int64, as etcd's


def is_special(name: bytes, created: int, deleted: int, prev_revision: int) -> bool:
    """Rows that are revisions but not keys: Kine's compact_rev_key and gap fillers."""
    if name == COMPACT_KEY:
        return True
    return bool(deleted) and not created and prev_revision == 0 and name.startswith(GAP_PREFIX)


def apply_row(
    index: Index,
    rid: int,
    name: bytes,
    created: int,
    deleted: int,
    create_revision: int,
    prev_revision: int,
    lease: int,
    version: int | None,
    revision: int | None = None,
) -> tuple[bytes, State | None] | None:
    """Apply one row; returns (key, the key's previous live State) or None for special
    rows. ``revision`` None is the id (docs/architecture.md#revisions)."""
    if revision is not None or index.has_anchors:
        index.note_revision(rid, rid if revision is None else revision)
    if is_special(name, created, deleted, prev_revision):
        index.skip(rid)
        return None
    key = key_of(name)
    if deleted:
        return key, index.delete(key, rid)
    return key, index.put(
        key, rid, lease or 0, bool(created), create_revision or 0, version or 0, revision or 0
    )


async def load(pool: asyncpg.Pool, index: Index) -> None:
    """Fill an empty ``index`` from the table (one snapshot), compact revision included."""
    async with pool.acquire() as conn:
        compacted, revision = await kine.load_all(conn, functools.partial(apply_row, index))
    set_compacted(index, compacted, revision)


def set_compacted(index: Index, rid: int, revision: int | None) -> None:
    """Raise the index's compact revision to row ``rid`` at etcd revision ``revision``
    (None: unknown, the revision of that row id)."""
    if rid <= index.compact_rev:
        return
    index.compact_rev = rid
    index.compact_revision = index.revision_of(rid) if revision is None else revision
