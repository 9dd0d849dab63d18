"""etcd's hash of its keyspace, ``Maintenance.HashKV``, over the entries a snapshot holds
(docs/architecture.md#hashkv-request).

etcd 3.4 and 3.5 hash the ``key`` bucket of their backend with CRC-32C (Castagnoli): the
bucket's name, then each entry's bbolt key and value (``backend.KeyRevision``) in bucket
order, taking of the entries with a main revision up to the requested revision R:

- every one above the compact revision C;
- at or below C, those a compaction at C left (a key's last revision if it is a put), and
  of these only the ones a compaction at R would keep (the key's last revision up to R),
  unless no key exists at R: etcd then skips none of them.

R 0 is the current revision; R at or below C fails with ``ErrCompacted`` as in etcd up to
3.4.26 and 3.5.9 (later ones answer R = C, 3.5 with a hash it may have stored while
compacting, which depends on the process's past), R above the current revision with
``ErrFutureRev``; a negative R hashes the bucket name alone. The answer carries the current
revision and C, -1 before any compaction (etcd's starting value).

``Maintenance.Hash`` is etcd's CRC-32C of its whole backend file, raft and member metadata
included, which no two clusters share; geminikv answers the hash HashKV gives at the
current revision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import google_crc32c

from geminikv import errors
from geminikv.config import SNAPSHOT_PREFETCH
from geminikv.mvcc.kvstore import KVStore
from geminikv.snapshot.backend import KEY, KeyRevision
from geminikv.snapshot.store import Versions
from geminikv.storage import hashkv, kine

NEVER_COMPACTED = -1  # etcd's compact revision before its first compaction


@dataclass(frozen=True, slots=True)
class KVHash:
    hash: int
    revision: int  # the current revision, for the response header
    compact_revision: int


class KeyBucketHash:
    """CRC-32C of the ``key`` bucket's name and the entries given to ``add``, in order."""

    def __init__(self) -> None:
        self.crc: int = google_crc32c.value(KEY)

    def add(self, entries: Sequence[KeyRevision]) -> None:
        crc = self.crc
        for entry in entries:
            crc = google_crc32c.extend(crc, entry.bucket_key())
            crc = google_crc32c.extend(crc, entry.bucket_value())
        self.crc = crc


async def hash_kv(store: KVStore, revision: int) -> KVHash:
    """etcd's HashKV at ``revision`` (0: the current one), from one consistent read."""
    hasher = KeyBucketHash()
    async with store.pool.acquire() as conn, kine.consistent_read(conn):
        newest, compacted = await kine.snapshot_revisions(conn)
        current, compact_revision = await Versions(store, newest).revisions(conn)
        if 0 < revision <= compact_revision:
            raise errors.Compacted()
        if revision > current:
            raise errors.FutureRevision()
        # row ids from here on (docs/architecture.md#revisions)
        upto = store.index.id_at(revision) if revision > 0 else newest
        if revision >= 0 and upto > 0:
            # etcd keeps a compacted key's entry only while no newer one exists at R, but
            # keeps them all when no key exists at R (its set of entries to keep is empty)
            keep_until = upto if await hashkv.any_live(conn, upto) else compacted
            versions = Versions(store, upto)
            batch: list[KeyRevision] = []
            async for row in hashkv.rows(conn, upto, compacted, keep_until):
                batch.append(await versions.key_revision(row))
                if len(batch) >= SNAPSHOT_PREFETCH:
                    # serialising and hashing off the event loop
                    await asyncio.to_thread(hasher.add, batch)
                    batch = []
            hasher.add(batch)
    return KVHash(hasher.crc, current, compact_revision or NEVER_COMPACTED)
