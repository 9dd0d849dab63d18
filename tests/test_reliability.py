"""Reliability under faults: recorded Kubernetes-shaped traffic against two geminikv
processes sharing one PostgreSQL while processes are killed (-9), PostgreSQL is shut
down fast and immediately and restarted, client connections and watch streams are
dropped and one watcher reads slowly; then the history is checked for linearizability
and the watches for etcd's guarantees (tests/reliability/).

``--reliability-seconds`` (default 60; or GEMINIKV_RELIABILITY_SECONDS) sets how long the
traffic runs; the faults repeat every 30 s. ``--reliability-seed`` (or
GEMINIKV_RELIABILITY_SEED) picks the random traffic.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.check import check
from tests.reliability.history import save
from tests.reliability.traffic import Settings, Traffic
from tests.servers import GeminiProcess, start_postgres, stop_postgres


class Faults:
    """The fault schedule, repeated every 30 s: (at second, what)."""

    SCHEDULE = (
        (4.0, "kill -9 the second geminikv"),
        (10.0, "PostgreSQL fast shutdown and restart"),
        (16.0, "PostgreSQL immediate shutdown and restart"),
        (22.0, "kill -9 the first geminikv"),
    )

    def __init__(self, processes: list[GeminiProcess], pg_data: Path) -> None:
        self.processes = processes
        self.pg_data = pg_data
        self.done: list[str] = []

    def kill(self, number: int) -> None:
        old = self.processes[number]
        old.kill()
        time.sleep(1.0)
        self.processes[number] = GeminiProcess(old.dsn, port=old.port).start()

    def restart_postgres(self, sig: signal.Signals) -> None:
        stop_postgres(self.pg_data, sig)
        time.sleep(1.0)
        start_postgres(self.pg_data)

    def inject(self, what: str) -> None:
        if what.startswith("kill -9"):
            self.kill(1 if "second" in what else 0)
        elif "fast" in what:
            self.restart_postgres(signal.SIGINT)
        else:
            self.restart_postgres(signal.SIGQUIT)
        self.done.append(what)

    async def run(self, duration: float) -> None:
        started = time.monotonic()
        cycle = 0.0
        while True:
            for at, what in self.SCHEDULE:
                delay = started + cycle + at - time.monotonic()
                if cycle + at > duration - 3:
                    return
                await asyncio.sleep(max(0.0, delay))
                await asyncio.to_thread(self.inject, what)
            cycle += 30.0


@pytest.mark.slow
def test_history_under_faults_is_linearizable(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seconds = float(request.config.getoption("--reliability-seconds"))
    seed = int(request.config.getoption("--reliability-seed"))
    pg_data = tmp_path / "pg"
    dsn = start_postgres(pg_data)
    processes = [GeminiProcess(dsn).start(), GeminiProcess(dsn).start()]
    faults = Faults(processes, pg_data)
    traffic = Traffic([p.endpoint for p in processes], b"/reliability/", Settings(seed=seed))

    async def run() -> None:
        work = asyncio.gather(traffic.run(seconds), faults.run(seconds))
        await asyncio.wait_for(work, seconds + 120)  # a hang fails the test
        await traffic.complete()

    try:
        asyncio.run(run())
    finally:
        for p in faults.processes:
            p.stop()
        stop_postgres(pg_data)
    history = traffic.history
    ops = history.operations
    outcomes = Counter("ok" if op.response is not None else op.error for op in ops)
    complete = history.complete
    assert complete is not None
    events = sum(len(r.events) for _, r in complete.responses)
    print(
        f"\nseed {seed}: {len(ops)} calls {dict(outcomes)}, {events} events, "
        f"{len(history.watches)} watch records "
        f"{dict(Counter(w.ended for w in history.watches))}, faults: {faults.done}"
    )
    started = time.monotonic()
    reasons = Counter(
        r.cancel_reason for w in history.watches for _, r in w.responses if r.canceled
    )
    print("watch cancel reasons:", dict(reasons))
    assert not traffic.unexpected, traffic.unexpected[:10]  # only errors etcd gives here
    violations = check(history)
    print(f"checked in {time.monotonic() - started:.1f}s")
    if violations:  # keep the history for a post-mortem (tests.reliability.history.load)
        dump = tmp_path / "history.pickle"
        save(history, dump)
        print("history saved to", dump)
    assert not violations, f"seed {seed}: " + "\n".join(violations[:30])
    # the run did what it claims: traffic got through, and every fault was injected
    assert outcomes["ok"] > 500 and events > 200
    assert len(faults.done) >= min(len(Faults.SCHEDULE), int(seconds // 7))
    assert sum(1 for w in history.watches if w.resumed) >= 2
