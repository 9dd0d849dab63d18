"""etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact."""

from __future__ import annotations

import grpc

from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.auth import Guard
from geminikv.server.rpc import Identity, answer, etcd_errors
from geminikv.server.wire import Answers, GuardedPut, KeyGet


class KVService(rpc_pb2_grpc.KVServicer):
    def __init__(self, store: KVStore, identity: Identity, guard: Guard) -> None:
        self.store = store
        self.identity = identity
        self.guard = guard  # checked only while auth is enabled
        self.answers = Answers(identity)

    @etcd_errors
    async def Range(
        self, request: pb.RangeRequest | KeyGet, context: grpc.aio.ServicerContext
    ) -> bytes:
        if isinstance(request, KeyGet):
            if self.guard.enabled:
                await self.guard.key_get(request.key, context)
            return self.answers.get(
                request.key, *await self.store.get(request.key, request.serializable)
            )
        if self.guard.enabled:
            await self.guard.range(request, context)
        return self.answers.range(*await self.store.range(request))

    @etcd_errors
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        if self.guard.enabled:
            await self.guard.put(request, context)
        return answer(self.identity, await self.store.put(request))

    @etcd_errors
    async def DeleteRange(
        self, request: pb.DeleteRangeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRangeResponse:
        if self.guard.enabled:
            await self.guard.delete_range(request, context)
        return answer(self.identity, await self.store.delete_range(request))

    @etcd_errors
    async def Txn(
        self, request: pb.TxnRequest | GuardedPut, context: grpc.aio.ServicerContext
    ) -> pb.TxnResponse | bytes:
        if isinstance(request, GuardedPut):
            if self.guard.enabled:
                await self.guard.guarded_put(
                    request.key, request.lease, request.read_on_failure, context
                )
            return self.answers.txn(request, *await self.store.guarded_put(request))
        if self.guard.enabled:
            await self.guard.txn(request, context)
        return answer(self.identity, await self.store.txn(request))

    @etcd_errors
    async def Compact(
        self, request: pb.CompactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompactionResponse:
        if self.guard.enabled:
            # etcd checks no permission for a compaction, only the token (as for any write)
            await self.guard.info(context)
        return answer(self.identity, await self.store.compact(request))
