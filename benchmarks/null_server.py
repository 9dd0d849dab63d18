"""The ``null`` target: a grpc.aio server in geminikv's own stack that answers every KV
and Watch request with a fixed response and touches no storage. Its throughput is the
ceiling Python's gRPC sets on this machine. It listens as geminikv does
(``--grpc-listeners``' default of servers on one address)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from geminikv.config import GRPC_LISTENERS
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.mvccpb import kv_pb2
from geminikv.server import scheduling
from geminikv.server.listeners import listen

_HEADER = pb.ResponseHeader(cluster_id=1, member_id=1, revision=100, raft_term=2)
_KV = kv_pb2.KeyValue(
    key=b"/registry/null", value=b"x" * 1024, create_revision=2, mod_revision=100, version=1
)
RANGE = pb.RangeResponse(header=_HEADER, kvs=[_KV], count=1).SerializeToString()
TXN = pb.TxnResponse(
    header=_HEADER,
    succeeded=True,
    responses=[pb.ResponseOp(response_put=pb.PutResponse(header=pb.ResponseHeader(revision=100)))],
).SerializeToString()
PUT = pb.PutResponse(header=_HEADER).SerializeToString()
LEASE = pb.LeaseGrantResponse(header=_HEADER, ID=7, TTL=60).SerializeToString()


def _fixed(answer: bytes) -> grpc.RpcMethodHandler:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    return grpc.unary_unary_rpc_method_handler(handler)  # raw bytes in and out


async def _watch(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield pb.WatchResponse(header=_HEADER, created=True).SerializeToString()


def handlers() -> list[grpc.GenericRpcHandler]:
    kv = {
        "Range": _fixed(RANGE),
        "Txn": _fixed(TXN),
        "Put": _fixed(PUT),
        "DeleteRange": _fixed(PUT),
        "Compact": _fixed(PUT),
    }
    return [
        grpc.method_handlers_generic_handler("etcdserverpb.KV", kv),
        grpc.method_handlers_generic_handler("etcdserverpb.Lease", {"LeaseGrant": _fixed(LEASE)}),
        grpc.method_handlers_generic_handler(
            "etcdserverpb.Watch", {"Watch": grpc.stream_stream_rpc_method_handler(_watch)}
        ),
        grpc.method_handlers_generic_handler(
            "etcdserverpb.Maintenance",
            {
                "Status": _fixed(
                    pb.StatusResponse(header=_HEADER, version="3.5.16").SerializeToString()
                )
            },
        ),
    ]


async def serve(address: str) -> None:
    """On ``address`` as geminikv listens: as many gRPC servers sharing it."""

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(handlers())

    listening = await listen(address, GRPC_LISTENERS, False, None, register)
    scheduling.helpers_batch()  # as geminikv's own processes
    await listening.servers[0].wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve(sys.argv[1]))
    except ImportError:
        asyncio.run(serve(sys.argv[1]))
