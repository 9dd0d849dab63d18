"""The embedded PostgreSQL belongs to one geminikv: a second geminikv on the same data
directory is refused with a clear error, and after a kill -9 the next geminikv adopts the
PostgreSQL left running and stops it on its own clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import GeminiProcess, alive, free_port, postgres_pid
from tests.waiting import eventually


def test_one_geminikv_per_data_directory_and_adoption_after_a_crash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = GeminiProcess("", "--data-dir", str(data)).start(timeout=120)
    try:
        stubs = first.stubs()
        stubs.kv.Put(pb.PutRequest(key=b"/owned", value=b"1"))
        stubs.close()
        assert first.process is not None
        # a second geminikv on the same directory: refused, and the first one unharmed
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "geminikv",
                "--data-dir",
                str(data),
                "--listen-address",
                f"127.0.0.1:{free_port()}",
                "--metrics-bind-address",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert f"another geminikv (pid {first.process.pid}) is using the embedded PostgreSQL" in (
            second.stderr
        ), second.stderr
        pg = postgres_pid(data)
        assert pg is not None and alive(pg)

        # kill -9: PostgreSQL outlives it, as a crash leaves it
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
        assert alive(pg)
    finally:
        first.stop()

    adopter = GeminiProcess("", "--data-dir", str(data)).start(timeout=120)
    try:
        assert f"adopting the embedded PostgreSQL (pid {pg})" in adopter.output()
        stubs = adopter.stubs()
        got = stubs.kv.Range(pb.RangeRequest(key=b"/owned"))
        assert [kv.value for kv in got.kvs] == [b"1"]
        stubs.close()
        assert postgres_pid(data) == pg  # the same server, not a second one
        assert adopter.process is not None
        adopter.process.send_signal(signal.SIGTERM)
        assert adopter.process.wait(60) == 0, adopter.output()
        # the clean shutdown stopped the adopted PostgreSQL too
        eventually(lambda: not alive(pg), f"the adopted PostgreSQL {pg} stopped", 30)
        assert postgres_pid(data) is None
    finally:
        adopter.stop()
        if alive(pg):
            os.kill(pg, signal.SIGQUIT)
