"""An etcd snapshot loaded into an empty geminikv database, revisions kept.

Each key an etcd revision changed becomes a row carrying that revision (one row per key,
so a revision that changed several keys is several rows with consecutive ids and one
revision; docs/architecture.md#revisions): create/mod revisions, versions and the current
revision are etcd's. Revisions that changed no key still exist in etcd (its revision 1,
history compacted away, a current revision that is the compact revision): the first of
them holds Kine's ``compact_rev_key`` row (etcd never writes revision 1), those above the
compact revision are Kine gap rows, and so is the current revision if no key changed at
it, so the newest row is at the current revision. Holes at or below the compact revision
stay holes, as geminikv's compaction leaves them. Kine's compact row holds the newest row
id at the compact revision, and the revision beside it.

Lease ids: Kine's ``lease`` column holds 32 bits, etcd's ids 64. An id that does not fit
is renumbered (its low 31 bits, or the next free id) and the new id reported; keys keep
their lease under the new id.

Everything is written in one transaction under the writer lock: the rows by COPY, the
leases, the compact revision, then Kine's id sequence. Memory: a page per tree level and
COPY's buffer; PostgreSQL sorts the rows by key to link each to its previous row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import asyncpg

from geminikv import errors
from geminikv.mvcc.keys import COMPACT_KEY, GAP_PREFIX, stored_name
from geminikv.snapshot.backend import KeyRevision
from geminikv.snapshot.reader import EtcdBackend, SnapshotRefused, check_trailer
from geminikv.storage import kine, locks, schema
from geminikv.storage import load as loading
from geminikv.storage.load import StagedRow
from geminikv.storage.queries import MAX_LEASE_ID


class LeaseIds:
    """etcd lease id -> geminikv lease id: kept if it fits 31 bits, else its low 31 bits
    (etcd draws ids from a counter, so those differ), or the next free id."""

    def __init__(self, held: Iterable[int]) -> None:
        held = sorted(held)
        self.taken = {lease for lease in held if 0 < lease <= MAX_LEASE_ID}
        self.renumbered: dict[int, int] = {}
        for lease in held:
            self(lease)

    def __call__(self, lease: int) -> int:
        if 0 <= lease <= MAX_LEASE_ID:
            return lease
        new = self.renumbered.get(lease)
        if new is None:
            new = lease & MAX_LEASE_ID or 1
            while new in self.taken:
                new = new % MAX_LEASE_ID + 1
            self.taken.add(new)
            self.renumbered[lease] = new
        return new


@dataclass(slots=True)
class Staging:
    """Turns etcd's revisions, in order, into Kine rows (``storage.load.STAGING_COLUMNS``):
    one row per key changed, ids ascending; a row's ``revision`` column is its etcd
    revision where that is not its id (docs/architecture.md#revisions)."""

    compact: int
    lease_ids: LeaseIds
    revision: int = 0  # the current revision, once every row is out
    compact_key: int | None = None  # the revision of Kine's compact_rev_key row
    compact_id: int = 0  # the newest row id at or below the compact revision
    rows: int = 0
    last_id: int = 0

    def rows_of(self, revisions: Iterable[KeyRevision]) -> Iterator[StagedRow]:
        expected = 1
        for entry in revisions:
            if entry.main >= expected:
                yield from self._holes(expected, entry.main - 1)
            yield self._row(entry)
            expected = entry.main + 1
        self.revision = max(expected - 1, self.compact, 1)
        yield from self._holes(expected, self.revision, newest=True)
        if self.compact_key is None:
            raise SnapshotRefused(errors.LOAD_NO_FREE_REVISION.format(revision=self.revision))

    def _next(self, revision: int) -> tuple[int, int | None]:
        """The next row's id, and its revision column (NULL when it is the id). A row's id
        is its revision where the rows before leave it free (always, without multi-key
        revisions), else the next id: never below its revision, so a row written later
        with its id as revision (Go Kine's, a gap row) never goes below one of these."""
        self.rows += 1
        self.last_id = rid = max(self.last_id + 1, revision)
        if revision <= self.compact:
            self.compact_id = rid
        return rid, None if revision == rid else revision

    def _holes(self, first: int, last: int, newest: bool = False) -> Iterator[StagedRow]:
        """Rows for revisions ``first`` to ``last``, at which no key changed."""
        if first > last:
            return
        if self.compact_key is None:
            self.compact_key = first
            rid, revision = self._next(first)
            yield (rid, COMPACT_KEY, 1, 0, 0, 0, b"", 1, revision)
            first += 1
        for gap in range(max(first, self.compact + 1), last + 1):
            rid, revision = self._next(gap)
            yield (rid, GAP_PREFIX + b"%d" % rid, 0, 1, 0, 0, None, 0, revision)
        if newest and first <= last <= self.compact:
            rid, revision = self._next(last)
            yield (rid, GAP_PREFIX + b"%d" % rid, 0, 1, 0, 0, None, 0, revision)

    def _row(self, entry: KeyRevision) -> StagedRow:
        rid, revision = self._next(entry.main)
        name = stored_name(entry.key)
        if entry.tombstone:
            return (rid, name, 0, 1, 0, 0, None, 0, revision)
        created = int(entry.create_revision == entry.main)
        lease = self.lease_ids(entry.lease)
        return (
            rid,
            name,
            created,
            0,
            entry.create_revision,
            lease,
            entry.value,
            entry.version,
            revision,
        )


@dataclass(frozen=True, slots=True)
class Loaded:
    """What was loaded: the current and compact revision, rows, leases, renumbered ids."""

    revision: int
    compact_revision: int
    rows: int
    leases: int
    renumbered: dict[int, int]


async def load_file(
    conn: asyncpg.Connection,
    path: str,
    skip_hash_check: bool = False,
    remaining_ttls: Mapping[int, int] | None = None,
) -> Loaded:
    """Load the snapshot at ``path`` into the (empty) database ``conn`` is connected to.

    ``remaining_ttls``: lease id -> seconds left, as a live etcd reported them after the
    snapshot; otherwise a lease keeps the remaining TTL the file holds, or its whole TTL
    (as etcd grants a lease it recovers). Raises SnapshotRefused, having written nothing.
    """
    with open(path, "rb") as file:
        size = check_trailer(file, path, skip_hash_check)
        backend = EtcdBackend(file, size, path)
        summary = backend.summary()
        lease_ids = LeaseIds(lease.id for lease in summary.leases)
        staging = Staging(summary.compact_revision, lease_ids)
        leases = []
        for lease in summary.leases:
            left = lease.remaining_ttl or lease.ttl
            if remaining_ttls is not None and lease.id in remaining_ttls:
                left = remaining_ttls[lease.id]
            # a lease already expired keeps a second, as geminikv's own snapshots do
            leases.append((lease_ids(lease.id), lease.ttl, max(1, left) * 1000))
        await schema.ensure_schema(conn)
        async with locks.locked(conn):
            revision, held = await loading.lock_and_measure(conn)
            if revision or held:
                raise SnapshotRefused(errors.LOAD_NOT_EMPTY.format(revision=revision, leases=held))
            await loading.copy_rows(conn, staging.rows_of(backend.revisions()))
            await kine.set_compact_rev(conn, staging.compact_id, summary.compact_revision)
            await loading.insert_leases(conn, leases)
            await loading.set_sequence(conn, staging.last_id)
    return Loaded(
        staging.revision,
        summary.compact_revision,
        staging.rows,
        len(leases),
        dict(lease_ids.renumbered),
    )
