"""The history's own record of every change (``History.complete``), replayed once.

Gives the changes in revision order, each key's state before each change (for prev_kv
checks) and lookups by (revision, key) and by revision range.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tests.reliability.convert import change_of
from tests.reliability.history import History, WatchRecord
from tests.reliability.model import KV, Change, Store


def record_events(record: WatchRecord) -> list[Change]:
    """Every event a watch record received, in the order received."""
    return [change_of(ev) for _, resp in record.responses for ev in resp.events]


@dataclass(slots=True)
class Timeline:
    changes: list[Change]  # sorted by revision (stable: order within a revision kept)
    prevs: list[KV | None]  # each change's key state just before it
    revisions: list[int] = field(default_factory=list)
    index: dict[tuple[int, bytes], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.revisions = [c.revision for c in self.changes]
        self.index = {(c.revision, c.key): i for i, c in enumerate(self.changes)}

    def find(self, revision: int, key: bytes) -> int | None:
        return self.index.get((revision, key))

    def between(self, first: int, last: int) -> range:
        """Indexes of the changes with first <= revision <= last."""
        lo = bisect.bisect_left(self.revisions, first)
        hi = bisect.bisect_right(self.revisions, last)
        return range(lo, max(lo, hi))


def build_timeline(history: History) -> Timeline:
    """Replay ``history.complete`` from an empty prefix at ``base_revision``. An event
    received twice is kept once (the watch checks report it)."""
    events = record_events(history.complete) if history.complete is not None else []
    changes = sorted(dict.fromkeys(events), key=lambda c: c.revision)
    store = Store()
    store.revision = history.base_revision
    prevs = [store.apply(c) for c in changes]
    return Timeline(changes, prevs)
