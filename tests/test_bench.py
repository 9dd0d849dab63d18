"""``geminikv bench --quick`` runs end to end and writes consistent results (no speed
is asserted: performance lives in benchmarks/, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import ALL

pytestmark = pytest.mark.slow


def test_quick_bench_produces_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "geminikv",
            "bench",
            "--quick",
            "--targets",
            "geminikv,null",
            "--seconds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
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
