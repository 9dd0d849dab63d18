"""kube-apiserver's create and update txn, ``MOD(key) == rev → Put(key) else Range(key)``,
taken from and answered in wire format (geminikv._native.txnwire): no protobuf messages
are built for the request or the answer. Every other Txn is parsed as usual."""

from __future__ import annotations

from typing import Any

from geminikv._native.txnwire import (
    GuardedPut,
    encode_answer,
    encode_header_prefix,
    parse_guarded_put,
)
from geminikv.mvcc.txn import MAX_REQUEST_BYTES
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.server.rpc import RAFT_TERM, Identity

__all__ = ["Answerer", "GuardedPut", "read_txn", "write_txn"]


def read_txn(data: bytes) -> GuardedPut | pb.TxnRequest:
    """The Txn request's deserializer (raises DecodeError on bytes that do not parse)."""
    return parse_guarded_put(data, MAX_REQUEST_BYTES) or pb.TxnRequest.FromString(data)


def write_txn(response: Any) -> bytes:
    """The Txn response's serializer: guarded puts are answered already encoded."""
    if response.__class__ is bytes:
        return response
    return response.SerializeToString()  # type: ignore[no-any-return]


class Answerer:
    """Encodes guarded put answers with this process's response header."""

    def __init__(self, identity: Identity) -> None:
        self._header = encode_header_prefix(identity.cluster_id, identity.member_id)

    def answer(
        self,
        req: GuardedPut,
        succeeded: bool,
        revision: int,
        found: tuple[int, int, int, int] | None,
        value: bytes,
    ) -> bytes:
        """``found``: on failure, the key's (mod, create, version, lease), None if absent."""
        return encode_answer(
            self._header, RAFT_TERM, succeeded, revision, req.read_on_failure, req.key, found, value
        )
