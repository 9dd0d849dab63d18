"""etcd v3 snapshots out: etcd's backend database (bbolt) with etcd's sha256 trailer.

``pages`` is bbolt's page format, ``btree`` writes a bbolt file front to back in bounded
memory, ``backend`` lays out etcd's buckets in it, ``stream`` adds the trailer.
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
