"""A bbolt database written front to back, one page after another, in bounded memory.

bbolt keeps each bucket as a B+tree: leaves hold the sorted keys and values, branches the
first key and page id of each child. Given keys in order, the tree can be built bottom-up
while they arrive: a node is written as soon as the next element would take it past the
fill threshold, and its first key and page id go to its parent level. Memory is one node
per level of the bucket being written, never the database.

The meta pages (0 and 1) name the root bucket's page, the freelist's and the page count,
known only at the end: pages 0 and 1 are reserved, the data pages follow in the order they
fill, and the meta pages are written last, so the file must be seekable (a temporary file
when the database is streamed; ``stream.py``).

Layout of a finished file: 0, 1 meta; the buckets' pages, one bucket after another; the
root bucket's page (one element per bucket, sorted by name); an empty freelist page. (etcd
runs bbolt with NoFreelistSync, so its own files name no freelist page and bbolt finds the
free pages by walking every bucket on open; an empty freelist spares that walk, and every
bbolt version reads it.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from geminikv.snapshot.pages import (
    BUCKET_HEADER,
    BUCKET_LEAF,
    ELEMENT_SIZE,
    PAGE_SIZE,
    branch_page,
    freelist_page,
    leaf_page,
    meta_page,
)

# bbolt splits a node only where each side keeps at least this many elements.
MIN_KEYS_PER_PAGE = 2
MAX_KEY_SIZE = 32768
# etcd writes its key bucket sequentially with FillPercent 0.9, and so does its defrag:
# pages 90 % full, room for an update without splitting at once.
FILL_PERCENT = 0.9


class PageFile:
    """Hands out page ids in file order and writes each page as soon as it is complete."""

    def __init__(self, file: BinaryIO, page_size: int = PAGE_SIZE) -> None:
        self.file = file
        self.page_size = page_size
        self.start = file.tell()
        self.next_id = 2  # pages 0 and 1 (meta) come last, at ``start``
        file.write(bytes(2 * page_size))

    def write(self, page_id: int, image: bytes) -> None:
        if page_id != self.next_id or len(image) % self.page_size:
            raise ValueError(f"page {page_id} written out of order (next is {self.next_id})")
        self.file.write(image)
        self.next_id += len(image) // self.page_size


@dataclass(slots=True)
class _Node:
    """One node being filled: a leaf's (flags, key, value) or a branch's (key, child id)."""

    leaf: bool
    elements: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    children: list[tuple[bytes, int]] = field(default_factory=list)
    size: int = ELEMENT_SIZE  # the page header

    def __len__(self) -> int:
        return len(self.elements) if self.leaf else len(self.children)

    def first_key(self) -> bytes:
        return self.elements[0][1] if self.leaf else self.children[0][0]


class BucketWriter:
    """Writes one bucket's B+tree from keys given in strictly increasing order."""

    def __init__(self, pages: PageFile, fill_percent: float = FILL_PERCENT) -> None:
        self.pages = pages
        self.threshold = int(pages.page_size * min(max(fill_percent, 0.1), 1.0))
        self.levels = [_Node(leaf=True)]
        self.last_key: bytes | None = None

    def put(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if not key or len(key) > MAX_KEY_SIZE:
            raise ValueError(f"bbolt key of {len(key)} bytes")
        if self.last_key is not None and key <= self.last_key:
            raise ValueError(f"keys out of order: {key!r} after {self.last_key!r}")
        self.last_key = key
        self._add(0, ELEMENT_SIZE + len(key) + len(value), leaf=(flags, key, value))

    def _add(
        self,
        level: int,
        size: int,
        leaf: tuple[int, bytes, bytes] | None = None,
        child: tuple[bytes, int] | None = None,
    ) -> None:
        if level == len(self.levels):
            self.levels.append(_Node(leaf=False))
        node = self.levels[level]
        if len(node) >= MIN_KEYS_PER_PAGE and node.size + size > self.threshold:
            self._write(level, to_parent=True)
            node = self.levels[level]
        if leaf is not None:
            node.elements.append(leaf)
        elif child is not None:
            node.children.append(child)
        node.size += size

    def _write(self, level: int, to_parent: bool) -> int:
        """Write the node filling at ``level``; its first key and id go up unless it is the root."""
        node = self.levels[level]
        page_id = self.pages.next_id
        if node.leaf:
            image = leaf_page(page_id, node.elements, self.pages.page_size)
        else:
            image = branch_page(page_id, node.children, self.pages.page_size)
        first = node.first_key() if len(node) else b""
        self.pages.write(page_id, image)
        self.levels[level] = _Node(leaf=node.leaf)
        if to_parent:
            self._add(level + 1, ELEMENT_SIZE + len(first), child=(first, page_id))
        return page_id

    def root(self) -> int:
        """Write what is still in memory, bottom up; the root's page id."""
        level = 0
        while True:
            top = level == len(self.levels) - 1
            page_id = self._write(level, to_parent=not top)
            if top:
                return page_id
            level += 1

    def value(self) -> bytes:
        """Finish the bucket: its value in the parent bucket.

        A bucket that fits a quarter page in one leaf is stored inline, as bbolt stores it:
        a header with root 0 followed by the leaf's image. Otherwise the header names the
        root page.
        """
        leaf = self.levels[0]
        if len(self.levels) == 1 and leaf.size <= self.pages.page_size // 4:
            return BUCKET_HEADER.pack(0, 0) + leaf_page(0, leaf.elements, page_size=0)
        return BUCKET_HEADER.pack(self.root(), 0)


class DatabaseWriter:
    """A whole bbolt file: top-level buckets written one at a time, then root and meta."""

    def __init__(
        self, file: BinaryIO, page_size: int = PAGE_SIZE, fill_percent: float = FILL_PERCENT
    ) -> None:
        self.pages = PageFile(file, page_size)
        self.fill_percent = fill_percent
        self.buckets: dict[bytes, bytes] = {}
        self.open: tuple[bytes, BucketWriter] | None = None

    def open_bucket(self, name: bytes) -> BucketWriter:
        """Start a top-level bucket; its pages are written while it fills."""
        if self.open is not None or name in self.buckets:
            raise ValueError(f"bucket {name!r}: one at a time, each once")
        self.open = (name, BucketWriter(self.pages, self.fill_percent))
        return self.open[1]

    def close_bucket(self) -> None:
        """Finish the open bucket: its pages, and its header or inline image for the root."""
        if self.open is not None:
            name, writer = self.open
            self.buckets[name] = writer.value()
            self.open = None

    @contextmanager
    def bucket(self, name: bytes) -> Iterator[BucketWriter]:
        yield self.open_bucket(name)
        self.close_bucket()

    def finish(self, txid: int = 2) -> int:
        """Write the root bucket, the freelist and both meta pages; the file's size in bytes.

        As bbolt's own copy (``Tx.WriteTo``) does, meta 1 carries the transaction id before
        meta 0's, so meta 0 is the one read.
        """
        if self.open is not None or txid < 1:
            raise ValueError("finish: a bucket is still open, or txid < 1")
        root = BucketWriter(self.pages, self.fill_percent)
        for name in sorted(self.buckets):
            root.put(name, self.buckets[name], BUCKET_LEAF)
        root_id = root.root()
        freelist_id = self.pages.next_id
        self.pages.write(freelist_id, freelist_page(freelist_id, self.pages.page_size))
        high_water = self.pages.next_id
        end = self.pages.file.tell()
        self.pages.file.seek(self.pages.start)
        for page_id, tx in ((0, txid), (1, txid - 1)):
            self.pages.file.write(
                meta_page(
                    page_id,
                    root=root_id,
                    freelist=freelist_id,
                    high_water=high_water,
                    txid=tx,
                    page_size=self.pages.page_size,
                )
            )
        self.pages.file.seek(end)
        return high_water * self.pages.page_size
