"""etcdserverpb.Maintenance: Status and Alarm; the rest is not implemented."""

from __future__ import annotations

import grpc

from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import RAFT_TERM, Identity, answer, etcd_errors, unimplemented


class MaintenanceService(unimplemented(rpc_pb2_grpc.MaintenanceServicer, "Maintenance")):  # type: ignore[misc]
    def __init__(self, store: KVStore, identity: Identity, version: str) -> None:
        self.store = store
        self.identity = identity
        self.version = version

    @etcd_errors
    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        size = await self.store.db_size()
        rev = self.store.revision
        status = pb.StatusResponse(
            version=self.version,
            dbSize=size,
            dbSizeInUse=size,
            leader=self.identity.member_id,
            raftIndex=rev,
            raftTerm=RAFT_TERM,
            raftAppliedIndex=rev,
            isLearner=False,
        )
        return answer(self.identity, status, rev)

    @etcd_errors
    async def Alarm(
        self, request: pb.AlarmRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlarmResponse:
        return answer(self.identity, pb.AlarmResponse(), self.store.revision)
