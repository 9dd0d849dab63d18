"""When the table no longer holds what this process applied: stop serving, cancel every
watch, rebuild the index from the table.

Two ways in: the database went back in time (its newest revision is below the applied
one: restored from an older backup, or failed over to a lagging replica), or this
process fell behind compaction (rows it had yet to apply were deleted, a delete's
tombstone perhaps among them, so they cannot be replayed). Meanwhile requests fail with
Unavailable and a message saying which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from geminikv import errors, tasks
from geminikv.config import REBUILD_RETRY
from geminikv.mvcc.applier import Applier
from geminikv.mvcc.compaction import Compaction
from geminikv.mvcc.gaps import Gaps
from geminikv.mvcc.index import Index
from geminikv.mvcc.values import Values

log = logging.getLogger(__name__)


class Rebuilding:
    """Whether the index is being rebuilt: set by ``Rewind``, read by whoever serves
    (the store, the watch hub). A flag of its own, so both can be built before Rewind."""

    def __init__(self) -> None:
        self.active = False
        self.message = errors.Rewound.message  # what requests fail with meanwhile
        # counts finished rebuilds: the writer forgets its guess of the next id on a change
        self.generation = 0

    def __call__(self) -> bool:
        return self.active

    def check(self) -> None:
        """Requests fail with Unavailable while the index is rebuilt."""
        if self.active:
            raise errors.Rewound(self.message)


class Rewind:
    def __init__(
        self,
        index: Index,
        load: Callable[[Index], Awaitable[None]],
        applier: Applier,
        values: Values,
        compaction: Compaction,
        gaps: Gaps,
        rebuilding: Rebuilding,
        cancel_watches: Callable[[str], None],
        holds: Callable[[int], Awaitable[tuple[int, bool, int]]] | None = None,
    ) -> None:
        self.index = index
        self._load = load  # fills a fresh index from the table
        self.applier = applier
        self.values = values
        self.compaction = compaction
        self.gaps = gaps
        self.rebuilding = rebuilding
        self._cancel_watches = cancel_watches  # with the reason they end
        # after a failover: (newest revision, whether a row is there, compact revision)
        self._holds = holds
        self._task: asyncio.Task[None] | None = None
        self._failover_check: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        await tasks.stop(self._failover_check)
        await tasks.stop(self._task)

    def failed_over(self) -> None:
        """PostgreSQL's primary changed: check that the new one holds the newest row this
        process applied (docs/architecture.md#failover)."""
        if self._holds is None or self.rebuilding.active:
            return
        if self._failover_check is None or self._failover_check.done():
            self._failover_check = asyncio.create_task(
                self._check_new_primary(), name="failover-check"
            )

    async def _check_new_primary(self) -> None:
        assert self._holds is not None
        applied = int(self.index.rev)
        while True:
            try:
                newest, present, compacted = await self._holds(applied)
                break
            except Exception as err:  # the new primary may still be starting
                log.warning("checking the index against the new primary failed (%s)", err)
                await asyncio.sleep(REBUILD_RETRY)
        # Commit order is id order: with the newest applied row there, every older one is
        # too (a compacted one may be gone, but then nothing is known to be lost).
        if newest < applied or (not present and applied > compacted):
            self._resync(
                f"geminikv: the new PostgreSQL primary lacks revision {applied}, which this "
                f"process applied (its newest revision is {newest}: it was behind the old "
                "primary); watch again from a current revision",
                errors.Rewound.message,
            )
        else:
            log.info("the new primary holds every revision applied here (up to %d)", applied)

    def check(self, newest: int, applied: int) -> None:
        """``newest`` is PostgreSQL's newest revision, read after ``applied`` was applied
        here: if it is lower, the database has lost revisions this process served."""
        if newest < applied:
            self.rewound(newest)
            raise errors.Rewound()

    def rewound(self, newest: int) -> None:
        self._resync(
            f"geminikv: the database revision went backwards from {int(self.index.rev)} "
            f"to {newest} (restored from a backup, or failed over to a lagging replica); "
            "watch again from a current revision",
            errors.Rewound.message,
        )

    def behind_compaction(self, missing: int, compacted: int) -> None:
        """Revision ``missing`` is not in the table and the table is compacted to
        ``compacted`` >= it."""
        self._resync(
            f"geminikv: this process fell behind compaction (revision {missing} not applied, "
            f"compacted to {compacted}); watch again from a current revision",
            errors.BEHIND_COMPACTION,
        )

    def _resync(self, reason: str, message: str) -> None:
        if self.rebuilding.active:
            return
        log.error("%s; rebuilding the index", reason.removeprefix("geminikv: "))
        self.rebuilding.active = True
        self.rebuilding.message = message
        self._cancel_watches(reason)
        self._task = asyncio.create_task(self._rebuild(), name="index-rebuild")

    async def _rebuild(self) -> None:
        while True:
            try:
                fresh = Index()
                await self._load(fresh)
                break
            except Exception as err:  # e.g. PostgreSQL still restarting: try again
                log.warning("rebuilding the index failed (%s); retrying", err)
                await asyncio.sleep(REBUILD_RETRY)
        # all in one step: no request sees a half-built index or a stale pending row
        self.applier.reset(self.rebuilding.message)
        self.compaction.reset()
        self.gaps.clear()
        self.values.clear()
        self.rebuilding.generation += 1
        self.index.take(fresh)
        self.rebuilding.active = False
        log.info("index rebuilt: %d keys, revision %d", self.index.live, self.index.rev)
