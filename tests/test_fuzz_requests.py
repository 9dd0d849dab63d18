"""Hostile requests side by side with etcd: random sequences of KV, lease, maintenance and
cluster requests with extreme, odd and invalid field values (the property and the known
differences: tests/fuzzing.py)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.fuzzing import I64_MAX, I64_MIN, TOP, Draw, Example, Requests
from tests.servers import Etcd, GeminiServer

pytestmark = pytest.mark.etcd


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
        length = data.draw(st.integers(1, 12), label="length")
        before = ex.checked
        for _ in range(length):
            _step(data.draw, ex, make)
        assert ex.checked - before >= length  # every step checked at least one answer
    finally:
        ex.close()
