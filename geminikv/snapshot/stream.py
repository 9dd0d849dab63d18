"""A snapshot as etcd sends it: the backend database, then the sha256 of those bytes.

etcd's ``Maintenance.Snapshot`` streams its database and ends with the sha256 of
everything before it; ``etcdctl snapshot restore`` recognises the trailer by the file's
size (a database is whole pages, so size % 512 == 32 means a trailer follows) and refuses
a file whose trailer does not match.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

TRAILER_SIZE = 32
CHUNK_SIZE = 32 * 1024  # etcd's snapshot send buffer


def chunks_with_sha256(file: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """``file``'s bytes from where it stands, in chunks, then their sha256 (32 bytes)."""
    digest = hashlib.sha256()
    while chunk := file.read(chunk_size):
        digest.update(chunk)
        yield chunk
    yield digest.digest()


def snapshot_chunks(
    write: Callable[[BinaryIO], object], chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """Run ``write`` on a temporary file (the meta pages are written last), then stream it.

    Memory is a chunk; the disk holds the database until the stream ends.
    """
    with tempfile.TemporaryFile(prefix="geminikv-snapshot-") as file:
        write(file)
        file.seek(0)
        yield from chunks_with_sha256(file, chunk_size)


def save(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write a snapshot file as ``etcdctl snapshot save`` leaves it: database + sha256."""
    with open(path, "w+b") as file:
        write(file)
        file.seek(0)
        digest = hashlib.sha256()
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
        file.write(digest.digest())
