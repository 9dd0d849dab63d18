"""etcd's HTTP endpoints on an HTTP/1.1 listener: the gRPC-JSON gateway, /version, /health,
/livez, /readyz and /metrics, answered as etcd 3.5 answers them on its client URL.

grpcio serves HTTP/2 only, so this is a listener of its own (``--http-listen-address``),
an aiohttp server on the event loop, HTTPS when the etcd endpoint has TLS. The gateway is
thin, as etcd's is: it decodes the JSON body, calls geminikv's own gRPC services over a
channel (a unix socket the app opens for it), so authentication, metadata and errors are
exactly what a gRPC client gets, and encodes the answer (README, "What works").
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message  # type: ignore[import-untyped]
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from geminikv import metrics
from geminikv.config import GATEWAY_MAX_BODY_BYTES, HEALTH_READ_TIMEOUT
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.server.gateway_routes import (
    ROUTES,
    BadJson,
    Route,
    dumps,
    error_body,
    from_json,
    http_status,
    next_value,
    stream_error,
    to_json,
)

log = logging.getLogger(__name__)

# etcd's access controller adds these to every answer (its default --cors is "*")
CORS = {
    "Access-Control-Allow-Headers": "accept, content-type, authorization",
    "Access-Control-Allow-Methods": "POST, GET, OPTIONS, PUT, DELETE",
    "Access-Control-Allow-Origin": "*",
}
JSON = "application/json"
# grpc-gateway passes the gRPC server's header metadata on as Grpc-Metadata-* headers
FORWARDED = {"Content-Type": JSON, "Grpc-Metadata-Content-Type": "application/grpc"}
METADATA_PREFIX = "grpc-metadata-"
_METADATA_KEY = re.compile(r"[a-z0-9._-]+")
_ALARM_REASONS: dict[int, str] = {
    pb.AlarmType.NOSPACE: "ALARM NOSPACE",
    pb.AlarmType.CORRUPT: "ALARM CORRUPT",
}
# etcd 3.5's probes and their checks (server/etcdserver/api/etcdhttp/health.go)
_PROBES = {
    "livez": ["serializable_read"],
    "readyz": ["data_corruption", "serializable_read", "linearizable_read"],
}
_GO_REQUEST_TYPE = "map[string]json.RawMessage"  # what jsonpb decodes an object into
_GO_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "bool"}


def _text(status: int, text: str, **headers: str) -> web.Response:
    """Go's http.Error."""
    return web.Response(
        status=status,
        text=text + "\n",
        headers={**CORS, "X-Content-Type-Options": "nosniff", **headers},
        content_type="text/plain",
        charset="utf-8",
    )


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=body, headers={**CORS, "Content-Type": JSON, **(headers or {})}
    )


def _rpc_error(err: grpc.aio.AioRpcError) -> web.Response:
    return _json(http_status(err.code()), error_body(err.code(), err.details() or ""))


def metadata_of(request: web.Request) -> list[tuple[str, str]]:
    """gRPC metadata from the HTTP headers, as etcd's gateway passes them: the
    Authorization header is the auth token, Grpc-Metadata-<key> headers pass as <key>."""
    metadata = []
    token = request.headers.get("Authorization")
    if token and token.isascii() and token.isprintable():
        metadata.append(("token", token))
    for name, value in request.headers.items():
        key = name.lower()
        if not key.startswith(METADATA_PREFIX):
            continue
        key = key[len(METADATA_PREFIX) :]
        # keys gRPC would refuse (or binary ones) are left out rather than failing the call
        printable = value.isascii() and value.isprintable()
        if _METADATA_KEY.fullmatch(key) and not key.endswith("-bin") and printable:
            metadata.append((key, value))
    return metadata


def request_message(value: Any, route: Route) -> Message:
    if value is not None and not isinstance(value, dict):
        kind = _GO_KINDS.get(type(value), "value")
        raise BadJson(f"json: cannot unmarshal {kind} into Go value of type {_GO_REQUEST_TYPE}")
    return from_json(value or {}, route.request)


def server_tls(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext | None:
    """HTTPS as on the etcd endpoint: its certificate, and client certificates signed by
    ``ca_file`` required when it is set (None: no TLS there, plain HTTP here)."""
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if ca_file:
        context.load_verify_locations(ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class BodyValues:
    """The JSON values of a request body as they arrive (a streaming call's requests)."""

    def __init__(self, request: web.Request) -> None:
        self.content = request.content
        self.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = ""
        self.eof = False

    async def next(self) -> Any | None:
        """The next value; None at the end of the body."""
        while True:
            try:
                found = next_value(self.buffer)
            except BadJson:
                if self.eof:
                    raise
                found = None  # perhaps cut short: read on
            if found is not None:
                value, self.buffer = found
                return value
            if self.eof:
                return None
            chunk = await self.content.readany()
            self.eof = not chunk
            self.buffer += self.text.decode(chunk, final=self.eof)


class Gateway:
    """The HTTP listener; ``start`` then ``stop``."""

    def __init__(
        self,
        grpc_target: str,
        health: metrics.Health,
        linearizable_read: Callable[[], Awaitable[object]],
        active_alarms: Callable[[], list[int]],
        etcd_version: str,
    ) -> None:
        """``active_alarms``: the alarm types raised, as this process knows them (etcd's
        health checks read its own alarm list, whatever auth says)."""
        self.channel = grpc.aio.insecure_channel(
            grpc_target, options=[("grpc.max_receive_message_length", -1)]
        )
        self.health = health
        self.linearizable_read = linearizable_read
        self.active_alarms = active_alarms
        major, minor, *_ = etcd_version.split(".")
        self.versions = dumps({"etcdserver": etcd_version, "etcdcluster": f"{major}.{minor}.0"})
        self.runner: web.AppRunner | None = None
        self.calls: set[grpc.aio.Call] = set()  # streaming calls, cancelled at stop
        self.stopping = False

    async def start(
        self, address: str, tls: ssl.SSLContext | None = None, shared: bool = False
    ) -> None:
        """Serve on ``address``; ``shared``: with the other workers (--workers), each
        answering the connections the kernel hands it."""
        app = web.Application(client_max_size=GATEWAY_MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self.dispatch)
        # a client that goes away cancels its handler, and with it the gRPC call
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"  # [::]:2379 is an IPv6 host
        site = web.TCPSite(self.runner, host, int(port), ssl_context=tls, reuse_port=shared)
        await site.start()
        scheme = "https" if tls else "http"
        log.info("etcd HTTP endpoints on %s://%s: /v3/..., /version, /health", scheme, address)

    async def stop(self) -> None:
        self.stopping = True
        for call in list(self.calls):
            call.cancel()  # its handler ends its response
        await asyncio.sleep(0)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.channel.close()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/v3beta/"):  # etcd 3.4 and 3.5 redirect the 3.3 prefix
            path = "/v3/" + path[len("/v3beta/") :]
        if request.method == "OPTIONS":
            return web.Response(status=200, headers=CORS)
        if path.startswith("/v3/"):
            route = ROUTES.get(path)
            if route is None:
                return _text(404, "Not Found")
            if request.method != "POST":
                return _text(405, "Method Not Allowed")
            return await self.forward(request, route)
        if path == "/version":
            if request.method != "GET":
                return _text(405, "Method Not Allowed", Allow="GET")
            return _json(200, self.versions)
        if path == "/health":
            if request.method != "GET":
                return _text(405, "Method Not Allowed", Allow="GET")
            return await self.etcd_health(request)
        kind, _, check = path[1:].partition("/")
        if kind in _PROBES and (not check or check in _PROBES[kind]):
            if request.method != "GET":
                return _text(405, "Method Not Allowed", Allow="GET")
            return await self.probe(request, [check] if check else _PROBES[kind])
        if path == "/metrics":
            return web.Response(
                body=generate_latest(REGISTRY),
                headers={**CORS, "Content-Type": CONTENT_TYPE_LATEST},
            )
        return _text(404, "404 page not found")

    async def forward(self, request: web.Request, route: Route) -> web.StreamResponse:
        if route.client_streaming:
            return await self.stream(request, route, None)
        try:  # one request message: the body's first JSON value, as grpc-gateway reads it
            found = next_value((await request.read()).decode(errors="replace"))
            message = request_message(None if found is None else found[0], route)
        except BadJson as err:
            return _json(400, error_body(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
        if route.server_streaming:
            return await self.stream(request, route, message)
        call = self.channel.unary_unary(
            route.method,
            request_serializer=route.request.SerializeToString,
            response_deserializer=route.response.FromString,
        )
        try:
            answer = await call(message, metadata=metadata_of(request))
        except grpc.aio.AioRpcError as err:
            return _rpc_error(err)
        return _json(200, dumps(to_json(answer)), FORWARDED)

    async def stream(
        self, request: web.Request, route: Route, message: Message | None
    ) -> web.StreamResponse:
        """A streaming call, each answer a line ``{"result": ...}``, an error ending it with
        ``{"error": ...}``: its one ``message``, or (client streaming) the body's JSON values
        as they arrive."""
        metadata = metadata_of(request)
        feeding: asyncio.Task[None] | None = None
        call: Any
        if route.client_streaming:
            body = BodyValues(request)
            try:
                first = await body.next()
                message = None if first is None else request_message(first, route)
            except BadJson as err:
                # grpc-gateway returns the decoder's error as is: Unknown
                return _json(500, error_body(grpc.StatusCode.UNKNOWN, str(err)))
            call = self.channel.stream_stream(
                route.method,
                request_serializer=route.request.SerializeToString,
                response_deserializer=route.response.FromString,
            )(metadata=metadata)
            feeding = asyncio.create_task(self._feed(call, body, route, message))
        else:
            call = self.channel.unary_stream(
                route.method,
                request_serializer=route.request.SerializeToString,
                response_deserializer=route.response.FromString,
            )(message or route.request(), metadata=metadata)
        self.calls.add(call)
        response: web.StreamResponse | None = None
        try:
            async for answer in self._answers(call):
                if response is None:
                    response = web.StreamResponse(headers={**CORS, **FORWARDED})
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                # one chunk per answer: clients (etcd3gw) parse each chunk as one line
                await response.write(dumps({"result": to_json(answer)}) + b"\n")
        except grpc.aio.AioRpcError as err:
            if not (self.stopping and err.code() == grpc.StatusCode.CANCELLED):
                if response is None:
                    response = web.StreamResponse(
                        status=http_status(err.code()), headers={**CORS, "Content-Type": JSON}
                    )
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                await response.write(stream_error(err.code(), err.details() or ""))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the client went away
            # else stop() cancelled the call: the response ends
        finally:
            self.calls.discard(call)
            call.cancel()
            if feeding is not None:
                feeding.cancel()
        if response is None:  # the stream ended without an answer
            return web.Response(status=200, headers={**CORS, "Content-Type": JSON})
        await response.write_eof()
        return response

    async def _answers(self, call: Any) -> AsyncIterator[Message]:
        while True:
            answer = await call.read()
            if answer is grpc.aio.EOF:
                return
            yield answer

    async def _feed(self, call: Any, body: BodyValues, route: Route, first: Message | None) -> None:
        """Send the body's requests, then half-close (etcd's gateway does: Watch streams
        stay open, LeaseKeepAlive ends once answered)."""
        try:
            message = first
            while message is not None:
                await call.write(message)
                value = await body.next()
                message = None if value is None else request_message(value, route)
        except BadJson as err:
            log.info("gateway: a request in the body of %s: %s", route.method, err)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended; its answer loop reports why
        await call.done_writing()

    async def etcd_health(self, request: web.Request) -> web.StreamResponse:
        """etcd's /health: alarms, then a leader (here: PostgreSQL reachable), then a read;
        ``?exclude=NOSPACE`` ignores an alarm, ``?serializable=true`` skips the leader and
        reads locally."""
        excluded = set(request.query.getall("exclude", []))
        serializable = request.query.get("serializable") == "true"
        reason = self._alarm(excluded)
        if not reason and not serializable and not self._postgres_reachable():
            reason = "RAFT NO LEADER"
        if not reason and not serializable and (error := await self._read()):
            reason = f"RANGE ERROR:{error}"
        if reason:
            log.warning("serving /health false: %s", reason)
            return _text(503, dumps({"health": "false", "reason": reason}).decode())
        return web.Response(
            body=dumps({"health": "true", "reason": ""}),
            headers={**CORS, "Content-Type": "text/plain; charset=utf-8"},
        )

    async def probe(self, request: web.Request, checks: list[str]) -> web.StreamResponse:
        """etcd 3.5's /livez and /readyz (and /readyz/<check>): each check's outcome, one
        line each, shown when one fails or with ``?verbose``."""
        excluded = set(request.query.getall("exclude", []))
        lines, failed = [], False
        for name in checks:
            if name in excluded:
                continue
            error = await self._check(name)
            failed = failed or bool(error)
            lines.append(f"[-]{name} failed: {error}\n" if error else f"[+]{name} ok\n")
        if failed:
            return _text(503, "".join(lines))
        shown = "".join(lines) if "verbose" in request.query else ""
        return _text(200, shown + "ok")

    async def _check(self, name: str) -> str:
        """What the check ``name`` finds wrong ("" if nothing)."""
        if name == "data_corruption":
            corrupt = pb.AlarmType.CORRUPT in self.active_alarms()
            return "alarm activated: CORRUPT" if corrupt else ""
        if name == "linearizable_read":
            return await self._read()
        return ""  # serializable_read: this process's index always answers

    async def _read(self) -> str:
        try:
            async with asyncio.timeout(HEALTH_READ_TIMEOUT):
                await self.linearizable_read()
        except TimeoutError:
            return "context deadline exceeded"
        except Exception as err:
            return str(err)
        return ""

    def _postgres_reachable(self) -> bool:
        fresh = time.monotonic() - self.health.database_ok < self.health.STALE
        return fresh and self.health.primary_reachable()

    def _alarm(self, excluded: set[str]) -> str:
        """The reason an active alarm makes this unhealthy ("" if none does)."""
        for alarm in self.active_alarms():
            if pb.AlarmType.Name(alarm) not in excluded:
                return _ALARM_REASONS.get(alarm, "ALARM UNKNOWN")
        return ""
