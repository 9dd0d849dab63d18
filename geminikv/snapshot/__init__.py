"""etcd v3 snapshots: etcd's backend database (bbolt) with etcd's sha256 trailer.

Out: ``pages`` is bbolt's page format, ``btree`` writes a bbolt file front to back in
bounded memory, ``backend`` lays out etcd's buckets in it, ``stream`` adds the trailer.
In: ``reader`` reads such a file back, ``load`` puts its revisions into an empty database
(``geminikv load-snapshot``), ``pull`` takes one from a live etcd.
"""

from geminikv.snapshot.backend import BackendWriter, KeyRevision, Lease, Meta, write_backend
from geminikv.snapshot.stream import Chunk, chunks_with_sha256, save, snapshot_chunks

__all__ = [
    "BackendWriter",
    "Chunk",
    "KeyRevision",
    "Lease",
    "Meta",
    "chunks_with_sha256",
    "save",
    "snapshot_chunks",
    "write_backend",
]
