"""Two nodes on synchronous streaming replication without a failover manager: the
harness itself, and geminikv across a kill -9 of the primary's node and ``pg_ctl promote``
(issue 18, item 5). Each test gets fresh nodes (network namespaces, see tests/ha/)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from tests.ha import replication
from tests.ha.cluster import Pair, missing, plain_pair
from tests.ha.gemini import Gemini, Watcher, Writer, check_nothing_lost

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
