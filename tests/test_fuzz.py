"""Hostile input: every request message geminikv serves, built by hypothesis with extreme,
odd and invalid field values, and random bytes sent as serialized requests.

The property, side by side with the real etcd: every call is answered within a deadline,
with etcd's gRPC code and (where etcd has one of its own) etcd's message; a request that
fails writes nothing (the revision does not move); the server keeps answering.

Keys that a request could write are under a fresh prefix per example, so tests sharing the
session's servers are not disturbed; Compact with real revisions, and random bytes (which
decode to requests on any key), only go to a dedicated etcd and geminikv (``sandbox``).

Where etcd 3.4 (the oracle here) is not etcd 3.5, or crashes, geminikv follows etcd 3.5/3.6
and the request goes to geminikv alone, with the expected answer spelled out:
- an unknown sort order/target: etcd 3.4/3.5 crash (nil sorter), 3.6 answers
  InvalidArgument "etcdserver: invalid sort option";
- an Alarm with an action other than GET/ACTIVATE/DEACTIVATE crashes etcd 3.4/3.5 (nil
  response); ACTIVATE would arm a real alarm on the shared etcd;
- ignore_value/ignore_lease in a txn that deletes: etcd 3.4 panics (test_kv_errors.py).
Known, documented differences (DESIGN.md) are checked on geminikv alone: keys that are not
UTF-8 or contain NUL cannot be written, and lease IDs must fit 32 bits. A never-compacted
etcd accepts Compact(0) (its first revision is -1) where geminikv, whose compact revision
starts at 0, answers Compacted: Compact(0) is compared once both have compacted.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.conftest import unique_prefix
from tests.differential import Pair
from tests.servers import Etcd, GeminiServer, Postgres, Stubs

pytestmark = pytest.mark.etcd

DEADLINE = 10.0  # every call must be answered within this (a hang fails the test)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_REQUEST = 1536 * 1024  # etcd's --max-request-bytes default
MAX_RECEIVE = 2 * 1024 * 1024  # etcd's gRPC receive limit: max request + 512 KiB
C = pb.Compare
R = pb.RangeRequest
W = pb.WatchRequest
NAMES = [b"a", b"b", b"c"]
# A request that cannot be decoded: INTERNAL "grpc: error unmarshalling request", as etcd.
UNDECODABLE = grpc.StatusCode.INTERNAL

Build = Callable[[Callable[[int], int]], Any]
Draw = Callable[..., Any]  # hypothesis's data.draw
Outcome = tuple[str, Any]

EXAMPLES = settings().max_examples  # the loaded profile's ("ci": 40)


def _fewer(divisor: int) -> settings:
    return settings(max_examples=max(5, EXAMPLES // divisor))


class FuzzPair(Pair):
    """A Pair whose calls all carry a deadline, so a hang shows up as DEADLINE_EXCEEDED."""

    @staticmethod
    def _invoke(stubs: Stubs, service: str, method: str, request: Message) -> tuple[str, Any]:
        try:
            return "ok", getattr(getattr(stubs, service), method)(request, timeout=DEADLINE)
        except grpc.RpcError as err:
            return "error", (err.code(), err.details())


def _revision(stubs: Stubs, key: bytes) -> int:
    return int(stubs.kv.Range(R(key=key), timeout=DEADLINE).header.revision)


def _end(p: bytes) -> bytes:
    return p[:-1] + b"0"


def assert_same_error(e: Outcome, g: Outcome, what: object) -> None:
    """Both failed with etcd's code, and etcd's message where etcd has one of its own
    (gRPC's own texts, such as "grpc: received message larger than max", differ between
    Go and C-core)."""
    assert e[0] == g[0] == "error", f"{what}:\n etcd:     {e}\n geminikv: {g}"
    (e_code, e_msg), (g_code, g_msg) = e[1], g[1]
    assert g_code == e_code, f"{what}: etcd {e}, geminikv {g}"
    if e_msg.startswith("etcdserver:"):
        assert g_msg == e_msg, f"{what}: etcd {e}, geminikv {g}"


# -- strategies: keys, revisions ------------------------------------------------------------


def _suffix(draw: Draw) -> bytes:
    """A key below the prefix: a common name (so requests meet) or random bytes."""
    return draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=6)))


def _storable_suffix(draw: Draw) -> bytes:
    """A key geminikv can write: UTF-8 without NUL (DESIGN.md; etcd takes any bytes)."""
    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4)
    return draw(st.one_of(st.sampled_from(NAMES), text.map(str.encode)))


def _read_key(draw: Draw, p: bytes, huge: bool = True) -> bytes:
    kind = draw(st.sampled_from(["name"] * 8 + ["empty"] + (["huge"] if huge else [])))
    if kind == "empty":
        return b""  # etcd: "key is not provided"
    if kind == "huge":
        # over etcd's max request size: fine for a Range (never proposed through raft)
        return p + b"k" * (MAX_REQUEST + 4096)
    return p + _suffix(draw)


def _range_end(draw: Draw, p: bytes, key: bytes) -> bytes:
    kind = draw(st.sampled_from(["one", "one", "open", "prefix", "below", "inverted", "next"]))
    if kind == "one":
        return b""
    if kind == "open":
        return b"\x00"  # every key >= key: the prefix sorts after all other tests' keys
    if kind == "prefix":
        return _end(p)
    if kind == "inverted":
        return key  # key >= range_end: an empty range
    if kind == "next":
        return key + b"\x00"
    return p + _suffix(draw)


def _revision_value(draw: Draw, top: int) -> Callable[[Callable[[int], int]], int]:
    """A revision field: 0, one of this example's revisions, a future one, or an extreme.

    -1 is left out: a never-compacted etcd (the shared one) reads it as its first
    revision inside a txn, while the shared geminikv may have been compacted by another
    test; -2 and INT64_MIN are compacted on both.
    """
    kind = draw(st.sampled_from(["zero", "zero", "rel", "rel", "future", "extreme"]))
    if kind == "zero":
        return lambda rev: 0
    if kind == "rel":
        rel = draw(st.integers(0, top))
        return lambda rev: rev(rel)
    if kind == "future":
        rel = draw(st.integers(top + 1, top + 100))
        return lambda rev: rev(rel)
    value = draw(st.sampled_from([-2, I64_MIN, I64_MAX, 2**62]))
    return lambda rev: value


def _filter_value(draw: Draw) -> Callable[[Callable[[int], int]], int]:
    """min/max revision filters and compare revisions: extremes, or the example's base.

    Never a revision inside the example: a multi-key write gets one revision per key in
    geminikv (the documented difference), so "mod >= its revision" is not comparable.
    """
    value = draw(st.sampled_from([0, 0, 1, -1, I64_MIN, I64_MAX, None]))
    if value is None:
        return lambda rev: rev(0)
    return lambda rev: value


# -- strategies: requests ------------------------------------------------------------------


class Requests:
    """Draws requests for one example: its prefix, leases and revision horizon."""

    def __init__(self, draw: Draw, p: bytes, leases: list[int], top: int) -> None:
        self.draw = draw
        self.p = p
        self.leases = leases  # explicit IDs, granted on both servers
        self.top = top

    def range(self, sort_values: st.SearchStrategy[int] | None = None, huge: bool = True) -> Build:
        draw, p = self.draw, self.p
        key = _read_key(draw, p, huge)
        end = _range_end(draw, p, key)
        revision = _revision_value(draw, self.top)
        filters = {
            name: _filter_value(draw)
            for name in draw(
                st.lists(
                    st.sampled_from(
                        [
                            "min_mod_revision",
                            "max_mod_revision",
                            "min_create_revision",
                            "max_create_revision",
                        ]
                    ),
                    max_size=2,
                    unique=True,
                )
            )
        }
        orders = (
            sort_values
            if sort_values is not None
            else st.sampled_from([R.NONE, R.NONE, R.ASCEND, R.DESCEND])
        )
        targets = (
            sort_values
            if sort_values is not None
            else st.sampled_from([R.KEY, R.KEY, R.VERSION, R.CREATE, R.MOD, R.VALUE])
        )
        fields: dict[str, Any] = dict(
            key=key,
            range_end=end,
            limit=draw(st.sampled_from([0, 1, 2, -1, I64_MIN, I64_MAX])),
            count_only=draw(st.booleans()) and draw(st.booleans()),
            keys_only=draw(st.booleans()),
            serializable=draw(st.booleans()),
            sort_order=draw(orders),
            sort_target=draw(targets),
        )

        def build(rev: Callable[[int], int]) -> R:
            req = R(**fields, revision=revision(rev))
            for name, value in filters.items():
                setattr(req, name, value(rev))
            return req

        return build

    def put(self, top_level: bool = True) -> Build:
        draw, p = self.draw, self.p
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + _storable_suffix(draw)
        sizes = [b"", b"x", b"y", None, None]
        if top_level:  # rare, and expensive: oversize requests
            sizes += [b"v" * (MAX_REQUEST + 1024), b"v" * (MAX_RECEIVE + 1024)]
        value = draw(st.sampled_from(sizes))
        if value is None:
            value = draw(st.binary(max_size=16))
        unknown = self.leases[0] + 1000
        lease = draw(st.sampled_from([0, 0, 0, *self.leases, unknown, -1, I64_MAX]))
        flags = dict(
            prev_kv=draw(st.booleans()),
            ignore_value=draw(st.integers(0, 4)) == 0,
            ignore_lease=draw(st.integers(0, 4)) == 0,
        )
        return lambda rev: pb.PutRequest(key=key, value=value, lease=lease, **flags)

    def delete(self) -> Build:
        draw, p = self.draw, self.p
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + _suffix(draw)
        end = _range_end(draw, p, key)
        prev_kv = draw(st.booleans())
        return lambda rev: pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=prev_kv)

    def compare(self) -> Callable[[Callable[[int], int]], C]:
        draw, p = self.draw, self.p
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + _suffix(draw)
        end = draw(st.sampled_from([b"", b"", b"\x00", _end(p), p + _suffix(draw)]))
        # unknown targets compare as equal, unknown results as true (etcd's compareKV)
        target = draw(st.sampled_from([C.VERSION, C.CREATE, C.MOD, C.VALUE, C.LEASE, 5, -1]))
        result = draw(st.sampled_from([C.EQUAL, C.GREATER, C.LESS, C.NOT_EQUAL, 7]))
        # the value set may not be the one the target reads (it then compares with 0/"")
        union = draw(
            st.sampled_from(["version", "create_revision", "mod_revision", "value", "lease", ""])
        )
        number = _filter_value(draw)
        version = draw(st.sampled_from([0, 1, 2, 3, -1, I64_MAX]))
        value = draw(st.sampled_from([b"", b"x", b"y", b"\xff"]))
        lease = draw(st.sampled_from([0, *self.leases, I64_MIN]))

        def build(rev: Callable[[int], int]) -> C:
            cmp = C(key=key, range_end=end, target=target, result=result)  # type: ignore[arg-type]
            if union == "version":
                cmp.version = version
            elif union in ("create_revision", "mod_revision"):
                setattr(cmp, union, number(rev))
            elif union == "value":
                cmp.value = value
            elif union == "lease":
                cmp.lease = lease
            return cmp

        return build

    def op(self, depth: int) -> Callable[[Callable[[int], int]], pb.RequestOp]:
        kinds = ["range", "put", "put", "delete", "empty"] + (["txn"] if depth < 2 else [])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "range":
            b = self.range()
            return lambda rev: pb.RequestOp(request_range=b(rev))
        if kind == "put":
            b = self.put(top_level=False)
            return lambda rev: pb.RequestOp(request_put=b(rev))
        if kind == "delete":
            b = self.delete()
            return lambda rev: pb.RequestOp(request_delete_range=b(rev))
        if kind == "txn":
            b = self.txn(depth + 1)
            return lambda rev: pb.RequestOp(request_txn=b(rev))
        return lambda rev: pb.RequestOp()  # etcd: "key not found"

    def txn(self, depth: int = 0) -> Build:
        draw = self.draw
        compares = [self.compare() for _ in range(draw(st.integers(0, 3)))]
        success = [self.op(depth) for _ in range(draw(st.integers(0, 3)))]
        failure = [self.op(depth) for _ in range(draw(st.integers(0, 2)))]
        too_many = depth == 0 and draw(st.integers(0, 15)) == 0
        branch = draw(st.sampled_from(["compare", "success", "failure"]))

        def build(rev: Callable[[int], int]) -> pb.TxnRequest:
            req = pb.TxnRequest(
                compare=[c(rev) for c in compares],
                success=[o(rev) for o in success],
                failure=[o(rev) for o in failure],
            )
            if too_many:  # 129 > etcd's --max-txn-ops
                extra = 129 - len(getattr(req, branch))
                if branch == "compare":
                    req.compare.extend(C(key=self.p + b"a") for _ in range(extra))
                else:
                    getattr(req, branch).extend(
                        pb.RequestOp(request_range=R(key=self.p + b"a")) for _ in range(extra)
                    )
            if depth == 0 and _deletes(req):
                _clear_ignores(req)  # etcd 3.4 panics on these (see the module docstring)
            return req

        return build


def _ops(req: pb.TxnRequest) -> Iterator[pb.RequestOp]:
    for op in (*req.success, *req.failure):
        yield op
        if op.WhichOneof("request") == "request_txn":
            yield from _ops(op.request_txn)


def _deletes(req: pb.TxnRequest) -> bool:
    return any(op.WhichOneof("request") == "request_delete_range" for op in _ops(req))


def _clear_ignores(req: pb.TxnRequest) -> None:
    for op in _ops(req):
        if op.WhichOneof("request") == "request_put":
            op.request_put.ignore_value = False
            op.request_put.ignore_lease = False


# -- the differential sequence test --------------------------------------------------------


def _agree(method: str, e: Outcome, g: Outcome, ours: set[int], what: object) -> None:
    """geminikv's outcome is etcd's, up to what legitimately differs between servers."""
    if e[0] == "error" or g[0] == "error":
        assert_same_error(e, g, what)
        return
    e_data, g_data = dict(e[1]), dict(g[1])
    if method in ("Status", "MemberList"):
        return  # versions, sizes and URLs are each server's own (checked in _check_own)
    if method == "Alarm":
        assert g_data.get("alarms") == e_data.get("alarms"), what
        return
    if method == "LeaseLeases":
        e_ids = {int(s["ID"]) for s in e_data.get("leases", [])} & ours
        g_ids = {int(s["ID"]) for s in g_data.get("leases", [])} & ours
        assert g_ids == e_ids, what
        return
    if method == "LeaseTimeToLive":
        e_ttl, g_ttl = int(e_data.pop("TTL", 0)), int(g_data.pop("TTL", 0))
        assert abs(e_ttl - g_ttl) <= 1, f"{what}: TTL etcd {e_ttl} geminikv {g_ttl}"
        for data in (e_data, g_data):
            data["keys"] = sorted(data.get("keys", []))
    if method == "LeaseGrant" and not what.ID:  # type: ignore[attr-defined]
        e_data.pop("ID"), g_data.pop("ID")  # each server picks its own
    assert g_data == e_data, f"{what}:\n etcd:     {e_data}\n geminikv: {g_data}"


def _check_own(method: str, g: Outcome, gk: Stubs) -> None:
    """What geminikv answers of its own: one member (itself), a plausible status."""
    if g[0] != "ok":
        return
    data = g[1]
    if method == "MemberList":
        members = data["members"]
        assert len(members) == 1 and members[0]["clientURLs"] == [f"http://{gk.target}"]
    elif method == "Status":
        assert data["version"].startswith("3.5.") and int(data["dbSize"]) > 0
        members = gk.cluster.MemberList(pb.MemberListRequest(), timeout=DEADLINE).members
        assert int(data["leader"]) == members[0].ID


class Example:
    """One example: a prefix, leases granted on both servers, and the calls made."""

    def __init__(self, etcd: Etcd, gemini: GeminiServer, leases: bool = True) -> None:
        self.p = unique_prefix()
        self.e, self.g = etcd.stubs(), gemini.stubs()
        self.pair = FuzzPair(self.e, self.g)
        # explicit lease IDs, above test_lease.py's, so both servers use the same ones
        self.lease_base = 2**30 + (time.time_ns() // 1000) % (2**30 - 100)
        self.leases = [self.lease_base, self.lease_base + 1]
        self.granted: dict[str, set[int]] = {"etcd": set(), "gk": set()}
        for lease in self.leases if leases else ():
            self.call(
                "LeaseGrant", lambda rev, i=lease: pb.LeaseGrantRequest(ID=i, TTL=600), "lease"
            )

    def ours(self) -> set[int]:
        return set(range(self.lease_base, self.lease_base + 8))

    def call(self, method: str, build: Build, service: str = "kv") -> bool:
        """Send to both, check the answers agree; whether geminikv's succeeded."""
        before = _revision(self.g, self.p + b"a")
        e, g = self.pair.call(method, build, service)
        what = build(self.pair.etcd_rev)
        _agree(method, e, g, self.ours(), what)
        _check_own(method, g, self.g)
        if method == "LeaseGrant" and g[0] == "ok":
            self.granted["etcd"].add(int(e[1]["ID"]))
            self.granted["gk"].add(int(g[1]["ID"]))
        if g[0] == "error":
            assert _revision(self.g, self.p + b"a") == before, f"failed {method} wrote: {what}"
        return g[0] == "ok"

    def gk_only(
        self, method: str, req: Message, service: str, code: grpc.StatusCode, message: str
    ) -> None:
        """A request sent to geminikv alone, with the answer it must give."""
        before = _revision(self.g, self.p + b"a")
        with pytest.raises(grpc.RpcError) as err:
            getattr(getattr(self.g, service), method)(req, timeout=DEADLINE)
        assert err.value.code() == code, (req, err.value)
        assert err.value.details().startswith(message), (req, err.value)
        assert _revision(self.g, self.p + b"a") == before

    def close(self) -> None:
        for name, stubs in (("etcd", self.e), ("gk", self.g)):
            for lease in self.granted[name]:
                try:
                    stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease), timeout=DEADLINE)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
        # still serving, and nothing of this example is left behind
        for stubs in (self.e, self.g):
            left = stubs.kv.Range(R(key=self.p, range_end=_end(self.p), count_only=True))
            assert left.header.revision > 0
        self.e.close()
        self.g.close()


TOP = 24  # relative revisions drawn from 0..TOP


def _step(draw: Draw, ex: Example, make: Requests) -> None:
    kind = draw(
        st.sampled_from(
            [
                *("range", "put", "put", "delete", "txn", "txn", "txn", "compact", "lease"),
                *("lease", "maintenance", "cluster"),
            ]
        )
    )
    if kind == "range":
        ex.call("Range", make.range())
    elif kind == "put":
        ex.call("Put", make.put())
    elif kind == "delete":
        ex.call("DeleteRange", make.delete())
    elif kind == "txn":
        ex.call("Txn", make.txn())
    elif kind == "compact":
        # only revisions no server can compact to: <= any compact revision, or future
        value = draw(st.sampled_from([-1, -2, I64_MIN, I64_MAX, 2**62, None]))
        rel = draw(st.integers(TOP + 10, TOP + 1000))
        physical = draw(st.booleans())
        ex.call(
            "Compact",
            lambda rev: pb.CompactionRequest(
                revision=rev(rel) if value is None else value, physical=physical
            ),
        )
    elif kind == "lease":
        _lease_step(draw, ex)
    elif kind == "maintenance":
        action = draw(st.sampled_from([pb.AlarmRequest.GET, pb.AlarmRequest.DEACTIVATE, None]))
        alarm = draw(st.sampled_from([pb.NONE, pb.NOSPACE, pb.CORRUPT, 9]))
        member = draw(st.sampled_from([0, 1, I64_MAX]))
        if action is None:
            ex.call("Status", lambda rev: pb.StatusRequest(), "maintenance")
        else:
            ex.call(
                "Alarm",
                lambda rev: pb.AlarmRequest(action=action, alarm=alarm, memberID=member),
                "maintenance",
            )
    else:
        linearizable = draw(st.booleans())
        ex.call(
            "MemberList", lambda rev: pb.MemberListRequest(linearizable=linearizable), "cluster"
        )


def _lease_step(draw: Draw, ex: Example) -> None:
    base = ex.lease_base
    known = st.sampled_from([base, base + 1, base + 2, base + 3])
    hostile = st.sampled_from([0, -1, I64_MIN, I64_MAX, 2**31])
    lease_id = draw(st.one_of(known, known, hostile))
    kind = draw(st.sampled_from(["grant", "grant", "revoke", "ttl", "ttl", "list"]))
    if kind == "grant":
        # a fresh ID for anything that might expire: an expiring lease with keys would
        # delete them on each server at a different moment
        grant_id = draw(st.sampled_from([base + 2, base + 3, 0, -1, I64_MAX, 2**31]))
        ttl = draw(st.sampled_from([-5, 0, 1, 60, 9_000_000_000, 9_000_000_001, I64_MAX, I64_MIN]))
        if not 0 <= grant_id < 2**31 and ttl <= 9_000_000_000:
            # geminikv's leases fit Kine's 32-bit column (etcd takes any int64)
            ex.gk_only(
                "LeaseGrant",
                pb.LeaseGrantRequest(ID=grant_id, TTL=ttl),
                "lease",
                grpc.StatusCode.INVALID_ARGUMENT,
                "geminikv: lease ID must be",
            )
            return
        granted = ex.call(
            "LeaseGrant", lambda rev: pb.LeaseGrantRequest(ID=grant_id, TTL=ttl), "lease"
        )
        if granted and grant_id and ttl < 60:
            # gone again at once: its expiry would come at a different moment on each server
            ex.call("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=grant_id), "lease")
    elif kind == "revoke":
        ex.call("LeaseRevoke", lambda rev: pb.LeaseRevokeRequest(ID=lease_id), "lease")
    elif kind == "ttl":
        keys = draw(st.booleans())
        ex.call(
            "LeaseTimeToLive",
            lambda rev: pb.LeaseTimeToLiveRequest(ID=lease_id, keys=keys),
            "lease",
        )
    else:
        ex.call("LeaseLeases", lambda rev: pb.LeaseLeasesRequest(), "lease")


@given(data=st.data())
def test_hostile_requests_answered_as_etcd(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    ex = Example(etcd, gemini)
    try:
        make = Requests(data.draw, ex.p, ex.leases, TOP)
        for _ in range(data.draw(st.integers(1, 12), label="length")):
            _step(data.draw, ex, make)
    finally:
        ex.close()


# -- geminikv alone: what etcd 3.4 cannot answer, and documented differences ---------------


SORT_VALUES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, -1, 99, 2**31 - 1, -(2**31)])


@_fewer(3)
@given(data=st.data())
def test_unknown_sort_options_rejected(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    ex = Example(etcd, gemini, leases=False)
    try:
        make = Requests(data.draw, ex.p, ex.leases, TOP)
        ex.call("Put", lambda rev: pb.PutRequest(key=ex.p + b"a", value=b"1"))
        build = make.range(sort_values=SORT_VALUES, huge=False)
        req = build(ex.pair.gk_rev)
        valid = req.sort_order in R.SortOrder.values() and req.sort_target in R.SortTarget.values()
        in_txn = data.draw(st.booleans())
        if valid and req.key:  # etcd 3.4 would crash on the others
            if in_txn:
                ex.call(
                    "Txn",
                    lambda rev: pb.TxnRequest(success=[pb.RequestOp(request_range=build(rev))]),
                )
            else:
                ex.call("Range", build)
            return
        message = (
            "etcdserver: key is not provided" if not req.key else "etcdserver: invalid sort option"
        )
        if in_txn:
            txn = pb.TxnRequest(
                compare=[C(key=ex.p + b"a", target=C.VERSION, result=C.EQUAL, version=1)],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=ex.p + b"b", value=b"2")),
                    pb.RequestOp(request_range=req),
                ],
            )
            ex.gk_only("Txn", txn, "kv", grpc.StatusCode.INVALID_ARGUMENT, message)
        else:
            ex.gk_only("Range", req, "kv", grpc.StatusCode.INVALID_ARGUMENT, message)
    finally:
        ex.close()


UNSTORABLE = st.one_of(
    st.binary(min_size=1, max_size=8).filter(lambda b: not _storable(b)),
    st.binary(max_size=4).map(lambda b: b + b"\x00"),
)


def _storable(key: bytes) -> bool:
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in key


@_fewer(3)
@given(data=st.data())
def test_unstorable_keys_rejected_and_nothing_written(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    """geminikv keeps keys in a text column (Kine's layout): a key that is not UTF-8 or has
    a NUL cannot be written, anywhere in a request (etcd would store it); reading such
    keys, deleting them, comparing and watching them works as in etcd (the other tests)."""
    ex = Example(etcd, gemini, leases=False)
    try:
        key = ex.p + data.draw(UNSTORABLE)
        put = pb.PutRequest(key=key, value=b"v")
        where = data.draw(st.sampled_from(["put", "success", "failure", "nested"]))
        good = pb.RequestOp(request_put=pb.PutRequest(key=ex.p + b"ok", value=b"v"))
        bad = pb.RequestOp(request_put=put)
        if where == "put":
            ex.gk_only("Put", put, "kv", grpc.StatusCode.INVALID_ARGUMENT, "geminikv: key must")
            return
        if where == "nested":
            bad = pb.RequestOp(request_txn=pb.TxnRequest(failure=[bad]))
        txn = pb.TxnRequest(
            success=[good, bad] if where != "failure" else [good],
            failure=[bad] if where == "failure" else [],
        )
        ex.gk_only("Txn", txn, "kv", grpc.StatusCode.INVALID_ARGUMENT, "geminikv: key must")
        # the same key can be read, compared and deleted, as in etcd
        ex.call("Range", lambda rev: R(key=key))
        ex.call("DeleteRange", lambda rev: pb.DeleteRangeRequest(key=key, prev_kv=True))
    finally:
        ex.close()


# -- lease keep-alive stream ---------------------------------------------------------------


def _keepalive(stubs: Stubs, ids: list[int]) -> list[tuple[int, int]]:
    replies = stubs.lease.LeaseKeepAlive(
        iter([pb.LeaseKeepAliveRequest(ID=i) for i in ids]), timeout=DEADLINE
    )
    return [(r.ID, r.TTL) for r in replies]


@_fewer(4)
@given(data=st.data())
def test_keepalive_stream_answered_as_etcd(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    ex = Example(etcd, gemini)
    try:
        base = ex.lease_base
        ids = data.draw(
            st.lists(
                st.sampled_from([base, base + 1, base + 5, 0, -1, I64_MIN, I64_MAX]), max_size=6
            )
        )
        before = _revision(ex.g, ex.p + b"a")
        e, g = _keepalive(ex.e, ids), _keepalive(ex.g, ids)
        assert g == e
        assert [i for i, _ in g] == ids
        assert _revision(ex.g, ex.p + b"a") == before
    finally:
        ex.close()


# -- watch streams -------------------------------------------------------------------------


class Watches:
    """A Watch stream fed from a queue; everything received is kept in order."""

    def __init__(self, stubs: Stubs) -> None:
        self.requests: queue.Queue[W | None] = queue.Queue()
        self.received: queue.Queue[pb.WatchResponse] = queue.Queue()
        self.log: list[pb.WatchResponse] = []
        self.error: grpc.RpcError | None = None
        self.call = stubs.watch.Watch(iter(self.requests.get, None), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.received.put(resp)
        except grpc.RpcError as err:
            self.error = err

    def created(self) -> int:
        return sum(1 for r in self.log if r.created)

    def wait_created(self, count: int) -> None:
        """Until ``count`` creates have been answered (each create gets one answer)."""
        deadline = time.monotonic() + DEADLINE
        while self.created() < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to a watch create within {DEADLINE}s: {self.log}"
            with contextlib.suppress(queue.Empty):
                self.log.append(self.received.get(timeout=left))

    def drain(self, quiet: float) -> list[pb.WatchResponse]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                self.log.append(self.received.get(timeout=quiet))
            except queue.Empty:
                break
        return self.log

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.thread.join(5)


def _is_progress(resp: pb.WatchResponse) -> bool:
    # etcd 3.4 answers every progress request; 3.5 (and geminikv) only when synced
    return not (resp.created or resp.canceled or resp.events or resp.compact_revision)


def _watch_items(
    responses: list[pb.WatchResponse], to_rel: Callable[[int], int], canceled: set[int]
) -> dict[int | str, list[object]]:
    """Per watch ID: control responses and events, events flattened (a catching-up
    watcher may get its revisions in fewer, larger responses).

    For an ID the client canceled, only its creates and whether it ended: how many events
    arrive before the cancel, and whether etcd's (asynchronous) compaction cancel comes
    before it, are races in etcd itself."""
    items: dict[int | str, list[object]] = {}
    for resp in responses:
        if _is_progress(resp):
            continue
        if resp.created and resp.canceled and resp.watch_id == -1:
            # a rejected create (its own bucket: a client may name a watch -1 too)
            items.setdefault("rejected", []).append(resp.cancel_reason)
            continue
        out = items.setdefault(resp.watch_id, [])
        if resp.watch_id in canceled:
            if resp.created:
                out.append((resp.created, resp.canceled, resp.cancel_reason))
            elif resp.canceled and "ended" not in out:
                out.append("ended")
            continue
        if resp.created or resp.canceled or resp.compact_revision:
            compacted = resp.compact_revision != 0
            out.append((resp.created, resp.canceled, resp.cancel_reason, compacted))
        out.extend(Pair._normalise(("ok", event), to_rel)[1] for event in resp.events)
    return items


def _watch_create(draw: Draw, p: bytes, top: int) -> Callable[[Callable[[int], int]], W]:
    key = p + _suffix(draw)
    end = _range_end(draw, p, key)
    start = draw(
        st.sampled_from(["zero", "rel", "rel", "future", "compacted", "compacted", "huge"])
    )
    rel = draw(st.integers(0, top))
    fields: dict[str, Any] = dict(
        key=key,
        range_end=end,
        prev_kv=draw(st.booleans()),
        fragment=draw(st.booleans()),
        progress_notify=draw(st.booleans()),
        filters=draw(st.lists(st.sampled_from([0, 1, 2, 7, -1]), max_size=3)),
        watch_id=draw(st.sampled_from([0, 0, 0, 1, 1, 2, -1, I64_MAX, I64_MIN])),
    )

    def build(rev: Callable[[int], int]) -> W:
        value = {
            "zero": 0,
            "rel": rev(rel),
            "future": rev(top + 1000),
            # below a never-compacted etcd's first revision (-1): compacted on both
            "compacted": -2,
            "huge": I64_MAX,
        }[start]
        create = pb.WatchCreateRequest(**fields, start_revision=value)  # type: ignore[arg-type]
        return W(create_request=create)

    return build


@_fewer(5)
@given(data=st.data())
def test_watch_requests_answered_as_etcd(
    etcd: Etcd, gemini: GeminiServer, data: st.DataObject
) -> None:
    draw = data.draw
    ex = Example(etcd, gemini, leases=False)
    streams = [Watches(ex.e), Watches(ex.g)]
    try:
        p, top, creates = ex.p, 8, 0
        canceled: set[int] = set()
        for i, name in enumerate(NAMES):  # some history to replay
            ex.call("Put", lambda rev, k=p + name, v=b"%d" % i: pb.PutRequest(key=k, value=v))
        for _ in range(draw(st.integers(1, 10), label="length")):
            kinds = ["create", "create", "create", "cancel", "progress", "put", "delete"]
            kind = draw(st.sampled_from(kinds))
            if kind in ("put", "delete"):
                # single-key writes: one revision per write on both servers, so watch
                # start revisions map exactly
                key = p + draw(st.sampled_from(NAMES))
                if kind == "put":
                    value = draw(st.sampled_from([b"", b"x", b"y"]))
                    ex.call("Put", lambda rev, k=key, v=value: pb.PutRequest(key=k, value=v))
                else:
                    ex.call("DeleteRange", lambda rev, k=key: pb.DeleteRangeRequest(key=k))
                continue
            if kind == "create":
                build = _watch_create(draw, p, top)
            elif kind == "cancel":
                watch_id = draw(st.sampled_from([0, 1, 2, 7, 12345, -1, I64_MAX]))
                canceled.add(watch_id)
                cancel = pb.WatchCancelRequest(watch_id=watch_id)
                build = lambda rev, c=cancel: W(cancel_request=c)  # noqa: E731
            else:
                build = lambda rev: W(progress_request=pb.WatchProgressRequest())  # noqa: E731
            streams[0].requests.put(build(ex.pair.etcd_rev))
            streams[1].requests.put(build(ex.pair.gk_rev))
            if kind == "create":  # as a client does: the next request after the answer
                creates += 1
                for s in streams:
                    s.wait_created(creates)
        # etcd catches up unsynced watchers every 100 ms: by the end of geminikv's drain
        g = _watch_items(streams[1].drain(0.4), ex.pair._gk_to_rel, canceled)
        e = _watch_items(streams[0].drain(0.15), ex.pair._etcd_to_rel, canceled)
        assert g == e, f"watch responses differ:\n etcd:     {e}\n geminikv: {g}"
        assert streams[0].error is None and streams[1].error is None
        # the stream still serves: a new watch is created
        streams[1].requests.put(W(create_request=pb.WatchCreateRequest(key=p, watch_id=2**62)))
        streams[1].wait_created(creates + 1)
    finally:
        for s in streams:
            s.close()
        ex.close()


# -- a dedicated etcd and geminikv: compaction, and requests on any key ----------------------


@pytest.fixture(scope="module")
def sandbox(etcd: Etcd, postgres: Postgres) -> Iterator[tuple[Etcd, GeminiServer]]:
    """Servers of this module's own: Compact at real revisions, and random bytes (which
    decode to requests on any key), must not reach the servers other tests share."""
    e = Etcd()
    g = GeminiServer(postgres.new_database("fuzz")).start()
    try:
        for server in (e, g):
            stubs = server.stubs()
            rev = stubs.kv.Put(pb.PutRequest(key=b"/sandbox", value=b"x")).header.revision
            # Compacted once on both: a never-compacted etcd accepts Compact(0) (its first
            # revision is -1), while geminikv's compact revision starts at 0.
            stubs.kv.Compact(pb.CompactionRequest(revision=rev))
            stubs.close()
        yield e, g
    finally:
        g.stop()
        e.stop()


@_fewer(2)
@given(data=st.data())
def test_compaction_answered_as_etcd(
    sandbox: tuple[Etcd, GeminiServer], data: st.DataObject
) -> None:
    draw = data.draw
    ex = Example(*sandbox)
    try:
        make = Requests(draw, ex.p, ex.leases, TOP)
        for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6)):
            ex.call("Put", lambda rev, k=ex.p + name: pb.PutRequest(key=k, value=b"v"))
        for _ in range(draw(st.integers(1, 10), label="length")):
            kind = draw(st.sampled_from(["compact", "compact", "range", "txn", "put", "delete"]))
            if kind == "compact":
                at = draw(st.sampled_from(["rel", "rel", "zero", "negative", "future", "max"]))
                rel = draw(st.integers(0, TOP))
                negative = draw(st.sampled_from([-1, -2, I64_MIN]))
                physical = draw(st.booleans())

                def build(
                    rev: Callable[[int], int],
                    at: str = at,
                    rel: int = rel,
                    neg: int = negative,
                    physical: bool = physical,
                ) -> pb.CompactionRequest:
                    value = {"rel": rev(rel), "zero": 0, "negative": neg, "max": I64_MAX}.get(
                        at, rev(TOP + 100)
                    )
                    return pb.CompactionRequest(revision=value, physical=physical)

                ex.call("Compact", build)
            elif kind == "range":
                ex.call("Range", make.range())
            elif kind == "txn":
                ex.call("Txn", make.txn())
            elif kind == "put":
                ex.call("Put", make.put(top_level=False))
            else:
                ex.call("DeleteRange", make.delete())
    finally:
        ex.close()


SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("KV", "Lease", "Cluster")]
SERVICES += [pb.DESCRIPTOR.services_by_name[name] for name in ("Maintenance", "Auth")]
SERVICES += [health_pb2.DESCRIPTOR.services_by_name["Health"]]
# every method taking one request (Health.Watch, an endless stream, is not etcd's)
UNARY = [
    (f"/{service.full_name}/{method.name}", message_factory.GetMessageClass(method.input_type))
    for service in SERVICES
    for method in service.methods
    if not method.client_streaming and method.full_name != "grpc.health.v1.Health.Watch"
]
STREAMING = {"/etcdserverpb.Maintenance/Snapshot"}  # one request, a stream of responses
SERVED = (
    {  # what geminikv implements; the rest answers UNIMPLEMENTED
        "/etcdserverpb.KV/" + m for m in ("Range", "Put", "DeleteRange", "Txn", "Compact")
    }
    | {"/etcdserverpb.Lease/" + m for m in ("LeaseGrant", "LeaseRevoke", "LeaseTimeToLive")}
    | {
        "/etcdserverpb.Lease/LeaseLeases",
        "/etcdserverpb.Maintenance/Status",
        "/etcdserverpb.Maintenance/Alarm",
        "/etcdserverpb.Cluster/MemberList",
        "/grpc.health.v1.Health/Check",
    }
)
OK = grpc.StatusCode.OK
ANY_TXN_ANSWER = {
    OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
}


def _decode(cls: type[Message], payload: bytes) -> Message | None:
    try:
        return cls.FromString(payload)
    except DecodeError:
        return None


def _sorts_known(req: R) -> bool:
    return req.sort_order in R.SortOrder.values() and req.sort_target in R.SortTarget.values()


def _plan(path: str, msg: Any, horizon: int) -> str | set[grpc.StatusCode]:
    """How to send a decoded random request: "both" (and compare), "neither" (its outcome
    depends on each server's own revision numbers and would change the sandbox
    differently), or the codes geminikv alone may answer (etcd crashes on it, or it is a
    documented difference)."""
    name = path.rsplit("/", 1)[1]
    if name == "Compact":
        return "both" if msg.revision <= 0 or msg.revision > horizon else "neither"
    if name == "Range":
        if not _sorts_known(msg):
            return {grpc.StatusCode.INVALID_ARGUMENT}
        if 0 < msg.revision <= horizon:
            return {OK, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT}
    if name == "Put" and not _storable(msg.key):
        return {grpc.StatusCode.INVALID_ARGUMENT}
    if name == "Txn":
        ops = list(_ops(msg))
        ranges = [op.request_range for op in ops if op.WhichOneof("request") == "request_range"]
        puts = [op.request_put for op in ops if op.WhichOneof("request") == "request_put"]
        if not all(_sorts_known(r) for r in ranges):
            return {grpc.StatusCode.INVALID_ARGUMENT}
        if any(not _storable(put.key) for put in puts):
            return {grpc.StatusCode.INVALID_ARGUMENT}
        if _deletes(msg) and any(put.ignore_value or put.ignore_lease for put in puts):
            return ANY_TXN_ANSWER  # etcd 3.4 may panic
        numbers = [r.revision for r in ranges]
        numbers += [c.create_revision for c in _compares(msg)] + [
            c.mod_revision for c in _compares(msg)
        ]
        if any(0 < n <= horizon for n in numbers):
            return ANY_TXN_ANSWER
    if name == "LeaseGrant" and not 0 <= msg.ID < 2**31 and msg.TTL <= 9_000_000_000:
        return {grpc.StatusCode.INVALID_ARGUMENT}
    if name == "Alarm" and msg.action not in (pb.AlarmRequest.GET, pb.AlarmRequest.DEACTIVATE):
        return {OK}  # etcd crashes on an unknown action; ACTIVATE would arm a real alarm
    return "both"


def _compares(req: pb.TxnRequest) -> Iterator[C]:
    yield from req.compare
    for op in _ops(req):
        if op.WhichOneof("request") == "request_txn":
            yield from op.request_txn.compare


def _raw(stubs: Stubs, path: str, payload: bytes) -> Outcome:
    try:
        if path in STREAMING:
            call = stubs.channel.unary_stream(
                path, request_serializer=None, response_deserializer=None
            )
            return "ok", list(call(payload, timeout=DEADLINE))
        call = stubs.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        return "ok", call(payload, timeout=DEADLINE)
    except grpc.RpcError as err:
        return "error", (err.code(), err.details())


def _code(outcome: Outcome) -> grpc.StatusCode:
    return OK if outcome[0] == "ok" else outcome[1][0]


def _unmarshal_error(outcome: Outcome) -> bool:
    """etcd's (Go's) parser rejected what Python's accepted (e.g. a known field with the
    wrong wire type, which upb keeps as an unknown field)."""
    return (
        outcome[0] == "error"
        and outcome[1][0] == grpc.StatusCode.INTERNAL
        and ("unmarshal" in outcome[1][1])
    )


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s take ten bytes
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


FIELDS = st.lists(  # well-formed fields with random numbers, types and values
    st.one_of(
        st.tuples(st.integers(1, 12), st.sampled_from([0, 1, 2, 7, -1, I64_MIN, I64_MAX])).map(
            lambda f: _varint(f[0] << 3) + _varint(f[1])
        ),
        st.tuples(st.integers(1, 12), st.binary(max_size=12)).map(
            lambda f: _varint(f[0] << 3 | 2) + _varint(len(f[1])) + f[1]
        ),
    ),
    max_size=5,
).map(b"".join)

PAYLOADS = st.one_of(
    st.binary(max_size=48),
    FIELDS,
    # a valid request's encoding, damaged
    st.tuples(
        st.sampled_from(
            [
                R(key=b"/r", range_end=b"\x00", limit=3).SerializeToString(),
                pb.TxnRequest(
                    compare=[C(key=b"/r", target=C.MOD, result=C.LESS, mod_revision=5)],
                    success=[pb.RequestOp(request_range=R(key=b"/r"))],
                ).SerializeToString(),
                pb.PutRequest(key=b"/r", value=b"v", prev_kv=True).SerializeToString(),
            ]
        ),
        st.integers(0, 40),
        st.binary(max_size=4),
    ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]),
)


@_fewer(2)
@given(payload=PAYLOADS)
def test_random_bytes_to_every_method(sandbox: tuple[Etcd, GeminiServer], payload: bytes) -> None:
    e_srv, g_srv = sandbox
    e, g = e_srv.stubs(), g_srv.stubs()
    try:
        horizon = max(_revision(e, b"/sandbox"), _revision(g, b"/sandbox")) + 1000
        for path, cls in UNARY:
            msg = _decode(cls, payload)
            plan = _plan(path, msg, horizon) if msg is not None and path in SERVED else "gk"
            if plan == "neither":
                continue
            before = _revision(g, b"/sandbox")
            got = _raw(g, path, payload)
            what = f"{path} {payload!r} = {msg}"
            if got[0] == "error":
                assert _revision(g, b"/sandbox") == before, f"failed {what} wrote"
            if msg is None:
                assert _code(got) == UNDECODABLE, (what, got)
            elif path not in SERVED:
                assert _code(got) == grpc.StatusCode.UNIMPLEMENTED, (what, got)
            elif plan != "both":
                assert _code(got) in plan, (what, got)
            else:
                want = _raw(e, path, payload)
                if _unmarshal_error(want):
                    continue
                if want[0] == "ok" or got[0] == "ok":
                    assert _code(got) == _code(want), f"{what}:\n etcd {want}\n geminikv {got}"
                else:
                    assert_same_error(want, got, what)
        # still serving
        assert _revision(g, b"/sandbox") > 0
    finally:
        e.close()
        g.close()


SENTINEL = 2**62 + 1


def _raw_stream(stubs: Stubs, path: str, payloads: list[bytes], sentinel: bytes) -> Outcome:
    """Send the payloads then a sentinel request; read until the sentinel's answer or the
    end of the stream. Returns ("ok", responses) or ("error", (code, details, responses))."""
    requests: queue.Queue[bytes | None] = queue.Queue()
    for p in (*payloads, sentinel):
        requests.put(p)
    call = stubs.channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    responses = call(iter(requests.get, None), timeout=DEADLINE)
    got: list[bytes] = []
    try:
        for raw in responses:
            got.append(raw)
            if path.endswith("/Watch"):
                resp = pb.WatchResponse.FromString(raw)
                if resp.watch_id == SENTINEL and resp.created:
                    return "ok", got
            elif pb.LeaseKeepAliveResponse.FromString(raw).ID == SENTINEL:
                return "ok", got
        return "ended", got
    except grpc.RpcError as err:
        return "error", (err.code(), err.details(), got)
    finally:
        requests.put(None)
        responses.cancel()


def _stream_shape(path: str, outcome: Outcome) -> tuple[str, object, list[object]]:
    """What both servers must agree on: watch control answers (not events, whose history
    differs, nor compaction cancels, which etcd sends asynchronously, nor progress), or
    keep-alive answers."""
    kind, value = outcome
    got = value[2] if kind == "error" else value
    if path.endswith("/Watch"):
        shapes: list[object] = []
        for raw in got:
            resp = pb.WatchResponse.FromString(raw)
            if resp.created or (resp.canceled and not resp.compact_revision):
                shapes.append((resp.watch_id, resp.created, resp.canceled, resp.cancel_reason))
    else:
        shapes = [(r.ID, r.TTL) for r in map(pb.LeaseKeepAliveResponse.FromString, got)]
    return (kind, value[0] if kind == "error" else None, shapes)


@_fewer(2)
@given(
    path=st.sampled_from(["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"]),
    payloads=st.lists(PAYLOADS, min_size=1, max_size=3),
)
def test_random_bytes_on_streams(
    sandbox: tuple[Etcd, GeminiServer], path: str, payloads: list[bytes]
) -> None:
    e, g = sandbox[0].stubs(), sandbox[1].stubs()
    try:
        if path.endswith("/Watch"):
            cls: type[Message] = W
            create = pb.WatchCreateRequest(key=b"/sentinel", watch_id=SENTINEL)
            sentinel = W(create_request=create).SerializeToString()
        else:
            cls = pb.LeaseKeepAliveRequest
            sentinel = pb.LeaseKeepAliveRequest(ID=SENTINEL).SerializeToString()
        decoded = [_decode(cls, p) for p in payloads]
        before = _revision(g, b"/sandbox")
        got = _raw_stream(g, path, payloads, sentinel)
        assert _revision(g, b"/sandbox") == before
        if None in decoded:
            # the stream ends at the request it cannot read, as etcd's does
            assert got[0] == "error" and got[1][0] == grpc.StatusCode.INTERNAL, got
        else:
            assert got[0] == "ok", got
        want = _raw_stream(e, path, payloads, sentinel)
        if (None in decoded) != (want[0] == "error"):
            return  # the two parsers disagree on these bytes (see _unmarshal_error)
        g_kind, g_code, g_shapes = _stream_shape(path, got)
        e_kind, e_code, e_shapes = _stream_shape(path, want)
        assert (g_kind, g_code) == (e_kind, e_code)
        if g_kind == "error":
            # etcd stops at the first message Go's parser rejects; an earlier message that
            # only Go rejects (a known field with the wrong wire type) is answered here
            assert g_shapes[: len(e_shapes)] == e_shapes
        else:
            assert g_shapes == e_shapes
        assert _revision(g, b"/sandbox") > 0  # still serving
    finally:
        e.close()
        g.close()


def test_undecodable_and_oversize_messages(pair: Pair) -> None:
    """Fixed cases on the shared servers (nothing here can be a valid write)."""
    corrupt = b"\xff\xff\xff"  # a truncated varint: no parser accepts it
    huge = R(key=b"/" + b"k" * (3 * 1024 * 1024)).SerializeToString()  # over 2 MiB
    before = _revision(pair.gk, b"/fuzz")
    for path in (
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.Lease/LeaseGrant",
    ):
        want, got = _raw(pair.etcd, path, corrupt), _raw(pair.gk, path, corrupt)
        assert _code(want) == _code(got) == UNDECODABLE
        assert want[1][1].startswith("grpc: error unmarshalling request")  # type: ignore[index]
        assert got[1][1].startswith("grpc: error unmarshalling request")  # type: ignore[index]
        want, got = _raw(pair.etcd, path, huge), _raw(pair.gk, path, huge)
        assert _code(want) == _code(got) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for path, sentinel in (
        ("/etcdserverpb.Watch/Watch", W(progress_request=pb.WatchProgressRequest())),
        ("/etcdserverpb.Lease/LeaseKeepAlive", pb.LeaseKeepAliveRequest(ID=SENTINEL)),
    ):
        for payload, code in (
            (corrupt, grpc.StatusCode.INTERNAL),
            (huge, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ):
            want = _raw_stream(pair.etcd, path, [payload], sentinel.SerializeToString())
            got = _raw_stream(pair.gk, path, [payload], sentinel.SerializeToString())
            assert want[0] == got[0] == "error" and want[1][0] == got[1][0] == code, (want, got)
    assert _revision(pair.gk, b"/fuzz") == before
