"""etcdserverpb.Lease: Grant, Revoke, KeepAlive, TimeToLive, Leases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv.lease import Leases
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import Identity, abort_stream, etcd_errors


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, leases: Leases, identity: Identity) -> None:
        self.leases = leases
        self.identity = identity

    def _rev(self) -> int:
        return self.leases.store.revision

    @etcd_errors
    async def LeaseGrant(
        self, request: pb.LeaseGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseGrantResponse:
        lease_id, ttl = await self.leases.grant(request.TTL, request.ID)
        resp = pb.LeaseGrantResponse(ID=lease_id, TTL=ttl)
        self.identity.fill(resp.header, self._rev())
        return resp

    @etcd_errors
    async def LeaseRevoke(
        self, request: pb.LeaseRevokeRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseRevokeResponse:
        resp = await self.leases.revoke(request.ID)
        self.identity.fill(resp.header, self._rev())
        return resp

    async def LeaseKeepAlive(
        self,
        request_iterator: AsyncIterator[pb.LeaseKeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.LeaseKeepAliveResponse]:
        try:
            async for request in request_iterator:
                ttl = await self.leases.keep_alive(request.ID)
                resp = pb.LeaseKeepAliveResponse(ID=request.ID, TTL=ttl)
                self.identity.fill(resp.header, self._rev())
                yield resp
        except DecodeError as err:
            await abort_stream(context, err, "LeaseKeepAlive")

    @etcd_errors
    async def LeaseTimeToLive(
        self, request: pb.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseTimeToLiveResponse:
        resp = await self.leases.time_to_live(request.ID, request.keys)
        self.identity.fill(resp.header, self._rev())
        return resp

    @etcd_errors
    async def LeaseLeases(
        self, request: pb.LeaseLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseLeasesResponse:
        ids = await self.leases.leases()
        resp = pb.LeaseLeasesResponse(leases=[pb.LeaseStatus(ID=i) for i in ids])
        self.identity.fill(resp.header, self._rev())
        return resp
