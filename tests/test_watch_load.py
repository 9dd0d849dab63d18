"""Load: 8 writers at full speed and 100 watchers (some deliberately slow) on one
geminikv process; every watcher must receive every event exactly once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.conftest import unique_prefix
from tests.servers import GeminiProcess, Postgres
from tests.waiting import eventually_async

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("GEMINIKV_WATCH_LOAD_SECONDS", "6"))
STREAMS = 10
WATCHERS_PER_STREAM = 10
SLOW_STREAMS = 2
WRITERS = 8


async def _writer(target: str, prefix: bytes, stop: asyncio.Event, acked: list[int]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        rnd = random.Random()
        while not stop.is_set():
            key = prefix + b"k%03d" % rnd.randrange(200)
            if rnd.random() < 0.1:
                resp = await kv.DeleteRange(pb.DeleteRangeRequest(key=key))
                if resp.deleted:
                    acked.append(resp.header.revision)
            else:
                resp = await kv.Put(pb.PutRequest(key=key, value=b"x" * 100))
                acked.append(resp.header.revision)


async def _stream(
    target: str,
    prefix: bytes,
    slow: bool,
    seen: dict[int, list[int]],
    ready: asyncio.Event,
    done: asyncio.Event,
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = rpc_pb2_grpc.WatchStub(channel).Watch()
        for _ in range(WATCHERS_PER_STREAM):
            await call.write(
                pb.WatchRequest(
                    create_request=pb.WatchCreateRequest(
                        key=prefix, range_end=prefix[:-1] + b"0", prev_kv=True
                    )
                )
            )
        ids: list[int] = []
        while len(ids) < WATCHERS_PER_STREAM:
            resp = await call.read()
            assert resp.created and not resp.canceled
            ids.append(resp.watch_id)
            seen[id(call) * 1000 + resp.watch_id] = []
        ready.set()
        reader = asyncio.create_task(_read(call, slow, seen))
        await done.wait()
        call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _read(call, slow: bool, seen: dict[int, list[int]]) -> None:  # type: ignore[no-untyped-def]
    while True:
        resp = await call.read()
        assert not resp.canceled, resp
        seen[id(call) * 1000 + resp.watch_id].extend(e.kv.mod_revision for e in resp.events)
        if slow:  # a consumer with a fraction of the others' throughput
            await asyncio.sleep(0.001 + 0.0005 * len(resp.events))


async def test_every_watcher_gets_every_event(postgres: Postgres) -> None:
    server = GeminiProcess(postgres.new_database("load")).start()
    try:
        prefix = unique_prefix()
        seen: dict[int, list[int]] = {}
        acked: list[int] = []
        stop, done = asyncio.Event(), asyncio.Event()
        readies = [asyncio.Event() for _ in range(STREAMS)]
        streams = [
            asyncio.create_task(
                _stream(server.endpoint, prefix, i < SLOW_STREAMS, seen, readies[i], done)
            )
            for i in range(STREAMS)
        ]
        for ready in readies:
            await asyncio.wait_for(ready.wait(), 30)
        writers = [
            asyncio.create_task(_writer(server.endpoint, prefix, stop, acked))
            for _ in range(WRITERS)
        ]
        await asyncio.sleep(SECONDS)
        stop.set()
        await asyncio.gather(*writers)
        expected = sorted(acked)
        assert len(expected) == len(set(expected)) > 0
        await eventually_async(
            lambda: all(len(revs) >= len(expected) for revs in seen.values()),
            lambda: (
                f"all {len(expected)} writes seen by every watcher (the fewest: "
                f"{min(len(revs) for revs in seen.values())})"
            ),
            240,
            0.5,
        )
        done.set()
        await asyncio.gather(*streams)
        assert len(seen) == STREAMS * WATCHERS_PER_STREAM
        for revs in seen.values():
            assert revs == expected[: len(revs)]  # in order, no duplicate, no gap
        short = [len(revs) for revs in seen.values() if len(revs) < len(expected)]
        assert not short, f"{len(short)} watchers incomplete ({short}) of {len(expected)}"
        print(f"{len(expected)} writes in {SECONDS:.0f}s, {len(seen)} watchers verified")
    finally:
        server.stop()
