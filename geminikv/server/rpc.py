"""What every service's handlers share: response headers, etcd's error mapping, ending a
stream, and servicers that answer UNIMPLEMENTED. (Registration with grpc.aio:
server/registration.py.)"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv import errors, metrics
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.server.registration import Undecodable, refuse, refuses_undecodable
from geminikv.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)

RAFT_TERM = 2  # a settled single-member etcd reports term 2


class Identity:
    """The cluster and member ids this process reports (constant for its lifetime)."""

    def __init__(self, cluster_id: int, member_id: int, name: str, client_url: str) -> None:
        self.cluster_id = cluster_id
        self.member_id = member_id
        self.name = name
        self.client_url = client_url

    def fill(self, header: pb.ResponseHeader, revision: int) -> None:
        header.cluster_id = self.cluster_id
        header.member_id = self.member_id
        header.raft_term = RAFT_TERM
        if header.revision == 0:
            header.revision = revision


class _Response(Protocol):
    header: pb.ResponseHeader


Response = TypeVar("Response", bound=_Response)


def answer(identity: Identity, resp: Response, revision: int = 0) -> Response:
    """``resp`` with the cluster, member and raft term in its header, and ``revision`` unless
    the header already has one (a write's response carries its own): the step every unary
    handler ends with."""
    identity.fill(resp.header, revision)
    return resp


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def etcd_errors(method: Handler) -> Handler:
    """Turn core errors into gRPC statuses with etcd's codes and messages; a request that
    did not parse is refused here too (registration then adds no call of its own)."""

    name = method.__name__
    stats = metrics.RPC.method(name)

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.__class__ is Undecodable:
            await refuse(request, context)
        start = perf_counter()
        try:
            result = await method(self, request, context)
        except errors.EtcdError as err:
            stats.failed(err.code.name)
            await context.abort(err.code, err.message)
        except CONNECTION_ERRORS as err:
            log.warning("%s failed: PostgreSQL unavailable: %s", name, err)
            stats.failed("UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, errors.Unavailable.message)
        stats.ok(perf_counter() - start)
        return result

    return refuses_undecodable(wrapper)  # type: ignore[return-value]


async def abort_stream(context: grpc.aio.ServicerContext, err: Exception, name: str) -> None:
    """End a stream whose request could not be read or handled, as etcd's gRPC server does:
    an undecodable message is INTERNAL (Go gRPC's "failed to unmarshal"), anything else
    UNKNOWN."""
    if isinstance(err, DecodeError):
        await context.abort(grpc.StatusCode.INTERNAL, errors.UNDECODABLE_STREAM_MESSAGE.format(err))
    log.error("%s stream failed", name, exc_info=err)
    await context.abort(grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}")


def unimplemented(servicer_base: type, service: str) -> type:
    """A servicer whose every method answers UNIMPLEMENTED with a clear message."""

    def make(name: str) -> Callable[..., Any]:
        async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, errors.NOT_IMPLEMENTED.format(f"{service}.{name}")
            )

        return method

    names = [n for n in vars(servicer_base) if not n.startswith("_")]
    return type(f"Unimplemented{service}", (servicer_base,), {n: make(n) for n in names})
