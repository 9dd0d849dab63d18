"""A snapshot taken from a live etcd: ``Maintenance.Snapshot`` saved to a file as
``etcdctl snapshot save`` saves it (the database, then etcd's sha256 trailer), and the
remaining TTL of each of its leases asked right after (``Lease.LeaseTimeToLive``)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from geminikv import errors
from geminikv.proto.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from geminikv.snapshot.reader import SnapshotRefused

TIMEOUT = 600.0  # for the whole snapshot stream


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """etcdctl's TLS flags: --cacert, --cert, --key, --insecure-skip-tls-verify."""

    cacert: str = ""
    cert: str = ""
    key: str = ""
    insecure_skip_tls_verify: bool = False


@contextlib.contextmanager
def channel(endpoint: str, tls: EtcdTLS) -> Iterator[grpc.Channel]:
    """A channel to ``endpoint`` (``host:port``, ``http://…`` or ``https://…``): TLS for
    https or when any TLS flag is given, as etcdctl decides."""
    parts = urlsplit(endpoint if "://" in endpoint else "//" + endpoint)
    target = parts.netloc
    secure = parts.scheme == "https" or bool(
        tls.cacert or tls.cert or tls.key or tls.insecure_skip_tls_verify
    )
    if not secure:
        with grpc.insecure_channel(target) as chan:
            yield chan
    elif tls.insecure_skip_tls_verify:
        host, port = parts.hostname or "localhost", parts.port or 2379
        with _unverified_tunnel(host, port, tls) as local, grpc.insecure_channel(local) as chan:
            yield chan
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls.cacert).read_bytes() if tls.cacert else None,
            private_key=Path(tls.key).read_bytes() if tls.key else None,
            certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
        )
        with grpc.secure_channel(target, credentials) as chan:
            yield chan


@contextlib.contextmanager
def _unverified_tunnel(host: str, port: int, tls: EtcdTLS) -> Iterator[str]:
    """A plaintext port on loopback relaying to ``host:port`` over TLS that does not verify
    the server (gRPC for Python always verifies, so etcdctl's --insecure-skip-tls-verify
    is done here); the client certificate is still presented. Its address."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key or None)
    context.set_alpn_protocols(["h2"])  # etcd serves gRPC over TLS as HTTP/2 only

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(relay(reader, far_writer), relay(far_reader, writer))

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(accept, "127.0.0.1", 0))
    local_port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, name="etcd-tunnel", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{local_port}"
    finally:

        async def shut() -> None:
            server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def pull(endpoint: str, path: str, tls: EtcdTLS) -> dict[int, int]:
    """Save etcd's snapshot to ``path``; lease id -> seconds left, for the leases alive
    when it was taken."""
    try:
        with channel(endpoint, tls) as chan:
            maintenance = rpc_pb2_grpc.MaintenanceStub(chan)  # type: ignore[no-untyped-call]
            with open(path, "wb") as file:
                for chunk in maintenance.Snapshot(rpc_pb2.SnapshotRequest(), timeout=TIMEOUT):
                    file.write(chunk.blob)
            lease = rpc_pb2_grpc.LeaseStub(chan)  # type: ignore[no-untyped-call]
            left: dict[int, int] = {}
            for held in lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=30).leases:
                answer = lease.LeaseTimeToLive(
                    rpc_pb2.LeaseTimeToLiveRequest(ID=held.ID), timeout=30
                )
                if answer.TTL >= 0:
                    left[held.ID] = answer.TTL
            return left
    except grpc.RpcError as err:
        why = f"{err.code().name}: {err.details()}"
        raise SnapshotRefused(
            errors.LOAD_ETCD_UNREACHABLE.format(endpoint=endpoint, why=why)
        ) from None
