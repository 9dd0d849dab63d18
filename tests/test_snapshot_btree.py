"""The bbolt writer (geminikv/snapshot/pages.py, btree.py) read back by an independent reader.

The reader below follows bbolt's format as documented (meta pages, leaf and branch pages,
inline buckets, overflow) and checks what ``bbolt check`` (``Tx.Check``) checks: every page
below the high-water mark reached exactly once. test_snapshot_etcd.py has the real bbolt
(etcdctl, etcd) read the same files.
"""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass, field

import pytest

from geminikv.snapshot.btree import DatabaseWriter
from geminikv.snapshot.pages import PAGE_SIZE, fnv64a

HEADER = struct.Struct("<QHHI")
LEAF = struct.Struct("<IIII")
BRANCH = struct.Struct("<IIQ")
META = struct.Struct("<IIIIQQQQQQ")
# etcd opens bbolt with NoFreelistSync: its files name no freelist page
NO_FREELIST = 2**64 - 1


@dataclass
class Database:
    buckets: dict[bytes, list[tuple[bytes, bytes]]]
    inline: set[bytes]
    pages_seen: dict[int, int] = field(default_factory=dict)
    depth: dict[bytes, int] = field(default_factory=dict)
    overflow_pages: int = 0
    free: list[int] = field(default_factory=list)


def read(data: bytes, page_size: int = PAGE_SIZE) -> Database:
    assert len(data) % page_size == 0
    metas = []
    for page_id in (0, 1):
        raw = data[page_id * page_size : (page_id + 1) * page_size]
        pid, flags, _, _ = HEADER.unpack_from(raw)
        assert (pid, flags) == (page_id, 0x04)
        fields = META.unpack_from(raw, 16)
        assert fields[0] == 0xED0CDAED and fields[1] == 2 and fields[2] == page_size
        assert fields[9] == fnv64a(raw[16 : 16 + 56]), "meta checksum"
        metas.append(fields)
    meta = max(metas, key=lambda m: m[8])  # the higher txid wins, as in bbolt
    _, _, _, _, root, _, freelist, high_water, _, _ = meta
    assert high_water * page_size == len(data)
    db = Database(buckets={}, inline=set())

    def page(page_id: int) -> tuple[int, int, int, bytes]:
        offset = page_id * page_size
        pid, flags, count, overflow = HEADER.unpack_from(data, offset)
        assert pid == page_id
        for i in range(page_id, page_id + overflow + 1):
            db.pages_seen[i] = db.pages_seen.get(i, 0) + 1
        db.overflow_pages += overflow
        return flags, count, overflow, data[offset : offset + (overflow + 1) * page_size]

    def leaf_elements(raw: bytes, count: int) -> list[tuple[int, bytes, bytes]]:
        out = []
        for i in range(count):
            at = 16 + 16 * i
            flags, pos, ksize, vsize = LEAF.unpack_from(raw, at)
            key = raw[at + pos : at + pos + ksize]
            out.append((flags, key, raw[at + pos + ksize : at + pos + ksize + vsize]))
        return out

    def walk(page_id: int, depth: int = 1) -> tuple[list[tuple[int, bytes, bytes]], int]:
        flags, count, _, raw = page(page_id)
        if flags == 0x02:
            return leaf_elements(raw, count), depth
        assert flags == 0x01 and count >= 1
        out: list[tuple[int, bytes, bytes]] = []
        deepest = depth
        for i in range(count):
            at = 16 + 16 * i
            pos, ksize, child = BRANCH.unpack_from(raw, at)
            first = raw[at + pos : at + pos + ksize]
            elements, deepest = walk(child, depth + 1)
            assert elements and elements[0][1] == first, "a branch key is its child's first"
            out.extend(elements)
        return out, deepest

    db.pages_seen[0] = db.pages_seen[1] = 1
    if freelist != NO_FREELIST:
        flags, count, _, raw = page(freelist)
        assert flags == 0x10
        at = 16
        if count == 0xFFFF:  # the real count is the first id's slot
            (count,) = struct.unpack_from("<Q", raw, at)
            at += 8
        db.free = list(struct.unpack_from(f"<{count}Q", raw, at))
        for free in db.free:
            db.pages_seen[free] = db.pages_seen.get(free, 0) + 1
    top, _ = walk(root)
    for flags, name, value in top:
        assert flags == 0x01, "the root bucket holds buckets only"
        child_root, _ = struct.unpack_from("<QQ", value)
        if child_root == 0:
            db.inline.add(name)
            _, iflags, icount, _ = HEADER.unpack_from(value, 16)
            assert iflags == 0x02
            elements = leaf_elements(value[16:], icount)
        else:
            elements, db.depth[name] = walk(child_root)
        keys = [k for _, k, _ in elements]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        db.buckets[name] = [(k, v) for _, k, v in elements]
    if freelist == NO_FREELIST:  # what bbolt then does: every page not reached is free
        db.free = [i for i in range(high_water) if i not in db.pages_seen]
        db.pages_seen.update(dict.fromkeys(db.free, 1))
    assert sorted(db.pages_seen) == list(range(high_water)), "every page reachable or free"
    assert set(db.pages_seen.values()) == {1}, "no page referenced twice"
    return db


def write(buckets: dict[bytes, list[tuple[bytes, bytes]]], fill: float = 0.9) -> bytes:
    file = io.BytesIO()
    writer = DatabaseWriter(file, fill_percent=fill)
    for name, entries in buckets.items():
        with writer.bucket(name) as bucket:
            for key, value in entries:
                bucket.put(key, value)
    size = writer.finish()
    assert size == len(file.getvalue())
    assert not read(file.getvalue()).free, "a written file has no free page"
    return file.getvalue()


def test_fnv64a_vectors() -> None:
    assert fnv64a(b"") == 0xCBF29CE484222325
    assert fnv64a(b"a") == 0xAF63DC4C8601EC8C
    assert fnv64a(b"foobar") == 0x85944171F73967E8


def test_empty_buckets_are_inline() -> None:
    data = write({b"b": [], b"a": []})
    db = read(data)
    assert db.buckets == {b"a": [], b"b": []}
    assert db.inline == {b"a", b"b"}
    assert len(data) == 4 * PAGE_SIZE  # meta, meta, root, freelist


def test_inline_up_to_a_quarter_page() -> None:
    # a page header and one element: 32 bytes, so 992 bytes of key and value fit
    fits = [(b"k", b"v" * (1024 - 32 - 1))]
    over = [(b"k", b"v" * (1024 - 32))]
    db = read(write({b"fits": fits, b"over": over}))
    assert db.inline == {b"fits"}
    assert db.buckets == {b"fits": fits, b"over": over}


def test_many_keys_make_a_three_level_tree() -> None:
    entries = [(struct.pack(">Q", i), b"%d" % i * 3) for i in range(60_000)]
    db = read(write({b"key": entries, b"meta": [(b"x", b"y")]}))
    assert db.buckets[b"key"] == entries
    assert db.depth[b"key"] == 3


def test_large_values_run_over_pages() -> None:
    rng = random.Random(7)
    entries = [
        (b"%06d" % i, rng.randbytes(rng.choice([10, 3000, 5000, 70_000]))) for i in range(200)
    ]
    db = read(write({b"big": entries}))
    assert db.buckets[b"big"] == entries
    assert db.overflow_pages > 0


@pytest.mark.parametrize("fill", [0.1, 0.5, 0.9, 1.0])
def test_fill_percent_bounds_pages(fill: float) -> None:
    entries = [(b"%08d" % i, b"v" * 40) for i in range(5000)]
    data = write({b"b": entries}, fill)
    db = read(data)
    assert db.buckets[b"b"] == entries
    leaves = len(data) // PAGE_SIZE - 4
    per_leaf = (fill * PAGE_SIZE - 16) // (16 + 48)
    assert leaves <= len(entries) / per_leaf * 1.1 + 3


def test_out_of_order_and_reused_names_refused() -> None:
    writer = DatabaseWriter(io.BytesIO())
    with writer.bucket(b"a") as bucket:
        bucket.put(b"2", b"")
        with pytest.raises(ValueError, match="out of order"):
            bucket.put(b"1", b"")
        with pytest.raises(ValueError, match="out of order"):
            bucket.put(b"2", b"")
    with pytest.raises(ValueError, match="each once"), writer.bucket(b"a"):
        pass
