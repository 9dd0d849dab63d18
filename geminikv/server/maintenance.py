"""etcdserverpb.Maintenance: every method; MoveLeader and Downgrade answer as a one-member
etcd would where that means something (every process serves writes), else say why not."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import grpc

from geminikv import errors
from geminikv.alarms import describe
from geminikv.members import Members
from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import RAFT_TERM, Identity, answer, etcd_errors
from geminikv.snapshot.hashkv import hash_kv
from geminikv.snapshot.store import snapshot
from geminikv.storage.database import CONNECTION_ERRORS

log = logging.getLogger(__name__)

# etcd's downgrade target: a major.minor version, optionally with a patch ("3.4", "3.4.0")
DOWNGRADE_VERSION = re.compile(r"\d+\.\d+(\.\d+)?")


class MaintenanceService(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, store: KVStore, identity: Identity, version: str, members: Members) -> None:
        self.store = store
        self.identity = identity
        self.version = version
        self.members = members

    @etcd_errors
    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        size, in_use = await self.store.db_sizes()
        rev = self.store.revision
        status = pb.StatusResponse(
            version=self.version,
            dbSize=size,
            dbSizeInUse=in_use,
            leader=self.identity.member_id,
            raftIndex=rev,
            raftTerm=RAFT_TERM,
            raftAppliedIndex=rev,
            isLearner=False,
            errors=[describe(alarm) for alarm in sorted(self.store.alarms.raised)],
        )
        return answer(self.identity, status, rev)

    @etcd_errors
    async def Alarm(
        self, request: pb.AlarmRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlarmResponse:
        """etcd's alarms, one set for the whole database (geminikv/alarms.py)."""
        alarms = self.store.alarms
        if request.action == pb.AlarmRequest.ACTIVATE:
            changed = await alarms.activate(request.memberID, request.alarm)
        elif request.action == pb.AlarmRequest.DEACTIVATE:
            changed = await alarms.deactivate(request.memberID, request.alarm)
        else:
            changed = await alarms.get(request.alarm)
        members = [pb.AlarmMember(memberID=m, alarm=pb.AlarmType.Name(kind)) for m, kind in changed]
        return answer(self.identity, pb.AlarmResponse(alarms=members), self.store.revision)

    @etcd_errors
    async def Defragment(
        self, request: pb.DefragmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DefragmentResponse:
        """A plain VACUUM of the table: the space compaction freed becomes reusable, and
        writes go on meanwhile (VACUUM FULL would lock them out)."""
        before = await self.store.db_sizes()
        await self.store.vacuum()
        after = await self.store.db_sizes()
        log.info(
            "defragmented: VACUUM of kine; size %d -> %d bytes, in use %d -> %d",
            before[0],
            after[0],
            before[1],
            after[1],
        )
        return answer(self.identity, pb.DefragmentResponse(), self.store.revision)

    @etcd_errors
    async def MoveLeader(
        self, request: pb.MoveLeaderRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveLeaderResponse:
        """Every process leads for its clients: moving to a live member changes nothing."""
        if request.targetID not in await self.members.ids():
            raise errors.BadLeaderTransferee()
        return answer(self.identity, pb.MoveLeaderResponse(), self.store.revision)

    @etcd_errors
    async def Downgrade(
        self, request: pb.DowngradeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DowngradeResponse:
        if request.action == pb.DowngradeRequest.CANCEL:
            raise errors.NoInflightDowngrade()
        if not DOWNGRADE_VERSION.fullmatch(request.version):
            raise errors.WrongDowngradeVersionFormat()
        raise errors.DowngradeDoesNotApply()

    @etcd_errors
    async def HashKV(
        self, request: pb.HashKVRequest, context: grpc.aio.ServicerContext
    ) -> pb.HashKVResponse:
        """etcd's hash of the keyspace up to a revision (snapshot/hashkv.py)."""
        self.store.rebuilding.check()
        result = await hash_kv(self.store, request.revision)
        response = pb.HashKVResponse(hash=result.hash, compact_revision=result.compact_revision)
        return answer(self.identity, response, result.revision)

    @etcd_errors
    async def Hash(
        self, request: pb.HashRequest, context: grpc.aio.ServicerContext
    ) -> pb.HashResponse:
        """HashKV's hash at the current revision (etcd hashes its whole backend file, whose
        raft and member metadata no two clusters share)."""
        self.store.rebuilding.check()
        result = await hash_kv(self.store, 0)
        return answer(self.identity, pb.HashResponse(hash=result.hash), result.revision)

    async def Snapshot(
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotResponse]:
        """etcd's backend database at one revision, in chunks, then its sha256 (a message
        of its own, as etcd sends it)."""
        try:
            self.store.rebuilding.check()
            chunks = snapshot(self.store, RAFT_TERM, self.identity.member_id)
            async for chunk in chunks:
                response = pb.SnapshotResponse(
                    remaining_bytes=chunk.remaining_bytes, blob=chunk.blob
                )
                yield answer(self.identity, response, self.store.revision)
        except errors.EtcdError as err:
            await context.abort(err.code, err.message)
        except CONNECTION_ERRORS as err:
            log.warning("Snapshot failed: PostgreSQL unavailable: %s", err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, errors.Unavailable.message)
