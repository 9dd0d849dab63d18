"""Checking a recorded history: ``check(history)`` returns its violations (empty: valid).

Assumptions on the recorded history:

- the key prefix was empty at ``base_revision`` and only the run wrote under it;
- ``complete`` is a watch over the whole prefix from ``base_revision + 1`` that received
  every change (taken after the run, before any compaction of that range);
- every value a run puts is unique, so a PUT change names the operation that wrote it;
- leases do not expire during the run (an expiry's deletions would be unexplained);
- no compaction removes a watcher's prev_kv (etcd then leaves prev_kv out).
"""

from __future__ import annotations

from tests.reliability.history import History
from tests.reliability.linearizability import check_linearizability
from tests.reliability.timeline import build_timeline
from tests.reliability.watches import check_watches


def check(history: History) -> list[str]:
    """Every violation found by the linearizability and watch checkers."""
    timeline = build_timeline(history)
    return check_linearizability(history, timeline) + check_watches(history, timeline)
