# cython: language_level=3, boundscheck=False, wraparound=False
"""kube-apiserver's most frequent requests read from and answered in protobuf wire
format directly, without building messages (etcd's rpc.proto field numbers below).

The shapes: ``Txn{compare: [MOD(key) == rev], success: [Put{key, value, lease}] or
[DeleteRange{key}], failure: [] or [Range{key}]}`` on one key, no other field set (its
create, update and delete, leased for Events), and ``Range{key}`` (its get). The parsers return None for anything else: the
generic path then parses it, and reports malformed bytes.

The parsers recognise shapes and enforce no rule: a request that a rule could refuse
(an empty key, one over the size limit the caller passes) is not the shape, so the
generic path refuses it; what is left for the shape is mvcc/txn.py's evaluation
(``Evaluator.guarded_put``), as for any Txn.
"""

from libc.stdint cimport int64_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcmp

DEF WIRE_VARINT = 0
DEF WIRE_BYTES = 2
DEF COMPARE_MOD = 2  # Compare.CompareTarget.MOD; Compare.CompareResult.EQUAL is 0


cdef class GuardedPut:
    """A parsed guarded put: put ``value`` at ``key`` (attached to ``lease``, 0 for none)
    or, if ``delete``, delete ``key`` (``value`` empty, ``lease`` 0), if its mod revision
    is ``want_mod``; otherwise, if ``read_on_failure``, answer with the key as it is."""

    cdef readonly bytes key
    cdef readonly int64_t want_mod
    cdef readonly bytes value
    cdef readonly int64_t lease
    cdef readonly bint read_on_failure
    cdef readonly bint delete

    def __repr__(self):
        return (f"GuardedPut(key={self.key!r}, want_mod={self.want_mod}, "
                f"{len(self.value)} value bytes, lease={self.lease}, "
                f"read_on_failure={self.read_on_failure}, delete={self.delete})")


cdef struct Reader:
    const unsigned char* p
    const unsigned char* end
    bint bad


cdef inline uint64_t _varint(Reader* r) noexcept:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef unsigned char b
    while r.p < r.end and shift < 64:
        b = r.p[0]
        r.p += 1
        result |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            return result
        shift += 7
    r.bad = True
    return 0


cdef inline Py_ssize_t _length(Reader* r) noexcept:
    """A length-delimited field's length, checked against what is left."""
    cdef uint64_t n = _varint(r)
    if r.bad or n > <uint64_t>(r.end - r.p):
        r.bad = True
        return 0
    return <Py_ssize_t>n


cdef bytes _bytes_field(Reader* r):
    """A length-delimited field's bytes (None when they run past the end)."""
    cdef Py_ssize_t length = _length(r)
    if r.bad:
        return None
    cdef bytes out = PyBytes_FromStringAndSize(<const char*>r.p, length)
    r.p += length
    return out


cdef bint _put_request(const unsigned char* p, Py_ssize_t n, GuardedPut out) except -1:
    """PutRequest{key (1), value (2), lease (3)}: anything else set (prev_kv, ignore_*), or
    a field twice, is not the shape."""
    cdef Reader r = Reader(p, p + n, False)
    cdef uint64_t tag
    cdef Py_ssize_t length
    cdef bint seen_key = False, seen_value = False, seen_lease = False
    while r.p < r.end:
        tag = _varint(&r)
        if r.bad:
            return False
        if tag == (1 << 3 | WIRE_BYTES) and not seen_key:
            length = _length(&r)
            if r.bad or length != len(out.key) or memcmp(r.p, <const char*>out.key, length):
                return False
            r.p += length
            seen_key = True
        elif tag == (2 << 3 | WIRE_BYTES) and not seen_value:
            out.value = _bytes_field(&r)
            if out.value is None:
                return False
            seen_value = True
        elif tag == (3 << 3 | WIRE_VARINT) and not seen_lease:
            out.lease = <int64_t>_varint(&r)
            if r.bad:
                return False
            seen_lease = True
        else:
            return False
    return seen_key


cdef bint _key_request(const unsigned char* p, Py_ssize_t n, bytes key) except -1:
    """RangeRequest{key (1)} or DeleteRangeRequest{key (1)} on ``key`` and nothing else."""
    cdef Reader r = Reader(p, p + n, False)
    cdef uint64_t tag = _varint(&r)
    cdef Py_ssize_t length
    if r.bad or tag != (1 << 3 | WIRE_BYTES):
        return False
    length = _length(&r)
    if r.bad or length != len(key) or memcmp(r.p, <const char*>key, length):
        return False
    return r.p + length == r.end


cdef bint _compare(const unsigned char* p, Py_ssize_t n, GuardedPut out) except -1:
    """Compare{result EQUAL (1), target MOD (2), key (3), mod_revision (6)}."""
    cdef Reader r = Reader(p, p + n, False)
    cdef uint64_t tag, v
    cdef Py_ssize_t length
    cdef bint seen_result = False, seen_target = False, seen_key = False, seen_mod = False
    cdef bint is_mod = False
    while r.p < r.end:
        tag = _varint(&r)
        if r.bad:
            return False
        if tag == (1 << 3 | WIRE_VARINT) and not seen_result:
            if _varint(&r) != 0 or r.bad:
                return False
            seen_result = True
        elif tag == (2 << 3 | WIRE_VARINT) and not seen_target:
            v = _varint(&r)
            if r.bad or v != COMPARE_MOD:
                return False
            is_mod = seen_target = True
        elif tag == (3 << 3 | WIRE_BYTES) and not seen_key:
            out.key = _bytes_field(&r)
            if not out.key:
                return False
            seen_key = True
        elif tag == (6 << 3 | WIRE_VARINT) and not seen_mod:
            v = _varint(&r)
            if r.bad:
                return False
            out.want_mod = <int64_t>v
            seen_mod = True
        else:
            return False
    return seen_key and is_mod


cdef bint _single_op(const unsigned char* p, Py_ssize_t n, int field,
                     const unsigned char** inner, Py_ssize_t* inner_n) except -1:
    """RequestOp with only ``field`` (a request message) set."""
    cdef Reader r = Reader(p, p + n, False)
    cdef uint64_t tag = _varint(&r)
    if r.bad or tag != (<uint64_t>field << 3 | WIRE_BYTES):
        return False
    inner_n[0] = _length(&r)
    if r.bad:
        return False
    inner[0] = r.p
    return r.p + inner_n[0] == r.end


def parse_guarded_put(bytes data, Py_ssize_t max_bytes):
    """The request as a GuardedPut, or None when it is not exactly that shape (or larger
    than ``max_bytes``: the generic path reports the limit)."""
    cdef Py_ssize_t n = len(data)
    if n > max_bytes:
        return None
    cdef const unsigned char* start = <const unsigned char*>(<char*>data)
    cdef Reader r = Reader(start, start + n, False)
    cdef uint64_t tag
    cdef Py_ssize_t length
    cdef const unsigned char* inner = NULL
    cdef Py_ssize_t inner_n = 0
    cdef const unsigned char* success_p = NULL
    cdef Py_ssize_t success_n = 0
    cdef const unsigned char* failure_p = NULL
    cdef Py_ssize_t failure_n = 0
    cdef GuardedPut out = GuardedPut.__new__(GuardedPut)
    cdef bint seen_compare = False, seen_success = False, seen_failure = False
    out.value = b""
    out.want_mod = 0
    out.lease = 0
    out.delete = False
    while r.p < r.end:
        tag = _varint(&r)
        if r.bad:
            return None
        length = _length(&r) if (tag & 7) == WIRE_BYTES else 0
        if r.bad:
            return None
        if tag == (1 << 3 | WIRE_BYTES) and not seen_compare:
            if not _compare(r.p, length, out):
                return None
            seen_compare = True
        elif tag == (2 << 3 | WIRE_BYTES) and not seen_success:
            success_p, success_n = r.p, length
            seen_success = True
        elif tag == (3 << 3 | WIRE_BYTES) and not seen_failure:
            failure_p, failure_n = r.p, length
            seen_failure = True
        else:
            return None
        r.p += length
    if not (seen_compare and seen_success):
        return None
    # the compare is parsed (it names the key); now the ops on that key
    if _single_op(success_p, success_n, 2, &inner, &inner_n):  # request_put
        if not _put_request(inner, inner_n, out):
            return None
    elif _single_op(success_p, success_n, 3, &inner, &inner_n):  # request_delete_range
        if not _key_request(inner, inner_n, out.key):
            return None
        out.delete = True
    else:
        return None
    out.read_on_failure = seen_failure
    if seen_failure:
        if not _single_op(failure_p, failure_n, 1, &inner, &inner_n):
            return None
        if not _key_request(inner, inner_n, out.key):
            return None
    return out


# -- answers ------------------------------------------------------------------------------

cdef inline void _put_varint(bytearray out, uint64_t v):
    while v >= 0x80:
        out.append(<unsigned char>((v & 0x7F) | 0x80))
        v >>= 7
    out.append(<unsigned char>v)


cdef inline void _put_field_varint(bytearray out, int field, uint64_t v):
    if v:
        _put_varint(out, <uint64_t>field << 3 | WIRE_VARINT)
        _put_varint(out, v)


cdef inline void _put_field_bytes(bytearray out, int field, const unsigned char* p, Py_ssize_t n):
    _put_varint(out, <uint64_t>field << 3 | WIRE_BYTES)
    _put_varint(out, <uint64_t>n)
    out.extend(p[:n])


cdef inline Py_ssize_t _varint_size(uint64_t v) noexcept:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline Py_ssize_t _varint_field_size(int field, uint64_t v) noexcept:
    return 0 if v == 0 else _varint_size(<uint64_t>field << 3) + _varint_size(v)


cdef inline Py_ssize_t _bytes_field_size(int field, Py_ssize_t n) noexcept:
    return _varint_size(<uint64_t>field << 3) + _varint_size(<uint64_t>n) + n


cdef void _put_kv(bytearray into, bytes key, int64_t mod, int64_t create, int64_t version,
                  int64_t lease, bytes value):
    """One of RangeResponse's kvs (field 2): KeyValue{key, create_revision, mod_revision,
    version, value, lease}, written in place (its size computed first)."""
    cdef Py_ssize_t size = (
        _bytes_field_size(1, len(key))
        + _varint_field_size(2, <uint64_t>create)
        + _varint_field_size(3, <uint64_t>mod)
        + _varint_field_size(4, <uint64_t>version)
        + (_bytes_field_size(5, len(value)) if value else 0)
        + _varint_field_size(6, <uint64_t>lease)
    )
    _put_varint(into, 2 << 3 | WIRE_BYTES)
    _put_varint(into, <uint64_t>size)
    _put_varint(into, 1 << 3 | WIRE_BYTES)
    _put_varint(into, <uint64_t>len(key))
    into += key
    _put_field_varint(into, 2, <uint64_t>create)
    _put_field_varint(into, 3, <uint64_t>mod)
    _put_field_varint(into, 4, <uint64_t>version)
    if value:
        _put_varint(into, 5 << 3 | WIRE_BYTES)
        _put_varint(into, <uint64_t>len(value))
        into += value
    _put_field_varint(into, 6, <uint64_t>lease)


cdef void _put_found(bytearray into, bytes key, int64_t mod, int64_t create, int64_t version,
                     int64_t lease, bytes value):
    """RangeResponse's kvs (one KeyValue) and count (1)."""
    _put_kv(into, key, mod, create, version, lease, value)
    _put_field_varint(into, 4, 1)


cdef void _put_header(bytearray out, bytes prefix, int64_t raft_term, int64_t revision):
    """The answer's ResponseHeader (field 1): ``prefix`` holds cluster and member id."""
    cdef bytearray header = bytearray(prefix)
    _put_field_varint(header, 3, <uint64_t>revision)
    _put_field_varint(header, 4, <uint64_t>raft_term)
    _put_field_bytes(out, 1, header, len(header))


cdef bytes _revision_header(int64_t revision):
    cdef bytearray out = bytearray()
    _put_field_varint(out, 3, <uint64_t>revision)
    return bytes(out)


def encode_txn_answer(
    bytes header_prefix,
    int64_t raft_term,
    GuardedPut request,
    bint succeeded,
    int64_t revision,
    tuple found,
    bytes value,
):
    """The TxnResponse for ``request``. ``header_prefix``: the ResponseHeader's cluster
    and member id fields, already encoded. ``found``: on failure, the key's (mod, create,
    version, lease), or None when it does not exist; ``value`` its value. After a
    delete, ``found`` is the deleted key's state, None when nothing was deleted."""
    cdef bytes key = request.key
    cdef bint read_on_failure = request.read_on_failure
    cdef bytes nested_header = _revision_header(revision)
    cdef bytearray out = bytearray()
    cdef bytearray inner = bytearray()
    cdef bytearray op = bytearray()
    _put_header(out, header_prefix, raft_term, revision)
    if succeeded:
        _put_field_varint(out, 2, 1)
        # PutResponse.header or DeleteRangeResponse.header
        _put_field_bytes(inner, 1, nested_header, len(nested_header))
        if request.delete:
            _put_field_varint(inner, 2, found is not None)  # DeleteRangeResponse.deleted
            _put_field_bytes(op, 3, inner, len(inner))  # ResponseOp.response_delete_range
        else:
            _put_field_bytes(op, 2, inner, len(inner))  # ResponseOp.response_put
        _put_field_bytes(out, 3, op, len(op))
    elif read_on_failure:
        _put_field_bytes(inner, 1, nested_header, len(nested_header))  # RangeResponse.header
        if found is not None:
            _put_found(inner, key, found[0], found[1], found[2], found[3], value)
        _put_field_bytes(op, 1, inner, len(inner))  # ResponseOp.response_range
        _put_field_bytes(out, 3, op, len(op))
    return bytes(out)


def encode_header_prefix(uint64_t cluster_id, uint64_t member_id):
    """ResponseHeader's cluster_id and member_id fields, encoded once per process."""
    cdef bytearray out = bytearray()
    _put_field_varint(out, 1, cluster_id)
    _put_field_varint(out, 2, member_id)
    return bytes(out)


# -- single-key gets ------------------------------------------------------------------------

cdef class KeyGet:
    """A get of one key at the current revision: ``Range{key}``, maybe serializable."""

    cdef readonly bytes key
    cdef readonly bint serializable

    def __repr__(self):
        return f"KeyGet(key={self.key!r}, serializable={self.serializable})"


def parse_key_get(bytes data):
    """The request as a KeyGet, or None for any other (a range, a limit, a revision,
    any option but serializable)."""
    cdef const unsigned char* start = <const unsigned char*>(<char*>data)
    cdef Reader r = Reader(start, start + len(data), False)
    cdef uint64_t tag, v
    cdef bytes key = None
    cdef bint serializable = False, seen_serializable = False
    while r.p < r.end:
        tag = _varint(&r)
        if r.bad:
            return None
        if tag == (1 << 3 | WIRE_BYTES) and key is None:
            key = _bytes_field(&r)
            if not key:
                return None
        elif tag == (7 << 3 | WIRE_VARINT) and not seen_serializable:
            v = _varint(&r)
            if r.bad:
                return None
            serializable = v != 0
            seen_serializable = True
        else:
            return None
    if key is None:
        return None
    cdef KeyGet out = KeyGet.__new__(KeyGet)
    out.key = key
    out.serializable = serializable
    return out


def encode_range_answer(bytes header_prefix, int64_t raft_term, int64_t revision,
                        list entries, dict values, int64_t count, bint more,
                        object revision_of=None):
    """Any RangeResponse: a KeyValue per entry ``(key, mod, create, version, lease)``
    with its value from ``values`` (by the entry's row id; None: keys only), then ``more``
    and ``count``, as protobuf writes them. ``revision_of`` turns the entries' row ids into
    mod revisions (None: they are; docs/architecture.md#revisions)."""
    cdef bytearray out = bytearray()
    cdef bytes key
    cdef int64_t mod, create, version, lease
    _put_header(out, header_prefix, raft_term, revision)
    for key, mod, create, version, lease in entries:
        _put_kv(out, key, mod if revision_of is None else revision_of(mod), create, version,
                lease, b"" if values is None else values[mod])
    _put_field_varint(out, 3, more)
    _put_field_varint(out, 4, <uint64_t>count)
    return bytes(out)


def encode_get_answer(bytes header_prefix, int64_t raft_term, bytes key, int64_t revision,
                      tuple found, bytes value):
    """The RangeResponse of a single-key get: ``found`` is the key's (mod, create,
    version, lease) or None when it does not exist."""
    cdef bytearray out = bytearray()
    _put_header(out, header_prefix, raft_term, revision)
    if found is not None:
        _put_found(out, key, found[0], found[1], found[2], found[3], value)
    return bytes(out)
