"""The reliability traffic (tests/reliability/) in the background of an HA test: it runs
for a fixed time on its own event loop in a thread while the test strikes the nodes, then
the table's own history is recorded and the whole history checked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from tests.reliability.check import check
from tests.reliability.traffic import Settings, Traffic


class BackgroundTraffic:
    def __init__(
        self, endpoints: list[str], seed: int, seconds: float, clients: int = Settings.clients
    ) -> None:
        self.traffic = Traffic(endpoints, b"/reliability/", Settings(seed=seed, clients=clients))
        self.seed = seed
        self.seconds = seconds
        self.error: BaseException | None = None
        self.started = 0.0
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> BackgroundTraffic:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        async def run() -> None:
            await asyncio.wait_for(self.traffic.run(self.seconds), self.seconds + 120)
            await self.traffic.complete()

        try:
            asyncio.run(run())
        except BaseException as err:  # reported by finish()
            self.error = err

    def finish(self) -> tuple[list[str], str]:
        """Once the traffic has run its time: the violations the checkers find, and a
        summary of what was checked."""
        self._thread.join(self.seconds + 240)
        assert not self._thread.is_alive(), "the traffic did not end"
        if self.error is not None:
            raise self.error
        assert not self.traffic.unexpected, self.traffic.unexpected[:10]
        history = self.traffic.history
        ops = history.operations
        outcomes = Counter("ok" if op.response is not None else op.error for op in ops)
        assert outcomes["ok"] > 300, outcomes  # the traffic got through
        assert history.complete is not None
        events = sum(len(r.events) for _, r in history.complete.responses)
        violations = check(history)
        summary = (
            f"reliability traffic, seed {self.seed}: {len(ops)} calls {dict(outcomes)}, "
            f"{events} events, {len(history.watches)} watch records; "
            f"{len(violations)} violations"
        )
        return violations, summary
