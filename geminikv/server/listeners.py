"""The gRPC servers of one process, all on the listen address.

grpc.aio takes calls one at a time per server: its serving task waits for gRPC core to
hand it a call, starts a task for it, then asks core for the next one, each step a turn
of the event loop. Under load that chain, not the CPU, bounds how many calls one server
takes (grpc.aio answering fixed bytes, 64 clients over 8 connections: 5,576 gets/s with
one server, 8,115 with eight, at the same CPU). So a process runs several servers on the
address with SO_REUSEPORT: the kernel spreads connections over them and their chains run
side by side. One connection is served by one of them, as it was by the one server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import grpc

from geminikv.config import GRPC_MAX_RECEIVE_BYTES

GRPC_OPTIONS = [
    # etcd: max request 1.5 MiB + 512 KiB gRPC overhead; responses are unbounded.
    ("grpc.max_receive_message_length", GRPC_MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", -1),
    # kube-apiserver pings every 30 s, also on idle connections (docs/architecture.md#server-layer).
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def grpc_options(shared: bool) -> list[tuple[str, int]]:
    """A server's options; ``shared``: the address is shared (several listeners, or
    several workers). Off otherwise: a second server on a busy port must fail, not
    silently share it (``check_free`` is asked first whenever it is on)."""
    return [*GRPC_OPTIONS, ("grpc.so_reuseport", 1 if shared else 0)]


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


def check_free(target: str) -> None:
    """Raise OSError if something listens on ``target`` (host:port) already: with
    SO_REUSEPORT our servers could join another server's socket instead of failing."""
    host, port = _split(target)
    family, kind, proto, _, where = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(where)
        except OSError as err:
            raise OSError(f"cannot listen on {target}: {err.strerror}") from None


class Listeners:
    """The servers on one address, started and stopped together."""

    def __init__(self, servers: list[grpc.aio.Server], port: int) -> None:
        self.servers = servers
        self.port = port  # the bound port (the one asked for, or the kernel's pick for 0)

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self.servers))


async def listen(
    target: str,
    listeners: int,
    shared: bool,
    credentials: grpc.ServerCredentials | None,
    register: Callable[[grpc.aio.Server], None],
    extra: str | None = None,
) -> Listeners:
    """``listeners`` servers on ``target``, each given every service by ``register``;
    ``shared``: the workers share the address (their supervisor checked it is free);
    ``extra``: a unix socket the first server serves as well (the HTTP gateway's)."""
    unix = target.startswith("unix:")
    if unix:
        listeners = 1  # a socket's path cannot be shared
    if not unix and not shared and _split(target)[1] != 0:
        check_free(target)  # a clear error, before any server binds
    options = grpc_options(shared or listeners > 1)
    servers: list[grpc.aio.Server] = []
    port = 0
    for number in range(listeners):
        server = grpc.aio.server(options=options)
        register(server)
        if extra is not None and number == 0:
            server.add_insecure_port(extra)
        # the first one binds what was asked (port 0: the kernel picks); the rest join it
        where = target if number == 0 else f"{_split(target)[0]}:{port}"
        try:
            if credentials is None:
                bound = server.add_insecure_port(where)
            else:
                bound = server.add_secure_port(where, credentials)
        except RuntimeError as err:  # grpc's "Failed to bind to address ..."
            raise OSError(f"cannot listen on {where}: {err}") from None
        if bound == 0 and not unix:
            raise OSError(f"cannot listen on {where}")
        port = port or bound
        servers.append(server)
    for server in servers:
        await server.start()
    return Listeners(servers, port)
