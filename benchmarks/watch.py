"""The watch workload: W watchers on one prefix, writers at a fixed rate or full speed.

Latency is measured from a write's acknowledgement to its event's arrival at each
watcher (CLOCK_MONOTONIC is shared by all processes); an acknowledged write that some
watcher never receives counts as lost.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from array import array
from multiprocessing.synchronize import Event as EventT

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

from .runner import channel_options
from .workloads import prefix_end


async def _watchers(
    endpoint: str, prefix: bytes, count: int, stop: EventT, ready: EventT
) -> list[tuple[bytes, bytes]]:
    channel = grpc.aio.insecure_channel(endpoint, options=channel_options(endpoint))
    stub = channel.stream_stream("/etcdserverpb.Watch/Watch")
    create = pb.WatchRequest(
        create_request=pb.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), prev_kv=True)
    ).SerializeToString()
    calls = []
    for _ in range(count):
        call = stub()
        await call.write(create)
        pb.WatchResponse.FromString(await call.read())  # created
        calls.append(call)
    ready.set()  # type: ignore[attr-defined]
    results: list[tuple[array, array]] = [(array("q"), array("d")) for _ in calls]
    last = [time.monotonic()]

    async def read(call, revs: array, times: array) -> None:  # type: ignore[no-untyped-def]
        while True:
            raw = await call.read()
            now = last[0] = time.monotonic()
            for event in pb.WatchResponse.FromString(raw).events:
                revs.append(event.kv.mod_revision)
                times.append(now)

    tasks = [asyncio.create_task(read(c, *r)) for c, r in zip(calls, results, strict=True)]
    while not stop.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
    drain_until = time.monotonic() + 120
    while time.monotonic() - last[0] < 1.0 and time.monotonic() < drain_until:
        await asyncio.sleep(0.1)  # until events stop arriving
    for task in tasks:
        task.cancel()
    for call in calls:
        call.cancel()
    await channel.close()
    return [(r.tobytes(), t.tobytes()) for r, t in results]


async def _writers(
    endpoint: str, prefix: bytes, count: int, rate: float, seconds: float, value_size: int
) -> tuple[bytes, bytes, bytes, float]:
    channels = [
        grpc.aio.insecure_channel(endpoint, options=channel_options(endpoint)) for _ in range(2)
    ]
    puts = [ch.unary_unary("/etcdserverpb.KV/Put") for ch in channels]
    revs, times, acks = array("q"), array("d"), array("d")
    value = b"w" * value_size
    deadline = time.monotonic() + seconds
    interval = count / rate if rate > 0 else 0.0

    async def writer(i: int) -> None:
        n = 0
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            req = pb.PutRequest(key=prefix + b"w%d-%d" % (i, n % 100), value=value)
            sent = time.monotonic()
            resp = pb.PutResponse.FromString(await puts[i % 2](req.SerializeToString()))
            times.append(sent)
            acks.append(time.monotonic())
            revs.append(resp.header.revision)
            n += 1

    started = time.monotonic()
    await asyncio.gather(*(writer(i) for i in range(count)))
    elapsed = time.monotonic() - started
    for ch in channels:
        await ch.close()
    return revs.tobytes(), times.tobytes(), acks.tobytes(), elapsed


def _run_watchers(
    endpoint: str, prefix: bytes, count: int, stop: EventT, ready: EventT, out: mp.Queue
) -> None:
    out.put(("watchers", asyncio.run(_watchers(endpoint, prefix, count, stop, ready))))


def _run_writers(
    endpoint: str,
    prefix: bytes,
    count: int,
    rate: float,
    seconds: float,
    value_size: int,
    out: mp.Queue,
) -> None:  # type: ignore[type-arg]
    out.put(("writers", asyncio.run(_writers(endpoint, prefix, count, rate, seconds, value_size))))


def run(
    endpoint: str,
    prefix: bytes,
    watchers: int,
    writers: int,
    rate: float,
    seconds: float,
    value_size: int,
) -> dict[str, object]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready, stop = ctx.Event(), ctx.Event()
    wproc = ctx.Process(target=_run_watchers, args=(endpoint, prefix, watchers, stop, ready, out))
    wproc.start()
    if not ready.wait(60):
        raise RuntimeError("watchers did not start")
    ctx.Process(
        target=_run_writers, args=(endpoint, prefix, writers, rate, seconds, value_size, out)
    ).start()
    got = dict([out.get(timeout=seconds + 120)])
    stop.set()  # the writers are done: watchers drain, then report
    got.update([out.get(timeout=300)])
    writes = got["writers"]
    acked_revs = array("q", writes[0])  # type: ignore[index]
    sent = dict(zip(acked_revs, array("d", writes[1]), strict=True))  # type: ignore[index]
    acked = dict(zip(acked_revs, array("d", writes[2]), strict=True))  # type: ignore[index]
    latencies = array("d")  # write sent → event received
    after_ack = array("d")  # write acknowledged → event received (often negative)
    lost = 0
    for raw_revs, raw_times in got["watchers"]:  # type: ignore[union-attr]
        revs, times = array("q", raw_revs), array("d", raw_times)
        seen = set()
        for rev, at in zip(revs, times, strict=True):
            if rev in acked and rev not in seen:
                seen.add(rev)
                latencies.append(at - sent[rev])
                after_ack.append(at - acked[rev])
        lost += len(acked) - len(seen)
    wproc.join(60)
    elapsed = float(writes[3])  # type: ignore[index]
    ordered = sorted(after_ack)
    return {
        "writes": len(acked),
        "write_rate": len(acked) / elapsed if elapsed else 0.0,
        "latencies": latencies.tobytes(),
        "lost": lost,
        "seconds": elapsed,
        "ack_to_event_p50_ms": ordered[len(ordered) // 2] * 1000 if ordered else 0.0,
        "ack_to_event_p99_ms": ordered[int(len(ordered) * 0.99)] * 1000 if ordered else 0.0,
    }
