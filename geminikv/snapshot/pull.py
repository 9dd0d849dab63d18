"""A snapshot taken from a live etcd: ``Maintenance.Snapshot`` saved to a file as
``etcdctl snapshot save`` saves it (the database, then etcd's sha256 trailer), and the
remaining TTL of each of its leases asked right after (``Lease.LeaseTimeToLive``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from geminikv import errors
from geminikv.proto.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from geminikv.snapshot.reader import SnapshotRefused

# etcd's own default limit is 2 MiB per request; responses (chunks) are 32 KiB
TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """etcdctl's TLS flags: --cacert, --cert, --key, --insecure-skip-tls-verify."""

    cacert: str = ""
    cert: str = ""
    key: str = ""
    insecure_skip_tls_verify: bool = False


def channel(endpoint: str, tls: EtcdTLS) -> grpc.Channel:
    """A channel to ``endpoint`` (``host:port``, ``http://…`` or ``https://…``): TLS for
    https or when any TLS flag is given, as etcdctl decides."""
    parts = urlsplit(endpoint if "://" in endpoint else "//" + endpoint)
    target = parts.netloc
    secure = parts.scheme == "https" or bool(tls.cacert or tls.cert or tls.key)
    if tls.insecure_skip_tls_verify:
        # grpc's Python TLS always verifies the server; there is no switch to turn it off
        raise SnapshotRefused(
            errors.LOAD_ETCD_UNREACHABLE.format(
                endpoint=endpoint,
                why="--insecure-skip-tls-verify is not supported (gRPC for Python always "
                "verifies the server): pass the CA with --cacert",
            )
        )
    if not secure:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.cacert).read_bytes() if tls.cacert else None,
        private_key=Path(tls.key).read_bytes() if tls.key else None,
        certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials)


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
