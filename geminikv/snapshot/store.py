"""A snapshot of the store: one consistent read of Kine's table, written as etcd's backend
and streamed as ``Maintenance.Snapshot`` sends it (docs/architecture.md#snapshot-request).

The rows are read in one REPEATABLE READ READ ONLY transaction, so the file is the table
at one revision R whatever is written meanwhile. Each row is one key's change at its etcd
revision (main: the row's revision, sub: its place among that revision's rows); rows etcd
would have compacted away are left out by the query. The bbolt
writer is synchronous: rows go to it in batches on a worker thread, so the event loop
keeps serving; it writes a temporary file (its meta pages come last), which is then
streamed in chunks and ends with the sha256. Memory: a batch of rows, a page per tree
level, a chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from collections.abc import AsyncIterator
from typing import BinaryIO

import asyncpg

from geminikv import errors
from geminikv.config import SNAPSHOT_PREFETCH
from geminikv.mvcc.keys import key_of
from geminikv.mvcc.kvstore import KVStore
from geminikv.snapshot.backend import BackendWriter, KeyRevision, Lease, Meta
from geminikv.snapshot.stream import Chunk, chunks_with_sha256
from geminikv.storage import kine, leases
from geminikv.storage.rows import CREATE, MOD, VERSION, Row

log = logging.getLogger(__name__)


async def snapshot(store: KVStore, term: int, member_id: int) -> AsyncIterator[Chunk]:
    """The store at one revision as etcd's snapshot stream: database chunks, then sha256."""
    with tempfile.TemporaryFile(prefix="geminikv-snapshot-") as file:
        started = time.monotonic()
        revision = await write(store, file, term, member_id)
        size = file.tell()
        log.info(
            "snapshot at revision %d: %d bytes written in %.2fs",
            revision,
            size,
            time.monotonic() - started,
        )
        for chunk in chunks_with_sha256(file):
            yield chunk


async def write(store: KVStore, file: BinaryIO, term: int, member_id: int) -> int:
    """Write the backend database to ``file``; the revision it holds."""
    writer = BackendWriter(file)
    async with store.pool.acquire() as conn, kine.consistent_read(conn):
        upto, compacted = await kine.snapshot_revisions(conn)
        versions = Versions(store, upto)
        revision, compact_revision = await versions.revisions(conn)
        batch: list[KeyRevision] = []
        last = 0
        async for row in kine.snapshot_rows(conn, upto, compacted):
            batch.append(await versions.key_revision(row))
            last = row.id
            if len(batch) >= SNAPSHOT_PREFETCH:
                await asyncio.to_thread(_add, writer, batch)
                batch = []
        if last < upto:
            # R changed no visible key (a gap or compact_rev_key row): etcd takes its current
            # revision from the last entry, so a tombstone of a key never put carries it
            batch.append(KeyRevision(b"gap-%d" % revision, revision, tombstone=True))
        await asyncio.to_thread(_add, writer, batch)
        held = await leases.snapshot(conn)
    for lease_id, ttl, left_ms in held:
        # an expired lease not yet revoked keeps 1 s (etcd expires it at once); etcd reads a
        # remaining TTL of 0 as the whole TTL
        writer.add_lease(Lease(lease_id, ttl, max(1, math.ceil(left_ms / 1000))))
    meta = Meta(
        consistent_index=revision,
        term=term,
        compact_revision=compact_revision,
        voters=(member_id,),
    )
    await asyncio.to_thread(writer.finish, meta)
    return revision


def _add(writer: BackendWriter, batch: list[KeyRevision]) -> None:
    for entry in batch:
        writer.add_revision(entry)


class Versions:
    """Each row's etcd revision (main, sub), create revision and version, for a read of the
    table up to row ``upto``. A row's revision is its column, or its id; its sub revision
    its place among the rows of that revision (docs/architecture.md#revisions). geminikv's
    rows carry create revision and version; Go Kine's rows have a NULL version, so the
    index gives them (it holds every retained revision)."""

    def __init__(self, store: KVStore, upto: int) -> None:
        self.store = store
        self.upto = upto

    async def revisions(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """(the etcd revision of row ``upto``, the compact revision), in the read's
        snapshot; the index then holds every row up to ``upto``."""
        await self._applied()
        rid, revision = await kine.compact_revs(conn)
        index = self.store.index
        return index.revision_of(self.upto), index.revision_of(rid) if revision is None else (
            revision
        )

    async def _applied(self) -> None:
        if self.store.follower.applied < self.upto:
            await self.store.follower.wait_for(self.upto)

    async def key_revision(self, row: Row) -> KeyRevision:
        key = key_of(row.name)
        main, sub = row.id, 0
        if row.revision is not None:
            await self._applied()
            main = row.revision
            sub = row.id - self.store.index.id_at(main - 1) - 1
        if row.deleted:
            return KeyRevision(key, main, sub, tombstone=True)
        value = row.value or b""
        if row.version is not None and row.version > 0:
            create = main if row.created else row.create_revision
            return KeyRevision(key, main, sub, value, create, row.version, row.lease)
        await self._applied()
        state = self.store.index.get(key, row.id)
        if state is None or state[MOD] != row.id:
            # compacted out of the index since the read began: try again
            raise errors.Unavailable()
        return KeyRevision(key, main, sub, value, state[CREATE], state[VERSION], row.lease)
