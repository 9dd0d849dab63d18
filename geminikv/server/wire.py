"""kube-apiserver's most frequent requests taken from and answered in protobuf wire format
(geminikv._native.kvwire), without building messages: its create and update txn,
``MOD(key) == rev → Put(key)`` (leased or not) else ``Range(key)`` or nothing, its delete
txn (the same with ``DeleteRange(key)``), and its get of one key.
Every other request is parsed into the generated messages as usual."""

from __future__ import annotations

from functools import partial
from typing import Any

from geminikv._native.kvwire import (
    GuardedPut,
    KeyGet,
    encode_get_answer,
    encode_header_prefix,
    encode_range_answer,
    encode_txn_answer,
    parse_guarded_put,
    parse_key_get,
)
from geminikv.config import MAX_REQUEST_BYTES
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
    """The wire-format answers, with this process's response header: ``txn(request,
    succeeded, revision, found, value)`` for a GuardedPut, ``get(key, revision, found,
    value)`` for a KeyGet (``found``: the key's (mod, create, version, lease) or None),
    ``range(revision, entries, values, count, more, revision_of)`` for any other Range
    (KVStore.range's answer)."""

    def __init__(self, identity: Identity) -> None:
        header = encode_header_prefix(identity.cluster_id, identity.member_id)
        # The encoders with the header bound (partial is C): no Python frame per answer.
        self.txn = partial(encode_txn_answer, header, RAFT_TERM)
        self.get = partial(encode_get_answer, header, RAFT_TERM)
        self.range = partial(encode_range_answer, header, RAFT_TERM)
