"""Figures: latency statistics, the terminal table, results.json and PNG plots."""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def stats(latencies: array) -> dict[str, float]:  # type: ignore[type-arg]
    if not latencies:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    ordered = sorted(latencies)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1000

    return {
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / n * 1000,
    }


def table(results: dict[str, Any]) -> str:
    """One line per (workload, target): throughput, latency, the ratio to etcd, and the CPU
    each operation cost the server's processes and the load generator."""
    rows = [
        (
            "workload",
            "target",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "vs etcd",
            "server CPU s",
            "server µs/op",
            "server peak MB",
            "client µs/op",
            "errors",
        )
    ]
    for workload, by_target in results["workloads"].items():
        etcd = by_target.get("etcd")
        for target, r in by_target.items():
            ratio = ""
            if etcd and target != "etcd":
                if r.get("kind") == "latency":
                    ratio = f"{r['p50_ms'] / etcd['p50_ms']:.2f}x time" if etcd["p50_ms"] else ""
                elif etcd["throughput"]:
                    ratio = f"{r['throughput'] / etcd['throughput']:.2f}x"
            extra = f" lost={r['lost']}" if "lost" in r else ""
            rows.append(
                (
                    workload,
                    target,
                    f"{r['throughput']:.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['max_ms']:.1f}",
                    ratio,
                    f"{r['server_cpu_s']:.1f}",
                    f"{r.get('cpu_us_per_op', 0.0):.0f}",
                    f"{r['server_peak_mb']:.0f}",
                    client_cost(r),
                    f"{r['errors']}{extra}",
                )
            )
    text = aligned(rows)
    pythons = "\n".join(
        f"{name} ran on Python {python}" for name, python in results.get("interpreters", {}).items()
    )
    if pythons:
        text = f"{text}\n\n{pythons}"
    against = cost_table(results)
    return f"{text}\n\n{against}" if against else text


def client_cost(r: dict[str, Any]) -> str:
    """The load generator's CPU µs per operation, and which generator it was."""
    if r.get("kind") == "watch":
        return ""  # the watch workloads' clients are not measured
    return f"{r.get('client_cpu_us_per_op', 0.0):.0f} {r.get('generator', 'python')}"


def aligned(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BASELINE = "etcd-cluster"  # the configuration the replicated ones are costed against


def ratio(r: dict[str, Any], base: dict[str, Any], field: str) -> str:
    return f"{r.get(field, 0.0) / base[field]:.2f}x" if base.get(field) else ""


def cost_table(results: dict[str, Any]) -> str:
    """Each target against etcd's three members, per workload: throughput, and CPU and
    memory per operation (all processes of each configuration), as ratios."""
    rows = [
        (
            "workload",
            "target",
            "ops/s",
            f"vs {BASELINE}",
            "p99 ms",
            "CPU µs/op",
            f"CPU/op vs {BASELINE}",
            "peak MB",
            "MB per op/s",
            f"mem/op vs {BASELINE}",
        )
    ]
    for workload, by_target in results["workloads"].items():
        base = by_target.get(BASELINE)
        if not base or base.get("kind") == "latency":
            continue
        for target, r in by_target.items():
            rows.append(
                (
                    workload,
                    target,
                    f"{r['throughput']:.0f}",
                    ratio(r, base, "throughput"),
                    f"{r['p99_ms']:.2f}",
                    f"{r.get('cpu_us_per_op', 0.0):.0f}",
                    ratio(r, base, "cpu_us_per_op"),
                    f"{r['server_peak_mb']:.0f}",
                    f"{r.get('mb_per_op_s', 0.0):.3f}",
                    ratio(r, base, "mb_per_op_s"),
                )
            )
    return aligned(rows) if len(rows) > 1 else ""


def write(out: Path, results: dict[str, Any], latencies: dict[str, dict[str, array]]) -> None:  # type: ignore[type-arg]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "table.txt").write_text(table(results) + "\n")
    plot(out, results, latencies)


def plot(out: Path, results: dict[str, Any], latencies: dict[str, dict[str, array]]) -> None:  # type: ignore[type-arg]
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    targets = sorted({t for w in workloads for t in results["workloads"][w]})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(workloads)), 4.5))
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        figures = [results["workloads"][w].get(target, {}).get("throughput", 0) for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], figures, width, label=target)
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=20, ha="right")
    ax.set_ylabel("operations / s")
    ax.set_title("Throughput per workload")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    cols = min(3, len(workloads)) or 1
    rows = (len(workloads) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for n, workload in enumerate(workloads):
        ax = axes[n // cols][n % cols]
        for target, values in latencies.get(workload, {}).items():
            if not values:
                continue
            in_ms = sorted(v * 1000 for v in values)
            ys = [(i + 1) / len(in_ms) for i in range(len(in_ms))]
            ax.plot(in_ms, ys, label=target)
        ax.set_xscale("log")
        ax.set_title(workload)
        ax.set_xlabel("latency ms (log)")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
    for n in range(len(workloads), rows * cols):
        axes[n // cols][n % cols].axis("off")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
