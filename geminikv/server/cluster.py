"""etcdserverpb.Cluster: every geminikv process serving the database is a member
(geminikv/members.py). PostgreSQL, not raft, holds them together, so membership changes
answer as a one-member etcd would where that means something, else say why not."""

from __future__ import annotations

import grpc

from geminikv import errors
from geminikv.members import Members
from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import Identity, answer, etcd_errors


class ClusterService(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, store: KVStore, identity: Identity, members: Members) -> None:
        self.store = store
        self.identity = identity
        self.members = members

    async def _listed(self) -> list[pb.Member]:
        return [
            pb.Member(ID=member_id, name=name, clientURLs=urls)
            for member_id, name, urls in await self.members.list()
        ]

    async def _known(self, member_id: int) -> None:
        if member_id not in await self.members.ids():
            raise errors.MemberNotFound()

    @etcd_errors
    async def MemberList(
        self, request: pb.MemberListRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberListResponse:
        response = pb.MemberListResponse(members=await self._listed())
        return answer(self.identity, response, self.store.revision)

    @etcd_errors
    async def MemberAdd(
        self, request: pb.MemberAddRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberAddResponse:
        raise errors.MembersAreProcesses()

    @etcd_errors
    async def MemberRemove(
        self, request: pb.MemberRemoveRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberRemoveResponse:
        await self._known(request.ID)
        raise errors.MembersAreProcesses()

    @etcd_errors
    async def MemberUpdate(
        self, request: pb.MemberUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberUpdateResponse:
        await self._known(request.ID)
        raise errors.MembersAreProcesses()

    @etcd_errors
    async def MemberPromote(
        self, request: pb.MemberPromoteRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberPromoteResponse:
        await self._known(request.ID)
        raise errors.MemberNotLearner()  # every member votes, as in a one-member etcd
