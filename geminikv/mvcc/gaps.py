"""Gaps: a missing id below a visible one.

geminikv writers commit in id order, so a gap is either a Go Kine insert still in flight
or an id burned by a rolled-back transaction. After a short grace period it is filled
with Kine's ``gap-N`` row (docs/architecture.md#the-follower-applies-in-id-order); a late
insert then fails and retries. A gap at or below the compact revision is not filled:
compaction may have deleted the row (and with it a delete this process would never
see), so the index must be rebuilt.
"""

from __future__ import annotations

import enum
import logging
import time

import asyncpg

from geminikv.config import GAP_GRACE
from geminikv.storage import kine

log = logging.getLogger(__name__)


class Gap(enum.Enum):
    WAIT = "wait"  # give it time: look again in GAP_GRACE / 2
    FILLED = "filled"  # fetch again: the row at the gap is there now
    COMPACTED = "compacted"  # the missing row may have been deleted by compaction


class Gaps:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._seen: tuple[int, float] | None = None  # (gap, first seen)

    def clear(self) -> None:
        """No gap now."""
        self._seen = None

    async def found(self, gap: int, last: int | None = None) -> tuple[Gap, int]:
        """Revisions ``gap`` to ``last`` (the id before the next visible one) are missing
        while later ones are in the table: what to do, and with ``Gap.COMPACTED`` the
        compact revision (else 0). The whole run is filled at once: ids a failover
        skipped (a promoted standby's sequence starts past the ones the old primary had
        cached) come in runs of dozens, and one grace period each would stall writes."""
        now = time.monotonic()
        if self._seen is None or self._seen[0] != gap:
            self._seen = (gap, now)
        if now - self._seen[1] < GAP_GRACE:
            return Gap.WAIT, 0
        async with self.pool.acquire() as conn:
            compacted = await kine.compact_rev(conn)
            if gap <= compacted:
                self._seen = None
                return Gap.COMPACTED, compacted
            if last is None or last <= gap:
                log.info("filling gap at revision %d", gap)
                await kine.fill_gap(conn, gap)
            else:
                log.info("filling gaps at revisions %d to %d", gap, last)
                await kine.fill_gaps(conn, gap, last)
        self._seen = None
        return Gap.FILLED, 0
