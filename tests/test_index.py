"""The Cython MVCC index against a plain Python model of etcd's key index."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from geminikv.mvcc.index import Index

KEYS = [b"a", b"b", b"b\x00", b"c", b"d/1", b"d/2", b"e"]


class Model:
    """For every key: a list of (mod, create, version, lease) with version 0 = tombstone."""

    def __init__(self) -> None:
        self.hist: dict[bytes, list[tuple[int, int, int, int]]] = {}

    def put(self, key: bytes, mod: int, lease: int) -> None:
        h = self.hist.setdefault(key, [])
        if h and h[-1][2]:
            h.append((mod, h[-1][1], h[-1][2] + 1, lease))
        else:
            h.append((mod, mod, 1, lease))

    def delete(self, key: bytes, mod: int) -> bool:
        h = self.hist.get(key)
        if not h or not h[-1][2]:
            return False
        h.append((mod, 0, 0, 0))
        return True

    def at(self, key: bytes, rev: int) -> tuple[int, int, int, int] | None:
        visible = [r for r in self.hist.get(key, []) if r[0] <= rev]
        return visible[-1] if visible and visible[-1][2] else None

    def range(
        self, start: bytes, end: bytes | None, rev: int
    ) -> list[tuple[bytes, int, int, int, int]]:
        out: list[tuple[bytes, int, int, int, int]] = []
        for key in sorted(self.hist):
            inside = key == start if end is None else key >= start and (not end or key < end)
            state = self.at(key, rev) if inside else None
            if state is not None:
                out.append((key, *state))
        return out


ops = st.lists(
    st.tuples(st.sampled_from(["put", "put", "del"]), st.sampled_from(KEYS), st.integers(0, 3)),
    max_size=60,
)
bounds = st.sampled_from([None, b"", *KEYS, b"z"])


@given(ops, st.sampled_from(KEYS), bounds, st.integers(0, 5))
def test_index_matches_model(
    history: list[tuple[str, bytes, int]], start: bytes, end: bytes | None, limit: int
) -> None:
    index, model = Index(), Model()
    rev = 1
    for kind, key, lease in history:
        rev += 1
        if kind == "put":
            model.put(key, rev, lease)
            index.put(key, rev, lease, False)
        elif model.delete(key, rev):
            index.delete(key, rev)
        else:
            index.skip(rev)
    assert index.rev == rev
    for at in range(1, rev + 1):
        expected = model.range(start, end, at)
        entries, count = index.range(start, end, at, 0)
        assert entries == expected
        assert count == len(expected) == index.count(start, end, at)
        limited, lcount = index.range(start, end, at, limit)
        assert lcount == len(expected)
        assert limited == (expected[:limit] if limit else expected)
        for key in KEYS:
            assert index.get(key, at) == model.at(key, at)


def test_many_keys_stay_ordered() -> None:
    # Enough keys to split the index's chunks many times, inserted out of order.
    index = Index()
    keys = [b"k%06d" % ((i * 7919) % 5000) for i in range(5000)]
    for rev, key in enumerate(keys, start=2):
        index.put(key, rev, 0, True)
    entries, count = index.range(b"k", b"l", index.rev, 0)
    assert count == 5000 and [e[0] for e in entries] == sorted(keys)
    assert index.count(b"k001000", b"k002000", index.rev) == 1000
    assert index.range(b"k004990", b"", index.rev, 3)[0][0][0] == b"k004990"


def test_create_rows_and_hints() -> None:
    index = Index()
    # A Kine update row whose earlier history is gone keeps its create revision.
    assert index.put(b"k", 10, 0, False, 4, 0) is None
    assert index.get(b"k", 10) == (10, 4, 1, 0)
    assert index.put(b"k", 11, 5, False) == (10, 4, 1, 0)
    assert index.get(b"k", 11) == (11, 4, 2, 5)
    # A create row always starts a new generation.
    assert index.delete(b"k", 12) == (11, 4, 2, 5)
    assert index.put(b"k", 13, 0, True) is None
    assert index.get(b"k", 13) == (13, 13, 1, 0)
    assert index.latest_row(b"k") == 13
    assert index.live == 1


class EtcdKeyIndex:
    """etcd's keyIndex (server/mvcc/key_index.go): generations closed by tombstones."""

    def __init__(self) -> None:
        self.generations: list[list[int]] = [[]]

    def put(self, rev: int) -> None:
        self.generations[-1].append(rev)

    def tombstone(self, rev: int) -> None:
        self.generations[-1].append(rev)
        self.generations.append([])

    def compact(self, at: int) -> None:
        gens = self.generations
        i = 0
        while i < len(gens) - 1 and gens[i][-1] <= at:
            i += 1
        g = gens[i]
        walked = [j for j in range(len(g)) if g[j] <= at]
        if g:
            if walked:
                g = g[walked[-1] :]
                gens[i] = g
            if len(g) == 1 and i != len(gens) - 1:
                i += 1
        self.generations = gens[i:]

    def revisions(self) -> list[int]:
        return [r for g in self.generations for r in g]

    def empty(self) -> bool:
        return self.revisions() == []


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["put", "put", "del"]), st.sampled_from(KEYS)),
            st.tuples(st.just("compact"), st.integers(0, 6)),
        ),
        max_size=80,
    )
)
def test_compaction_matches_etcd_key_index(history: list[tuple[str, object]]) -> None:
    index = Index()
    model: dict[bytes, EtcdKeyIndex] = {}
    live: set[bytes] = set()
    rev, compacted = 1, 0
    for kind, arg in history:
        if kind == "compact":
            assert isinstance(arg, int)
            at = min(rev, compacted + arg)
            before = {k: m.revisions() for k, m in model.items()}
            for m in model.values():
                m.compact(at)
            model = {k: m for k, m in model.items() if not m.empty()}
            dropped = sorted(
                r
                for k, revs in before.items()
                for r in revs
                if r not in (model[k].revisions() if k in model else [])
            )
            assert index.plan_compaction(at) == dropped
            while not index.compact(at, 3):  # in small steps, as the server does
                pass
            assert index.plan_compaction(at) == []
            compacted = at
            for key in KEYS:
                kept = model[key].revisions() if key in model else []
                assert [r[0] for r in index.history(key)] == kept
            continue
        assert isinstance(arg, bytes)
        key = arg
        rev += 1
        if kind == "put":
            model.setdefault(key, EtcdKeyIndex()).put(rev)
            index.put(key, rev, 0, False)
            live.add(key)
        elif key in live:
            model[key].tombstone(rev)
            index.delete(key, rev)
            live.discard(key)
        else:
            index.skip(rev)
    # everything readable at or after the last compaction is still there
    entries, count = index.range(b"a", b"", rev, 0)
    assert [e[0] for e in entries] == sorted(live) and count == len(live)


def test_compaction_of_a_long_history_in_slices() -> None:
    # Enough superseded revisions that the index trims its list of them while compacting.
    index = Index()
    rev = 1
    for round_ in range(11):
        for k in range(3000):
            rev += 1
            index.put(b"/c/%06d" % k, rev, 0, round_ == 0)
    assert len(index.plan_compaction(rev)) == 30000
    slices = 0
    while not index.compact(rev, 2000):
        slices += 1
    assert slices >= 10 and index.pending_compaction() == 0
    assert index.plan_compaction(rev) == []
    entries, count = index.range(b"/c/", b"/c0", rev, 0)
    assert count == 3000 and all(e[3] == 11 for e in entries)
    assert index.history(b"/c/000000") == [(rev - 2999, 2, 11, 0)]


# -- the revision map (docs/architecture.md#revisions) ---------------------------------


def _rows(sizes: list[int], jumps: list[bool]) -> list[tuple[int, int]]:
    """(row id, revision) of requests of ``sizes`` rows each, one revision per request; a
    jump is a row whose revision is its id (Go Kine's, a gap row)."""
    out: list[tuple[int, int]] = []
    rid = rev = 0
    for size, jump in zip(sizes, jumps, strict=False):
        rid += 1
        rev = rid if jump else rev + 1
        out.append((rid, rev))
        for _ in range(size - 1):
            rid += 1
            out.append((rid, rev))
    return out


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=30),
    st.lists(st.booleans(), min_size=30, max_size=30),
    st.sets(st.integers(1, 120)),
)
def test_revision_map(sizes: list[int], jumps: list[bool], gone: set[int]) -> None:
    """Fed the rows that are left (a compaction deleted ``gone``, but never the newest), the
    map gives every left row its revision, and for every revision from the oldest left
    row's up an id at which the left rows are those up to that revision."""
    rows = _rows(sizes, jumps)
    left = [r for r in rows[:-1] if r[0] not in gone] + [rows[-1]]
    index = Index()
    for rid, rev in left:
        index.note_revision(rid, rev)
    assert index.has_anchors == any(rid != rev for rid, rev in left)
    for rid, rev in left:
        assert index.revision_of(rid) == rev
    for at in range(left[0][1], left[-1][1] + 1):
        got = index.id_at(at)
        assert [r for r in left if r[1] <= at] == [r for r in left if r[0] <= got]


def test_create_revision_is_the_rows_revision() -> None:
    """Two keys created by one request (rows 2 and 3 at revision 2): both have create
    revision 2; a later put keeps it."""
    index = Index()
    index.note_revision(2, 2)
    index.put(b"a", 2, 0, True, 0, 0, 2)
    index.note_revision(3, 2)
    index.put(b"b", 3, 0, True, 0, 0, 2)
    index.note_revision(4, 3)
    index.put(b"b", 4, 0, False, 2, 2, 3)
    assert index.get(b"a", 3) == (2, 2, 1, 0)
    assert index.get(b"b", 4) == (4, 2, 2, 0)
    assert (index.id_at(2), index.id_at(3)) == (3, 4)
    assert [index.revision_of(i) for i in (1, 2, 3, 4)] == [1, 2, 2, 3]
