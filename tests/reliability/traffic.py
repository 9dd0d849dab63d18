"""Recorded traffic for reliability runs: Kubernetes-shaped clients and watchers.

Clients send Put/Range/DeleteRange/Txn and lease calls, including kube-apiserver's
create (``MOD == 0 → Put``), optimistic update and delete (``MOD == rev → …, else
Get``) and paged lists at a fixed revision; some calls are cancelled mid-flight (a
dropped connection: the outcome is unknown). Watchers follow the whole prefix, ask for
progress, drop and resume their streams, and one of them reads slowly. Every call and
every watch response is recorded in a ``History`` for the checkers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.reliability.history import History, Operation, WatchRecord

CALL_TIMEOUT = 3.0
PROGRESS_AFTER = 1.0  # the complete watch asks for progress after this long without a response
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # each client its own connection (not gRPC's one shared per address): clients of one
    # address served by several processes (--workers) reach all of them
    ("grpc.use_local_subchannel_pool", 1),
]


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def _read_into(call: grpc.aio.StreamStreamCall, out: asyncio.Queue[Any]) -> None:
    """Every response of ``call`` into ``out``, then EOF or the error that ended it (the
    reads are never cancelled by a wait's timeout, which would cancel the call)."""
    try:
        while True:
            resp = await call.read()
            await out.put(resp)
            if resp is grpc.aio.EOF:
                return
    except grpc.RpcError as err:
        await out.put(err)


@dataclass
class Settings:
    clients: int = 8
    watchers: int = 3
    keys: int = 24
    seed: int = 1


class Traffic:
    def __init__(self, endpoints: list[str], prefix: bytes, settings: Settings) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.end = prefix_end(prefix)
        self.settings = settings
        self.history = History(prefix=prefix, base_revision=0)
        self._stop = asyncio.Event()
        self.unexpected: list[str] = []  # errors a correct server never gives here

    # -- running -----------------------------------------------------------------------

    async def run(self, duration: float) -> History:
        async with grpc.aio.insecure_channel(self.endpoints[0], CHANNEL_OPTIONS) as channel:
            request = pb.RangeRequest(key=self.prefix, range_end=self.end)
            for attempt in range(20):
                try:
                    head = await rpc_pb2_grpc.KVStub(channel).Range(request, timeout=10)
                    break
                except grpc.RpcError:
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.5)
        assert head.count == 0, "the prefix must be empty at the start"
        self.history.base_revision = head.header.revision
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.settings.clients)]
        tasks += [asyncio.create_task(self._watcher(i)) for i in range(self.settings.watchers)]
        await asyncio.sleep(duration)
        self._stop.set()
        await asyncio.gather(*tasks)
        return self.history

    async def complete(self, timeout: float = 60.0) -> None:
        """Record the table's own history of the prefix since the start (after the run)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.history.complete = await self._complete()
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _complete(self) -> WatchRecord:
        async with grpc.aio.insecure_channel(self.endpoints[0], CHANNEL_OPTIONS) as channel:
            final = (
                await rpc_pb2_grpc.KVStub(channel).Range(
                    pb.RangeRequest(key=self.prefix, range_end=self.end, count_only=True),
                    timeout=10,
                )
            ).header.revision
            create = pb.WatchCreateRequest(
                key=self.prefix,
                range_end=self.end,
                start_revision=self.history.base_revision + 1,
                prev_kv=True,
            )
            record = WatchRecord(client=-1, request=create)
            call = rpc_pb2_grpc.WatchStub(channel).Watch(timeout=60)
            await call.write(pb.WatchRequest(create_request=create))
            responses: asyncio.Queue[Any] = asyncio.Queue()
            reader = asyncio.create_task(_read_into(call, responses))
            progress = pb.WatchRequest(progress_request=pb.WatchProgressRequest())
            try:
                while True:
                    try:
                        resp = await asyncio.wait_for(responses.get(), PROGRESS_AFTER)
                    except TimeoutError:
                        # ``final`` need not be a revision of the prefix (other writers):
                        # only a progress response reaches it, and one asked for while the
                        # watch catches up is dropped (as etcd does): ask again
                        await call.write(progress)
                        continue
                    if isinstance(resp, grpc.RpcError):
                        raise resp
                    assert resp is not grpc.aio.EOF, "the complete watch ended early"
                    record.responses.append((time.monotonic_ns(), resp))
                    reached = resp.events[-1].kv.mod_revision if resp.events else 0
                    if not resp.events and not resp.created:
                        reached = resp.header.revision  # a progress notification
                    if reached >= final:
                        break
            finally:
                reader.cancel()
                call.cancel()
            return record

    # -- clients -----------------------------------------------------------------------

    async def _client(self, number: int) -> None:
        rng = random.Random(self.settings.seed * 1000 + number)
        endpoint = self.endpoints[number % len(self.endpoints)]
        client = _Client(self, number, endpoint, rng)
        async with grpc.aio.insecure_channel(endpoint, CHANNEL_OPTIONS) as channel:
            client.kv = rpc_pb2_grpc.KVStub(channel)
            client.lease = rpc_pb2_grpc.LeaseStub(channel)
            while not self._stop.is_set():
                await client.step()

    # -- watchers ----------------------------------------------------------------------

    async def _watcher(self, number: int) -> None:
        rng = random.Random(self.settings.seed * 1000 + 500 + number)
        endpoint = self.endpoints[(number + 1) % len(self.endpoints)]
        slow = number == 0  # reads slowly: its stream backs up and catches up
        prev_kv = number % 2 == 1
        start = self.history.base_revision + 1
        resumed = False
        while not self._stop.is_set():
            create = pb.WatchCreateRequest(
                key=self.prefix,
                range_end=self.end,
                start_revision=start,
                prev_kv=prev_kv,
                progress_notify=True,
            )
            record = WatchRecord(client=1000 + number, request=create, resumed=resumed)
            self.history.watches.append(record)
            last = await self._watch_once(endpoint, record, rng, slow)
            if not record.responses:
                self.history.watches.remove(record)  # never started (the server was down)
            start = max(start, last + 1)
            resumed = True
            if record.ended == "broken":
                await asyncio.sleep(0.2)  # the server may be restarting

    async def _watch_once(
        self, endpoint: str, record: WatchRecord, rng: random.Random, slow: bool
    ) -> int:
        """Run one watcher until it breaks, is dropped or the run ends; returns the
        newest revision it is known to have everything up to."""
        last = record.request.start_revision - 1

        async def read(call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
            nonlocal last
            await call.write(pb.WatchRequest(create_request=record.request))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    record.ended = "broken"
                    return
                record.responses.append((time.monotonic_ns(), resp))
                if resp.canceled:
                    record.ended = "canceled"
                    return
                if resp.events:
                    last = max(last, resp.events[-1].kv.mod_revision)
                elif not resp.created:
                    last = max(last, resp.header.revision)
                if slow:
                    await asyncio.sleep(0.02)

        async with grpc.aio.insecure_channel(endpoint, CHANNEL_OPTIONS) as channel:
            call = rpc_pb2_grpc.WatchStub(channel).Watch()
            reading = asyncio.create_task(read(call))
            progress = asyncio.create_task(self._ask_progress(call))
            stopping = asyncio.create_task(self._stop.wait())
            # the client drops its connection after a while, or the run ends
            await asyncio.wait(
                {reading, stopping},
                timeout=rng.uniform(2.0, 8.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in (reading, progress, stopping):
                task.cancel()
            for task in (reading, progress, stopping):
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except grpc.RpcError:
                    record.ended = "broken"
            call.cancel()
        return last

    async def _ask_progress(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            while True:
                await asyncio.sleep(0.5)
                await call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))


class _Client:
    """One client's choice of calls, each recorded with its timing and outcome."""

    def __init__(self, traffic: Traffic, number: int, endpoint: str, rng: random.Random) -> None:
        self.traffic = traffic
        self.number = number
        self.endpoint = endpoint
        self.rng = rng
        self.kv: rpc_pb2_grpc.KVStub
        self.lease: rpc_pb2_grpc.LeaseStub
        self.sequence = 0
        self.leases: list[int] = []

    def key(self) -> bytes:
        return self.traffic.prefix + b"k%02d" % self.rng.randrange(self.traffic.settings.keys)

    def value(self) -> bytes:
        self.sequence += 1
        return b"c%d-%d" % (self.number, self.sequence)  # unique in the run

    async def call(self, kind: str, request: object, drop: bool = False) -> object | None:
        """Send one call and record it; returns the response, or None if it failed."""
        method = {
            "range": self.kv.Range,
            "put": self.kv.Put,
            "delete": self.kv.DeleteRange,
            "txn": self.kv.Txn,
            "lease_grant": self.lease.LeaseGrant,
            "lease_revoke": self.lease.LeaseRevoke,
        }[kind]
        op = Operation(self.number, time.monotonic_ns(), None, kind, request)
        self.traffic.history.operations.append(op)
        call = method(request, timeout=CALL_TIMEOUT)
        try:
            if drop:  # the client goes away while the call is in flight
                asyncio.get_running_loop().call_later(self.rng.uniform(0, 0.003), call.cancel)
            op.response = await call
            op.ret = time.monotonic_ns()
            return op.response
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not drop or (task is not None and task.cancelling()):
                raise  # the run itself is being cancelled
            op.error = "CANCELLED"  # the dropped call: its outcome is unknown
            return None
        except grpc.RpcError as err:
            op.error = err.code().name
            if op.error not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND"):
                self.traffic.unexpected.append(f"{kind}: {op.error} {err.details()}")
            if op.error in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                await asyncio.sleep(self.rng.uniform(0.05, 0.2))  # back off, as clients do
            return None

    async def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.18:
            await self.put()
        elif roll < 0.33:
            await self.call("range", pb.RangeRequest(key=self.key()))
        elif roll < 0.38:
            await self.call("range", pb.RangeRequest(key=self.key(), serializable=True))
        elif roll < 0.46:
            await self.paged_list()
        elif roll < 0.60:
            await self.create()
        elif roll < 0.75:
            await self.update()
        elif roll < 0.82:
            await self.delete()
        elif roll < 0.86:
            await self.call("delete", pb.DeleteRangeRequest(key=self.key(), prev_kv=True))
        elif roll < 0.89:
            prefix, end = self.traffic.prefix, self.traffic.end
            await self.call("range", pb.RangeRequest(key=prefix, range_end=end, count_only=True))
        elif roll < 0.93:
            await self.leased_put()
        elif roll < 0.95:
            await self.revoke()
        elif roll < 0.965:
            await self.multi_key_txn()
        elif roll < 0.97:
            await self.range_delete()
        elif roll < 0.985:
            req = pb.PutRequest(key=self.key(), value=self.value())
            await self.call("put", req, drop=True)
        else:
            await self.put_then_disconnect()

    async def put_then_disconnect(self) -> None:
        """The client's connection closes (TCP, not a cancel) while its put is in flight."""
        req = pb.PutRequest(key=self.key(), value=self.value())
        op = Operation(self.number, time.monotonic_ns(), None, "put", req)
        self.traffic.history.operations.append(op)
        channel = grpc.aio.insecure_channel(self.endpoint, CHANNEL_OPTIONS)
        call = rpc_pb2_grpc.KVStub(channel).Put(req, timeout=CALL_TIMEOUT)
        closing = asyncio.get_running_loop().call_later(
            self.rng.uniform(0, 0.003), lambda: asyncio.ensure_future(channel.close())
        )
        try:
            op.response = await call
            op.ret = time.monotonic_ns()
        except grpc.RpcError as err:
            op.error = err.code().name  # the outcome is unknown
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the run itself is being cancelled
            op.error = "CANCELLED"
        finally:
            closing.cancel()
            await channel.close()

    async def put(self) -> None:
        req = pb.PutRequest(key=self.key(), value=self.value(), prev_kv=self.rng.random() < 0.5)
        await self.call("put", req)

    async def paged_list(self) -> None:
        """kube-apiserver's paged list: later pages at the first page's revision."""
        limit = self.rng.choice([3, 7, 10])
        key, end, revision = self.traffic.prefix, self.traffic.end, 0
        for _ in range(20):
            req = pb.RangeRequest(key=key, range_end=end, limit=limit, revision=revision)
            resp = await self.call("range", req)
            if not isinstance(resp, pb.RangeResponse) or not resp.more or not resp.kvs:
                return
            revision = revision or resp.header.revision
            key = resp.kvs[-1].key + b"\x00"

    async def guarded(self, key: bytes, mod: int, then: pb.RequestOp) -> None:
        """kube-apiserver's guarded write: ``then`` if the key's MOD is ``mod`` (0: the key
        does not exist), else read the key."""
        compare = pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL)
        compare.mod_revision = mod
        otherwise = pb.RequestOp(request_range=pb.RangeRequest(key=key))
        request = pb.TxnRequest(compare=[compare], success=[then], failure=[otherwise])
        await self.call("txn", request)

    async def create(self) -> None:
        key = self.key()
        put = pb.RequestOp(request_put=pb.PutRequest(key=key, value=self.value()))
        await self.guarded(key, 0, put)

    async def _current(self, key: bytes) -> int | None:
        resp = await self.call("range", pb.RangeRequest(key=key))
        if isinstance(resp, pb.RangeResponse) and resp.kvs:
            return int(resp.kvs[0].mod_revision)
        return None

    async def update(self) -> None:
        key = self.key()
        mod = await self._current(key)
        if mod is None:
            return
        if self.rng.random() < 0.2:
            mod -= 1  # a stale read: the compare must fail
        put = pb.RequestOp(request_put=pb.PutRequest(key=key, value=self.value()))
        await self.guarded(key, mod, put)

    async def delete(self) -> None:
        key = self.key()
        mod = await self._current(key)
        if mod is not None:
            delete = pb.DeleteRangeRequest(key=key, prev_kv=True)
            await self.guarded(key, mod, pb.RequestOp(request_delete_range=delete))

    async def multi_key_txn(self) -> None:
        """Several keys written in one txn: atomic, all or nothing, in the watches too."""
        keys = sorted({self.key() for _ in range(3)})
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=k, value=self.value())) for k in keys]
        if len(keys) > 1 and self.rng.random() < 0.5:
            ops[-1] = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=keys[-1]))
        await self.call("txn", pb.TxnRequest(success=ops))

    async def range_delete(self) -> None:
        """A DeleteRange over a few neighbouring keys."""
        i = self.rng.randrange(self.traffic.settings.keys)
        key, end = (self.traffic.prefix + b"k%02d" % n for n in (i, i + 3))
        await self.call("delete", pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=True))

    async def leased_put(self) -> None:
        if not self.leases or self.rng.random() < 0.3:
            grant = await self.call("lease_grant", pb.LeaseGrantRequest(TTL=600))
            if isinstance(grant, pb.LeaseGrantResponse) and not grant.error:
                self.leases.append(grant.ID)
        if self.leases:
            lease = self.rng.choice(self.leases)
            put = pb.PutRequest(key=self.key(), value=self.value(), lease=lease)
            if self.rng.random() < 0.5:
                await self.call("put", put)
            else:  # kube-apiserver's create of an Event
                await self.guarded(put.key, 0, pb.RequestOp(request_put=put))

    async def revoke(self) -> None:
        if self.leases:
            lease = self.leases.pop(self.rng.randrange(len(self.leases)))
            await self.call("lease_revoke", pb.LeaseRevokeRequest(ID=lease))
