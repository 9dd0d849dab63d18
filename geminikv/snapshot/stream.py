"""A snapshot as etcd sends it: the backend database, then the sha256 of those bytes.

etcd's ``Maintenance.Snapshot`` streams its database and ends with the sha256 of
everything before it, in a message of its own; ``etcdctl snapshot restore`` recognises the
trailer by the file's size (a database is whole pages, so size % 512 == 32 means a trailer
follows) and refuses a file whose trailer does not match.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

TRAILER_SIZE = 32
CHUNK_SIZE = 32 * 1024  # etcd's snapshot send buffer


@dataclass(frozen=True, slots=True)
class Chunk:
    """One ``SnapshotResponse``: ``remaining_bytes`` counts the database bytes still to
    come after this blob, as etcd counts them (the trailer's message says 0)."""

    blob: bytes
    remaining_bytes: int


def chunks_with_sha256(file: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[Chunk]:
    """``file``'s bytes from its start, in chunks, then their sha256 (32 bytes)."""
    remaining = file.seek(0, os.SEEK_END)
    file.seek(0)
    digest = hashlib.sha256()
    while blob := file.read(chunk_size):
        digest.update(blob)
        remaining -= len(blob)
        yield Chunk(blob, remaining)
    yield Chunk(digest.digest(), 0)


def snapshot_chunks(
    write: Callable[[BinaryIO], object], chunk_size: int = CHUNK_SIZE
) -> Iterator[Chunk]:
    """Run ``write`` on a temporary file (the meta pages are written last), then stream it.

    Memory is a chunk; the disk holds the database until the stream ends.
    """
    with tempfile.TemporaryFile(prefix="geminikv-snapshot-") as file:
        write(file)
        yield from chunks_with_sha256(file, chunk_size)


def save(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write a snapshot file as ``etcdctl snapshot save`` leaves it: database + sha256."""
    with open(path, "w+b") as file:
        write(file)
        file.seek(0)
        digest = hashlib.sha256()
        while blob := file.read(CHUNK_SIZE):
            digest.update(blob)
        file.write(digest.digest())
