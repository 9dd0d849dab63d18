"""Hostile lease IDs on the LeaseKeepAlive stream, side by side with etcd."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.fuzzing import DEADLINE, I64_MAX, I64_MIN, Example, fewer, revision_of
from tests.servers import Etcd, GeminiServer, Stubs

pytestmark = pytest.mark.etcd


def _keepalive(stubs: Stubs, ids: list[int]) -> list[tuple[int, int]]:
    replies = stubs.lease.LeaseKeepAlive(
        iter([pb.LeaseKeepAliveRequest(ID=i) for i in ids]), timeout=DEADLINE
    )
    return [(r.ID, r.TTL) for r in replies]


@fewer(4)
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
        before = revision_of(ex.g, ex.p + b"a")
        e, g = _keepalive(ex.e, ids), _keepalive(ex.g, ids)
        assert g == e
        assert [i for i, _ in g] == ids
        assert revision_of(ex.g, ex.p + b"a") == before
    finally:
        ex.close()
