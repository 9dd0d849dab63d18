"""Compaction at scale, and Kine's single DELETE on the same table for comparison.

    python -m geminikv_bench.compaction --keys 100000 --revisions 11

Fills Kine's table with ``keys`` keys of ``revisions`` revisions each (1 KiB values),
then (1) starts geminikv and compacts everything through the Compact RPC (physical)
while a client keeps reading and writing, and (2) runs Kine's compaction statement
(its generic driver's CompactSQL) on an identical table. Prints totals, the longest
statement, the client's worst latency during compaction, and the table size before and
after VACUUM.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time

import asyncpg
import grpc

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.storage.embedded import EmbeddedPostgres

from . import tables
from .targets import GeminiTarget

PREFIX = "/registry/c/"
KINE_COMPACT = """
    DELETE FROM kine AS kv USING (
        SELECT kp.prev_revision AS id FROM kine AS kp
        WHERE kp.name != 'compact_rev_key' AND kp.prev_revision != 0 AND kp.id <= $1
        UNION
        SELECT kd.id AS id FROM kine AS kd WHERE kd.deleted != 0 AND kd.id <= $2
    ) AS ks WHERE kv.id = ks.id
"""


async def rewrite(dsn: str, revisions: int) -> None:
    """As many new revisions again: after VACUUM they reuse the space compaction freed."""
    conn = await asyncpg.connect(dsn)
    try:
        await tables.add_revisions(conn, PREFIX, revisions - 1)
    finally:
        await conn.close()


async def table_size(dsn: str, vacuum: bool = False) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        if vacuum:
            await conn.execute("VACUUM kine")
        rows = await conn.fetchval("SELECT count(*) FROM kine")
        size = await conn.fetchval("SELECT pg_total_relation_size('kine')")
        return int(rows), int(size)
    finally:
        await conn.close()


def load(endpoint: str, stop: threading.Event, worst: list[float], ops: list[int]) -> None:
    channel = grpc.insecure_channel(endpoint)
    kv = rpc_pb2_grpc.KVStub(channel)
    i = 0
    while not stop.is_set():
        t = time.perf_counter()
        if i % 2:
            kv.Put(pb.PutRequest(key=b"/registry/c/%08d" % (i % 1000 + 1), value=b"y" * 1024))
        else:
            kv.Range(pb.RangeRequest(key=b"/registry/c/%08d" % (i % 1000 + 1)))
        worst[0] = max(worst[0], time.perf_counter() - t)
        ops[0] += 1
        i += 1
    channel.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--revisions", type=int, default=11)
    args = ap.parse_args()
    pg = EmbeddedPostgres(tempfile.mkdtemp(prefix="bench-compact-"))
    pg.start()
    try:
        ours, kines = pg.dsn("ours"), pg.dsn("kines")
        for dsn in (ours, kines):
            t = time.monotonic()
            asyncio.run(tables.fill(dsn, PREFIX, args.keys, args.revisions))
            print(
                f"filled {args.keys} keys x {args.revisions} revisions "
                f"in {time.monotonic() - t:.0f}s",
                flush=True,
            )
        rows, size = asyncio.run(table_size(ours))
        print(f"table: {rows} rows, {size / 1024**2:.0f} MiB", flush=True)

        target = GeminiTarget(ours)
        t = time.monotonic()
        target.start()
        print(f"geminikv serving after {time.monotonic() - t:.1f}s", flush=True)
        try:
            channel = grpc.insecure_channel(target.endpoint)
            kv = rpc_pb2_grpc.KVStub(channel)
            head = kv.Range(pb.RangeRequest(key=b"/registry/c/00000001")).header.revision
            stop, worst, ops = threading.Event(), [0.0], [0]
            client = threading.Thread(target=load, args=(target.endpoint, stop, worst, ops))
            client.start()
            time.sleep(1.0)
            worst[0], ops[0] = 0.0, 0
            t = time.monotonic()
            kv.Compact(pb.CompactionRequest(revision=head, physical=True), timeout=3600)
            took = time.monotonic() - t
            time.sleep(1.0)  # the index drops the history after the RPC returns
            assert target.process is not None and target.process.poll() is None, "server died"
            stop.set()
            client.join()
            channel.close()
            server_log = target.log()
            if "Traceback" in server_log or "ERROR" in server_log:
                print(server_log[-4000:])
            longest = re.findall(r"longest statement ([0-9.]+)s", server_log)
            print(f"longest compaction statement: {longest[-1] if longest else '?'}s")
        finally:
            target.stop()
        rows_after, size_after = asyncio.run(table_size(ours))
        _, size_vacuumed = asyncio.run(table_size(ours, vacuum=True))
        print(
            f"geminikv: compacted {rows - rows_after} rows in {took:.1f}s; "
            f"meanwhile {ops[0]} reads/writes served, slowest {worst[0] * 1000:.0f} ms; "
            f"table {size / 1024**2:.0f} MiB -> {size_after / 1024**2:.0f} MiB, "
            f"{size_vacuumed / 1024**2:.0f} MiB after VACUUM",
            flush=True,
        )
        asyncio.run(rewrite(ours, args.revisions))
        rows_again, size_again = asyncio.run(table_size(ours))
        print(
            f"after writing the same history again: {rows_again} rows, "
            f"{size_again / 1024**2:.0f} MiB (the freed space was reused)",
            flush=True,
        )

        async def kine() -> float:
            conn = await asyncpg.connect(kines)
            try:
                top = int(await conn.fetchval("SELECT max(id) FROM kine"))
                t = time.monotonic()
                await conn.execute(KINE_COMPACT, top, top)
                return time.monotonic() - t
            finally:
                await conn.close()

        kine_took = asyncio.run(kine())
        k_rows, _ = asyncio.run(table_size(kines))
        print(
            f"Kine's single DELETE on the same table: {rows - k_rows} rows in "
            f"{kine_took:.1f}s (one statement)",
            flush=True,
        )
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
