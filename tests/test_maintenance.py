"""Maintenance and Cluster past Status: Defragment (a plain VACUUM), dbSizeInUse,
MoveLeader, Downgrade and the membership calls answered as a one-member etcd (a fresh real
one) answers them, and MemberList listing every geminikv process on the database."""

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


def outcome(stubs: Stubs, call: Callable[[Stubs], Any]) -> str:
    try:
        call(stubs)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    return "OK"


def own_id(stubs: Stubs) -> int:
    return int(stubs.maintenance.Status(pb.StatusRequest()).header.member_id)


@pytest.fixture(scope="module")
def pair(postgres: Postgres) -> Iterator[tuple[Stubs, Stubs, str, str]]:
    etcd = Etcd().start()
    gemini = GeminiServer(postgres.new_database("maintenance")).start()
    e, g = etcd.stubs(), gemini.stubs()
    yield e, g, etcd.endpoint, gemini.endpoint
    e.close()
    g.close()
    gemini.stop()
    etcd.stop()


def test_leader_and_membership_calls_answer_as_one_member_etcd(
    pair: tuple[Stubs, Stubs, str, str],
) -> None:
    etcd, gk, _, _ = pair
    unknown = 0x1234_5678_9ABC
    for stubs in (etcd, gk):
        own_id(stubs)
    calls: dict[str, Callable[[Stubs], Any]] = {
        "move leader to itself": lambda s: s.maintenance.MoveLeader(
            pb.MoveLeaderRequest(targetID=own_id(s))
        ),
        "move leader elsewhere": lambda s: s.maintenance.MoveLeader(
            pb.MoveLeaderRequest(targetID=unknown)
        ),
        "remove an unknown member": lambda s: s.cluster.MemberRemove(
            pb.MemberRemoveRequest(ID=unknown)
        ),
        "update an unknown member": lambda s: s.cluster.MemberUpdate(
            pb.MemberUpdateRequest(ID=unknown, peerURLs=["http://10.0.0.1:2380"])
        ),
        "promote an unknown member": lambda s: s.cluster.MemberPromote(
            pb.MemberPromoteRequest(ID=unknown)
        ),
        "promote itself": lambda s: s.cluster.MemberPromote(pb.MemberPromoteRequest(ID=own_id(s))),
        "defragment": lambda s: s.maintenance.Defragment(pb.DefragmentRequest()),
    }
    theirs = {name: outcome(etcd, call) for name, call in calls.items()}
    ours = {name: outcome(gk, call) for name, call in calls.items()}
    assert ours == theirs
    assert (
        theirs["move leader elsewhere"] == "FAILED_PRECONDITION: etcdserver: bad leader transferee"
    )
    # what has no meaning here says why (etcd would change its membership)
    for call in (
        lambda s: s.cluster.MemberAdd(pb.MemberAddRequest(peerURLs=["http://10.0.0.1:2380"])),
        lambda s: s.cluster.MemberRemove(pb.MemberRemoveRequest(ID=own_id(s))),
    ):
        assert outcome(gk, call).startswith(
            "FAILED_PRECONDITION: geminikv: every geminikv process serving the database is a member"
        )
    # Downgrade (etcd 3.5's; 3.4 has none): its format check, no job to cancel, and why not
    downgrade = pb.DowngradeRequest
    assert outcome(gk, lambda s: s.maintenance.Downgrade(downgrade(action=downgrade.CANCEL))) == (
        "FAILED_PRECONDITION: etcdserver: no inflight downgrade job"
    )
    assert outcome(
        gk, lambda s: s.maintenance.Downgrade(downgrade(action=downgrade.VALIDATE, version="x"))
    ) == ("INVALID_ARGUMENT: etcdserver: wrong downgrade target version format")
    assert "downgrade does not apply" in outcome(
        gk, lambda s: s.maintenance.Downgrade(downgrade(action=downgrade.ENABLE, version="3.4"))
    )


def test_etcdctl_defrag_and_db_size_in_use(pair: tuple[Stubs, Stubs, str, str]) -> None:
    _etcd, gk, etcd_endpoint, gk_endpoint = pair
    outputs = []
    for endpoint in (etcd_endpoint, gk_endpoint):
        done = ctl(endpoint, "defrag")
        outputs.append((done.returncode, done.stdout.replace(endpoint, "ENDPOINT")))
    assert outputs[1] == outputs[0]
    assert "Finished defragmenting etcd member[ENDPOINT]" in outputs[1][1]
    # history, then a physical compaction: after Defragment the freed space is not in use
    for _round in range(3):
        for i in range(300):  # random: PostgreSQL would compress anything else
            gk.kv.Put(pb.PutRequest(key=b"/defrag/%d" % i, value=os.urandom(4096)))
    top = gk.kv.Range(pb.RangeRequest(key=b"/defrag/0")).header.revision
    gk.maintenance.Defragment(pb.DefragmentRequest())
    before = gk.maintenance.Status(pb.StatusRequest())
    gk.kv.Compact(pb.CompactionRequest(revision=top, physical=True))
    gk.maintenance.Defragment(pb.DefragmentRequest(), timeout=120)
    after = gk.maintenance.Status(pb.StatusRequest())
    assert 0 < after.dbSizeInUse < after.dbSize
    # two thirds of the values were compacted away: at least a third of the space is free
    assert after.dbSizeInUse < before.dbSizeInUse - 300 * 4096
    assert gk.kv.Range(pb.RangeRequest(key=b"/defrag/", range_end=b"/defrag0")).count == 300


def test_member_list_is_every_process_on_the_database(postgres: Postgres) -> None:
    dsn = postgres.new_database("members")
    one = GeminiServer(dsn, name="one").start()
    two = GeminiServer(dsn, name="two").start()
    a = one.stubs()
    try:

        def listed() -> list[tuple[str, list[str]]]:
            members = a.cluster.MemberList(pb.MemberListRequest()).members
            return sorted((m.name, list(m.clientURLs)) for m in members)

        both = [("one", [f"http://{one.endpoint}"]), ("two", [f"http://{two.endpoint}"])]
        eventually(lambda: listed() == both, "both processes listed")
        status = ctl(one.endpoint, "endpoint", "status", "--cluster", "-w", "table")
        assert status.returncode == 0, status.stderr
        assert one.endpoint in status.stdout and two.endpoint in status.stdout
        two.stop()  # a clean stop takes its row away at once
        assert listed() == both[:1]
    finally:
        a.close()
        two.stop()
        one.stop()
