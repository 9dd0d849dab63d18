"""What a reliability run records: every client call with its outcome, and every watch.

Times are ``time.monotonic_ns()`` taken by the client around the call. Requests and
responses are the etcd protobuf messages (``geminikv.proto.etcdserverpb.rpc_pb2``).
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geminikv.proto.authpb
import geminikv.proto.etcdserverpb
import geminikv.proto.mvccpb
from geminikv.proto.authpb import auth_pb2
from geminikv.proto.etcdserverpb import rpc_pb2
from geminikv.proto.mvccpb import kv_pb2

# gRPC codes after which a write has certainly not been applied (etcd rejects these
# before proposing); after any other error (Unavailable, DeadlineExceeded, a dropped
# connection) the write may or may not have been applied.
DEFINITE_FAILURES = frozenset(
    {"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND"}
)


@dataclass(slots=True)
class Operation:
    client: int
    call: int  # monotonic_ns before sending
    ret: int | None  # monotonic_ns after the answer; None when the outcome is unknown
    kind: str  # "range" | "put" | "delete" | "txn" | "lease_grant" | "lease_revoke"
    # RangeRequest | PutRequest | DeleteRangeRequest | TxnRequest | LeaseGrantRequest |
    # LeaseRevokeRequest
    request: Any
    response: Any | None = None  # the response message when the call succeeded
    error: str | None = None  # gRPC status code name when it failed

    @property
    def unknown(self) -> bool:
        """A failed call that may still have been applied."""
        return self.response is None and self.error not in DEFINITE_FAILURES


@dataclass(slots=True)
class WatchRecord:
    """One watcher: its create request and every response it received, in order.

    A watcher whose stream broke is resumed by a *new* record starting at the revision
    after the last one it saw (``resumed`` = True)."""

    client: int
    request: Any  # WatchCreateRequest
    responses: list[tuple[int, Any]] = field(default_factory=list)  # (monotonic_ns, WatchResponse)
    resumed: bool = False
    # why it ended: "closed" (the client closed it), "broken" (stream error), "canceled"
    ended: str = "closed"


@dataclass(slots=True)
class History:
    """A run: the key prefix it used, the revision before its first write, its calls and
    watches, and ``complete``: a watch over the whole prefix from ``base_revision + 1``
    taken after the run (the table's own record of every change)."""

    prefix: bytes
    base_revision: int
    operations: list[Operation] = field(default_factory=list)
    watches: list[WatchRecord] = field(default_factory=list)
    complete: WatchRecord | None = None
    # revisions consumed by a write: "txn" = one per write whatever it changes (etcd, and
    # geminikv: docs/architecture.md#revisions); "key" = one per changed key, consecutive
    # (Kine's, and geminikv's before; kept so the checker covers both)
    revisions: str = "txn"


def save(history: History, path: Path) -> None:
    """Keep a history for a post-mortem (``load`` reads it back)."""
    _alias_protobuf_modules()
    path.write_bytes(pickle.dumps(history))


def load(path: Path) -> History:
    _alias_protobuf_modules()
    history = pickle.loads(path.read_bytes())
    assert isinstance(history, History)
    return history


def _alias_protobuf_modules() -> None:
    # The generated classes name their modules by the .proto packages
    # ("etcdserverpb.rpc_pb2"), which is where pickle looks them up.
    for package, module in (
        (geminikv.proto.etcdserverpb, rpc_pb2),
        (geminikv.proto.mvccpb, kv_pb2),
        (geminikv.proto.authpb, auth_pb2),
    ):
        name = package.__name__.rsplit(".", 1)[1]
        sys.modules.setdefault(name, package)
        sys.modules.setdefault(f"{name}.{module.__name__.rsplit('.', 1)[1]}", module)
