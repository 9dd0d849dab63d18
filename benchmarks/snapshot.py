"""Maintenance.Snapshot on a large store: time and geminikv's peak memory.

    python -m geminikv_bench.snapshot --keys 1000000 --history 0

Fills a fresh embedded PostgreSQL with ``keys`` keys (1 KiB values) and ``history`` extra
revisions per key, in Kine's row layout, starts geminikv on it, and times `etcdctl
snapshot save` while sampling geminikv's resident memory; then `etcdctl snapshot status`
checks the file. The snapshot is built on a worker thread in a temporary file and
streamed, so memory should not grow with the store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

from . import tables
from .targets import GeminiTarget

PREFIX = "/registry/bench/"


def sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--history", type=int, default=0)
    args = ap.parse_args()
    if shutil.which("etcdctl") is None:
        print("needs etcdctl (Debian: etcd-client)", file=sys.stderr)
        return 2
    pg, dsn = tables.filled(args.keys, args.history, PREFIX)
    try:
        target = GeminiTarget(dsn)
        target.start()
        try:
            assert target.process is not None
            pid = target.process.pid
            base = psutil.Process(pid).memory_info().rss
            peak = [base]
            stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(pid, stop, peak), daemon=True)
            sampler.start()
            path = os.path.join(pg.data_dir, "snapshot.db")
            env = dict(os.environ, ETCDCTL_API="3")
            t0 = time.monotonic()
            subprocess.run(
                [
                    "etcdctl",
                    "--endpoints",
                    target.endpoint,
                    "--command-timeout=600s",
                    "snapshot",
                    "save",
                    path,
                ],
                check=True,
                capture_output=True,
                env=env,
                timeout=900,
            )
            took = time.monotonic() - t0
            stop.set()
            sampler.join()
            status = subprocess.run(
                ["etcdctl", "snapshot", "status", path, "-w", "json"],
                check=True,
                capture_output=True,
                env=env,
                text=True,
                timeout=600,
            )
            found = json.loads(status.stdout)
            print(
                f"snapshot save: {took:.1f}s, {os.path.getsize(path) / 2**20:.0f} MiB, "
                f"revision {found['revision']}, {found['totalKey']} keys; geminikv RSS "
                f"{base / 2**20:.0f} MiB before, peak {peak[0] / 2**20:.0f} MiB",
                flush=True,
            )
        finally:
            target.stop()
    finally:
        pg.stop()
        shutil.rmtree(pg.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
