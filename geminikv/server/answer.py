"""The one step every unary handler ends with: its response, with this process's header."""

from __future__ import annotations

from typing import Protocol, TypeVar

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.server.rpc import Identity


class _Response(Protocol):
    header: pb.ResponseHeader


Response = TypeVar("Response", bound=_Response)


def answer(identity: Identity, resp: Response, revision: int = 0) -> Response:
    """``resp`` with the cluster, member and raft term in its header, and ``revision`` unless
    the header already has one (a write's response carries its own)."""
    identity.fill(resp.header, revision)
    return resp
