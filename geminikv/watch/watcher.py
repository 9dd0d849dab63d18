"""A watcher, and the two narrow surfaces between the hub and the streams.

As in etcd (watcher.go, watchable_store.go), a watcher holds only where its responses
go, its ``Sink``: the hub queues events and cancellations there and asks whether it is
backlogged, nothing more. A stream knows the hub only as a ``Watchable``: it adds and
removes watchers and reads the revision. Neither module imports the other.
"""

from __future__ import annotations

from typing import Protocol

from geminikv.mvcc.events import Event


class Sink(Protocol):
    """Where the hub sends a watcher's responses (the watcher's stream)."""

    def queue_events(
        self, watcher: Watcher, events: list[Event], header_rev: int, compact_rev: int
    ) -> None:
        """Queue ``events`` for ``watcher``; ``compact_rev`` decides which carry prev_kv."""

    def cancel_with_reason(self, watcher: Watcher, reason: str) -> None:
        """End ``watcher``, dropping what is queued for it."""

    def cancel_compacted(self, watcher: Watcher, compact_rev: int) -> None:
        """End ``watcher``: its next revision was compacted away."""

    def backlogged(self, watcher: Watcher) -> bool:
        """Too much queued for ``watcher``: give it nothing more until the stream drains."""


class Watchable(Protocol):
    """What a stream needs of the hub (etcd's ``watchable``)."""

    @property
    def revision(self) -> int:
        """The revision every synced watcher has been given."""

    def first_id(self, revision: int) -> int:
        """The first row id a watch from etcd revision ``revision`` wants."""

    def rebuilding(self) -> bool:
        """The index is being rebuilt: no new watchers."""

    def add(self, watcher: Watcher) -> None: ...

    def remove(self, watcher: Watcher) -> None: ...

    def demote(self, watcher: Watcher) -> None:
        """Catch ``watcher`` up from ``watcher.next_rev`` by reading the table."""

    def wake(self) -> None:
        """A stream drained its queue: lagging watchers may continue."""


class Watcher:
    __slots__ = (
        "end",
        "fragment",
        "id",
        "key",
        "next_rev",
        "no_delete",
        "no_put",
        "prev_kv",
        "progress_notify",
        "sent_since_tick",
        "stream",
        "synced",
    )

    def __init__(
        self,
        stream: Sink,
        watch_id: int,
        key: bytes,
        end: bytes | None,
        start_rev: int,
        prev_kv: bool,
        no_put: bool,
        no_delete: bool,
        fragment: bool,
        progress_notify: bool,
    ) -> None:
        self.stream = stream
        self.id = watch_id
        self.key = key
        self.end = end  # None: one key; b"": every key >= key
        self.next_rev = start_rev  # the first row id not yet queued
        self.prev_kv = prev_kv
        self.no_put = no_put
        self.no_delete = no_delete
        self.fragment = fragment
        self.progress_notify = progress_notify
        self.synced = False
        self.sent_since_tick = False

    def matches(self, event: Event) -> bool:
        key = event.key
        if self.end is None:
            inside = key == self.key
        else:
            inside = key >= self.key and (not self.end or key < self.end)
        if not inside:
            return False
        return not (self.no_delete if event.deleted else self.no_put)
