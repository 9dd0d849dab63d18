"""Protobuf messages to the model's types and back (the back direction is for building
synthetic histories in tests)."""

from __future__ import annotations

from typing import Any

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from tests.reliability.model import (
    DELETE,
    KV,
    PUT,
    Change,
    DeleteResult,
    PutResult,
    RangeResult,
    Result,
    RevokeResult,
    TxnResult,
)

# -- protobuf -> model ----------------------------------------------------------------------


def kv_of(msg: kv_pb2.KeyValue) -> KV:
    return KV(msg.key, msg.create_revision, msg.mod_revision, msg.version, msg.value, msg.lease)


def change_of(event: kv_pb2.Event) -> Change:
    return Change(DELETE if event.type == kv_pb2.Event.DELETE else PUT, kv_of(event.kv))


def prev_of(event: kv_pb2.Event) -> KV | None:
    return kv_of(event.prev_kv) if event.HasField("prev_kv") else None


def result_of(kind: str, response: Any) -> Result | None:
    """What a response says (its header aside), as the model would say it."""
    if kind == "range":
        return RangeResult(tuple(kv_of(kv) for kv in response.kvs), response.count, response.more)
    if kind == "put":
        return PutResult(kv_of(response.prev_kv) if response.HasField("prev_kv") else None)
    if kind == "delete":
        return DeleteResult(response.deleted, tuple(kv_of(kv) for kv in response.prev_kvs))
    if kind == "txn":
        out: list[RangeResult | PutResult | DeleteResult] = []
        for op in response.responses:
            which = op.WhichOneof("response")
            inner = {
                "response_range": "range",
                "response_put": "put",
                "response_delete_range": "delete",
            }.get(which or "")
            if inner is None:
                raise ValueError(f"txn response {which} is not modelled")
            result = result_of(inner, getattr(op, which or ""))
            assert isinstance(result, RangeResult | PutResult | DeleteResult)
            out.append(result)
        return TxnResult(response.succeeded, tuple(out))
    if kind == "lease_revoke":
        return RevokeResult()
    return None


# -- model -> protobuf ----------------------------------------------------------------------


def kv_to_pb(kv: KV) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(
        key=kv.key,
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        value=kv.value,
        lease=kv.lease,
    )


def event_to_pb(change: Change, prev: KV | None = None) -> kv_pb2.Event:
    kind = kv_pb2.Event.PUT if change.type == PUT else kv_pb2.Event.DELETE
    event = kv_pb2.Event(type=kind, kv=kv_to_pb(change.kv))
    if prev is not None:
        event.prev_kv.CopyFrom(kv_to_pb(prev))
    return event


def response_to_pb(result: Result, revision: int) -> Any:
    """The response message for a result, its header at ``revision``."""
    resp: Any
    if isinstance(result, RangeResult):
        resp = pb.RangeResponse(
            kvs=[kv_to_pb(kv) for kv in result.kvs], count=result.count, more=result.more
        )
    elif isinstance(result, PutResult):
        resp = pb.PutResponse()
        if result.prev_kv is not None:
            resp.prev_kv.CopyFrom(kv_to_pb(result.prev_kv))
    elif isinstance(result, DeleteResult):
        resp = pb.DeleteRangeResponse(
            deleted=result.deleted, prev_kvs=[kv_to_pb(kv) for kv in result.prev_kvs]
        )
    elif isinstance(result, TxnResult):
        resp = pb.TxnResponse(succeeded=result.succeeded)
        for inner in result.responses:
            op = resp.responses.add()
            field = {RangeResult: "response_range", PutResult: "response_put"}.get(
                type(inner), "response_delete_range"
            )
            getattr(op, field).CopyFrom(response_to_pb(inner, revision))
    else:
        resp = pb.LeaseRevokeResponse()
    resp.header.revision = revision
    return resp
