"""Hostile load on a geminikv process: storms of 1000 clients connecting at once, and a
100 MB list. The server answers everything, its file descriptors return to where they
were, and its memory stays bounded."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.conftest import unique_prefix
from tests.servers import GeminiProcess, Postgres
from tests.waiting import eventually

MiB = 1024 * 1024
CLIENTS = 1000
STORMS = 8
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """1000 connections need 1000 descriptors on each side (the child inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _usage(proc: psutil.Process) -> tuple[int, int]:
    return proc.num_fds(), int(proc.memory_info().rss)


def _settle(proc: psutil.Process, fds: int, timeout: float = 15.0) -> tuple[int, int]:
    """Wait until the server holds no more than ``fds`` descriptors; the usage then."""
    eventually(lambda: proc.num_fds() <= fds, f"at most {fds} descriptors open", timeout, 0.1)
    time.sleep(0.3)
    return _usage(proc)


async def _storm(target: str, prefix: bytes, proc: psutil.Process) -> dict[str, float]:
    """CLIENTS channels (each its own TCP connection) connect, then all send a Range and
    a Put at once, and close together once every one has been answered."""
    connected, go, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    ready, done, retries = [0], [0], [0]

    async def client(i: int) -> None:
        # a local subchannel pool: no sharing of one connection between channels
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            ready[0] += 1
            if ready[0] == CLIENTS:
                connected.set()
            await go.wait()
            kv = rpc_pb2_grpc.KVStub(channel)
            key = prefix + b"%04d" % i
            for attempt in range(30):
                try:
                    await kv.Range(pb.RangeRequest(key=key), timeout=60)
                    await kv.Put(pb.PutRequest(key=key, value=b"v%d" % i), timeout=60)
                    break
                except grpc.aio.AioRpcError as err:
                    # allowed: overload answered with a retryable error (a Put may then
                    # be applied twice, harmlessly: same key, same value)
                    assert err.code() in RETRIED, err
                    retries[0] += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
            else:
                raise AssertionError(f"client {i} never got through")
            done[0] += 1
            if done[0] == CLIENTS:
                finished.set()
            await finished.wait()

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    started = time.monotonic()
    await asyncio.wait_for(connected.wait(), 120)
    connect_seconds = time.monotonic() - started
    fds_connected = proc.num_fds()
    go.set()
    await asyncio.wait_for(finished.wait(), 120)
    storm_seconds = time.monotonic() - started
    rss_peak = proc.memory_info().rss
    await asyncio.gather(*tasks)
    return {
        "connect_seconds": connect_seconds,
        "seconds": storm_seconds,
        "fds_connected": fds_connected,
        "rss_answered": rss_peak,
        "retries": retries[0],
    }


@pytest.mark.usefixtures("enough_fds")
def test_connection_storm(postgres: Postgres) -> None:
    server = GeminiProcess(postgres.new_database("storm")).start()
    try:
        assert server.process is not None
        proc = psutil.Process(server.process.pid)
        warm = server.stubs()  # the first request creates what every later one reuses
        warm.kv.Put(pb.PutRequest(key=b"/warm", value=b"x"))
        warm.kv.Range(pb.RangeRequest(key=b"/warm"))
        warm.close()
        base_fds, base_rss = _settle(proc, 1 << 30)
        rss_after = []
        for _round in range(STORMS):
            prefix = unique_prefix()
            stats = asyncio.run(_storm(server.endpoint, prefix, proc))
            print(f"storm {_round}: {stats}")
            # every client held its own connection at the same time
            assert stats["fds_connected"] >= base_fds + CLIENTS
            check = server.stubs()
            listed = check.kv.Range(
                pb.RangeRequest(key=prefix, range_end=prefix[:-1] + b"0", keys_only=True)
            )
            check.close()
            assert [kv.key for kv in listed.kvs] == [prefix + b"%04d" % i for i in range(CLIENTS)]
            fds, rss = _settle(proc, base_fds + 2)
            print(
                f"after storm {_round}: fds {fds} (base {base_fds}), rss {rss / MiB:.0f} MiB "
                f"(base {base_rss / MiB:.0f} MiB, answering {stats['rss_answered'] / MiB:.0f})"
            )
            assert fds <= base_fds + 2  # every connection closed on the server too
            rss_after.append(rss)
        # Memory: the first storm leaves the allocator's arenas bigger, and what they keep
        # afterwards swings from storm to storm (measured over 16 storms: 88 to 111 MiB,
        # base 54, with no trend). So: bounded, and no growth across the storms after the
        # first (a leak of 4 KiB per connection would be a slope of 4 MiB a storm).
        assert max(rss_after) - base_rss < 96 * MiB
        slope = statistics.linear_regression(range(STORMS - 1), rss_after[1:]).slope
        after_mib = [round(r / MiB) for r in rss_after]
        print(f"rss after each storm (MiB): {after_mib}, slope {slope / MiB:.1f}")
        assert slope < 4 * MiB
    finally:
        server.stop()


def _value(i: int) -> bytes:
    # 1 MiB, different for every key
    return hashlib.sha256(b"%d" % i).digest() * (MiB // 32)


class PeakRss:
    """The highest RSS of a process, sampled every few milliseconds in a thread."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.003)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_hundred_megabyte_list(postgres: Postgres) -> None:
    """100 keys x 1 MiB (etcd takes requests up to 1.5 MiB) listed in one Range.

    The value cache is off, so the values come from PostgreSQL: the heaviest path. A
    response is in memory about four times at its peak: the values as fetched, the
    RangeResponse, its serialization, and gRPC's copy of that for sending (measured:
    3.8x). The bound is 5x; afterwards the memory is returned.
    """
    server = GeminiProcess(postgres.new_database("biglist"), "--value-cache-size", "0").start()
    options = [("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(server.endpoint, options=options)
    try:
        assert server.process is not None
        proc = psutil.Process(server.process.pid)
        kv = rpc_pb2_grpc.KVStub(channel)
        prefix = b"/big/"
        for i in range(100):
            kv.Put(pb.PutRequest(key=prefix + b"%03d" % i, value=_value(i)), timeout=30)
        size = 100 * MiB
        kv.Range(pb.RangeRequest(key=prefix, count_only=True))  # warm the read path
        time.sleep(0.5)
        base = proc.memory_info().rss
        with PeakRss(proc) as peak:
            started = time.monotonic()
            resp = kv.Range(pb.RangeRequest(key=prefix, range_end=b"/big0"), timeout=120)
            seconds = time.monotonic() - started
        assert resp.count == 100 and not resp.more
        assert [kv.key for kv in resp.kvs] == [prefix + b"%03d" % i for i in range(100)]
        assert all(kv.value == _value(i) for i, kv in enumerate(resp.kvs))
        assert resp.ByteSize() > size
        del resp
        growth = peak.peak - base
        eventually(
            lambda: proc.memory_info().rss <= base + size // 4,
            lambda: (
                f"the memory of the response given back: RSS {base / MiB:.0f} MiB before, "
                f"peak {peak.peak / MiB:.0f} MiB, now {proc.memory_info().rss / MiB:.0f} MiB"
            ),
            10,
            0.1,
        )
        after = proc.memory_info().rss
        print(
            f"100 MiB list: {seconds:.2f}s, RSS {base / MiB:.0f} MiB -> peak "
            f"{peak.peak / MiB:.0f} MiB (+{growth / size:.1f}x the response) -> "
            f"{after / MiB:.0f} MiB"
        )
        assert growth < 5 * size
        assert after <= base + size // 4
        # and it still answers
        assert (
            kv.Range(pb.RangeRequest(key=prefix, range_end=b"/big0", count_only=True)).count == 100
        )
    finally:
        channel.close()
        server.stop()
