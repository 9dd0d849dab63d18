"""What the follower hands on for every applied revision (the watch hub consumes these)."""

from __future__ import annotations

from typing import NamedTuple

from geminikv.storage.rows import State


class Event(NamedTuple):
    """One key change. ``revision`` is its etcd revision, ``rid`` its row id; ``value`` is
    None on deletes; ``prev`` is the previous live state, its mod an etcd revision. A named
    tuple: the follower builds one per applied row, a quarter of a frozen dataclass's cost."""

    rid: int
    revision: int
    key: bytes
    deleted: bool
    create_revision: int
    version: int
    lease: int
    value: bytes | None
    prev: State | None
    prev_value: bytes | None
