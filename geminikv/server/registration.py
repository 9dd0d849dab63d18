"""How the services are registered with grpc.aio: one table of every method, the wire
codecs of kube-apiserver's hottest methods, and etcd's INTERNAL status for a request that
does not parse (grpc-python would answer UNKNOWN).

A handler that refuses ``Undecodable`` requests itself declares it with
``refuses_undecodable``; every other handler gets a wrapper that does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv import errors

F = TypeVar("F", bound=Callable[..., Any])

# Registered by name as well: a registered method has its own call request pending in
# gRPC core, so calls to different methods are accepted in parallel (lease: LeaseGrant
# then Txn). Only kube-apiserver's per-request methods: see UndecodableAsInternal.
REGISTERED = frozenset(
    f"/etcdserverpb.{name}"
    for name in ("KV/Range", "KV/Put", "KV/DeleteRange", "KV/Txn", "Lease/LeaseGrant")
)

# Handler functions that call ``refuse`` themselves (one call less per request).
_REFUSING: set[Callable[..., Any]] = set()


class Undecodable:
    """A unary request whose bytes did not parse (handed to the handler, not raised)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INTERNAL, errors.UNDECODABLE_REQUEST.format(request.reason))


def refuses_undecodable(handler: F) -> F:
    """Declare that ``handler`` answers an ``Undecodable`` request with ``refuse`` itself."""
    _REFUSING.add(handler)
    return handler


class UndecodableAsInternal:
    """Stands in for the gRPC server while the generated ``add_*Servicer_to_server``
    functions register handlers: a single request that does not parse gets etcd's (Go
    gRPC's) INTERNAL "grpc: error unmarshalling request" instead of grpc-python's UNKNOWN.
    Request streams already end with INTERNAL (``rpc.abort_stream``).

    Every method goes into one table, found by one dict lookup; only ``REGISTERED`` ones
    are also registered by name. grpc.aio keeps one pending future per registered method
    and runs ``asyncio.wait`` over all of them for every call it accepts: with all of
    etcd's ~50 methods registered that was 8 % of the event loop's time under writes."""

    def __init__(
        self,
        server: grpc.aio.Server,
        codecs: Mapping[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] | None = None,
        wrap: Callable[[str, Any], Any] | None = None,
    ) -> None:
        """``codecs``: a (deserializer, serializer) pair replacing the generated ones of
        the named methods; ``wrap(full_name, handler)``: the handler to register instead
        (auth's checks of methods whose servicers do not check, server/auth.py)."""
        self.server = server
        self.codecs = codecs or {}
        self.wrap = wrap
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
            if self.wrap is not None:
                handler = self.wrap(full_name, handler)
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
        return handler  # request streams: rpc.abort_stream
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            return Undecodable(str(err))

    # the generated code registers bound methods: the declared function is their __func__
    if getattr(behaviour, "__func__", behaviour) in _REFUSING:
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
