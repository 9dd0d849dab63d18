"""etcdserverpb.Lease: Grant, Revoke, KeepAlive, TimeToLive, Leases."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from geminikv import errors
from geminikv.lease import Leases
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.auth import Guard
from geminikv.server.rpc import Identity, Response, abort_stream, answer, etcd_errors
from geminikv.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, leases: Leases, identity: Identity, guard: Guard) -> None:
        self.leases = leases
        self.identity = identity
        self.guard = guard  # checked only while auth is enabled

    def _answer(self, resp: Response) -> Response:
        # a lease change writes no revision of its own: the header carries the store's
        return answer(self.identity, resp, self.leases.store.revision)

    @etcd_errors
    async def LeaseGrant(
        self, request: pb.LeaseGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseGrantResponse:
        if self.guard.enabled:
            await self.guard.require_info(context)
        lease_id, ttl = await self.leases.grant(request.TTL, request.ID)
        return self._answer(pb.LeaseGrantResponse(ID=lease_id, TTL=ttl))

    @etcd_errors
    async def LeaseRevoke(
        self, request: pb.LeaseRevokeRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseRevokeResponse:
        if self.guard.enabled:
            await self.guard.lease_writes(request.ID, context)
        return self._answer(await self.leases.revoke(request.ID))

    async def LeaseKeepAlive(
        self,
        request_iterator: AsyncIterator[pb.LeaseKeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.LeaseKeepAliveResponse]:
        try:
            async for request in request_iterator:
                if self.guard.enabled:
                    await self.guard.lease_writes(request.ID, context)
                ttl = await self.leases.keep_alive(request.ID)
                yield self._answer(pb.LeaseKeepAliveResponse(ID=request.ID, TTL=ttl))
        except errors.EtcdError as err:
            await context.abort(err.code, err.message)
        except DecodeError as err:
            await abort_stream(context, err, "LeaseKeepAlive")
        except CONNECTION_ERRORS as err:
            # etcd ends the stream the same way while it has no leader; clients reopen it
            log.warning("LeaseKeepAlive failed: PostgreSQL unavailable: %s", err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, errors.Unavailable.message)

    @etcd_errors
    async def LeaseTimeToLive(
        self, request: pb.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseTimeToLiveResponse:
        if self.guard.enabled:
            await self.guard.require_info(context)
            if request.keys:
                await self.guard.lease_reads((request.ID,), context)
        return self._answer(await self.leases.time_to_live(request.ID, request.keys))

    @etcd_errors
    async def LeaseLeases(
        self, request: pb.LeaseLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseLeasesResponse:
        ids = await self.leases.leases()
        if self.guard.enabled:
            await self.guard.lease_reads(ids, context)
        return self._answer(pb.LeaseLeasesResponse(leases=[pb.LeaseStatus(ID=i) for i in ids]))
