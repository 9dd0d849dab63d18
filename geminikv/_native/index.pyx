# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""In-memory MVCC index: for every key, its revisions (like etcd's treeIndex + keyIndex).

Keys live in a sorted sequence of chunks (a two-level B-tree), so inserting a new key
costs O(sqrt n) instead of moving the whole array. Every key has a ``KeyHistory``: a C
array of revisions, oldest first; a tombstone (version 0) closes a generation.
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.stdint cimport INT64_MAX, int64_t
from bisect import bisect_left, bisect_right

DEF CHUNK = 512


cdef class KeyHistory:
    """All retained revisions of one key."""

    def __cinit__(self, bytes key):
        self.key = key
        self.n = 0
        self.cap = 2
        self.revs = <Rev*>PyMem_Malloc(self.cap * sizeof(Rev))
        if self.revs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.revs)

    cdef void append(self, int64_t mod, int64_t create, int64_t version, int64_t lease) except *:
        cdef Rev* grown
        if self.n == self.cap:
            grown = <Rev*>PyMem_Realloc(self.revs, 2 * self.cap * sizeof(Rev))
            if grown == NULL:
                raise MemoryError()
            self.revs = grown
            self.cap *= 2
        self.revs[self.n].mod = mod
        self.revs[self.n].create = create
        self.revs[self.n].version = version
        self.revs[self.n].lease = lease
        self.n += 1

    cdef Py_ssize_t upto(self, int64_t rev):
        """How many retained revisions are <= rev."""
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.revs[mid].mod <= rev:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef Rev* at(self, int64_t rev):
        """The newest revision <= rev, or NULL."""
        cdef Py_ssize_t n = self.upto(rev)
        if n == 0:
            return NULL
        return &self.revs[n - 1]

    cdef Rev* live_at(self, int64_t rev):
        """The visible revision at rev (NULL when absent or deleted)."""
        cdef Rev* r = self.at(rev)
        if r == NULL or r.version == 0:
            return NULL
        return r

    cdef Rev* latest(self):
        if self.n == 0:
            return NULL
        return &self.revs[self.n - 1]

    cdef void drop(self, Py_ssize_t count) except *:
        """Forget the ``count`` oldest revisions."""
        cdef Py_ssize_t i
        for i in range(count, self.n):
            self.revs[i - count] = self.revs[i]
        self.n -= count

    def revisions(self):
        """(mod, create, version, lease) for every retained revision, oldest first."""
        cdef Py_ssize_t i
        return [(self.revs[i].mod, self.revs[i].create, self.revs[i].version, self.revs[i].lease)
                for i in range(self.n)]


cdef inline tuple rev_tuple(Rev* r):
    """A key's State (geminikv.storage.rows): a plain tuple, which kvwire requires."""
    return (r.mod, r.create, r.version, r.lease)


cdef class Index:
    """The MVCC index. Rows are applied strictly in increasing id order.

    Everything in it is by row id (``rev``: the newest applied row; ``compact_rev``: the
    row id compacted at; a State's ``mod``) except a State's ``create`` and
    ``compact_revision``, which are etcd revisions; ``revision_of`` and ``id_at`` map
    between the two (docs/architecture.md#revisions)."""

    def __cinit__(self):
        self.chunks = [[]]
        self.firsts = [b""]
        self.by_key = {}
        self.by_lease = {}
        self.dirty_revs = []
        self.dirty_keys = []
        self.dirty_head = 0
        self.rev = 1
        self.compact_rev = 0
        self.compact_revision = 0
        self.live = 0
        self.anchor_ids = []
        self.anchor_revs = []
        self.anchor_ends = []
        self.last_noted = 0
        self.last_noted_rev = 0

    def take(self, Index other):
        """Become ``other`` (which is left empty), in one step: a rebuilt index replaces
        this one while every holder keeps its reference."""
        self.chunks, other.chunks = other.chunks, [[]]
        self.firsts, other.firsts = other.firsts, [b""]
        self.by_key, other.by_key = other.by_key, {}
        self.by_lease, other.by_lease = other.by_lease, {}
        self.dirty_revs, other.dirty_revs = other.dirty_revs, []
        self.dirty_keys, other.dirty_keys = other.dirty_keys, []
        self.dirty_head, other.dirty_head = other.dirty_head, 0
        self.rev, other.rev = other.rev, 1
        self.compact_rev, other.compact_rev = other.compact_rev, 0
        self.compact_revision, other.compact_revision = other.compact_revision, 0
        self.live, other.live = other.live, 0
        self.anchor_ids, other.anchor_ids = other.anchor_ids, []
        self.anchor_revs, other.anchor_revs = other.anchor_revs, []
        self.anchor_ends, other.anchor_ends = other.anchor_ends, []
        self.last_noted, other.last_noted = other.last_noted, 0
        self.last_noted_rev, other.last_noted_rev = other.last_noted_rev, 0

    def __len__(self):
        """Number of keys with retained history (live or tombstoned)."""
        return len(self.by_key)

    # -- key placement -------------------------------------------------------------

    cdef Py_ssize_t _chunk_for(self, bytes key):
        cdef Py_ssize_t c = bisect_right(self.firsts, key) - 1
        return c if c > 0 else 0

    cdef KeyHistory _history(self, bytes key):
        """The key's history, created (and placed in order) if new."""
        cdef KeyHistory h = self.by_key.get(key)
        cdef Py_ssize_t c, pos
        cdef list chunk
        if h is not None:
            return h
        h = KeyHistory(key)
        self.by_key[key] = h
        c = self._chunk_for(key)
        chunk = <list>self.chunks[c]
        pos = self._bisect(chunk, key)
        chunk.insert(pos, h)
        if pos == 0:
            self.firsts[c] = key if c > 0 else b""
        if len(chunk) > CHUNK:
            self.chunks.insert(c + 1, chunk[CHUNK // 2:])
            del chunk[CHUNK // 2:]
            self.firsts.insert(c + 1, (<KeyHistory>self.chunks[c + 1][0]).key)
        return h

    cdef Py_ssize_t _bisect(self, list chunk, bytes key):
        cdef Py_ssize_t lo = 0, hi = len(chunk), mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if (<KeyHistory>chunk[mid]).key < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- applying revisions --------------------------------------------------------

    def put(self, bytes key, int64_t mod, int64_t lease, bint created,
            int64_t create_hint=0, int64_t version_hint=0, int64_t revision=0):
        """Apply a PUT row; returns the previous live (mod, create, version, lease) or None.

        ``created`` marks Kine's create rows. When the key's earlier history is gone
        (written by another tool and compacted), the hints from the row are used.
        ``revision`` is the row's revision (0: the same as ``mod``, the row id): a new
        generation's create revision.
        """
        cdef KeyHistory h = self._history(key)
        cdef Rev* prev = h.latest()
        cdef tuple before = None
        cdef int64_t create, version
        if prev != NULL and prev.version != 0:
            before = rev_tuple(prev)
        if before is not None and not created:
            create = prev.create
            version = prev.version + 1
        elif before is not None or created or create_hint <= 0:
            create = revision if revision > 0 else mod
            version = 1
        else:
            create = create_hint
            version = version_hint if version_hint > 0 else 1
        if before is None:
            self.live += 1
        elif prev.lease != 0 and prev.lease != lease:
            self._detach(prev.lease, key)
        if h.n > 0:
            self._mark(mod, key)  # an older revision became compactable
        if lease != 0:
            keys = self.by_lease.get(lease)
            if keys is None:
                self.by_lease[lease] = {key}
            else:
                (<set>keys).add(key)
        h.append(mod, create, version, lease)
        self.rev = mod
        return before

    cdef void _detach(self, int64_t lease, bytes key) except *:
        keys = self.by_lease.get(lease)
        if keys is not None:
            (<set>keys).discard(key)
            if not keys:
                del self.by_lease[lease]

    def lease_keys(self, int64_t lease):
        """Keys currently attached to a lease, sorted."""
        return sorted(self.by_lease.get(lease, ()))

    def leases_in_use(self):
        """Every lease id some live key is attached to."""
        return list(self.by_lease)

    def delete(self, bytes key, int64_t mod):
        """Apply a tombstone row; returns the previous live revision tuple or None."""
        cdef KeyHistory h = self.by_key.get(key)
        cdef Rev* prev
        self.rev = mod
        if h is None:
            return None
        prev = h.latest()
        if prev == NULL or prev.version == 0:
            return None
        before = rev_tuple(prev)
        if prev.lease != 0:
            self._detach(prev.lease, key)
        h.append(mod, 0, 0, 0)
        self._mark(mod, key)
        self.live -= 1
        return before

    cdef void _mark(self, int64_t rev, bytes key) except *:
        self.dirty_revs.append(rev)
        self.dirty_keys.append(key)

    # -- compaction (etcd keyIndex.compact) -------------------------------------------

    cdef Py_ssize_t _cut(self, KeyHistory h, int64_t rev):
        """How many of the key's oldest revisions a compaction at rev removes.

        The newest revision <= rev stays readable at rev, unless it is a tombstone;
        everything older goes.
        """
        cdef Py_ssize_t lo = h.upto(rev)
        if lo == 0:
            return 0
        if h.revs[lo - 1].version == 0:
            return lo
        return lo - 1

    def plan_compaction(self, int64_t rev):
        """Row ids a compaction at rev makes unreachable (the index is not changed).

        Only keys written again since the last applied compaction are looked at, so the
        cost follows what is compacted, not the size of the store.
        """
        cdef list out = []
        cdef set seen = set()
        cdef Py_ssize_t i, n = len(self.dirty_revs), j, cut
        cdef KeyHistory h
        for i in range(self.dirty_head, n):
            if <int64_t>self.dirty_revs[i] > rev:
                break
            key = self.dirty_keys[i]
            if key in seen:
                continue
            seen.add(key)
            h = self.by_key.get(key)
            if h is None:
                continue
            cut = self._cut(h, rev)
            for j in range(cut):
                out.append(h.revs[j].mod)
        out.sort()
        return out

    def compact(self, int64_t rev, Py_ssize_t budget=100000):
        """Drop what a compaction at rev made unreachable, at most ``budget`` dirty
        entries per call; returns True when done (call again otherwise)."""
        cdef Py_ssize_t n = len(self.dirty_revs), cut, done = 0
        cdef KeyHistory h
        cdef Py_ssize_t i = self.dirty_head
        while i < n and done < budget:
            if <int64_t>self.dirty_revs[i] > rev:
                break
            key = self.dirty_keys[i]
            i += 1
            done += 1
            h = self.by_key.get(key)
            if h is None:
                continue
            cut = self._cut(h, rev)
            if cut == 0:
                continue
            if cut == h.n:
                self._forget(h)
                continue
            h.drop(cut)
        cdef bint finished = i >= n or <int64_t>self.dirty_revs[i] > rev
        self.dirty_head = i
        if self.dirty_head > 4096 and self.dirty_head * 2 > n:
            # Drop the processed prefix once it is most of the list.
            del self.dirty_revs[:self.dirty_head]
            del self.dirty_keys[:self.dirty_head]
            self.dirty_head = 0
        return finished

    cdef void _forget(self, KeyHistory h) except *:
        """Remove a key that has no revision left."""
        cdef bytes key = h.key
        cdef Py_ssize_t c = self._chunk_for(key), pos
        cdef list chunk = self.chunks[c]
        pos = self._bisect(chunk, key)
        assert chunk[pos] is h
        del chunk[pos]
        del self.by_key[key]
        if not chunk and len(self.chunks) > 1:
            del self.chunks[c]
            del self.firsts[c]
            if c == 0:
                self.firsts[0] = b""
        elif pos == 0 and c > 0:
            self.firsts[c] = (<KeyHistory>chunk[0]).key

    def pending_compaction(self):
        """Dirty entries not yet compacted (each is one superseded revision)."""
        return len(self.dirty_revs) - self.dirty_head

    def skip(self, int64_t mod):
        """A revision that changes no key (Kine gap rows, special rows)."""
        self.rev = mod

    # -- revisions and row ids (docs/architecture.md#revisions) ------------------------
    #
    # Several rows (one request's) may share one revision, so revisions are not row ids.
    # Revisions never decrease in id order and never exceed the id. The map holds anchors
    # (first id, revision, last id): the rows from the first to the last id are at that
    # revision, and each id after the last one revision further, up to the next anchor.
    # One anchor per multi-row request (whatever its number of rows), one per jump of a
    # revision to its id; without anchors every revision is its id, as in every database
    # Go Kine or older geminikv wrote. Fed only the rows a compaction left, it still gives
    # each of them its revision.

    def note_revision(self, int64_t rid, int64_t revision):
        """Row ``rid`` (fed in id order) has ``revision``."""
        cdef Py_ssize_t n = len(self.anchor_ids)
        if revision != self.revision_of(rid):
            if revision == self.last_noted_rev and self.last_noted > 0:
                # the same request as the row before: one anchor for all its rows
                if (n and <int64_t>self.anchor_ends[n - 1] == self.last_noted
                        and <int64_t>self.anchor_revs[n - 1] == revision):
                    self.anchor_ends[n - 1] = rid
                else:
                    self.anchor_ids.append(self.last_noted)
                    self.anchor_revs.append(revision)
                    self.anchor_ends.append(rid)
            else:
                self.anchor_ids.append(rid)
                self.anchor_revs.append(revision)
                self.anchor_ends.append(rid)
        self.last_noted = rid
        self.last_noted_rev = revision

    @property
    def has_anchors(self):
        """Whether some revision is not its row id."""
        return len(self.anchor_ids) > 0

    def revision_of(self, int64_t rid):
        """The revision of row ``rid``."""
        if not self.anchor_ids:
            return rid
        cdef Py_ssize_t k = bisect_right(self.anchor_ids, rid) - 1
        if k < 0:
            return rid
        cdef int64_t end = <int64_t>self.anchor_ends[k]
        cdef int64_t rev = <int64_t>self.anchor_revs[k]
        return rev if rid <= end else rev + (rid - end)

    def id_at(self, int64_t revision):
        """The newest row id whose revision is at most ``revision``: the index at that id
        is the store at that revision."""
        if not self.anchor_ids:
            return revision
        cdef Py_ssize_t k = bisect_right(self.anchor_revs, revision) - 1
        cdef int64_t rid, limit, ahead, end
        if k < 0:
            rid = revision
            limit = <int64_t>self.anchor_ids[0] - 1
        else:
            ahead = revision - <int64_t>self.anchor_revs[k]
            end = <int64_t>self.anchor_ends[k]
            # saturating: a revision far ahead (a watch from 2**63 - 1) is past every id
            rid = INT64_MAX if ahead > INT64_MAX - end else end + ahead
            limit = (<int64_t>self.anchor_ids[k + 1] - 1
                     if k + 1 < len(self.anchor_ids) else rid)
        return rid if rid < limit else limit

    def anchors(self):
        """The map's anchors, (first row id, revision, last row id) in id order."""
        return list(zip(self.anchor_ids, self.anchor_revs, self.anchor_ends))

    # -- reading -------------------------------------------------------------------

    def get(self, bytes key, int64_t rev):
        """(mod, create, version, lease) of key visible at rev, or None."""
        cdef KeyHistory h = self.by_key.get(key)
        cdef Rev* r
        if h is None:
            return None
        r = h.live_at(rev)
        if r == NULL:
            return None
        return rev_tuple(r)

    def latest_row(self, bytes key):
        """Id of the newest retained row of key (live or tombstone), 0 if none."""
        cdef KeyHistory h = self.by_key.get(key)
        cdef Rev* r
        if h is None:
            return 0
        r = h.latest()
        return r.mod if r != NULL else 0

    def latest(self, bytes key):
        """(mod, create, version, lease) of the newest retained revision (tombstones too)."""
        cdef KeyHistory h = self.by_key.get(key)
        cdef Rev* r
        if h is None:
            return None
        r = h.latest()
        return rev_tuple(r) if r != NULL else None

    def history(self, bytes key):
        cdef KeyHistory h = self.by_key.get(key)
        return [] if h is None else h.revisions()

    def range(self, bytes start, object end, int64_t rev, Py_ssize_t limit=0):
        """Keys visible at rev in [start, end): (list of (key, mod, create, version, lease), count).

        ``end`` None = the single key ``start``; b"" = every key >= start.
        At most ``limit`` entries are returned (0 = all); count is always the total.
        """
        cdef list out = []
        cdef Py_ssize_t count = visible(self, start, end, rev, limit, out)
        return out, count

    def count(self, bytes start, object end, int64_t rev):
        """Number of keys visible at rev in [start, end) (same ``end`` rules as range)."""
        return visible(self, start, end, rev, 0, None)


cdef Py_ssize_t visible(Index index, bytes start, object end, int64_t rev, Py_ssize_t limit,
                        list out) except -1:
    """The one walk behind Index.range and Index.count: the number of keys visible at rev
    in [start, end) (``end`` as in range), appending the first ``limit`` of them (0 = all)
    to ``out`` as (key, mod, create, version, lease) unless ``out`` is None."""
    cdef Py_ssize_t count = 0
    cdef KeyHistory h
    cdef Rev* r
    if end is None:
        h = index.by_key.get(start)
        if h is None:
            return 0
        r = h.live_at(rev)
        if r == NULL:
            return 0
        if out is not None:
            out.append((start, r.mod, r.create, r.version, r.lease))
        return 1
    cdef bytes bend = end
    cdef bint unbounded = len(bend) == 0
    if not unbounded and bend <= start:
        return 0
    cdef Py_ssize_t c = index._chunk_for(start), i, nchunks = len(index.chunks)
    cdef list chunk = index.chunks[c]
    i = index._bisect(chunk, start)
    while c < nchunks:
        chunk = <list>index.chunks[c]
        while i < len(chunk):
            h = <KeyHistory>chunk[i]
            if not unbounded and h.key >= bend:
                return count
            r = h.live_at(rev)
            if r != NULL:
                count += 1
                if out is not None and (limit <= 0 or count <= limit):
                    out.append((h.key, r.mod, r.create, r.version, r.lease))
            i += 1
        c += 1
        i = 0
    return count
