"""Two nodes on synchronous streaming replication without a failover manager: the
harness itself, and geminikv across a kill -9 of the primary's node and ``pg_ctl promote``
(issue 18, item 5). Each test gets fresh nodes (network namespaces, see tests/ha/)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import asyncpg
import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from tests.ha import replication
from tests.ha.cluster import Pair, missing, plain_pair
from tests.ha.gemini import Gemini, Watcher, Writer, check_nothing_lost
from tests.ha.node import Node
from tests.reliability.check import check
from tests.reliability.traffic import Settings, Traffic
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture
def pair() -> Iterator[Pair]:
    with plain_pair() as nodes:
        yield nodes


def test_commit_waits_for_the_standby(pair: Pair) -> None:
    """A commit on the primary returns only once the standby has the row."""
    primary, standby = pair.primary, pair.standby
    primary.sql("CREATE TABLE t (x int)")
    lsn = primary.sql("INSERT INTO t VALUES (1) RETURNING pg_current_wal_insert_lsn()::text")
    received = standby.sql("SELECT (pg_last_wal_receive_lsn() >= $1::text::pg_lsn)", lsn)
    assert received is True

    async def commit_while_standby_frozen() -> tuple[bool, bool]:
        conn = await asyncpg.connect(primary.dsn())
        try:
            insert = asyncio.ensure_future(conn.execute("INSERT INTO t VALUES (2)"))
            await asyncio.sleep(1.0)
            waited = not insert.done()
            standby.thaw()
            await asyncio.wait_for(insert, 10)
            return waited, insert.done()
        finally:
            await conn.close()

    standby.freeze()
    try:
        waited, committed = asyncio.run(commit_while_standby_frozen())
    finally:
        standby.thaw()
    assert waited, "the commit returned while the synchronous standby was frozen"
    assert committed
    assert standby.sql("SELECT count(*) FROM t") == 2


def test_promote_after_kill_keeps_every_commit_and_the_old_primary_rejoins(pair: Pair) -> None:
    old, new = pair.primary, pair.standby
    old.sql("CREATE TABLE t (x int)")
    for i in range(50):
        old.sql("INSERT INTO t VALUES ($1)", i)
    old.kill()
    assert old.pids() == []
    replication.promote(new)
    assert new.in_recovery() is False
    assert new.sql("SELECT count(*) FROM t") == 50
    new.sql("INSERT INTO t VALUES (50)")
    replication.rejoin(old, new)
    assert old.in_recovery() is True
    assert old.sql("SELECT count(*) FROM t") == 51
    new.sql("INSERT INTO t VALUES (51)")  # synchronous again: waits for the rejoined node
    # flushed there before the commit returned; applied (visible) a moment later
    assert _eventually(lambda: old.sql("SELECT count(*) FROM t") == 52)


def _eventually(check, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_geminikv_keeps_acknowledged_writes_across_pg_ctl_promote(pair: Pair) -> None:
    """geminikv on the surviving node, both hosts in its endpoint; the primary's node is
    killed, the standby promoted by hand; every acknowledged key survives, writes resume,
    and go on while the old primary is rewound and rejoins as a synchronous standby."""
    old, new = pair.primary, pair.standby
    gemini = Gemini(new, pair.endpoint()).wait_listening()
    watcher = Watcher(gemini)
    writer = Writer(gemini).start()
    try:
        writer.wait_acks_after(0, 100, timeout=30)
        killed = old.kill()
        replication.promote(new)
        promoted = time.monotonic()
        writer.wait_acks_after(promoted, 50, timeout=30)
        replication.rejoin(old, new)  # the old primary back as a synchronous standby
        writer.wait_acks_after(time.monotonic(), 50, timeout=30)
    finally:
        writer.stop()
    check_nothing_lost(writer, watcher, "pg_ctl promote, kill", killed, promoted)


def test_geminikv_keeps_acknowledged_writes_across_a_frozen_primary_and_pg_ctl_promote(
    pair: Pair,
) -> None:
    """The primary's node frozen (SIGSTOP: its connections open, its kernel acknowledging,
    nothing answering) and the standby promoted by hand: geminikv's statement deadline and
    heartbeat give the frozen primary up and it finds the new one. Thawed, the old primary
    is a primary of its own on the old timeline: geminikv must not go back to it. Then it is
    killed, rewound and rejoins as a synchronous standby, writes going on throughout."""
    old, new = pair.primary, pair.standby
    gemini = Gemini(new, pair.endpoint()).wait_listening()
    watcher = Watcher(gemini)
    writer = Writer(gemini).start()
    thawed = False
    try:
        writer.wait_acks_after(0, 100, timeout=30)
        # steady state first: a connection geminikv opens during the fault (start-up
        # pool growth) tries both hosts and finds the new primary before the heartbeat
        # gives the frozen one up, which would time a luckier case than a running server's
        time.sleep(3)
        old.freeze()
        frozen = time.monotonic()
        try:
            replication.promote(new)
            promoted = time.monotonic()
            writer.wait_acks_after(promoted, 50, timeout=30)
        finally:
            old.thaw()
            thawed = True
        writer.wait_acks_after(time.monotonic(), 50, timeout=30)  # not on the old timeline
        old.kill()
        replication.rejoin(old, new)
        writer.wait_acks_after(time.monotonic(), 50, timeout=30)
    finally:
        writer.stop()
        if not thawed:
            old.thaw()
    check_nothing_lost(writer, watcher, "pg_ctl promote, primary frozen", frozen, promoted)


def test_geminikv_takes_its_rewind_path_when_an_asynchronous_failover_loses_writes(
    pair: Pair,
) -> None:
    """Asynchronous replication (issue 18, item 2): writes acknowledged by the primary and
    never received by the standby (its WAL receiver stopped) are lost when the primary's
    node dies and the standby is promoted. geminikv on the surviving node notices the new
    primary lacks revisions it served (on seeing the primary change, or on reading it): its
    watches are cancelled with the reason, its index is rebuilt from the new primary, and
    no read ever mixes the lost writes with the new primary's state; writes go on from the
    new primary's revision."""
    old, new = pair.primary, pair.standby
    replication.set_sync(old, False)
    gemini = Gemini(new, pair.endpoint()).wait_listening()
    channel, kv, _ = gemini.stubs()
    reads = Reads(kv, PREFIX)
    try:
        kept = {PREFIX + b"kept%02d" % i for i in range(20)}
        for key in sorted(kept):
            replicated = kv.Put(pb.PutRequest(key=key, value=b"v")).header.revision
        eventually(lambda: _newest(new) >= replicated, "the standby has the first writes")
        # the standby stops receiving: what the primary acknowledges now is on it alone
        new.sql("ALTER SYSTEM SET primary_conninfo = ''")
        new.sql("SELECT pg_reload_conf()")
        eventually(lambda: new.sql("SELECT count(*) FROM pg_stat_wal_receiver") == 0, "stopped")
        lost = {PREFIX + b"lost%02d" % i for i in range(20)}
        for key in sorted(lost):
            served = kv.Put(pb.PutRequest(key=key, value=b"v")).header.revision
        watcher = Watcher(gemini, PREFIX, start=replicated + 1)
        watcher.wait_for(lost)
        assert lost <= {key for key, _, _ in watcher.events}  # served to a watch, then lost
        assert _newest(new) == replicated
        reads.start()
        eventually(lambda: reads.answers, "reads answered before the failover")
        killed = old.kill()
        replication.promote(new)
        eventually(lambda: any(r.canceled for r in watcher.responses), "the watch cancelled", 30)
        cancelled = time.monotonic()
        cancel = next(r for r in watcher.responses if r.canceled)
        # Two paths race to notice, both naming the revision served and the new newest one:
        # the check run when the primary's change is seen, or a read (or write) that finds
        # the table's newest revision below the applied one first.
        reasons = (
            f"the new PostgreSQL primary lacks revision {served}, which this process "
            f"applied (its newest revision is {replicated}:",
            f"the database revision went backwards from {served} to {replicated} ",
        )
        assert any(reason in cancel.cancel_reason for reason in reasons), cancel.cancel_reason
        noticed = "on the primary's change" if reasons[0] in cancel.cancel_reason else "by a read"
        answer = eventually(lambda: _range(kv), "reads answered again (the index rebuilt)", 30)
        rebuilt = time.monotonic()
        assert answer is not None
        assert {item.key for item in answer.kvs} == kept
        assert answer.header.revision == replicated
        after = kv.Put(pb.PutRequest(key=PREFIX + b"after", value=b"v")).header.revision
        # a standby's sequence is ahead of the last id it received (PostgreSQL logs
        # sequences 32 values ahead): the ids between are gaps, as after any crash
        assert replicated < after <= replicated + 33
        fresh = Watcher(gemini, PREFIX, start=replicated + 1)
        fresh.wait_for({PREFIX + b"after"})
        fresh.close()
        assert [key for key, _, _ in fresh.events] == [PREFIX + b"after"]
        time.sleep(0.5)
    finally:
        reads.stop()
        channel.close()
    # every read answered either the state before the loss (the lost writes included, at
    # the revision that had them) or the new primary's (none of them): never a mix
    for keys, revision in reads.answers:
        if keys & lost:
            assert keys == kept | lost and revision == served, (sorted(keys), revision)
        else:
            assert keys <= kept | {PREFIX + b"after"} and revision <= after, (keys, revision)
    assert {code for code, _ in reads.errors} <= {grpc.StatusCode.UNAVAILABLE}
    old_state = sum(1 for keys, _ in reads.answers if keys & lost)
    print(
        f"\nasynchronous replication, {len(lost)} acknowledged writes lost (noticed {noticed}): "
        f"kill -> watch cancelled {cancelled - killed:.2f} s, -> reads answered again "
        f"{rebuilt - killed:.2f} s (promote included); reads: {old_state} "
        f"of the old state, {len(reads.answers) - old_state} of the new, "
        f"{len(reads.errors)} refused (Unavailable) while rebuilding"
    )
    watcher.close()


PREFIX = b"/async/"


def _newest(node: Node) -> int:
    """The newest row id on ``node``: 0 while the table itself is not replicated yet."""
    try:
        return int(node.sql("SELECT COALESCE(MAX(id), 0) FROM kine", database="kubernetes"))  # type: ignore[call-overload]
    except asyncpg.UndefinedTableError:
        return 0


def _range(kv: rpc_pb2_grpc.KVStub) -> pb.RangeResponse | None:
    """The prefix's keys, or None while geminikv answers Unavailable."""
    try:
        answer: pb.RangeResponse = kv.Range(
            pb.RangeRequest(key=PREFIX, range_end=PREFIX[:-1] + b"0"), timeout=5
        )
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return None
    return answer


class Reads:
    """Ranges over ``prefix`` one after another from a thread: each answer's keys and
    revision, and each refusal's code and message."""

    def __init__(self, kv: rpc_pb2_grpc.KVStub, prefix: bytes) -> None:
        self.kv = kv
        self.request = pb.RangeRequest(key=prefix, range_end=prefix[:-1] + b"0")
        self.answers: list[tuple[set[bytes], int]] = []
        self.errors: list[tuple[grpc.StatusCode, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.kv.Range(self.request, timeout=5)
            except grpc.RpcError as err:
                self.errors.append((err.code(), err.details() or ""))
            else:
                self.answers.append(({i.key for i in answer.kvs}, answer.header.revision))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


RELIABILITY_SECONDS = 12.0


def test_reliability_traffic_through_a_failover(pair: Pair, request: pytest.FixtureRequest) -> None:
    """The reliability traffic and checkers (tests/reliability/, issue 18 item 5) through
    one failover: Kubernetes-shaped clients and watchers spread over geminikv on both
    nodes; the primary's node is killed (its geminikv with it) and the standby promoted at
    once, the traffic going on through the survivor. The history is linearizable and every
    watch keeps etcd's guarantees. (The old primary returning under this traffic: the
    cut-link test in test_ha_autofailover.py.)"""
    seed = int(request.config.getoption("--reliability-seed"))
    old, new = pair.primary, pair.standby
    geminis = [Gemini(node, pair.endpoint()).wait_listening() for node in (old, new)]
    # the survivor's first: the traffic reads the table's own history through it at the end
    endpoints = [geminis[1].address, geminis[0].address]
    traffic = Traffic(endpoints, b"/reliability/", Settings(seed=seed))
    timings: list[str] = []

    def failover() -> None:
        time.sleep(RELIABILITY_SECONDS / 3)
        killed = old.kill()
        replication.promote(new)
        timings.append(f"kill -> promoted {time.monotonic() - killed:.2f} s")

    async def run() -> None:
        work = asyncio.gather(traffic.run(RELIABILITY_SECONDS), asyncio.to_thread(failover))
        await asyncio.wait_for(work, RELIABILITY_SECONDS + 120)  # a hang fails the test
        await traffic.complete()

    asyncio.run(run())
    history = traffic.history
    outcomes = Counter("ok" if op.response is not None else op.error for op in history.operations)
    complete = history.complete
    assert complete is not None
    events = sum(len(r.events) for _, r in complete.responses)
    reasons = Counter(
        r.cancel_reason for w in history.watches for _, r in w.responses if r.canceled
    )
    started = time.monotonic()
    violations = check(history)
    print(
        f"\nreliability through a failover, seed {seed}: {len(history.operations)} calls "
        f"{dict(outcomes)}, {events} events, {len(history.watches)} watch records, watch "
        f"cancel reasons {dict(reasons)}; {'; '.join(timings)}; "
        f"{len(violations)} violations (checked in {time.monotonic() - started:.1f} s)"
    )
    assert not traffic.unexpected, traffic.unexpected[:10]  # only errors etcd gives here
    assert not violations, f"seed {seed}: " + "\n".join(violations[:30])
    assert timings  # the failover happened while the traffic ran
    assert outcomes["ok"] > 300 and events > 100
