"""The state one write batch evaluates against: the index plus the batch's own writes.

Requests in a batch are applied in order, so each sees the committed store (the index at
``base_rev``) overlaid with every earlier write of the batch. Writes become rows with ids
drawn from ``ids``, a request's rows at one etcd revision; values are fetched from
PostgreSQL by row id only when needed. States hold row ids as the index's do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence

from geminikv.mvcc.index import Index
from geminikv.mvcc.keys import stored_name
from geminikv.mvcc.ranges import in_range
from geminikv.storage.rows import CREATE, MOD, VERSION, Entry, NewRow, Row, State

__all__ = ["BatchView", "OutOfIds", "gap_row"]


def gap_row(rid: int) -> NewRow:
    """Kine's filler for a revision that holds no change (docs/architecture.md#row-shapes)."""
    return NewRow(Row(rid, b"gap-%d" % rid, 0, 1, 0, 0, 0, 0, None, None, None), True)


class OutOfIds(Exception):
    """The batch needs more row ids than were drawn for it."""


class BatchView:
    def __init__(
        self,
        index: Index,
        ids: int | Sequence[int],
        fetch_values: Callable[[list[int]], Awaitable[dict[int, bytes]]],
        values: dict[int, bytes],
    ) -> None:
        """``ids``: the row ids to use, or the first of a contiguous run of them."""
        self.index = index
        self.base_rev = int(index.rev)  # row ids, as the index's
        self.rev = self.base_rev  # the newest row id the batch has written (or base_rev)
        # etcd revisions (docs/architecture.md#revisions): the batch's current revision,
        # and each of its rows'. A request's rows share one, one above the previous
        # request's, while their ids follow the previous row's; any other id (skipped ids:
        # burned by a rollback, or Go Kine's) is a row whose revision is its id, as a row
        # committed later with a lower id may have its id as its revision.
        self.base_revision = index.revision_of(self.base_rev)
        self.revision = self.base_revision
        self._request_revision = 0  # the revision of this request's rows (0: none yet)
        self._own: dict[int, int] = {}
        self._ids = ids
        self._taken = 0
        self._fetch_values = fetch_values
        self.values = values  # row id → value, shared across evaluation passes
        self.overlay: dict[bytes, State] = {}
        self.rows: list[NewRow] = []
        self.revoked_leases: list[int] = []
        self._journal: list[tuple[bytes, State | None]] = []  # overlay entries replaced

    def mark(self) -> tuple[int, int, int, int, int, int]:
        """A savepoint, taken as each request starts: everything written after it can be
        undone by ``rollback``; the request's rows will share a revision."""
        self._request_revision = 0
        return (
            len(self.rows),
            len(self._journal),
            self.rev,
            len(self.revoked_leases),
            self._taken,
            self.revision,
        )

    def rollback(self, mark: tuple[int, int, int, int, int, int]) -> None:
        rows, journal, rev, revoked, self._taken, self.revision = mark
        self._request_revision = 0
        while len(self._journal) > journal:
            key, old = self._journal.pop()
            if old is None:
                self.overlay.pop(key, None)
            else:
                self.overlay[key] = old
        del self.rows[rows:]
        del self.revoked_leases[revoked:]
        self.rev = rev

    def _set(self, key: bytes, state: State) -> None:
        self._journal.append((key, self.overlay.get(key)))
        self.overlay[key] = state

    # -- reading -------------------------------------------------------------------------

    def get(self, key: bytes) -> State | None:
        state = self.overlay.get(key)
        if state is None:
            state = self.index.get(key, self.base_rev)
        return state if state is not None and state[VERSION] else None

    def range(self, start: bytes, end: bytes | None) -> list[Entry]:
        """Live keys in [start, end) at the current state, in key order."""
        if end is None:  # one key: the common case, without scanning the overlay
            state = self.get(start)
            return [(start, *state)] if state is not None else []
        entries: list[Entry] = self.index.range(start, end, self.base_rev, 0)[0]
        if not self.overlay:
            return entries
        merged = {e[0]: e for e in entries}
        for key, state in self.overlay.items():
            if in_range(key, start, end):
                if state[VERSION]:
                    merged[key] = (key, *state)
                else:
                    merged.pop(key, None)
        return [merged[k] for k in sorted(merged)]

    async def values_of(self, mods: Iterable[int]) -> dict[int, bytes]:
        """Values of the given row ids (fetched once, then cached)."""
        missing = [m for m in mods if m not in self.values]
        if missing:
            self.values.update(await self._fetch_values(missing))
        return self.values

    # -- writing -------------------------------------------------------------------------

    def revision_of(self, rid: int) -> int:
        """The etcd revision of row ``rid``: one of this batch's, or the index's."""
        if rid > self.base_rev:
            return self._own[rid]
        return self.index.revision_of(rid)

    def _next_id(self) -> tuple[int, int | None]:
        """The next row's id and its revision column (None when it is the id)."""
        ids, n = self._ids, self._taken
        if isinstance(ids, int):
            rid = ids + n
        elif n < len(ids):
            rid = ids[n]
        else:
            raise OutOfIds
        self._taken = n + 1
        if rid != self.rev + 1:
            revision = rid
        elif not self._request_revision:
            revision = self.revision + 1
        else:
            revision = self._request_revision
        self._request_revision = self.revision = self._own[rid] = revision
        self.rev = rid
        return rid, None if revision == rid else revision

    def _latest_row(self, key: bytes) -> tuple[int, bool]:
        """(id of the key's newest row, whether that row is in this batch)."""
        state = self.overlay.get(key)
        if state is not None:
            return state[MOD], True
        return int(self.index.latest_row(key)), False

    def put(self, key: bytes, value: bytes, lease: int) -> State:
        prev = self.get(key)
        prev_row, prev_in_batch = self._latest_row(key)
        rid, revision = self._next_id()
        if prev is None:
            state = (rid, revision or rid, 1, lease)
        else:
            state = (rid, prev[CREATE], prev[VERSION] + 1, lease)
        old = self.values.get(prev_row) if prev_in_batch else None
        self.rows.append(
            NewRow(
                Row(
                    rid,
                    stored_name(key),
                    int(prev is None),
                    0,
                    state[CREATE],
                    prev_row,
                    lease,
                    state[VERSION],
                    revision,
                    value,
                    old,
                ),
                prev_in_batch,
            )
        )
        self._set(key, state)
        self.values[rid] = value
        return state

    def delete(self, key: bytes) -> None:
        prev_row, prev_in_batch = self._latest_row(key)
        rid, revision = self._next_id()
        old = self.values.get(prev_row) if prev_in_batch else None
        self.rows.append(
            NewRow(
                Row(rid, stored_name(key), 0, 1, 0, prev_row, 0, 0, revision, None, old),
                prev_in_batch,
            )
        )
        self._set(key, (rid, 0, 0, 0))
