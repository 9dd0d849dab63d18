"""kube-apiserver's most frequent requests taken from and answered in protobuf wire format
(geminikv._native.kvwire), without building messages: its create and update txn,
``MOD(key) == rev → Put(key)`` (leased or not) else ``Range(key)`` or nothing, and its get
of one key.
Every other request is parsed into the generated messages as usual."""

from __future__ import annotations

from typing import Any

from geminikv._native.kvwire import (
    GuardedPut,
    KeyGet,
    encode_get_answer,
    encode_header_prefix,
    encode_txn_answer,
    parse_guarded_put,
    parse_key_get,
)
from geminikv.mvcc.txn import MAX_REQUEST_BYTES
from geminikv.mvcc.view import State
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.server.rpc import RAFT_TERM, Identity

__all__ = ["Answers", "GuardedPut", "KeyGet", "read_range", "read_txn", "write"]


def read_txn(data: bytes) -> GuardedPut | pb.TxnRequest:
    """Txn's deserializer (raises DecodeError on bytes that do not parse)."""
    return parse_guarded_put(data, MAX_REQUEST_BYTES) or pb.TxnRequest.FromString(data)


def read_range(data: bytes) -> KeyGet | pb.RangeRequest:
    """Range's deserializer (raises DecodeError on bytes that do not parse)."""
    return parse_key_get(data) or pb.RangeRequest.FromString(data)


def write(response: Any) -> bytes:
    """The serializer of both: wire-format answers come already encoded."""
    if response.__class__ is bytes:
        return response
    return response.SerializeToString()  # type: ignore[no-any-return]


CODECS = {
    "/etcdserverpb.KV/Txn": (read_txn, write),
    "/etcdserverpb.KV/Range": (read_range, write),
}


class Answers:
    """Encodes answers with this process's response header."""

    def __init__(self, identity: Identity) -> None:
        self._header = encode_header_prefix(identity.cluster_id, identity.member_id)

    def txn(
        self, req: GuardedPut, succeeded: bool, revision: int, found: State | None, value: bytes
    ) -> bytes:
        """``found``: on failure, the key's (mod, create, version, lease), None if absent."""
        return encode_txn_answer(
            self._header, RAFT_TERM, succeeded, revision, req.read_on_failure, req.key, found, value
        )

    def get(self, key: bytes, revision: int, found: State | None, value: bytes) -> bytes:
        return encode_get_answer(self._header, RAFT_TERM, revision, key, found, value)
