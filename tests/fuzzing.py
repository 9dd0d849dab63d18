"""What the hostile-input tests (tests/test_fuzz_*.py) share: hypothesis strategies for keys,
revisions and requests, and ``Example``, which sends a request to etcd and geminikv alike.

Hostile input: every request message geminikv serves, built by hypothesis with extreme,
odd and invalid field values, and random bytes sent as serialized requests.

The property, side by side with the real etcd: every call is answered within a deadline,
with etcd's gRPC code and (where etcd has one of its own) etcd's message; a request that
fails writes nothing (the revision does not move); the server keeps answering.

Keys that a request could write are under a fresh prefix per example, so tests sharing the
session's servers are not disturbed; Compact with real revisions, and random bytes (which
decode to requests on any key), only go to a dedicated etcd and geminikv (``sandbox`` in
test_fuzz_sandbox.py).

Where etcd 3.4 (the oracle here) is not etcd 3.5, or crashes, geminikv follows etcd 3.5/3.6
and the request goes to geminikv alone, with the expected answer spelled out:
- an unknown sort order/target: etcd 3.4/3.5 crash (nil sorter), 3.6 answers
  InvalidArgument "etcdserver: invalid sort option";
- an Alarm with an action other than GET/ACTIVATE/DEACTIVATE crashes etcd 3.4/3.5 (nil
  response); ACTIVATE would arm a real alarm on the shared etcd;
- ignore_value/ignore_lease in a txn that deletes: etcd 3.4 panics (test_kv_errors.py).
A known, documented difference is checked on geminikv alone: lease IDs must fit 32 bits.
A never-compacted etcd accepts Compact(0) (its first revision is -1) where geminikv, whose
compact revision starts at 0, answers Compacted: Compact(0) is compared once both have compacted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message  # type: ignore[import-untyped]
from hypothesis import settings
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.conftest import unique_prefix
from tests.differential import Build, Pair
from tests.servers import Etcd, GeminiServer, Stubs

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


Draw = Callable[..., Any]  # hypothesis's data.draw
Outcome = tuple[str, Any]

EXAMPLES = settings().max_examples  # the loaded profile's ("ci": 40)


def fewer(divisor: int) -> settings:
    return settings(max_examples=max(5, EXAMPLES // divisor))


def revision_of(stubs: Stubs, key: bytes) -> int:
    return int(stubs.kv.Range(R(key=key), timeout=DEADLINE).header.revision)


def prefix_end(p: bytes) -> bytes:
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


def draw_suffix(draw: Draw) -> bytes:
    """A key below the prefix: a common name (so requests meet) or random bytes."""
    return draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=6)))


def draw_read_key(draw: Draw, p: bytes, huge: bool = True) -> bytes:
    kind = draw(st.sampled_from(["name"] * 8 + ["empty"] + (["huge"] if huge else [])))
    if kind == "empty":
        return b""  # etcd: "key is not provided"
    if kind == "huge":
        # over etcd's max request size: fine for a Range (never proposed through raft)
        return p + b"k" * (MAX_REQUEST + 4096)
    return p + draw_suffix(draw)


def draw_range_end(draw: Draw, p: bytes, key: bytes) -> bytes:
    kind = draw(st.sampled_from(["one", "one", "open", "prefix", "below", "inverted", "next"]))
    if kind == "one":
        return b""
    if kind == "open":
        return b"\x00"  # every key >= key: the prefix sorts after all other tests' keys
    if kind == "prefix":
        return prefix_end(p)
    if kind == "inverted":
        return key  # key >= range_end: an empty range
    if kind == "next":
        return key + b"\x00"
    return p + draw_suffix(draw)


def draw_revision(draw: Draw, top: int) -> Callable[[Callable[[int], int]], int]:
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


def draw_filter(draw: Draw, top: int) -> Callable[[Callable[[int], int]], int]:
    """min/max revision filters and compare revisions: extremes, the example's base, or a
    revision inside the example (a multi-key write's too: one revision per request on
    both servers)."""
    value = draw(st.sampled_from([0, 0, 1, -1, I64_MIN, I64_MAX, None, "inside"]))
    if value is None:
        return lambda rev: rev(0)
    if value == "inside":
        rel = draw(st.integers(0, top))
        return lambda rev: rev(rel)
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
        key = draw_read_key(draw, p, huge)
        end = draw_range_end(draw, p, key)
        revision = draw_revision(draw, self.top)
        filters = {
            name: draw_filter(draw, self.top)
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
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + draw_suffix(draw)
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
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + draw_suffix(draw)
        end = draw_range_end(draw, p, key)
        prev_kv = draw(st.booleans())
        return lambda rev: pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=prev_kv)

    def compare(self) -> Callable[[Callable[[int], int]], C]:
        draw, p = self.draw, self.p
        key = draw(st.sampled_from([b""] + [None] * 9)) or p + draw_suffix(draw)
        end = draw(st.sampled_from([b"", b"", b"\x00", prefix_end(p), p + draw_suffix(draw)]))
        # unknown targets compare as equal, unknown results as true (etcd's compareKV)
        target = draw(st.sampled_from([C.VERSION, C.CREATE, C.MOD, C.VALUE, C.LEASE, 5, -1]))
        result = draw(st.sampled_from([C.EQUAL, C.GREATER, C.LESS, C.NOT_EQUAL, 7]))
        # the value set may not be the one the target reads (it then compares with 0/"")
        union = draw(
            st.sampled_from(["version", "create_revision", "mod_revision", "value", "lease", ""])
        )
        number = draw_filter(draw, self.top)
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
            if depth == 0 and txn_deletes(req):
                _clear_ignores(req)  # etcd 3.4 panics on these (see the module docstring)
            return req

        return build


def txn_ops(req: pb.TxnRequest) -> Iterator[pb.RequestOp]:
    for op in (*req.success, *req.failure):
        yield op
        if op.WhichOneof("request") == "request_txn":
            yield from txn_ops(op.request_txn)


def txn_deletes(req: pb.TxnRequest) -> bool:
    return any(op.WhichOneof("request") == "request_delete_range" for op in txn_ops(req))


def _clear_ignores(req: pb.TxnRequest) -> None:
    for op in txn_ops(req):
        if op.WhichOneof("request") == "request_put":
            op.request_put.ignore_value = False
            op.request_put.ignore_lease = False


# -- one example: its calls to both servers, and how their answers must agree ---------------


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
        self.pair = Pair(self.e, self.g, timeout=DEADLINE)
        # explicit lease IDs, above test_lease.py's, so both servers use the same ones
        self.lease_base = 2**30 + (time.time_ns() // 1000) % (2**30 - 100)
        self.leases = [self.lease_base, self.lease_base + 1]
        self.granted: dict[str, set[int]] = {"etcd": set(), "gk": set()}
        self.checked = 0  # requests whose answers were checked (by call or gk_only)
        for lease in self.leases if leases else ():
            self.call(
                "LeaseGrant", lambda rev, i=lease: pb.LeaseGrantRequest(ID=i, TTL=600), "lease"
            )

    def ours(self) -> set[int]:
        return set(range(self.lease_base, self.lease_base + 8))

    def call(self, method: str, build: Build, service: str = "kv") -> bool:
        """Send to both, check the answers agree; whether geminikv's succeeded."""
        before = revision_of(self.g, self.p + b"a")
        e, g = self.pair.call(method, build, service)
        what = build(self.pair.etcd_rev)
        _agree(method, e, g, self.ours(), what)
        _check_own(method, g, self.g)
        if method == "LeaseGrant" and g[0] == "ok":
            self.granted["etcd"].add(int(e[1]["ID"]))
            self.granted["gk"].add(int(g[1]["ID"]))
        if g[0] == "error":
            assert revision_of(self.g, self.p + b"a") == before, f"failed {method} wrote: {what}"
        self.checked += 1
        return g[0] == "ok"

    def gk_only(
        self, method: str, req: Message, service: str, code: grpc.StatusCode, message: str
    ) -> None:
        """A request sent to geminikv alone, with the answer it must give."""
        before = revision_of(self.g, self.p + b"a")
        with pytest.raises(grpc.RpcError) as err:
            getattr(getattr(self.g, service), method)(req, timeout=DEADLINE)
        assert err.value.code() == code, (req, err.value)
        assert err.value.details().startswith(message), (req, err.value)
        assert revision_of(self.g, self.p + b"a") == before
        self.checked += 1

    def close(self) -> None:
        for name, stubs in (("etcd", self.e), ("gk", self.g)):
            for lease in self.granted[name]:
                try:
                    stubs.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease), timeout=DEADLINE)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
        # still serving, and nothing of this example is left behind
        for stubs in (self.e, self.g):
            left = stubs.kv.Range(R(key=self.p, range_end=prefix_end(self.p), count_only=True))
            assert left.header.revision > 0
        self.e.close()
        self.g.close()


TOP = 24  # relative revisions drawn from 0..TOP
