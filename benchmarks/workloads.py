"""The request shapes kube-apiserver sends (its storage/etcd3 store and watcher), as
benchmark workloads.

A workload has an optional ``setup`` (run once per target, from the main process) and a
``client`` coroutine factory: each client repeats one operation until the deadline. All
calls send and receive raw bytes, so the load generator spends as little CPU as it can.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

C = pb.Compare
Op = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Params:
    prefix: bytes
    value_size: int = 1024
    keys: int = 1000  # keys prepared for get/update/count/list
    history: int = 0  # extra revisions per key for list
    conflict_rate: float = 0.0
    serializable: bool = False
    page: int = 500


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Calls:
    """Raw-bytes callables on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.range = channel.unary_unary("/etcdserverpb.KV/Range")
        self.txn = channel.unary_unary("/etcdserverpb.KV/Txn")
        self.put = channel.unary_unary("/etcdserverpb.KV/Put")
        self.delete = channel.unary_unary("/etcdserverpb.KV/DeleteRange")
        self.grant = channel.unary_unary("/etcdserverpb.Lease/LeaseGrant")


def key(p: Params, i: int) -> bytes:
    return p.prefix + b"k%07d" % i


async def prepare_keys(calls: Calls, p: Params, count: int, history: int = 0) -> None:
    value = b"v" * p.value_size
    for start in range(0, count, 200):
        for _ in range(history + 1):
            await asyncio.gather(
                *(
                    calls.put(pb.PutRequest(key=key(p, i), value=value).SerializeToString())
                    for i in range(start, min(count, start + 200))
                )
            )


def create_txn(k: bytes, value: bytes, lease: int = 0) -> bytes:
    return pb.TxnRequest(
        compare=[C(key=k, target=C.MOD, result=C.EQUAL, mod_revision=0)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=k, value=value, lease=lease))],
    ).SerializeToString()


def update_txn(k: bytes, value: bytes, rev: int) -> bytes:
    return pb.TxnRequest(
        compare=[C(key=k, target=C.MOD, result=C.EQUAL, mod_revision=rev)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=k, value=value))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=k))],
    ).SerializeToString()


def delete_txn(k: bytes, rev: int) -> bytes:
    return pb.TxnRequest(
        compare=[C(key=k, target=C.MOD, result=C.EQUAL, mod_revision=rev)],
        success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=k))],
    ).SerializeToString()


def current_rev(resp: bytes) -> int:
    txn = pb.TxnResponse.FromString(resp)
    if txn.succeeded:
        return int(txn.header.revision)
    kvs = txn.responses[0].response_range.kvs
    return int(kvs[0].mod_revision) if kvs else 0


async def paged_list(calls: Calls, p: Params, start: bytes, end: bytes) -> int:
    """kube-apiserver's paged LIST: pages at the first page's revision; returns items."""
    first = pb.RangeResponse.FromString(
        await calls.range(
            pb.RangeRequest(key=start, range_end=end, limit=p.page).SerializeToString()
        )
    )
    items, more, rev = len(first.kvs), first.more, first.header.revision
    last = first.kvs[-1].key if first.kvs else start
    while more:
        page = pb.RangeResponse.FromString(
            await calls.range(
                pb.RangeRequest(
                    key=last + b"\x00", range_end=end, limit=p.page, revision=rev
                ).SerializeToString()
            )
        )
        items += len(page.kvs)
        more = page.more
        last = page.kvs[-1].key
    return items


# -- workloads ------------------------------------------------------------------------


class Workload:
    name = ""
    describe = ""

    async def setup(self, calls: Calls, p: Params) -> None:
        pass

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        raise NotImplementedError


class Create(Workload):
    name = "create"
    describe = "create-if-absent txn (MOD(key)==0 → Put), new key each time"

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        value = b"v" * p.value_size
        counter = iter(range(10**9))
        base = p.prefix + b"c%d-%d-" % (worker, index)

        async def op() -> None:
            await calls.txn(create_txn(base + b"%d" % next(counter), value))

        return op


class Update(Workload):
    name = "update"
    describe = "guaranteed update txn (MOD(key)==rev → Put, else Get), own key per client"

    async def setup(self, calls: Calls, p: Params) -> None:
        await prepare_keys(calls, p, p.keys)

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        value = b"u" * p.value_size
        k = key(p, (worker * 1000 + index) % p.keys)
        rnd = random.Random(worker * 100_000 + index)
        rev = [0]

        async def op() -> None:
            if rev[0] == 0:
                got = pb.RangeResponse.FromString(
                    await calls.range(pb.RangeRequest(key=k).SerializeToString())
                )
                rev[0] = got.kvs[0].mod_revision if got.kvs else 0
            use = rev[0] - 1 if rnd.random() < p.conflict_rate else rev[0]
            rev[0] = current_rev(await calls.txn(update_txn(k, value, use)))

        return op


class Get(Workload):
    name = "get"
    describe = "single-key Range (linearizable)"

    async def setup(self, calls: Calls, p: Params) -> None:
        await prepare_keys(calls, p, p.keys)

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        rnd = random.Random(worker * 100_000 + index)
        requests = [
            pb.RangeRequest(key=key(p, i), serializable=p.serializable).SerializeToString()
            for i in range(p.keys)
        ]

        async def op() -> None:
            await calls.range(requests[rnd.randrange(len(requests))])

        return op


class GetSerializable(Get):
    name = "get-serializable"
    describe = "single-key Range (serializable)"

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        return Get.client(
            self, calls, Params(**{**p.__dict__, "serializable": True}), worker, index
        )


class List(Workload):
    name = "list"
    describe = "paged LIST of all keys, 500 per page, at the first page's revision"

    async def setup(self, calls: Calls, p: Params) -> None:
        await prepare_keys(calls, p, p.keys, p.history)

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        end = prefix_end(p.prefix)

        async def op() -> None:
            assert await paged_list(calls, p, p.prefix, end) == p.keys

        return op


class Count(List):
    name = "count"
    describe = "count_only Range over all keys"

    async def setup(self, calls: Calls, p: Params) -> None:
        await prepare_keys(calls, p, p.keys)

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        request = pb.RangeRequest(
            key=p.prefix, range_end=prefix_end(p.prefix), count_only=True
        ).SerializeToString()

        async def op() -> None:
            await calls.range(request)

        return op


class Lease(Workload):
    name = "lease"
    describe = "LeaseGrant then a create txn with that lease"
    reuse_lease = False

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        value = b"l" * p.value_size
        counter = iter(range(10**9))
        base = p.prefix + b"l%d-%d-" % (worker, index)
        grant = pb.LeaseGrantRequest(TTL=600).SerializeToString()
        lease = [0]

        async def op() -> None:
            if not (self.reuse_lease and lease[0]):
                lease[0] = pb.LeaseGrantResponse.FromString(await calls.grant(grant)).ID
            await calls.txn(create_txn(base + b"%d" % next(counter), value, lease[0]))

        return op


class LeasedCreate(Lease):
    name = "leased-create"
    describe = "create txns attached to one lease per client, granted once (kube's Events)"
    reuse_lease = True  # kube-apiserver attaches many objects to one lease


class Mixed(Workload):
    name = "mixed"
    describe = "kube-apiserver mix: 45% get, 25% update, 10% create, 5% delete txn, 15% list(100)"

    async def setup(self, calls: Calls, p: Params) -> None:
        await prepare_keys(calls, p, p.keys)

    def client(self, calls: Calls, p: Params, worker: int, index: int) -> Op:
        rnd = random.Random(worker * 100_000 + index)
        value = b"m" * p.value_size
        revs: dict[int, int] = {}
        mine: list[tuple[bytes, int]] = []  # keys created here, at their revision
        counter = iter(range(10**9))
        base = p.prefix + b"n%d-%d-" % (worker, index)
        small = Params(**{**p.__dict__, "page": 100})
        end = prefix_end(p.prefix)

        async def op() -> None:
            roll = rnd.random()
            i = rnd.randrange(p.keys)
            if roll < 0.45:
                await calls.range(pb.RangeRequest(key=key(p, i)).SerializeToString())
            elif roll < 0.70:
                resp = await calls.txn(update_txn(key(p, i), value, revs.get(i, 0)))
                revs[i] = current_rev(resp)
            elif roll < 0.80:
                k = base + b"%d" % next(counter)
                created = pb.TxnResponse.FromString(await calls.txn(create_txn(k, value)))
                mine.append((k, created.header.revision))
            elif roll < 0.85:
                # kube-apiserver's delete, of a key this client created, at its revision
                k, rev = mine.pop() if mine else (base + b"%d" % next(counter), 0)
                await calls.txn(delete_txn(k, rev))
            else:
                start = key(p, rnd.randrange(max(1, p.keys - 100)))
                first = pb.RangeRequest(key=start, range_end=end, limit=small.page)
                await calls.range(first.SerializeToString())

        return op


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Create(),
        Update(),
        Get(),
        GetSerializable(),
        List(),
        Count(),
        Lease(),
        LeasedCreate(),
        Mixed(),
    )
}
