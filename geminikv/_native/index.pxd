from libc.stdint cimport int64_t


# The C form of geminikv.storage.rows.State (index.pyx returns State tuples).
cdef struct Rev:
    int64_t mod       # the row id (Index.revision_of gives the mod revision)
    int64_t create    # create revision of the generation (0 on a tombstone): a revision
                      # (not a row id; see Index's revision map)
    int64_t version   # 1 on create, +1 per put; 0 marks a tombstone
    int64_t lease


cdef class KeyHistory:
    cdef readonly bytes key
    cdef Rev* revs
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef void append(self, int64_t mod, int64_t create, int64_t version, int64_t lease) except *
    cdef Py_ssize_t upto(self, int64_t rev)
    cdef Rev* at(self, int64_t rev)
    cdef Rev* live_at(self, int64_t rev)
    cdef Rev* latest(self)
    cdef void drop(self, Py_ssize_t count) except *


cdef class Index:
    cdef list chunks
    cdef list firsts
    cdef dict by_key
    cdef dict by_lease
    cdef list dirty_revs
    cdef list dirty_keys
    cdef Py_ssize_t dirty_head
    cdef public int64_t rev
    cdef public int64_t compact_rev
    cdef public int64_t compact_revision
    cdef public Py_ssize_t live
    cdef list anchor_ids
    cdef list anchor_revs
    cdef list anchor_ends
    cdef int64_t last_noted
    cdef int64_t last_noted_rev

    cdef Py_ssize_t _chunk_for(self, bytes key)
    cdef KeyHistory _history(self, bytes key)
    cdef Py_ssize_t _bisect(self, list chunk, bytes key)
    cdef void _detach(self, int64_t lease, bytes key) except *
    cdef void _mark(self, int64_t rev, bytes key) except *
    cdef Py_ssize_t _cut(self, KeyHistory h, int64_t rev)
    cdef void _forget(self, KeyHistory h) except *
