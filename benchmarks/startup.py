"""Start-up time on a large table, and single-client put/get latency.

    python -m geminikv_bench.startup --keys 100000 --history 0

Fills a fresh embedded PostgreSQL with ``keys`` keys (1 KiB values) and ``history``
extra revisions per key, in Kine's row layout, then times ``geminikv`` from launch to
serving, and one client's sequential Put and Get latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc

from . import tables
from .targets import GeminiTarget

PREFIX = "/registry/bench/"


def latency(endpoint: str, n: int = 500) -> tuple[list[float], list[float]]:
    channel = grpc.insecure_channel(endpoint)
    kv = rpc_pb2_grpc.KVStub(channel)
    puts, gets = [], []
    for i in range(n):
        t = time.perf_counter()
        kv.Put(pb.PutRequest(key=b"/lat/%d" % (i % 50), value=b"v" * 1024))
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        kv.Range(pb.RangeRequest(key=b"/lat/%d" % (i % 50)))
        gets.append(time.perf_counter() - t)
    channel.close()
    return puts, gets


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--history", type=int, default=0)
    args = ap.parse_args()
    pg, dsn = tables.filled(args.keys, args.history, PREFIX)
    try:
        target = GeminiTarget(dsn)
        t0 = time.monotonic()
        target.start()
        print(f"start-up to serving: {time.monotonic() - t0:.2f}s", flush=True)
        try:
            channel = grpc.insecure_channel(target.endpoint)
            count = (
                rpc_pb2_grpc.KVStub(channel)
                .Range(
                    pb.RangeRequest(
                        key=b"/registry/bench/", range_end=b"/registry/bench0", count_only=True
                    )
                )
                .count
            )
            channel.close()
            print(f"keys served: {count}", flush=True)
            puts, gets = latency(target.endpoint)
            for name, values in (("put", puts), ("get", gets)):
                values.sort()
                print(
                    f"single-client {name}: p50 {statistics.median(values) * 1000:.2f} ms,"
                    f" p99 {values[int(len(values) * 0.99)] * 1000:.2f} ms"
                )
        finally:
            target.stop()
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
