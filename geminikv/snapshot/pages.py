"""bbolt's on-disk page format (file format version 2, as etcd 3.4 and 3.5 read it).

Every page starts with a 16-byte header: page id (u64), flags (u16), element count (u16),
overflow (u32: how many further pages the page runs over). All integers are little-endian
(bbolt writes its structs in the machine's order, and etcd runs on little-endian machines).

- meta page (pages 0 and 1): magic, version, page size, flags, the root bucket's header,
  the freelist's page, the high-water page id, the transaction id, and an FNV-64a checksum
  of everything before it.
- leaf page: 16-byte elements (flags, pos, key size, value size), then keys and values;
  ``pos`` counts from the element itself to its key.
- branch page: 16-byte elements (pos, key size, child page id), then the keys.
- freelist page: a count and that many free page ids (always none here).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

PAGE_SIZE = 4096
MAGIC = 0xED0CDAED
VERSION = 2

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10

# A leaf element whose value is a bucket (a header, maybe followed by an inline page).
BUCKET_LEAF = 0x01

PAGE_HEADER = struct.Struct("<QHHI")
LEAF_ELEMENT = struct.Struct("<IIII")
BRANCH_ELEMENT = struct.Struct("<IIQ")
BUCKET_HEADER = struct.Struct("<QQ")  # root page id (0: inline), sequence
# magic, version, page size, flags, root bucket (root, sequence), freelist, pgid, txid
META_FIELDS = struct.Struct("<IIIIQQQQQ")
CHECKSUM = struct.Struct("<Q")

ELEMENT_SIZE = 16
assert PAGE_HEADER.size == LEAF_ELEMENT.size == BRANCH_ELEMENT.size == ELEMENT_SIZE

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv64a(data: bytes) -> int:
    """FNV-1a, 64 bits: what bbolt checksums a meta page with."""
    h = _FNV64_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV64_PRIME) & _MASK64
    return h


def leaf_page(
    page_id: int, elements: Sequence[tuple[int, bytes, bytes]], page_size: int = PAGE_SIZE
) -> bytes:
    """A leaf page of ``(flags, key, value)`` elements, padded to whole pages.

    ``page_id`` 0 and ``page_size`` 0 give the unpadded image an inline bucket holds.
    """
    header_end = ELEMENT_SIZE + ELEMENT_SIZE * len(elements)
    parts = [b""]  # the header, filled in once the size is known
    offset = header_end
    for i, (flags, key, value) in enumerate(elements):
        element_at = ELEMENT_SIZE + ELEMENT_SIZE * i
        parts.append(LEAF_ELEMENT.pack(flags, offset - element_at, len(key), len(value)))
        offset += len(key) + len(value)
    for _, key, value in elements:
        parts.append(key)
        parts.append(value)
    return _finish(parts, page_id, LEAF_PAGE, len(elements), offset, page_size)


def branch_page(
    page_id: int, children: Sequence[tuple[bytes, int]], page_size: int = PAGE_SIZE
) -> bytes:
    """A branch page of ``(first key, child page id)`` elements, padded to whole pages."""
    header_end = ELEMENT_SIZE + ELEMENT_SIZE * len(children)
    parts = [b""]
    offset = header_end
    for i, (key, child) in enumerate(children):
        element_at = ELEMENT_SIZE + ELEMENT_SIZE * i
        parts.append(BRANCH_ELEMENT.pack(offset - element_at, len(key), child))
        offset += len(key)
    parts.extend(key for key, _ in children)
    return _finish(parts, page_id, BRANCH_PAGE, len(children), offset, page_size)


def _finish(
    parts: list[bytes], page_id: int, flags: int, count: int, size: int, page_size: int
) -> bytes:
    if count >= 0xFFFF:
        raise ValueError(f"{count} elements do not fit one page's count")
    pages = 1 if page_size == 0 else -(-size // page_size)
    parts[0] = PAGE_HEADER.pack(page_id, flags, count, pages - 1)
    image = b"".join(parts)
    if page_size:
        image += bytes(pages * page_size - size)
    return image


def freelist_page(page_id: int, page_size: int = PAGE_SIZE) -> bytes:
    """An empty freelist: every page of a freshly written file is in use."""
    return PAGE_HEADER.pack(page_id, FREELIST_PAGE, 0, 0) + bytes(page_size - ELEMENT_SIZE)


def meta_page(
    page_id: int,
    *,
    root: int,
    freelist: int,
    high_water: int,
    txid: int,
    page_size: int = PAGE_SIZE,
) -> bytes:
    """Meta page ``page_id`` (0 or 1); ``high_water`` is the number of pages in the file."""
    fields = META_FIELDS.pack(MAGIC, VERSION, page_size, 0, root, 0, freelist, high_water, txid)
    meta = fields + CHECKSUM.pack(fnv64a(fields))
    header = PAGE_HEADER.pack(page_id, META_PAGE, 0, 0)
    return header + meta + bytes(page_size - len(header) - len(meta))
