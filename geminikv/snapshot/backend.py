"""etcd's v3 backend database (its buckets, keys and values) written as a bbolt file.

What etcd 3.4 and 3.5 keep in their backend, and so what a snapshot holds:

- ``key``: one entry per revision of a key. The bbolt key is the revision: 8-byte
  big-endian main revision, ``_``, 8-byte big-endian sub revision, and a trailing ``t``
  for a deletion (tombstone). The value is a serialized ``mvccpb.KeyValue``; a
  tombstone's holds only the key. On start etcd rebuilds its index from this bucket: the
  current revision is the last entry's main revision (or the compact revision if later).
- ``meta``: ``consistent_index`` and (3.5) ``term``, 8-byte big-endian, (3.5)
  ``confState``, raft's voters as JSON; after a
  compaction ``scheduledCompactRev`` and ``finishedCompactRev``, each a revision (main, 0)
  in the form above.
- ``lease``: 8-byte big-endian lease id -> ``leasepb.Lease`` (ID, TTL, RemainingTTL).
  Keys are attached to leases from their KeyValue's ``lease`` when etcd starts.
- ``auth``: ``authRevision`` (8-byte big-endian; 1 in a fresh etcd); ``authUsers``,
  ``authRoles``: none here (geminikv has no auth).
- ``cluster`` (``clusterVersion``), ``members``, ``members_removed``, ``alarm``: restore
  replaces the members; a cluster version is optional (etcd writes it once it has a
  leader, and an etcd older than the version written refuses to start on the data).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from geminikv.proto.mvccpb import kv_pb2
from geminikv.snapshot.btree import FILL_PERCENT, BucketWriter, DatabaseWriter
from geminikv.snapshot.pages import PAGE_SIZE

KEY = b"key"
META = b"meta"
LEASE = b"lease"
ALARM = b"alarm"
AUTH = b"auth"
AUTH_USERS = b"authUsers"
AUTH_ROLES = b"authRoles"
CLUSTER = b"cluster"
MEMBERS = b"members"
MEMBERS_REMOVED = b"members_removed"

CONSISTENT_INDEX = b"consistent_index"
TERM = b"term"
CONF_STATE = b"confState"
SCHEDULED_COMPACT = b"scheduledCompactRev"
FINISHED_COMPACT = b"finishedCompactRev"
AUTH_REVISION = b"authRevision"
CLUSTER_VERSION = b"clusterVersion"

_U64 = struct.Struct(">Q")
_REVISION = struct.Struct(">QcQ")


def revision_key(main: int, sub: int = 0, tombstone: bool = False) -> bytes:
    """A revision as etcd stores it in the ``key`` bucket (17 bytes, 18 for a tombstone)."""
    if main < 0 or sub < 0:
        raise ValueError(f"revision ({main}, {sub}) is negative")
    return _REVISION.pack(main, b"_", sub) + (b"t" if tombstone else b"")


def parse_revision_key(key: bytes) -> tuple[int, int, bool] | None:
    """(main, sub, tombstone) of a ``key`` bucket key; None if it is not one."""
    if len(key) not in (_REVISION.size, _REVISION.size + 1) or key[8:9] != b"_":
        return None
    if len(key) > _REVISION.size and key[-1:] != b"t":
        return None
    main, _, sub = _REVISION.unpack_from(key)
    return main, sub, len(key) > _REVISION.size


@dataclass(frozen=True, slots=True)
class KeyRevision:
    """One entry of etcd's history: a put of ``key`` at (main, sub), or its deletion."""

    key: bytes
    main: int
    sub: int = 0
    value: bytes = b""
    create_revision: int = 0
    version: int = 0
    lease: int = 0
    tombstone: bool = False

    def bucket_key(self) -> bytes:
        return revision_key(self.main, self.sub, self.tombstone)

    def bucket_value(self) -> bytes:
        if self.tombstone:
            kv = kv_pb2.KeyValue(key=self.key)
        else:
            kv = kv_pb2.KeyValue(
                key=self.key,
                create_revision=self.create_revision,
                mod_revision=self.main,
                version=self.version,
                value=self.value,
                lease=self.lease,
            )
        data: bytes = kv.SerializeToString()
        return data


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as etcd persists it; ``remaining_ttl`` 0 means the whole ``ttl`` is left."""

    id: int
    ttl: int
    remaining_ttl: int = 0

    def bucket_key(self) -> bytes:
        if self.id <= 0:
            raise ValueError(f"lease id {self.id} is not positive")
        return _U64.pack(self.id)

    def bucket_value(self) -> bytes:
        # leasepb.Lease: ID = 1, TTL = 2, RemainingTTL = 3, all int64 (varints; proto3
        # leaves zeros out, as etcd's gogo-generated Marshal does)
        out = bytearray()
        for number, field in ((1, self.id), (2, self.ttl), (3, self.remaining_ttl)):
            if field:
                out.append(number << 3)
                out += _varint(field)
        return bytes(out)

    @classmethod
    def parse(cls, value: bytes) -> Lease:
        """A ``lease`` bucket value (leasepb.Lease) back into a Lease."""
        fields = {1: 0, 2: 0, 3: 0}
        at = 0
        while at < len(value):
            tag, at = _read_varint(value, at)
            if tag & 7 != 0:  # every field of leasepb.Lease is a varint
                raise ValueError(f"lease record: wire type {tag & 7} of field {tag >> 3}")
            field, at = _read_varint(value, at)
            if field >= 1 << 63:
                field -= 1 << 64  # int64, two's complement
            fields[tag >> 3] = field
        return cls(fields[1], fields[2], fields[3])


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("lease record: truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its two's complement, ten bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Meta:
    """The ``meta`` bucket: raft position (restore rewrites it) and the compact revision."""

    consistent_index: int
    term: int = 1
    compact_revision: int = 0
    # member ids for ``confState`` (etcd 3.5 keeps raft's ConfState there, as JSON; etcd
    # 3.6 tells a 3.5 backend from a 3.4 one by it and ``term``); none: not written
    voters: tuple[int, ...] = ()

    def entries(self) -> list[tuple[bytes, bytes]]:
        entries = [
            (CONSISTENT_INDEX, _U64.pack(self.consistent_index)),
            (TERM, _U64.pack(self.term)),
        ]
        if self.voters:
            voters = ",".join(str(voter) for voter in self.voters)
            entries.append((CONF_STATE, b'{"voters":[%s],"auto_leave":false}' % voters.encode()))
        if self.compact_revision:
            # a finished compaction: both marks at the same revision (etcd resumes a
            # compaction on start when scheduled is past finished)
            compacted = revision_key(self.compact_revision)
            entries += [(SCHEDULED_COMPACT, compacted), (FINISHED_COMPACT, compacted)]
        return sorted(entries)


class BackendWriter:
    """etcd's backend, written as it arrives: revisions (in order), then leases (by id).

    ``finish`` writes the small buckets, the root and the meta pages. Memory stays at one
    page per tree level whatever the number of revisions.
    """

    def __init__(
        self, file: BinaryIO, page_size: int = PAGE_SIZE, fill_percent: float = FILL_PERCENT
    ) -> None:
        self.db = DatabaseWriter(file, page_size, fill_percent)
        self.keys: BucketWriter | None = self.db.open_bucket(KEY)
        self.leases: BucketWriter | None = None
        self.revision = 0

    def add_revision(self, entry: KeyRevision) -> None:
        if self.keys is None:
            raise ValueError("revisions come before leases")
        self.keys.put(entry.bucket_key(), entry.bucket_value())
        self.revision = entry.main

    def add_lease(self, lease: Lease) -> None:
        if self.leases is None:
            self.db.close_bucket()
            self.keys = None
            self.leases = self.db.open_bucket(LEASE)
        self.leases.put(lease.bucket_key(), lease.bucket_value())

    def finish(
        self,
        meta: Meta,
        *,
        cluster_version: str | None = None,
        members: Iterable[tuple[bytes, bytes]] = (),
    ) -> int:
        """Close the database; its size in bytes (without the sha256 trailer)."""
        self.db.close_bucket()
        small: dict[bytes, list[tuple[bytes, bytes]]] = {
            ALARM: [],
            AUTH: [(AUTH_REVISION, _U64.pack(1))],
            AUTH_ROLES: [],
            AUTH_USERS: [],
            CLUSTER: [(CLUSTER_VERSION, cluster_version.encode())] if cluster_version else [],
            MEMBERS: sorted(members),
            MEMBERS_REMOVED: [],
            META: meta.entries(),
        }
        if self.leases is None:
            small[LEASE] = []
        for name, entries in small.items():
            with self.db.bucket(name) as bucket:
                for key, value in entries:
                    bucket.put(key, value)
        return self.db.finish()


def write_backend(
    file: BinaryIO,
    revisions: Iterable[KeyRevision],
    leases: Iterable[Lease],
    meta: Meta,
    *,
    cluster_version: str | None = None,
) -> int:
    """Write a whole etcd backend to ``file`` (seekable); its size in bytes."""
    writer = BackendWriter(file)
    for entry in revisions:
        writer.add_revision(entry)
    for lease in leases:
        writer.add_lease(lease)
    return writer.finish(meta, cluster_version=cluster_version)
