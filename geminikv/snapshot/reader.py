"""etcd v3 snapshots in: a snapshot file read back, page by page, in bounded memory.

The inverse of ``backend.py`` and ``btree.py``: the sha256 trailer checked (``stream.py``),
bbolt's meta pages validated as bbolt validates them (magic, version, FNV-64a checksum;
the valid one with the higher transaction id wins), then etcd's buckets walked in key
order from the root. bbolt checksums only its meta pages, so every other page is checked
for what can be checked: its header names its own id, it lies within the file and below
the high-water mark, its type is the one its parent implies, its elements lie inside it.
Memory is one page per tree level; nothing of the file is kept once read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv import errors
from geminikv.proto.mvccpb import kv_pb2
from geminikv.snapshot.backend import (
    FINISHED_COMPACT,
    KEY,
    LEASE,
    META,
    SCHEDULED_COMPACT,
    KeyRevision,
    Lease,
    parse_revision_key,
)
from geminikv.snapshot.pages import (
    BRANCH_ELEMENT,
    BRANCH_PAGE,
    BUCKET_HEADER,
    BUCKET_LEAF,
    CHECKSUM,
    ELEMENT_SIZE,
    LEAF_ELEMENT,
    LEAF_PAGE,
    MAGIC,
    META_FIELDS,
    META_PAGE,
    PAGE_HEADER,
    PAGE_SIZE,
    VERSION,
    fnv64a,
)
from geminikv.snapshot.stream import CHUNK_SIZE, TRAILER_SIZE


class SnapshotRefused(Exception):
    """The snapshot cannot be loaded (the message says why); nothing was written."""


def check_trailer(file: BinaryIO, path: str, skip_hash_check: bool = False) -> int:
    """Check etcd's sha256 trailer as ``etcdctl snapshot restore`` does; the size of the
    database before it. Without the check, a file with no trailer is a bare database."""
    size = file.seek(0, os.SEEK_END)
    has_trailer = size % 512 == TRAILER_SIZE
    if not has_trailer:
        if skip_hash_check:
            return size
        raise SnapshotRefused(errors.LOAD_NO_TRAILER.format(path=path, size=size))
    database = size - TRAILER_SIZE
    if skip_hash_check:
        return database
    file.seek(0)
    digest = hashlib.sha256()
    left = database
    while left:
        blob = file.read(min(CHUNK_SIZE, left))
        if not blob:
            break
        digest.update(blob)
        left -= len(blob)
    if digest.digest() != file.read(TRAILER_SIZE):
        raise SnapshotRefused(errors.LOAD_HASH_MISMATCH.format(path=path, size=database))
    return database


@dataclass(frozen=True, slots=True)
class MetaPage:
    page_size: int
    root: int  # the root bucket's page
    high_water: int  # pages in use: every page id is below it
    txid: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What loading needs besides the revisions: the compact revision and the leases."""

    compact_revision: int
    leases: list[Lease]


class BoltReader:
    """A bbolt file's buckets, read on demand from ``file`` (its first ``size`` bytes)."""

    def __init__(self, file: BinaryIO, size: int, path: str) -> None:
        self.file = file
        self.size = size
        self.path = path
        self.meta = self._meta()

    def _refuse(self, why: str) -> SnapshotRefused:
        return SnapshotRefused(errors.LOAD_CORRUPT.format(path=self.path, why=why))

    def _meta(self) -> MetaPage:
        """bbolt's choice: of the two meta pages, the valid one with the higher txid."""
        found: list[MetaPage] = []
        problems: list[str] = []
        page_size = PAGE_SIZE
        for page_id in (0, 1):
            meta, problem = self._read_meta(page_id, page_size)
            if meta is not None:
                found.append(meta)
                page_size = meta.page_size
            else:
                problems.append(f"page {page_id}: {problem}")
        if not found:
            why = "; ".join(problems)
            if any("checksum" in p for p in problems):
                raise self._refuse(why)
            raise SnapshotRefused(errors.LOAD_NOT_BBOLT.format(path=self.path, why=why))
        return max(found, key=lambda meta: meta.txid)

    def _read_meta(self, page_id: int, page_size: int) -> tuple[MetaPage | None, str]:
        self.file.seek(page_id * page_size)
        data = self.file.read(ELEMENT_SIZE + META_FIELDS.size + CHECKSUM.size)
        if len(data) < ELEMENT_SIZE + META_FIELDS.size + CHECKSUM.size:
            return None, "beyond the end of the file"
        _, flags, _, _ = PAGE_HEADER.unpack_from(data)
        fields = data[ELEMENT_SIZE : ELEMENT_SIZE + META_FIELDS.size]
        magic, version, size, _, root, _, _, high_water, txid = META_FIELDS.unpack(fields)
        (checksum,) = CHECKSUM.unpack_from(data, ELEMENT_SIZE + META_FIELDS.size)
        if magic != MAGIC or not flags & META_PAGE:
            return None, "bad magic"
        if version != VERSION:
            return None, f"bbolt file format {version}, not {VERSION}"
        if checksum != 0 and checksum != fnv64a(fields):
            return None, "meta page checksum mismatch"
        if size < 1024 or size & (size - 1):
            return None, f"page size {size}"
        if high_water * size > self.size:
            return None, f"{high_water} pages of {size} bytes, the file has {self.size} bytes"
        return MetaPage(size, root, high_water, txid), ""

    def _page(self, page_id: int, expect: int) -> tuple[int, int, bytes]:
        """(flags, element count, the page's bytes) of a branch or leaf page."""
        size = self.meta.page_size
        if not 2 <= page_id < self.meta.high_water:
            raise self._refuse(f"page {page_id} outside the file's {self.meta.high_water}")
        self.file.seek(page_id * size)
        data = self.file.read(size)
        if len(data) < size:
            raise self._refuse(f"page {page_id} beyond the end of the file")
        stored_id, flags, count, overflow = PAGE_HEADER.unpack_from(data)
        if stored_id != page_id or not flags & expect:
            raise self._refuse(f"page {page_id}: header says page {stored_id}, flags {flags:#x}")
        if overflow:
            if page_id + overflow >= self.meta.high_water:
                raise self._refuse(f"page {page_id} runs past the high-water mark")
            data += self.file.read(overflow * size)
        return flags, count, data

    def _elements(self, data: bytes, count: int, at: int = 0) -> Iterator[tuple[int, bytes, bytes]]:
        """A leaf page image's (flags, key, value) elements, bounds checked."""
        for i in range(count):
            element_at = at + ELEMENT_SIZE + ELEMENT_SIZE * i
            if element_at + ELEMENT_SIZE > len(data):
                raise self._refuse("a leaf element lies outside its page")
            flags, pos, key_size, value_size = LEAF_ELEMENT.unpack_from(data, element_at)
            start = element_at + pos
            end = start + key_size + value_size
            if end > len(data):
                raise self._refuse("a leaf's key or value lies outside its page")
            yield flags, data[start : start + key_size], data[start + key_size : end]

    def _walk(self, page_id: int) -> Iterator[tuple[int, bytes, bytes]]:
        """Every (flags, key, value) of the tree rooted at ``page_id``, in key order."""
        flags, count, data = self._page(page_id, BRANCH_PAGE | LEAF_PAGE)
        if flags & LEAF_PAGE:
            yield from self._elements(data, count)
            return
        children = []
        for i in range(count):
            element_at = ELEMENT_SIZE + ELEMENT_SIZE * i
            if element_at + ELEMENT_SIZE > len(data):
                raise self._refuse(f"branch page {page_id}: an element lies outside it")
            _, _, child = BRANCH_ELEMENT.unpack_from(data, element_at)
            children.append(child)
        for child in children:
            yield from self._walk(child)

    def bucket(self, value: bytes) -> Iterator[tuple[int, bytes, bytes]]:
        """A bucket's elements from its value in the parent: a root page, or inline."""
        if len(value) < BUCKET_HEADER.size:
            raise self._refuse("a bucket header is cut short")
        root, _ = BUCKET_HEADER.unpack_from(value)
        if root:
            yield from self._walk(root)
            return
        inline = value[BUCKET_HEADER.size :]
        if len(inline) < ELEMENT_SIZE:
            raise self._refuse("an inline bucket is cut short")
        _, flags, count, _ = PAGE_HEADER.unpack_from(inline)
        if not flags & LEAF_PAGE:
            raise self._refuse(f"an inline bucket's page has flags {flags:#x}")
        yield from self._elements(inline, count)

    def top_level(self) -> dict[bytes, bytes]:
        """The root bucket: top-level bucket name -> its value (a bucket header)."""
        return {
            key: value
            for flags, key, value in self.bucket(BUCKET_HEADER.pack(self.meta.root, 0))
            if flags & BUCKET_LEAF
        }


class EtcdBackend:
    """etcd's buckets in a bbolt file: the leases, the compact revision, the revisions."""

    def __init__(self, file: BinaryIO, size: int, path: str) -> None:
        self.bolt = BoltReader(file, size, path)
        self.path = path
        self.buckets = self.bolt.top_level()
        for name in (KEY, META):
            if name not in self.buckets:
                raise SnapshotRefused(errors.LOAD_NOT_ETCD.format(path=path, bucket=name.decode()))

    def _entries(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        value = self.buckets.get(name)
        if value is None:
            return
        for flags, key, data in self.bolt.bucket(value):
            if not flags & BUCKET_LEAF:
                yield key, data

    def summary(self) -> Snapshot:
        meta = dict(self._entries(META))
        compact = 0
        for mark in (SCHEDULED_COMPACT, FINISHED_COMPACT):
            if mark in meta:
                parsed = parse_revision_key(meta[mark])
                if parsed is None:
                    raise self.bolt._refuse(f"meta {mark.decode()} is {meta[mark]!r}")
                # a compaction scheduled but not finished is resumed by etcd on start
                compact = max(compact, parsed[0])
        leases = []
        for key, data in self._entries(LEASE):
            try:
                leases.append(Lease.parse(data))
            except ValueError as err:
                raise self.bolt._refuse(f"lease {key.hex()}: {err}") from None
        return Snapshot(compact, leases)

    def revisions(self) -> Iterator[KeyRevision]:
        """The ``key`` bucket in revision order, each entry decoded."""
        last = (0, -1)
        for key, data in self._entries(KEY):
            parsed = parse_revision_key(key)
            if parsed is None:
                raise self.bolt._refuse(f"key bucket entry {key!r} is not a revision")
            main, sub, tombstone = parsed
            if (main, sub) <= last:
                raise self.bolt._refuse(f"revision {main}.{sub} out of order")
            last = (main, sub)
            kv = kv_pb2.KeyValue()
            try:
                kv.ParseFromString(data)
            except DecodeError as err:
                raise self.bolt._refuse(f"revision {main}.{sub}: {err}") from None
            if tombstone:
                yield KeyRevision(kv.key, main, sub, tombstone=True)
            else:
                yield KeyRevision(
                    kv.key, main, sub, kv.value, kv.create_revision, kv.version, kv.lease
                )
