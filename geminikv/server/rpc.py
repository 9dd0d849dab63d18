"""What every service shares: response headers and etcd's error mapping."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv import errors, metrics
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
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


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def etcd_errors(method: Handler) -> Handler:
    """Turn core errors into gRPC statuses with etcd's codes and messages; a request that
    did not parse is refused here too (``_lenient`` then adds no call of its own)."""

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

    wrapper.refuses_undecodable = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


async def abort_stream(context: grpc.aio.ServicerContext, err: Exception, name: str) -> None:
    """End a stream whose request could not be read or handled, as etcd's gRPC server does:
    an undecodable message is INTERNAL (Go gRPC's "failed to unmarshal"), anything else
    UNKNOWN."""
    if isinstance(err, DecodeError):
        await context.abort(
            grpc.StatusCode.INTERNAL, f"grpc: failed to unmarshal the received message: {err}"
        )
    log.error("%s stream failed", name, exc_info=err)
    await context.abort(grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}")


class Undecodable:
    """A unary request whose bytes did not parse (handed to the handler, not raised)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# Registered by name as well: a registered method has its own call request pending in
# gRPC core, so calls to different methods are accepted in parallel (lease: LeaseGrant
# then Txn). Only kube-apiserver's per-request methods: see UndecodableAsInternal.
REGISTERED = frozenset(
    f"/etcdserverpb.{name}"
    for name in ("KV/Range", "KV/Put", "KV/DeleteRange", "KV/Txn", "Lease/LeaseGrant")
)


class UndecodableAsInternal:
    """Stands in for the gRPC server while the generated ``add_*Servicer_to_server``
    functions register handlers: a single request that does not parse gets etcd's (Go
    gRPC's) INTERNAL "grpc: error unmarshalling request" instead of grpc-python's UNKNOWN.
    Request streams already end with INTERNAL (``abort_stream``).

    Every method goes into one table, found by one dict lookup; only ``REGISTERED`` ones
    are also registered by name. grpc.aio keeps one pending future per registered method
    and runs ``asyncio.wait`` over all of them for every call it accepts: with all of
    etcd's ~50 methods registered that was 8 % of the event loop's time under writes."""

    def __init__(
        self,
        server: grpc.aio.Server,
        codecs: Mapping[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] | None = None,
    ) -> None:
        """``codecs``: a (deserializer, serializer) pair replacing the generated ones of
        the named methods."""
        self.server = server
        self.codecs = codecs or {}
        self.table = MethodTable()
        server.add_generic_rpc_handlers((self.table,))

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the generated code registers the same handlers next, by name, below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        registered: dict[str, Any] = {}
        for name, handler in handlers.items():
            full_name = f"/{service}/{name}"
            if full_name in self.codecs:
                read, write = self.codecs[full_name]
                handler = handler._replace(request_deserializer=read, response_serializer=write)
            self.table.methods[full_name] = _lenient(handler)
            if full_name in REGISTERED:
                registered[name] = self.table.methods[full_name]
        if registered:
            self.server.add_registered_method_handlers(service, registered)


class MethodTable(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Every method's handler by its full name (``/etcdserverpb.KV/Range``)."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.methods.get(handler_call_details.method)


def _lenient(handler: Any) -> Any:
    """``handler`` with a request that fails to parse answered INTERNAL, as etcd does."""
    kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
    behaviour = getattr(handler, kind)
    if behaviour is None:
        return handler  # request streams: abort_stream
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            return Undecodable(str(err))

    if getattr(behaviour, "refuses_undecodable", False):  # etcd_errors checks (one call less)
        return handler._replace(request_deserializer=deserialize)
    if inspect.isasyncgenfunction(behaviour):

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.__class__ is Undecodable:
                await refuse(request, context)
            async for response in behaviour(request, context):
                yield response

        checked: Any = checked_stream
    else:

        async def checked_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.__class__ is Undecodable:
                await refuse(request, context)
            return await behaviour(request, context)

        checked = checked_call
    return handler._replace(request_deserializer=deserialize, **{kind: checked})


async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {request.reason}"
    )


def unimplemented(servicer_base: type, service: str) -> type:
    """A servicer whose every method answers UNIMPLEMENTED with a clear message."""

    def make(name: str) -> Callable[..., Any]:
        async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"geminikv: {service}.{name} is not implemented"
            )

        return method

    names = [n for n in vars(servicer_base) if not n.startswith("_")]
    return type(f"Unimplemented{service}", (servicer_base,), {n: make(n) for n in names})
