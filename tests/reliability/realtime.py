"""Real-time order: an operation called after another returned must come after it.

Every operation is first placed in the revision order (the revision it read, or the
revisions it wrote). Then, if A returned before B was called: a read B must have read
revision >= A's last revision, and a write B must have written its first revision after
A's last one. One sweep over the calls, sorted, against the returns, sorted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placed:
    """An operation placed in the revision order."""

    index: int  # into History.operations
    call: int
    ret: int | None  # None: unknown outcome (it constrains nothing called after it)
    first: int  # the revision it read, or the first revision it wrote
    last: int  # the revision it read, or the last revision it wrote
    writes: bool
    stale_ok: bool = False  # a serializable read: may be stale, constrains only others


def check_real_time(placed: list[Placed], describe: Callable[[int], str]) -> list[str]:
    returned = sorted((p for p in placed if p.ret is not None), key=lambda p: p.ret or 0)
    violations: list[str] = []
    latest: Placed | None = None  # among the returned so far, the one with the highest last
    k = 0
    for b in sorted(placed, key=lambda p: p.call):
        while k < len(returned) and (returned[k].ret or 0) < b.call:
            if latest is None or returned[k].last > latest.last:
                latest = returned[k]
            k += 1
        if latest is None or b.stale_ok:
            continue
        if b.writes and b.first <= latest.last:
            violations.append(
                f"real-time order violated: {describe(b.index)} wrote revision {b.first} "
                f"but was called after {describe(latest.index)} returned having reached "
                f"revision {latest.last}"
            )
        elif not b.writes and b.first < latest.last:
            violations.append(
                f"real-time order violated (stale read): {describe(b.index)} read revision "
                f"{b.first} but was called after {describe(latest.index)} returned having "
                f"reached revision {latest.last}"
            )
    return violations
