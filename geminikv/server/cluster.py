"""etcdserverpb.Cluster: MemberList answers with this process; membership changes are
not implemented (PostgreSQL, not raft, holds the cluster together)."""

from __future__ import annotations

import grpc

from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import Identity, answer, etcd_errors, unimplemented


class ClusterService(unimplemented(rpc_pb2_grpc.ClusterServicer, "Cluster")):  # type: ignore[misc]
    def __init__(self, store: KVStore, identity: Identity) -> None:
        self.store = store
        self.identity = identity

    @etcd_errors
    async def MemberList(
        self, request: pb.MemberListRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberListResponse:
        member = pb.Member(
            ID=self.identity.member_id,
            name=self.identity.name,
            clientURLs=[self.identity.client_url],
        )
        return answer(self.identity, pb.MemberListResponse(members=[member]), self.store.revision)
