"""``geminikv bench --quick`` runs end to end and writes consistent results, and the load
generator does what its options say (no speed is asserted: performance lives in
benchmarks/, not in tests)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

import psutil
import pytest

from benchmarks import runner
from benchmarks.cli import ALL, median_run
from benchmarks.targets import GeminiTarget
from benchmarks.workloads import Params
from geminikv import metrics
from tests.servers import GeminiServer

pytestmark = pytest.mark.slow


def quick_bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``geminikv bench --quick`` against geminikv and null; fails the test if it fails."""
    command = [sys.executable, "-m", "geminikv", "bench", "--quick", "--targets", "geminikv,null"]
    done = subprocess.run(
        [*command, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_quick_bench_produces_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = quick_bench(out, "--seconds", "1")
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["quick"] is True
    assert results["versions"]["geminikv"]
    assert set(results["workloads"]) == set(ALL)
    for name, by_target in results["workloads"].items():
        figures = by_target["geminikv"]
        assert figures["errors"] == 0, (name, figures.get("first_error"))
        assert figures["throughput"] > 0
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert figures["server_cpu_s"] > 0 and figures["server_peak_mb"] > 0
        if name.startswith("watch"):
            assert figures["lost"] == 0
    assert set(results["workloads"]["get"]) == {"geminikv", "null"}
    assert "null" not in results["workloads"]["list"]
    for plot in ("throughput.png", "latency.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    table = (out / "table.txt").read_text()
    assert "geminikv" in table and "null" in table
    assert "get-serializable" in done.stdout  # the progress lines


def test_load_opens_its_connections_and_does_not_count_the_warmup(gemini: GeminiServer) -> None:
    params = Params(prefix=b"/bench-runner/", value_size=16, keys=10)
    asyncio.run(runner.setup(gemini.endpoint, "get", params))
    served = metrics.RPC.method("Range")
    before = served.codes.get("OK", 0)
    connections: set[tuple[str, int]] = set()
    done = threading.Event()

    def watch_connections() -> None:  # the server runs in this process: its sockets are ours
        while not done.wait(0.05):
            for c in psutil.Process().net_connections("tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == gemini.port:
                    connections.add((c.raddr.ip, c.raddr.port))

    started: list[float] = []
    job = runner.Job(gemini.endpoint, "get", params, 6, 3, seconds=0.5, warmup=1.0)
    watcher = threading.Thread(target=watch_connections, daemon=True)
    watcher.start()
    began = time.monotonic()
    try:
        (result,) = runner.run(job, 1, on_start=lambda: started.append(time.monotonic()))
    finally:
        done.set()
        watcher.join()
    assert len(connections) == 3  # one TCP connection per channel, not one shared
    assert result.errors == 0 and result.ops > 0
    assert len(array("d", result.latencies)) == result.ops
    # the server answered the warm-up's gets as well; the result counts only the rest
    assert served.codes.get("OK", 0) - before > result.ops
    assert len(started) == 1 and started[0] - began >= job.warmup


def test_rounds_interleave_the_targets_and_report_the_median(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = quick_bench(out, "--workloads", "create,list", "--rounds", "3", "--seconds", "0.5")
    progress = [line.split()[3:5] for line in done.stdout.splitlines() if "/9 " in line]
    # rounds take turns, alternating the order: no target always goes first
    assert progress == [
        ["geminikv", "create"],
        ["null", "create"],
        ["null", "create"],
        ["geminikv", "create"],
        ["geminikv", "create"],
        ["null", "create"],
        ["geminikv", "list"],
        ["geminikv", "list"],
        ["geminikv", "list"],
    ]
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["rounds"] == 3
    for name, by_target in results["workloads"].items():
        for figures in by_target.values():
            rounds = figures["rounds"]
            assert len(rounds) == 3
            reported = figures["p50_ms"] if name == "list" else figures["throughput"]
            assert reported == sorted(rounds)[1]


def test_the_median_of_an_even_count_is_the_worse_middle_run() -> None:
    def run(throughput: float, p50: float, kind: str = "throughput") -> tuple[dict, array]:  # type: ignore[type-arg]
        return {"kind": kind, "throughput": throughput, "p50_ms": p50}, array("d")

    figures, _ = median_run("create", [run(300, 1), run(100, 1), run(400, 1), run(200, 1)])
    assert figures["throughput"] == 200 and figures["rounds"] == [300, 100, 400, 200]
    figures, _ = median_run("list", [run(5, p50, "latency") for p50 in (70, 90, 80, 60)])
    assert figures["p50_ms"] == 80  # for a latency, the worse middle is the slower one
    watches = [({"kind": "watch", "throughput": 500, "p99_ms": p99}, array("d")) for p99 in (9, 30)]
    figures, _ = median_run("watch", watches)
    assert figures["p99_ms"] == 30 and figures["rounds"] == [9, 30]


def test_the_harness_starts_the_installed_server_wherever_it_is_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `geminikv` directory in the working directory (an unbuilt checkout, say) is not
    what the harness starts."""
    decoy = tmp_path / "geminikv"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise ImportError("the decoy source tree was imported")\n')
    (decoy / "__main__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    target = GeminiTarget().start()
    try:
        host, port = target.endpoint.split(":")
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    finally:
        target.stop()


def test_a_server_that_fails_to_start_shows_the_end_of_its_log() -> None:
    target = GeminiTarget(extra=["--compact-interval-jitter", "150"])
    with pytest.raises(RuntimeError) as failed:
        target.start()
    target.stop()
    message = str(failed.value)
    assert message.startswith("geminikv did not start: server exited with code")
    assert "compact-interval-jitter" in message  # the server's own complaint, from its log
