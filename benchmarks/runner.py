"""Load generation: several client processes, each with many concurrent clients.

Each worker process runs its share of the clients on its own event loop and reports
every latency, its op and error counts, and the CPU time it used. The load runs for a
warm-up first (connections settle, caches fill, servers reach their steady state), which
is not measured.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .workloads import WORKLOADS, Calls, Params

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    # Each channel its own TCP connection: grpc shares one between identical channels of a
    # process otherwise, and --conns would mean nothing.
    ("grpc.use_local_subchannel_pool", 1),
]
# Several addresses (a cluster's members, "ipv4:a:p,b:q"): each channel sends its calls to
# all of them in turn, as etcd's clientv3 balances over its endpoints.
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))


def channel_options(endpoint: str) -> list[tuple[str, object]]:
    return [*CHANNEL_OPTIONS, ROUND_ROBIN] if "," in endpoint else list(CHANNEL_OPTIONS)


@dataclass(frozen=True)
class Job:
    endpoint: str
    workload: str
    params: Params
    clients: int
    connections: int
    seconds: float
    warmup: float = 0.0


@dataclass(frozen=True)
class Start:
    """Workers signal ``ready``; the parent sets ``event`` when all have."""

    ready: Any
    event: Any


@dataclass
class WorkerResult:
    ops: int
    errors: int
    latencies: bytes  # array('d') of seconds
    cpu_seconds: float
    first_error: str = ""


async def _worker(job: Job, worker: int, clients: int, go: Start) -> WorkerResult:
    workload = WORKLOADS[job.workload]
    channels = [
        grpc.aio.insecure_channel(job.endpoint, options=channel_options(job.endpoint))
        for _ in range(max(1, job.connections))
    ]
    calls = [Calls(ch) for ch in channels]
    latencies = array("d")
    counts = {"ops": 0, "errors": 0}
    first_error: list[str] = []
    ops = [workload.client(calls[i % len(calls)], job.params, worker, i) for i in range(clients)]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    # Every worker starts together, once all are connected and ready.
    go.ready.release()
    while not go.event.is_set():
        await asyncio.sleep(0.01)
    start = time.monotonic() + job.warmup  # what completes before is not counted
    deadline = start + job.seconds

    async def client(op):  # type: ignore[no-untyped-def]
        while (now := time.monotonic()) < deadline:
            t0 = time.perf_counter()
            try:
                await op()
            except (grpc.RpcError, AssertionError) as err:
                if now >= start:
                    counts["errors"] += 1
                    if not first_error:
                        first_error.append(str(err)[:300])
                continue
            if now >= start:
                latencies.append(time.perf_counter() - t0)
                counts["ops"] += 1

    async def cpu_at_start() -> float:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        return time.process_time()

    cpu_start = asyncio.create_task(cpu_at_start())
    await asyncio.gather(*(client(op) for op in ops))
    cpu_seconds = time.process_time() - await cpu_start
    for ch in channels:
        await ch.close()
    return WorkerResult(
        counts["ops"],
        counts["errors"],
        latencies.tobytes(),
        cpu_seconds,
        first_error[0] if first_error else "",
    )


def _run_worker(
    job: Job, worker: int, clients: int, go: Start, cpus: str | None, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        import uvloop

        result = uvloop.run(_worker(job, worker, clients, go))
    except ImportError:
        result = asyncio.run(_worker(job, worker, clients, go))
    out.put((worker, result))


def run(
    job: Job,
    processes: int,
    client_cpus: str | None = None,
    on_start: Callable[[], None] | None = None,
) -> list[WorkerResult]:
    """Run a job across ``processes`` worker processes; returns each worker's result.
    ``on_start`` is called (in a thread) when the warm-up ends and measuring begins."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = Start(ctx.Semaphore(0), ctx.Event())
    shares = [
        job.clients // processes + (1 if i < job.clients % processes else 0)
        for i in range(processes)
    ]
    procs = [
        ctx.Process(target=_run_worker, args=(job, i, shares[i], go, client_cpus, out), daemon=True)
        for i in range(processes)
        if shares[i]
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not go.ready.acquire(timeout=120):
            raise RuntimeError("a load worker did not start")
    go.event.set()
    if on_start is not None:
        threading.Timer(job.warmup, on_start).start()
    results = [out.get(timeout=job.warmup + job.seconds + 300) for _ in procs]
    for proc in procs:
        proc.join(30)
    return [r for _, r in sorted(results, key=lambda item: item[0])]


async def setup(endpoint: str, workload: str, params: Params) -> None:
    async with grpc.aio.insecure_channel(endpoint, options=channel_options(endpoint)) as channel:
        await WORKLOADS[workload].setup(Calls(channel), params)
