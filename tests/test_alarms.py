"""Alarms and quota as etcd's: Maintenance.Alarm ACTIVATE/GET/DEACTIVATE, one set for the
whole database; while NOSPACE is raised, requests that add data are refused and the rest
works; while CORRUPT is raised, writes are refused; --quota-backend-bytes raises NOSPACE.
Compared with a fresh real etcd (alarms would disturb the session's)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import Etcd, GeminiServer, Postgres, Stubs
from tests.test_etcdctl import ctl
from tests.waiting import eventually

GET, ACTIVATE, DEACTIVATE = (
    pb.AlarmRequest.GET,
    pb.AlarmRequest.ACTIVATE,
    pb.AlarmRequest.DEACTIVATE,
)


class Side:
    def __init__(self, stubs: Stubs) -> None:
        self.stubs = stubs
        self.member = stubs.maintenance.Status(pb.StatusRequest()).header.member_id

    def alarm(self, action: Any, kind: Any) -> list[tuple[str, str]]:
        """The answer's alarms, this member's id written as "me"."""
        resp = self.stubs.maintenance.Alarm(
            pb.AlarmRequest(action=action, memberID=self.member, alarm=kind)
        )
        return [(self._who(a.memberID), pb.AlarmType.Name(a.alarm)) for a in resp.alarms]

    def status_errors(self) -> list[str]:
        errors = self.stubs.maintenance.Status(pb.StatusRequest()).errors
        return [e.replace(str(self.member), "me") for e in errors]

    def _who(self, member: int) -> str:
        return "me" if member == self.member else str(member)

    def outcome(self, call: Callable[[Stubs], Any]) -> str:
        try:
            call(self.stubs)
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
        return "OK"


@pytest.fixture(scope="module")
def sides(postgres: Postgres) -> Iterator[tuple[Side, Side, GeminiServer]]:
    etcd = Etcd().start()
    gemini = GeminiServer(postgres.new_database("alarms")).start()
    e, g = etcd.stubs(), gemini.stubs()
    yield Side(e), Side(g), gemini
    e.close()
    g.close()
    gemini.stop()
    etcd.stop()


def put(key: bytes) -> Callable[[Stubs], Any]:
    return lambda s: s.kv.Put(pb.PutRequest(key=key, value=b"v"))


def txn(*ops: pb.RequestOp) -> Callable[[Stubs], Any]:
    return lambda s: s.kv.Txn(pb.TxnRequest(success=list(ops)))


RANGE_OP = pb.RequestOp(request_range=pb.RangeRequest(key=b"/a"))
PUT_OP = pb.RequestOp(request_put=pb.PutRequest(key=b"/t", value=b"v"))
DELETE_OP = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"/t"))

REQUESTS: dict[str, Callable[[Stubs], Any]] = {
    "put": put(b"/a"),
    "range": lambda s: s.kv.Range(pb.RangeRequest(key=b"/a")),
    "delete": lambda s: s.kv.DeleteRange(pb.DeleteRangeRequest(key=b"/nothing")),
    "txn read-only": txn(RANGE_OP),
    "txn with a put": txn(RANGE_OP, PUT_OP),
    "txn deleting": txn(DELETE_OP),
    "lease grant": lambda s: s.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60)),
    "lease revoke": lambda s: s.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=12345)),
    "compact": lambda s: s.kv.Compact(pb.CompactionRequest(revision=1)),
}


def outcomes(side: Side) -> dict[str, str]:
    return {name: side.outcome(call) for name, call in REQUESTS.items()}


@pytest.mark.parametrize("kind", [pb.NOSPACE, pb.CORRUPT])
def test_alarm_lifecycle_and_what_it_refuses(sides: tuple[Side, Side, Any], kind: int) -> None:
    etcd, gk, _ = sides
    for side in (etcd, gk):
        side.outcome(put(b"/a"))
    seen: list[list[Any]] = []
    for side in (etcd, gk):
        steps: list[Any] = [
            side.alarm(GET, pb.NONE),
            side.alarm(ACTIVATE, kind),
            side.alarm(ACTIVATE, kind),  # raised already: answered again
            side.alarm(GET, pb.NONE),
            side.alarm(GET, kind),
            side.alarm(GET, pb.CORRUPT if kind == pb.NOSPACE else pb.NOSPACE),
            side.status_errors(),
            outcomes(side),
            side.alarm(DEACTIVATE, kind),
            side.alarm(DEACTIVATE, kind),  # cleared already: nothing
            side.alarm(GET, pb.NONE),
            side.status_errors(),
            outcomes(side),
        ]
        seen.append(steps)
    for step, (theirs, ours) in enumerate(zip(*seen, strict=True)):
        assert ours == theirs, (step, ours, theirs)
    # etcd 3.5 ignores ACTIVATE of NONE (3.4 answers it, then panics applying it)
    assert gk.alarm(ACTIVATE, pb.NONE) == []
    raised: dict[str, str] = seen[1][7]
    assert raised["range"] == raised["txn read-only"] == "OK"
    assert raised["put"] != "OK", raised


def test_etcdctl_alarm_list_and_disarm(sides: tuple[Side, Side, GeminiServer]) -> None:
    etcd, gk, gemini = sides
    outputs = []
    for side, endpoint in ((etcd, None), (gk, gemini.endpoint)):
        if endpoint is None:
            endpoint = side.stubs.target
        side.alarm(ACTIVATE, pb.NOSPACE)
        listed = ctl(endpoint, "alarm", "list")
        disarmed = ctl(endpoint, "alarm", "disarm")
        after = ctl(endpoint, "alarm", "list")
        outputs.append(
            [
                (
                    r.returncode,
                    r.stdout.replace(f"{side.member:x}", "me").replace(str(side.member), "me"),
                )
                for r in (listed, disarmed, after)
            ]
        )
    assert outputs[1] == outputs[0]
    assert "NOSPACE" in outputs[1][0][1]


def test_one_alarm_set_for_every_process(postgres: Postgres) -> None:
    dsn = postgres.new_database("alarms_shared")
    one, two = GeminiServer(dsn).start(), GeminiServer(dsn).start()
    a, b = one.stubs(), two.stubs()
    try:
        raising = Side(a)
        raising.alarm(ACTIVATE, pb.NOSPACE)
        refused = "RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded"
        eventually(lambda: Side(b).outcome(put(b"/x")) == refused, "the other process refuses")
        listed = b.maintenance.Alarm(pb.AlarmRequest(action=GET)).alarms
        assert [(m.memberID, m.alarm) for m in listed] == [(raising.member, pb.NOSPACE)]
        raising.alarm(DEACTIVATE, pb.NOSPACE)
        eventually(lambda: Side(b).outcome(put(b"/x")) == "OK", "the other process writes again")
    finally:
        a.close()
        b.close()
        one.stop()
        two.stop()


def test_quota_raises_nospace(postgres: Postgres) -> None:
    dsn = postgres.new_database("alarms_quota")
    probe = GeminiServer(dsn).start()
    stubs = probe.stubs()
    size = stubs.maintenance.Status(pb.StatusRequest()).dbSize
    stubs.close()
    probe.stop()
    quota = size + 256 * 1024
    server = GeminiServer(dsn, quota_backend_bytes=quota).start()
    stubs = server.stubs()
    side = Side(stubs)
    try:
        written = 0
        refused = None
        for i in range(1000):
            try:
                # incompressible: the table's size, which the health loop re-reads each
                # second, grows as the quota counts
                stubs.kv.Put(pb.PutRequest(key=b"/q/%d" % i, value=os.urandom(8192)))
                written += 1
            except grpc.RpcError as err:
                refused = err
                break
        assert refused is not None, "the quota never refused a write"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == "etcdserver: mvcc: database space exceeded"
        assert 0 < written < 40  # about 256 KiB of 8 KiB values, and not far past it
        eventually(lambda: side.alarm(GET, pb.NONE) == [("me", "NOSPACE")], "NOSPACE raised")
        # deletes, reads and compaction still work; small puts are refused too
        assert side.outcome(lambda s: s.kv.DeleteRange(pb.DeleteRangeRequest(key=b"/q/0"))) == "OK"
        assert side.outcome(lambda s: s.kv.Range(pb.RangeRequest(key=b"/q/1"))) == "OK"
        assert side.outcome(put(b"/small")).startswith("RESOURCE_EXHAUSTED")
    finally:
        stubs.close()
        server.stop()
