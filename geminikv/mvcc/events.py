"""What the follower hands on for every applied revision (the watch hub consumes these)."""

from __future__ import annotations

from dataclasses import dataclass

from geminikv.storage.rows import State


@dataclass(frozen=True, slots=True)
class Event:
    """One key change. ``revision`` is its etcd revision, ``rid`` its row id; ``value`` is
    None on deletes; ``prev`` is the previous live state, its mod an etcd revision."""

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
