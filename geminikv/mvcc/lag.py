"""How far this process is behind the table: the follower-lag metrics.

A revision is *known* once something says it is committed (a notification, a fetch, the
writer's hand-over, a linearizable read's head revision); it is behind until applied.
"""

from __future__ import annotations

import time
from collections import deque

from geminikv import metrics
from geminikv.config import LAG_MARKS
from geminikv.mvcc.index import Index


class Lag:
    def __init__(self, index: Index) -> None:
        self.index = index
        # the newest committed revision known here, and when each newer head became
        # known, oldest first, while not yet applied
        self._known = 0
        self._marks: deque[tuple[int, float]] = deque()

    def learned(self, rev: int) -> None:
        """``rev`` is committed in PostgreSQL: note when it became known."""
        marks = self._marks
        if rev > self._known:
            self._known = rev
            if rev > self.index.rev:
                if len(marks) < LAG_MARKS:
                    marks.append((rev, time.monotonic()))
                else:
                    # merged into the newest mark, whose older time can only overstate lag
                    marks[-1] = (rev, marks[-1][1])
        if marks:
            self.report()  # also refreshes the seconds of a follower that is stuck

    def applied(self) -> None:
        """Rows were applied."""
        if self._marks:
            self.report()

    def reset(self) -> None:
        """The index is rebuilt: nothing is known."""
        self._known = 0
        self._marks.clear()
        self.report()

    def report(self) -> None:
        applied = int(self.index.rev)
        marks = self._marks
        while marks and marks[0][0] <= applied:
            marks.popleft()
        # the oldest unapplied revision, applied + 1, became known with the first mark above
        metrics.FOLLOWER_LAG.set(max(0, self._known - applied))
        metrics.FOLLOWER_LAG_SECONDS.set(time.monotonic() - marks[0][1] if marks else 0.0)
