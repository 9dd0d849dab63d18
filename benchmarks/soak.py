"""Soak: Kubernetes-shaped traffic for a long time, watching for slow leaks.

    python -m geminikv_bench.soak --minutes 30

Runs geminikv (embedded PostgreSQL) under kube-apiserver's mix (get, optimistic update,
create, delete, paged list) on a bounded set of objects, watchers on the whole prefix,
leases that expire (short TTLs) and compaction every minute keeping 1 000 revisions, as
kube-apiserver compacts. Every 10 s it samples geminikv's resident memory, PostgreSQL's
(PSS), geminikv's open file descriptors and asyncio tasks, the table size and the
watchers. At the end it compares the peaks of the middle and last thirds of the run
(``FLAT``) and exits with 1 if any grew past its limit or any call failed. Not part of
the test suite (it takes minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from geminikv.proto.etcdserverpb import rpc_pb2 as pb

from .targets import GeminiTarget, free_port
from .workloads import WORKLOADS, Calls, Params, create_txn, paged_list, prefix_end

PREFIX = b"/registry/soak/"
SAMPLE_SECONDS = 10.0


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def _pss(process: psutil.Process) -> int:
    try:
        return int(process.memory_full_info().pss)
    except psutil.NoSuchProcess:  # a backend that just ended
        return 0


def sample(target: GeminiTarget, url: str, started: float) -> dict[str, float]:
    procs = target.processes()
    root = procs[0]
    m = metrics(url)
    return {
        "t": round(time.monotonic() - started, 1),
        "geminikv_rss_mib": root.memory_info().rss / 2**20,
        # PSS: PostgreSQL's backends share its buffers; RSS would count them once each
        "postgres_pss_mib": sum(_pss(p) for p in procs[1:]) / 2**20,
        "fds": root.num_fds(),
        "tasks": m.get("geminikv_asyncio_tasks", -1),
        "table_mib": m.get("geminikv_db_size_bytes", 0) / 2**20,
        "watchers": m.get("geminikv_watchers", -1),
        "revision": m.get("geminikv_revision", 0),
    }


async def traffic(endpoint: str, stop: asyncio.Event, counts: dict[str, int], clients: int) -> None:
    channel = grpc.aio.insecure_channel(endpoint)
    calls = Calls(channel)
    params = Params(prefix=PREFIX, keys=2000)
    await WORKLOADS["get"].setup(calls, params)
    page = Params(prefix=PREFIX, page=100)

    def mixed_update(index: int):  # type: ignore[no-untyped-def]
        return WORKLOADS["update"].client(calls, params, 0, index)

    lease_calls = channel.unary_unary("/etcdserverpb.Lease/LeaseGrant")
    compact = channel.unary_unary("/etcdserverpb.KV/Compact")

    async def client(index: int) -> None:
        # kube-apiserver's mix on a bounded set of objects (creates and deletes balance,
        # as in a steady cluster), so any growth is a leak, not more data
        rnd = random.Random(index)
        get, update = WORKLOADS["get"].client(calls, params, 0, index), mixed_update(index)
        while not stop.is_set():
            roll = rnd.random()
            name = PREFIX + b"obj/%d" % rnd.randrange(2000)
            try:
                if roll < 0.45:
                    await get()
                elif roll < 0.70:
                    await update()
                elif roll < 0.80:
                    await calls.txn(create_txn(name, b"o" * 1024))
                elif roll < 0.90:
                    await calls.delete(pb.DeleteRangeRequest(key=name).SerializeToString())
                else:
                    objects = PREFIX + b"obj/"
                    await paged_list(calls, page, objects, prefix_end(objects))
                counts["calls"] += 1
            except grpc.RpcError:
                counts["errors"] += 1

    async def leases() -> None:  # short-lived leased keys: expiry runs all the time
        n = 0
        while not stop.is_set():
            grant = pb.LeaseGrantResponse.FromString(
                await lease_calls(
                    pb.LeaseGrantRequest(TTL=random.randint(2, 6)).SerializeToString()
                )
            )
            await calls.txn(create_txn(PREFIX + b"lease/%d" % n, b"x" * 256, grant.ID))
            n += 1
            await asyncio.sleep(0.05)

    async def watcher() -> None:
        while not stop.is_set():
            call = channel.stream_stream("/etcdserverpb.Watch/Watch")()
            create = pb.WatchCreateRequest(key=PREFIX, range_end=prefix_end(PREFIX), prev_kv=True)
            await call.write(pb.WatchRequest(create_request=create).SerializeToString())
            until = time.monotonic() + random.uniform(30, 120)  # watches come and go
            reading: asyncio.Future[Any] | None = None
            while not stop.is_set() and time.monotonic() < until:
                reading = reading or asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reading}, timeout=1.0)
                if done:
                    reading.result()
                    reading = None
                    counts["watch_responses"] += 1
            call.cancel()
            if reading is not None:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await reading

    async def compactor() -> None:  # kube-apiserver's compaction, every minute
        while not stop.is_set():
            await asyncio.sleep(60)
            head = pb.RangeResponse.FromString(
                await calls.range(pb.RangeRequest(key=PREFIX, count_only=True).SerializeToString())
            ).header.revision
            if head > 1000:
                req = pb.CompactionRequest(revision=head - 1000)
                await compact(req.SerializeToString())
                counts["compactions"] += 1

    jobs = [client(i) for i in range(clients)] + [watcher() for _ in range(10)]
    await asyncio.gather(*jobs, leases(), compactor())
    await channel.close()


# How much a peak may grow from the middle third of the run to the last before the run
# counts as a leak: the middle third starts after the warm-up (the value cache fills in
# about ten minutes); peaks, because the table swings with every compaction and vacuum.
FLAT = {
    "geminikv_rss_mib": 1.10,
    "postgres_pss_mib": 1.10,
    "fds": 1.10,
    "tasks": 1.25,
    "table_mib": 1.15,
}


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third], samples[2 * third :]
    out: dict[str, Any] = {}
    for name, limit in FLAT.items():
        a = max(s[name] for s in middle)
        b = max(s[name] for s in last)
        out[name] = {
            "middle_third_peak": round(a, 1),
            "last_third_peak": round(b, 1),
            "growth": round(b / a, 3) if a else None,
            "flat": b <= a * limit,
        }
    out["flat"] = all(out[name]["flat"] for name in FLAT)
    return out


async def run(minutes: float, out: Path, clients: int) -> dict[str, Any]:
    port = free_port()
    target = GeminiTarget(extra=["--metrics-bind-address", f"127.0.0.1:{port}"])
    target.start()
    url = f"http://127.0.0.1:{port}/metrics"
    counts = {"calls": 0, "errors": 0, "watch_responses": 0, "compactions": 0}
    stop = asyncio.Event()
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    load = asyncio.create_task(traffic(target.endpoint, stop, counts, clients))
    try:
        while time.monotonic() - started < minutes * 60:
            await asyncio.sleep(SAMPLE_SECONDS)
            if load.done():
                load.result()  # raises what stopped the traffic
            samples.append(sample(target, url, started))
            print(json.dumps({**samples[-1], **counts}), flush=True)
        stop.set()
        await asyncio.wait_for(load, 120)
    finally:
        target.stop()
    result = {"minutes": minutes, "counts": counts, "summary": summary(samples), "samples": samples}
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geminikv_bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args.minutes, args.out, args.clients))
    print(json.dumps({"counts": result["counts"], "summary": result["summary"]}, indent=1))
    return 0 if result["summary"]["flat"] and not result["counts"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
