"""Two data nodes and pg_auto_failover's monitor as the witness (issue 18, item 5): the
manager's failover after a kill -9 of the primary's node or a cut link, a planned
switchover, the old primary rejoining as a standby; and geminikv across a failover: its
writes and watches, and (items 3 and 4) the leader's duties moving to the survivor.
Each test gets a fresh formation (network namespaces, see tests/ha/)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.ha.autofailover import Formation
from tests.ha.cluster import endpoint, formation, missing
from tests.ha.gemini import Gemini, Watcher, Writer, check_nothing_lost
from tests.ha.keepalive import KeepAlive
from tests.ha.node import Node
from tests.ha.reliability import BackgroundTraffic
from tests.waiting import eventually

reason = missing() or (
    None if shutil.which("pg_autoctl") else "needs pg_autoctl (Debian pg-auto-failover-cli)"
)
pytestmark = pytest.mark.skipif(reason is not None, reason=str(reason))

LEADER = "geminikv_leader"
TTL = 3  # shorter than the outage (the monitor alone needs ~6 s to promote)


@pytest.fixture
def pgaf() -> Iterator[Formation]:
    with formation() as f:
        yield f


def _count(node: Node) -> object:
    return node.sql("SELECT count(*) FROM t")


def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_failover_after_kill_and_the_old_primary_rejoins(pgaf: Formation) -> None:
    old, new = pgaf.wait_settled()
    # the monitor made replication synchronous: a commit waits for the secondary
    assert str(old.sql("SHOW synchronous_standby_names")).startswith("ANY 1 (")
    assert old.sql("SHOW synchronous_commit") == "on"
    old.sql("CREATE TABLE t (x int)")
    for i in range(20):
        old.sql("INSERT INTO t VALUES ($1)", i)
    killed = old.kill()
    pgaf.wait_primary(new, timeout=30)
    promoted = time.monotonic()
    assert new.in_recovery() is False
    assert _count(new) == 20
    new.sql("INSERT INTO t VALUES (20)")  # alone: the monitor turned synchronous commit off
    pgaf.run_keeper(old)  # the old primary's node comes back
    primary, secondary = pgaf.wait_settled()
    rejoined = time.monotonic()
    assert (primary, secondary) == (new, old)
    assert old.in_recovery() is True
    _until(lambda: _count(old) == 21)
    print(
        f"\npg_auto_failover: kill -> new primary {promoted - killed:.2f} s; "
        f"old primary back as secondary {rejoined - promoted:.2f} s later"
    )


def test_switchover(pgaf: Formation) -> None:
    old, new = pgaf.wait_settled()
    old.sql("CREATE TABLE t (x int)")
    old.sql("INSERT INTO t VALUES (1)")
    pgaf.switchover()
    primary, secondary = pgaf.wait_settled()
    assert (primary, secondary) == (new, old)
    assert new.in_recovery() is False and old.in_recovery() is True
    new.sql("INSERT INTO t VALUES (2)")
    _until(lambda: _count(old) == 2)


def test_failover_when_the_primary_link_is_cut(pgaf: Formation) -> None:
    """No FIN, no RST: the monitor stops hearing from the primary and promotes the
    secondary; the cut primary demotes itself; mended, it rejoins as a secondary."""
    old, new = pgaf.wait_settled()
    old.sql("CREATE TABLE t (x int)")
    old.sql("INSERT INTO t VALUES (1)")
    cut = time.monotonic()
    old.cut()
    pgaf.wait_primary(new, timeout=30)
    promoted = time.monotonic()
    new.sql("INSERT INTO t VALUES (2)")
    old.mend()
    primary, secondary = pgaf.wait_settled()
    assert (primary, secondary) == (new, old)
    assert old.in_recovery() is True
    _until(lambda: _count(old) == 2)
    print(f"\npg_auto_failover: link cut -> new primary {promoted - cut:.2f} s")


def test_geminikv_keeps_acknowledged_writes_across_a_failover(pgaf: Formation) -> None:
    """geminikv on the secondary's node with both hosts; the primary's node is killed and
    the monitor promotes; every acknowledged key survives, writes resume."""
    old, new = pgaf.wait_settled()
    gemini = Gemini(new, endpoint(pgaf.nodes)).wait_listening()
    watcher = Watcher(gemini)
    writer = Writer(gemini).start()
    try:
        writer.wait_acks_after(0, 100, timeout=30)
        killed = old.kill()
        pgaf.wait_primary(new, timeout=30)
        promoted = time.monotonic()
        writer.wait_acks_after(promoted, 50, timeout=30)
        pgaf.run_keeper(old)
        pgaf.wait_settled()
        rejoined = time.monotonic()
        writer.wait_acks_after(rejoined, 50, timeout=30)  # synchronous again, still writing
    finally:
        writer.stop()
    check_nothing_lost(writer, watcher, "pg_auto_failover, kill", killed, promoted, pgaf.nodes)


def test_failover_when_the_primary_node_freezes(pgaf: Formation) -> None:
    """Every process of the primary's node stopped (SIGSTOP), its connections left open:
    the monitor promotes the secondary; thawed, the old primary finds itself demoted and
    rejoins as a secondary."""
    old, new = pgaf.wait_settled()
    old.sql("CREATE TABLE t (x int)")
    old.sql("INSERT INTO t VALUES (1)")
    frozen = time.monotonic()
    old.freeze()
    try:
        pgaf.wait_primary(new, timeout=30)
        promoted = time.monotonic()
        new.sql("INSERT INTO t VALUES (2)")
    finally:
        old.thaw()
    primary, secondary = pgaf.wait_settled()
    assert (primary, secondary) == (new, old)
    assert old.in_recovery() is True
    _until(lambda: _count(old) == 2)
    print(f"\npg_auto_failover: primary frozen -> new primary {promoted - frozen:.2f} s")


def test_geminikv_keeps_acknowledged_writes_across_a_switchover(pgaf: Formation) -> None:
    """A planned switchover under writes: the old primary shuts down cleanly (its
    connections closed) and comes back as a standby; nothing acknowledged is lost."""
    old, new = pgaf.wait_settled()
    gemini = Gemini(new, endpoint(pgaf.nodes)).wait_listening()
    writer = Writer(gemini).start()
    try:
        writer.wait_acks_after(0, 100, timeout=30)
        # a planned switchover starts from a standby in sync (pg_auto_failover turns
        # synchronous replication off while it finds the standby unhealthy)
        before = pgaf.wait_synchronous(old)
        started = time.monotonic()
        pgaf.switchover()
        assert pgaf.wait_settled() == (new, old)
        writer.wait_acks_after(time.monotonic(), 50, timeout=30)
    finally:
        writer.stop()
    first = writer.first_ack_after(started)
    assert first is not None
    gaps = [b - a for (*_, a), (*_, b) in zip(writer.acked, writer.acked[1:], strict=False)]
    print(
        f"\npg_auto_failover switchover: longest gap between acknowledged writes "
        f"{max(gaps):.2f} s; {len(writer.acked)} writes acknowledged, "
        f"{writer.failures} failed attempts; before it: {before}"
    )
    missing = writer.missing()
    assert not missing, (
        f"before the switchover: {before}\n"
        + writer.explain(missing, pgaf.nodes)
        + _keeper_logs(pgaf)
    )


def _keeper_logs(pgaf: Formation) -> str:
    """The monitor's events and each keeper's log (end), for a failure message."""
    logs = [f"\nmonitor events:\n{pgaf.events()}"]
    for node in pgaf.nodes:
        log = node.home / "pg_autoctl.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        logs.append(f"\n{node.name} keeper log (end):\n{text[-8000:]}")
    return "".join(logs)


def _geminikv_across(
    pgaf: Formation,
    what: str,
    fault: Callable[[Node], float],
    heal: Callable[[Node], None],
    seed: int,
) -> None:
    """geminikv on the secondary's node with both hosts in its endpoint, a watch from
    revision 1 and a writer; ``fault`` strikes the primary's node (returning when), the
    monitor promotes the secondary, ``heal`` brings the old node back and its keeper makes
    it a secondary again. Every acknowledged write survives and the watch goes on.
    Meanwhile the reliability traffic (issue 18 item 5) runs through the same geminikv:
    its history is linearizable and its watches keep etcd's guarantees; and through a
    geminikv on the struck node too, which never sees the new primary's timeline: once the
    node is back, its old primary answers as a primary until its keeper stops it, and no
    linearizable read may be served from it then (tests/ha/README.md)."""
    old, new = pgaf.wait_settled()
    gemini = Gemini(new, endpoint(pgaf.nodes)).wait_listening()
    struck_side = Gemini(old, endpoint(pgaf.nodes)).wait_listening()
    traffic = BackgroundTraffic([gemini.address, struck_side.address], seed, 20.0).start()
    watcher = Watcher(gemini)
    writer = Writer(gemini).start()
    healed: list[float] = []

    def heal_and_note(node: Node) -> None:
        heal(node)
        healed.append(time.monotonic())

    try:
        writer.wait_acks_after(0, 100, timeout=30)
        struck, promoted = _strike_and_rejoin(pgaf, old, new, writer, fault, heal_and_note)
    finally:
        writer.stop()
    check_nothing_lost(writer, watcher, f"pg_auto_failover, {what}", struck, promoted, pgaf.nodes)
    violations, summary = traffic.finish()
    # the clients with odd numbers use the struck node's geminikv (Traffic: by number)
    reads_after = [
        op
        for op in traffic.traffic.history.operations
        if op.client % 2 == 1 and op.kind == "range" and op.call >= healed[0] * 1e9
    ]
    answered = sum(1 for op in reads_after if op.response is not None)
    print(
        f"{summary} ({what} {struck - traffic.started:.1f} s in); through the struck node "
        f"after it came back: {answered} of {len(reads_after)} reads answered"
    )
    assert not violations, "\n".join(violations[:30])
    assert answered > 0, "no read through the struck node's geminikv after it came back"


def _strike_and_rejoin(
    pgaf: Formation,
    old: Node,
    new: Node,
    writer: Writer,
    fault: Callable[[Node], float],
    heal: Callable[[Node], None],
) -> tuple[float, float]:
    """``fault`` strikes the primary's node ``old``; once the monitor has promoted ``new``
    and writes go on, ``heal`` (whatever happened) brings the node back, it rejoins as the
    secondary and writes go on, synchronous again. When it was struck and ``new``
    promoted (time.monotonic())."""
    try:
        struck = fault(old)
        pgaf.wait_primary(new, timeout=30)
        promoted = time.monotonic()
        writer.wait_acks_after(promoted, 50, timeout=30)
    finally:
        heal(old)
    assert pgaf.wait_settled() == (new, old)
    writer.wait_acks_after(time.monotonic(), 50, timeout=30)
    return struck, promoted


def _freeze(node: Node) -> float:
    node.freeze()
    return time.monotonic()


def _cut(node: Node) -> float:
    node.cut()
    return time.monotonic()


def test_geminikv_keeps_writes_leases_and_duties_when_the_leading_node_freezes(
    pgaf: Formation,
) -> None:
    """Every process of the primary's node stopped (SIGSTOP: PostgreSQL, keeper and the
    leading geminikv), its connections open and its kernel still acknowledging: the
    surviving geminikv's heartbeat gives the old primary up, the parallel connect finds the
    promoted secondary, and it takes over the leader's duties (issue 18, items 3 and 4).
    Thawed, the old primary's keeper makes it a secondary."""
    _duties_across(pgaf, "leading node frozen", _freeze, Node.thaw)


def test_geminikv_keeps_acknowledged_writes_when_the_primary_link_is_cut(
    pgaf: Formation, request: pytest.FixtureRequest
) -> None:
    """The primary's link down (no FIN, no RST, nothing answers): as frozen, plus TCP's
    user timeout on the connections that have data in flight. Mended, it rejoins."""
    seed = int(request.config.getoption("--reliability-seed"))
    _geminikv_across(pgaf, "link cut", _cut, Node.mend, seed)


class TakeOver:
    """When ``gemini`` first reported leading, watched from a thread from ``start()`` on
    (independent of how soon the test learns of the promotion)."""

    def __init__(self, gemini: Gemini) -> None:
        self.gemini = gemini
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TakeOver:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.at is None:
            # when the asking began: the answer can take long on a busy machine, and the
            # leases were renewed before the flag went up, not when its answer came back
            asked = time.monotonic()
            if self.gemini.metric(LEADER, timeout=0.5) == 1:
                self.at = asked
            self._stop.wait(0.05)

    def wait(self, timeout: float = 30) -> float:
        self._thread.join(timeout)
        self._stop.set()
        assert self.at is not None, f"{self.gemini.node.name} never led"
        return self.at


def _leader_flag(gemini: Gemini) -> float:
    """``geminikv_leader`` of a process that serves (a slow answer is asked again, not
    taken for a missing flag)."""
    for _ in range(5):
        value = gemini.metric(LEADER, timeout=5)
        if value is not None:
            return value
    raise AssertionError(f"{gemini.node.name} gave no {LEADER}:\n{gemini.output()[-3000:]}")


def _leading(gemini: Gemini, value: float, timeout: float = 30) -> float:
    """Until ``gemini`` reports ``geminikv_leader`` = ``value``; when it did."""
    eventually(
        lambda: gemini.metric(LEADER) == value,
        lambda: f"{LEADER} {value} on {gemini.node.name}:\n{gemini.output()[-3000:]}",
        timeout,
        0.1,
    )
    return time.monotonic()


def _duties_across(
    pgaf: Formation,
    what: str,
    fault: Callable[[Node], float],
    heal: Callable[[Node], None],
) -> None:
    """geminikv on the primary's node leads (expires leases, compacts); ``fault`` strikes
    that node for longer than a lease's TTL and the monitor promotes the other node. The
    survivor takes the lock on the new primary and renews every lease first: the lease
    nobody kept alive lives its TTL again and is deleted once; the one kept alive through
    the survivor never expires. After ``heal`` the old node's geminikv serves from the new
    primary and does not lead: exactly one process expires leases and compacts."""
    old, new = pgaf.wait_settled()
    # the primary's node first: its geminikv takes the lock
    leading = Gemini(old, endpoint(pgaf.nodes)).wait_listening()
    _leading(leading, 1)
    surviving = Gemini(new, endpoint(pgaf.nodes)).wait_listening()
    _leading(surviving, 0)
    channel, kv, lease = surviving.stubs()
    kept: KeepAlive | None = None
    writer = Writer(surviving)
    try:
        left = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=TTL)).ID
        kept_id = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=TTL)).ID
        kv.Put(pb.PutRequest(key=b"/duty/left", value=b"v", lease=left))
        rev = kv.Put(pb.PutRequest(key=b"/duty/kept", value=b"v", lease=kept_id)).header.revision
        deletes = Watcher(surviving, b"/duty/", start=rev + 1)
        kept = KeepAlive(surviving.address, kept_id, interval=TTL / 3).start()  # as clientv3
        watcher = Watcher(surviving, writer.prefix, start=rev + 1)
        writer.start()
        writer.wait_acks_after(0, 50, timeout=30)
        take_over = TakeOver(surviving).start()
        struck, promoted = _strike_and_rejoin(pgaf, old, new, writer, fault, heal)
        took_over = take_over.wait()
        # the thawed process serves from the new primary and leaves the duties alone
        other = leading
        channel1, kv1, _ = other.stubs()
        eventually(lambda: _answers(kv1), f"geminikv on {old.name} serving", 30, 0.2)
        _leading(other, 0)
        for _ in range(5):  # exactly one leader, and it stays so
            assert (_leader_flag(other), _leader_flag(surviving)) == (0, 1)
            time.sleep(0.2)

        eventually(lambda: deletes.deletes, "the lease left alone expired", 30)
        during_outage = sum(1 for at, _ in kept.answers if struck < at < took_over)
        time.sleep(TTL + 1.5)  # longer than the kept lease's TTL: it would have gone by now
        kept.stop()
        assert kept.gone() == [], kept.gone()  # never reported expired
        assert [key for key, _ in deletes.deletes] == [b"/duty/left"]  # one DELETE, only it
        deleted_after = deletes.deletes[0][1] - took_over
        assert deleted_after >= TTL  # renewed at the take-over, not expired at once
        assert kv.Range(pb.RangeRequest(key=b"/duty/kept")).count == 1
        deletes.close()
        assert "geminikv.lease: expired" not in other.output()
        assert "renewed to their TTL" in surviving.output()

        # a compaction asked of the other process is carried out by the leader alone
        for i in range(20):
            head = kv1.Put(pb.PutRequest(key=b"/duty/c", value=b"%d" % i)).header.revision
        kv1.Compact(pb.CompactionRequest(revision=head, physical=True), timeout=30)
        rows = new.sql("SELECT count(*) FROM kine WHERE name = '/duty/c'", database="kubernetes")
        assert rows == 1
        # logged after the purge's notification, which answers the Compact
        eventually(lambda: f"compacted to revision {head}" in surviving.output(), "purge logged")
        assert "compacted to revision" not in other.output()
        channel1.close()
        print(
            f"\nleases, {what}: promotion {promoted - struck:.2f} s after the fault, the "
            f"survivor led {took_over - struck:.2f} s after the fault; the lease left alone (TTL "
            f"{TTL} s) deleted {deleted_after:.2f} s after the take-over; the kept one: "
            f"{len(kept.answers)} keep-alives answered ({during_outage} during the outage), "
            f"{len(kept.errors)} streams ended and reopened"
        )
    finally:
        writer.stop()
        if kept is not None:
            kept.stop()
        channel.close()
    check_nothing_lost(writer, watcher, f"pg_auto_failover, {what}", struck, promoted, pgaf.nodes)


def _answers(kv: rpc_pb2_grpc.KVStub) -> bool:
    try:
        kv.Range(pb.RangeRequest(key=b"/duty/kept"), timeout=2)
    except grpc.RpcError:
        return False
    return True
