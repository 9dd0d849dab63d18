"""Which key ranges a user may read or write: etcd's merged permissions
(server/auth/range_perm_cache.go) over its affine byte intervals (pkg/adt), where the empty
byte string is +infinity, as a begin as well as an end.

A user's permissions are the union of its roles' intervals; a single key is permitted if
some interval holds it, a range if the intervals that overlap it cover it without a gap.
"""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[bytes, bytes]  # [begin, end), b"" = +infinity

READ, WRITE, READWRITE = 0, 1, 2  # authpb.Permission.Type
OPEN_END = b"\x00"  # a range end meaning "every key from the begin on"


def _cmp(a: bytes, b: bytes) -> int:
    """adt.BytesAffineComparable.Compare."""
    if not a:
        return 0 if not b else 1
    if not b:
        return -1
    return (a > b) - (a < b)


def _overlaps(query: Interval, ivl: Interval) -> bool:
    """adt.Interval.Compare(query, ivl) == 0."""
    if _cmp(query[0], ivl[0]) < 0 and _cmp(query[1], ivl[0]) <= 0:
        return False  # query is left of ivl
    return _cmp(query[0], ivl[1]) < 0  # else it is right of ivl


def _point(key: bytes) -> Interval:
    return key, key + b"\x00"


def permission_interval(key: bytes, range_end: bytes) -> Interval:
    """The interval a granted permission covers (getMergedPerms)."""
    if not range_end:
        return _point(key)
    return key, b"" if range_end == OPEN_END else range_end


def valid_permission(key: bytes, range_end: bytes) -> bool:
    """etcd 3.5's isValidPermissionRange: a key, and an end after it (or open, or none)."""
    if not key:
        return False
    return not range_end or range_end == OPEN_END or _cmp(key, range_end) < 0


class Permissions:
    """One user's merged read and write intervals."""

    __slots__ = ("read", "write")

    def __init__(self, granted: Iterable[tuple[bytes, bytes, int]]) -> None:
        """``granted``: (key, range_end, perm_type) of every permission of the user's roles."""
        read: list[Interval] = []
        write: list[Interval] = []
        for key, range_end, perm_type in granted:
            ivl = permission_interval(key, range_end)
            if perm_type in (READ, READWRITE):
                read.append(ivl)
            if perm_type in (WRITE, READWRITE):
                write.append(ivl)
        # the interval tree visits by begin (b"" = +infinity last)
        self.read = sorted(read, key=lambda ivl: (not ivl[0], ivl[0]))
        self.write = sorted(write, key=lambda ivl: (not ivl[0], ivl[0]))

    def permits(self, key: bytes, range_end: bytes, write: bool) -> bool:
        """isRangeOpPermitted: a key if ``range_end`` is empty, else [key, range_end)."""
        intervals = self.write if write else self.read
        if not range_end:
            point = _point(key)
            return any(_overlaps(point, ivl) for ivl in intervals)
        query = (key, b"" if range_end == OPEN_END else range_end)
        return _covers(intervals, query)


def _covers(intervals: list[Interval], query: Interval) -> bool:
    """adt.IntervalTree.Contains: the intervals overlapping ``query``, by begin, join
    without a gap and reach from its begin to its end."""
    low = high = None
    for ivl in intervals:
        if not _overlaps(query, ivl):
            continue
        if low is None or high is None:
            low, high = ivl
            continue
        if _cmp(high, ivl[0]) < 0:
            return False
        if _cmp(ivl[1], high) > 0:
            high = ivl[1]
    if low is None or high is None:
        return False
    return _cmp(high, query[1]) >= 0 and _cmp(low, query[0]) <= 0
