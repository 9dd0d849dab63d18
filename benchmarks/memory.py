"""Memory: resident memory holding 100 000 keys of 1 KiB, geminikv (+ its PostgreSQL) and etcd.

    python -m geminikv_bench.memory [--keys 100000]

Each target is started empty, loaded with the keys (create txns, 64 at a time), then
measured after a full read of every key (so caches hold what a serving process holds):
geminikv's RSS plus its embedded PostgreSQL's PSS (its backends share buffers: PSS
counts shared pages once), against etcd's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import grpc
import psutil

from .targets import EtcdTarget, GeminiTarget, Target
from .workloads import Calls, Params, paged_list, prefix_end, prepare_keys

PREFIX = b"/registry/memory/"


def resident_mib(target: Target) -> dict[str, float]:
    procs = target.processes()
    out = {"server_rss_mib": procs[0].memory_info().rss / 2**20}
    pss = 0
    for p in procs[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            pss += p.memory_full_info().pss
    out["postgres_pss_mib"] = pss / 2**20
    out["total_mib"] = out["server_rss_mib"] + out["postgres_pss_mib"]
    return out


async def load(endpoint: str, keys: int) -> int:
    async with grpc.aio.insecure_channel(
        endpoint, options=[("grpc.max_receive_message_length", 2**30)]
    ) as channel:
        calls = Calls(channel)
        params = Params(prefix=PREFIX, keys=keys, page=1000)
        await prepare_keys(calls, params, keys)
        return await paged_list(calls, params, PREFIX, prefix_end(PREFIX))


def measure(target: Target, keys: int) -> dict[str, float]:
    target.start()
    try:
        listed = asyncio.run(load(target.endpoint, keys))
        assert listed == keys, f"{target.name} listed {listed} of {keys} keys"
        return resident_mib(target)
    finally:
        target.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geminikv_bench.memory")
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args(argv)
    results = {"keys": args.keys, "geminikv": measure(GeminiTarget(), args.keys)}
    if EtcdTarget.available():
        results["etcd"] = measure(EtcdTarget(), args.keys)
        results["ratio"] = round(results["geminikv"]["total_mib"] / results["etcd"]["total_mib"], 2)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
