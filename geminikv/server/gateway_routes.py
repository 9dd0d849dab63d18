"""What etcd's gRPC-JSON gateway serves: each /v3/ path, the RPC behind it, and the JSON.

The paths are etcd 3.5's google.api.http bindings (api/etcdserverpb/rpc.proto), extra
bindings included; the JSON is grpc-gateway v1's as etcd configures it: proto field names
as written in the .proto (``cluster_id``, ``grantedTTL``), fields at their default value
left out, 64-bit integers as strings, bytes as base64, enums by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

# path -> (service, method); etcd 3.4 maps HashKV to /v3/maintenance/hash (shadowed by
# Hash there) and has no Downgrade or AuthStatus binding: geminikv answers as 3.5.
_BINDINGS: dict[str, tuple[str, str]] = {
    "/v3/kv/range": ("KV", "Range"),
    "/v3/kv/put": ("KV", "Put"),
    "/v3/kv/deleterange": ("KV", "DeleteRange"),
    "/v3/kv/txn": ("KV", "Txn"),
    "/v3/kv/compaction": ("KV", "Compact"),
    "/v3/watch": ("Watch", "Watch"),
    "/v3/lease/grant": ("Lease", "LeaseGrant"),
    "/v3/lease/revoke": ("Lease", "LeaseRevoke"),
    "/v3/kv/lease/revoke": ("Lease", "LeaseRevoke"),
    "/v3/lease/keepalive": ("Lease", "LeaseKeepAlive"),
    "/v3/lease/timetolive": ("Lease", "LeaseTimeToLive"),
    "/v3/kv/lease/timetolive": ("Lease", "LeaseTimeToLive"),
    "/v3/lease/leases": ("Lease", "LeaseLeases"),
    "/v3/kv/lease/leases": ("Lease", "LeaseLeases"),
    "/v3/cluster/member/add": ("Cluster", "MemberAdd"),
    "/v3/cluster/member/remove": ("Cluster", "MemberRemove"),
    "/v3/cluster/member/update": ("Cluster", "MemberUpdate"),
    "/v3/cluster/member/list": ("Cluster", "MemberList"),
    "/v3/cluster/member/promote": ("Cluster", "MemberPromote"),
    "/v3/maintenance/alarm": ("Maintenance", "Alarm"),
    "/v3/maintenance/status": ("Maintenance", "Status"),
    "/v3/maintenance/defragment": ("Maintenance", "Defragment"),
    "/v3/maintenance/hash": ("Maintenance", "Hash"),
    "/v3/maintenance/hashkv": ("Maintenance", "HashKV"),
    "/v3/maintenance/snapshot": ("Maintenance", "Snapshot"),
    "/v3/maintenance/transfer-leadership": ("Maintenance", "MoveLeader"),
    "/v3/maintenance/downgrade": ("Maintenance", "Downgrade"),
    "/v3/auth/enable": ("Auth", "AuthEnable"),
    "/v3/auth/disable": ("Auth", "AuthDisable"),
    "/v3/auth/status": ("Auth", "AuthStatus"),
    "/v3/auth/authenticate": ("Auth", "Authenticate"),
    "/v3/auth/user/add": ("Auth", "UserAdd"),
    "/v3/auth/user/get": ("Auth", "UserGet"),
    "/v3/auth/user/list": ("Auth", "UserList"),
    "/v3/auth/user/delete": ("Auth", "UserDelete"),
    "/v3/auth/user/changepw": ("Auth", "UserChangePassword"),
    "/v3/auth/user/grant": ("Auth", "UserGrantRole"),
    "/v3/auth/user/revoke": ("Auth", "UserRevokeRole"),
    "/v3/auth/role/add": ("Auth", "RoleAdd"),
    "/v3/auth/role/get": ("Auth", "RoleGet"),
    "/v3/auth/role/list": ("Auth", "RoleList"),
    "/v3/auth/role/delete": ("Auth", "RoleDelete"),
    "/v3/auth/role/grant": ("Auth", "RoleGrantPermission"),
    "/v3/auth/role/revoke": ("Auth", "RoleRevokePermission"),
}


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # the gRPC method path, /etcdserverpb.KV/Range
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def _route(service: str, name: str) -> Route:
    method = pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]
    return Route(
        f"/etcdserverpb.{service}/{name}",
        getattr(pb, method.input_type.name),
        getattr(pb, method.output_type.name),
        method.client_streaming,
        method.server_streaming,
    )


ROUTES: dict[str, Route] = {path: _route(*rpc) for path, rpc in _BINDINGS.items()}


class BadJson(ValueError):
    """A request body grpc-gateway's JSON decoder would refuse."""


def to_json(message: Message) -> dict[str, Any]:
    value: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return value


def dumps(value: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it: non-ASCII as UTF-8, but <, >, & and
    the two JavaScript line separators escaped (they occur only inside strings)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_ESCAPES).encode()


_GO_ESCAPES = str.maketrans({c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"})


def from_json(value: Any, request: type[Message]) -> Message:
    """``value`` (decoded JSON) as a ``request``; unknown fields are ignored, as etcd's
    gateway ignores them."""
    message = request()
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise BadJson(str(err)) from None
    return message


def next_value(text: str) -> tuple[Any, str] | None:
    """The first JSON value of ``text`` and the text after it (None: only blanks), as Go's
    json.Decoder reads a stream of values; a value cut short is "unexpected EOF"."""
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        return None
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as err:
        short = err.pos >= len(text) or err.msg.startswith("Unterminated")
        raise BadJson("unexpected EOF" if short else err.msg) from None
    return value, text[end:]


_DECODER = json.JSONDecoder()


def http_status(code: grpc.StatusCode) -> int:
    """grpc-gateway's HTTPStatusFromCode."""
    return _HTTP_STATUS.get(code, 500)


_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 408,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def error_body(code: grpc.StatusCode, message: str) -> bytes:
    """grpc-gateway's error body for a unary call (and a stream refused at once)."""
    body: dict[str, Any] = {"error": message, "code": code.value[0], "message": message}
    return dumps({k: v for k, v in body.items() if v})  # proto3 JSON: defaults left out


def stream_error(code: grpc.StatusCode, message: str) -> bytes:
    """grpc-gateway's error chunk ending a response stream."""
    status = http_status(code)
    fields = {
        "grpc_code": code.value[0],
        "http_code": status,
        "message": message,
        "http_status": HTTPStatus(status).phrase,
    }
    return dumps({"error": {k: v for k, v in fields.items() if v}})
