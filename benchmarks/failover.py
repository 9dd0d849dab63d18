"""Failover timing (issue 18, item 6): two PostgreSQL nodes in synchronous replication
with pg_auto_failover's monitor as the witness, and geminikv on each node with both hosts
in ``--endpoint``; each round kills every process of the primary's node (kill -9) while a
client writes through the other node's geminikv, one Put after another.

    geminikv bench failover [--failovers 10]      (or python -m geminikv_bench.failover)

Per failover it measures, from the kill (on a connection to the survivor's PostgreSQL
opened before it, asked every 20 ms):
- PostgreSQL promoted: it answers ``pg_is_in_recovery()`` false;
- PostgreSQL read-write: and ``transaction_read_only`` off. pg_auto_failover keeps the
  promoted node read-only until the old primary's ``primary_demote_timeout`` has passed,
  so that two primaries never both take writes; geminikv (like libpq's
  ``target_session_attrs=read-write``) connects to it only from then on;
- PostgreSQL commits again: a commit on it returns (synchronous replication no longer
  waits for the dead standby);
- the monitor reports the promotion (``pg_autoctl show state``; what the HA tests time);
- the first write acknowledged by the survivor's geminikv (a Put sent after the kill);
- geminikv's share: from PostgreSQL committing again to that first acknowledged write.

Then the old primary's keeper is started again (it rewinds the node, which rejoins as the
synchronous standby) with a geminikv of its own, so the next round fails back over to it.

It runs on the repository's HA harness (``tests/ha``: network namespaces on a bridge,
Debian's PostgreSQL 15 and pg_auto_failover), so it needs a checkout of the repository,
root, iproute2, ``postgresql-15``, ``postgresql-15-auto-failover`` and
``pg-auto-failover-cli``; it says which is missing and exits with 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from geminikv.config import Settings
from geminikv.storage.queries import SQL

CANNOT_RUN = 2  # exit code when this machine cannot run the failovers
POLL = 0.02  # seconds between the promotion probe's questions
GEMINIKV_TIMEOUTS = (
    "datastore_connect_timeout",
    "datastore_command_timeout",
    "datastore_tcp_timeout",
    "datastore_heartbeat_interval",
    "datastore_heartbeat_timeout",
)
COLUMNS = {
    "promoted_s": "kill -> PostgreSQL promoted",
    "read_write_s": "kill -> PostgreSQL read-write",
    "writable_s": "kill -> PostgreSQL commits again",
    "reported_s": "kill -> monitor reports it",
    "first_write_s": "kill -> first write acknowledged",
    "geminikv_share_s": "geminikv's share (commits -> ack)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geminikv bench failover", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--failovers", type=int, help="failovers to time (default 10; quick 2)")
    p.add_argument("--quick", action="store_true", help="two failovers (about a minute)")
    p.add_argument(
        "--repo",
        default="",
        help="the geminikv checkout whose tests/ha harness to use (default: the one this "
        "harness was installed from, else the working directory)",
    )
    p.add_argument("--out", default="./bench-results/failover", help="where results.json goes")
    return p


def checkout(given: str) -> Path | None:
    """The repository holding the HA harness (tests/ha), if there is one."""
    here = Path(__file__).resolve().parents[1]
    for root in [Path(given)] if given else [here, Path.cwd()]:
        if (root / "tests" / "ha" / "cluster.py").is_file():
            return root.resolve()
    return None


def why_not(given: str) -> tuple[str | None, Path | None]:
    """What this machine lacks to run the failovers (None: nothing), and the checkout."""
    root = checkout(given)
    if root is None:
        where = given or "this harness's source tree or the working directory"
        return (
            f"needs a checkout of the geminikv repository (its tests/ha harness), not found "
            f"in {where}: run it from the checkout or pass --repo",
            None,
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    cluster = importlib.import_module("tests.ha.cluster")
    lacking: str | None = cluster.missing()
    if lacking is None and shutil.which("pg_autoctl") is None:
        lacking = "needs pg_autoctl (Debian postgresql-15-auto-failover, pg-auto-failover-cli)"
    return lacking, root


class PromotionProbe(threading.Thread):
    """On a connection to ``node`` opened before the kill, when its PostgreSQL first
    answers as a primary (``promoted``), then as a writable one (``read_write``: not read
    only, what geminikv and libpq's ``target_session_attrs=read-write`` accept), then
    when a commit on it first returns (``writable``). Monotonic times, None until seen."""

    def __init__(self, node: Any) -> None:
        super().__init__(name="promotion-probe", daemon=True)
        self.dsn = node.dsn()
        self.promoted: float | None = None
        self.read_write: float | None = None
        self.writable: float | None = None
        self.connected = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        conn = None
        while not self.halt.is_set():
            try:
                if conn is None:
                    conn = await asyncpg.connect(self.dsn, timeout=1)
                    self.connected.set()
                if self.read_write is None:
                    # geminikv's own question: in recovery? read-only? (and the timeline)
                    recovery, read_only, _ = await conn.fetchrow(SQL["role"], timeout=1)
                    now = time.monotonic()
                    if not recovery and self.promoted is None:
                        self.promoted = now
                    if not recovery and not read_only:
                        self.read_write = now
                    else:
                        await asyncio.sleep(POLL)
                    continue
                # a transaction id makes the commit write WAL, and wait for the standby
                # while replication is synchronous
                await conn.fetchval("SELECT txid_current()", timeout=60)
                self.writable = time.monotonic()
                break
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(POLL)
        if conn is not None:
            await conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(70)


def one_failover(
    ha: dict[str, ModuleType], pgaf: Any, geminis: dict[str, Any], n: int
) -> dict[str, Any]:
    """Kill the primary's node while writing through the standby's geminikv; bring the
    old primary back as the standby (with its geminikv). Returns the round's figures."""
    primary, standby = pgaf.wait_settled()
    writer = ha["gemini"].Writer(geminis[standby.name], prefix=b"/failover/%03d/" % n)
    probe = PromotionProbe(standby)
    probe.start()
    writer.start()
    try:
        if not probe.connected.wait(30):
            raise RuntimeError(f"cannot reach {standby.name}'s PostgreSQL")
        writer.wait_acks_after(0, 20, timeout=60)  # writing through the survivor's geminikv
        killed = primary.kill()
        pgaf.wait_primary(standby, timeout=60)
        reported = time.monotonic()
        writer.wait_acks_after(reported, 5, timeout=60)
        probe.join(60)  # the probe's commit returns when commits are let through
    finally:
        writer.stop()
        probe.stop()
    first = writer.first_ack_after(killed)
    promoted, read_write, writable = probe.promoted, probe.read_write, probe.writable
    if promoted is None or read_write is None or writable is None or first is None:
        raise RuntimeError(f"failover {n}: no promotion, or no write seen")
    lost = len(writer.missing())  # every acknowledged write, read back through geminikv
    pgaf.run_keeper(primary)  # the old primary's node comes back: rewound, the standby
    pgaf.wait_settled()
    rejoined = time.monotonic()
    geminis[primary.name] = ha["gemini"].Gemini(primary, pgaf_endpoint(ha, pgaf)).wait_listening()
    return {
        "killed": primary.name,
        "survivor": standby.name,
        "promoted_s": promoted - killed,
        "read_write_s": read_write - killed,
        "writable_s": writable - killed,
        "reported_s": reported - killed,
        "first_write_s": first - killed,
        "geminikv_share_s": first - writable,
        "promoted_to_first_write_s": first - promoted,
        "rejoined_after_s": rejoined - reported,
        "acknowledged": len(writer.acked),
        "failed_attempts": writer.failures,
        "lost": lost,
    }


def pgaf_endpoint(ha: dict[str, ModuleType], pgaf: Any) -> str:
    endpoint: str = ha["cluster"].endpoint(pgaf.nodes)
    return endpoint


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        column: {
            "p50": statistics.median(r[column] for r in rounds),
            "max": max(r[column] for r in rounds),
            "min": min(r[column] for r in rounds),
        }
        for column in COLUMNS
    }


def settings_shown(ha: dict[str, ModuleType]) -> dict[str, dict[str, str]]:
    """The failover manager's tuned timeouts and geminikv's own (its defaults here)."""
    defaults = Settings()
    return {
        "pg_auto_failover monitor": dict(ha["autofailover"].MONITOR_SETTINGS),
        "pg_auto_failover keepers": dict(ha["autofailover"].KEEPER_SETTINGS),
        "geminikv": {
            "--" + name.replace("_", "-"): f"{getattr(defaults, name):g}s"
            for name in GEMINIKV_TIMEOUTS
        },
    }


def run(count: int, out: Path) -> int:
    ha = {
        name: importlib.import_module(f"tests.ha.{name}")
        for name in ("autofailover", "cluster", "gemini")
    }
    shown = settings_shown(ha)
    for what, values in shown.items():
        print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in values.items()), flush=True)
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    with ha["cluster"].formation() as pgaf:
        print(f"[{time.monotonic() - started:5.0f}s] formation up", flush=True)
        endpoint = pgaf_endpoint(ha, pgaf)
        geminis = {
            node.name: ha["gemini"].Gemini(node, endpoint).wait_listening() for node in pgaf.nodes
        }
        for n in range(count):
            r = one_failover(ha, pgaf, geminis, n)
            rounds.append(r)
            print(
                f"[{time.monotonic() - started:5.0f}s] {n + 1}/{count} kill {r['killed']}: "
                f"promoted {r['promoted_s']:.2f} s, read-write {r['read_write_s']:.2f} s, "
                f"commits {r['writable_s']:.2f} s, "
                f"reported {r['reported_s']:.2f} s, first write {r['first_write_s']:.2f} s "
                f"(geminikv {r['geminikv_share_s']:.2f} s); "
                f"{r['acknowledged']} acknowledged, {r['lost']} lost",
                flush=True,
            )
    figures = summary(rounds)
    results = {"settings": shown, "rounds": rounds, "summary": figures}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{count} failovers, kill -9 of every process of the primary's node:")
    for column, title in COLUMNS.items():
        f = figures[column]
        print(f"  {title:<38} p50 {f['p50']:5.2f} s   max {f['max']:5.2f} s")
    lost = sum(r["lost"] for r in rounds)
    print(f"  acknowledged writes lost: {lost}\nresults: {(out / 'results.json').resolve()}")
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    count = args.failovers if args.failovers is not None else (2 if args.quick else 10)
    if count < 1:
        print("--failovers must be at least 1", file=sys.stderr)
        return CANNOT_RUN
    lacking, _ = why_not(args.repo)
    if lacking is not None:
        print(f"geminikv bench failover cannot run here: it {lacking}", file=sys.stderr)
        return CANNOT_RUN
    return run(count, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
