"""A database that goes back in time (restored from an older backup, or a failover to a
lagging replica): geminikv notices, cancels watches with a reason, rebuilds its index and
serves the restored state — never a mix of the lost future and the restored past."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import asyncpg
import grpc
import pytest

from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from tests.servers import (
    GeminiProcess,
    GeminiServer,
    Postgres,
    Stubs,
    range_once_rebuilt,
    run_sync,
    start_postgres,
    stop_postgres,
)
from tests.waiting import eventually
from tests.watching import WatchClient


async def _sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


def test_database_restored_from_an_older_backup(postgres: Postgres) -> None:
    dsn = postgres.new_database("rewind")
    server = GeminiServer(dsn).start()
    try:
        stubs = server.stubs()
        for i in range(5):
            stubs.kv.Put(pb.PutRequest(key=b"/rw/old%d" % i, value=b"old"))
        backup_rev = stubs.kv.Range(pb.RangeRequest(key=b"/rw/old0")).header.revision
        # the backup: the table and its id sequence as they are now
        run_sync(
            _sql(
                dsn,
                "CREATE TABLE kine_backup AS SELECT * FROM kine",
                "CREATE TABLE seq_backup AS SELECT last_value FROM kine_id_seq",
            )
        )
        for i in range(5):
            stubs.kv.Put(pb.PutRequest(key=b"/rw/new%d" % i, value=b"lost"))
        lost_rev = stubs.kv.Range(pb.RangeRequest(key=b"/rw/new0")).header.revision
        watcher = WatchClient(stubs)
        watcher.create(key=b"/rw/", range_end=b"/rw0", start_revision=backup_rev + 1)
        seen = watcher.events(5)
        assert len(seen) == 5  # the writes made after the backup
        # restore the backup under geminikv's feet
        run_sync(
            _sql(
                dsn,
                "DELETE FROM kine",
                "INSERT INTO kine SELECT * FROM kine_backup",
                "SELECT setval('kine_id_seq', (SELECT last_value FROM seq_backup))",
            )
        )
        # the watch is cancelled with a clear reason (noticed within ~1 s, without traffic)
        canceled = watcher.wait_canceled("the watch cancelled", 10)
        assert "revision went backwards" in canceled.cancel_reason
        assert f"from {lost_rev} to {backup_rev}" in canceled.cancel_reason
        # once rebuilt, it serves the restored state and nothing of the lost future
        got = range_once_rebuilt(
            stubs.kv, pb.RangeRequest(key=b"/rw/", range_end=b"/rw0"), "revision went backwards"
        )
        assert got.header.revision == backup_rev
        assert sorted(kv.key for kv in got.kvs) == [b"/rw/old%d" % i for i in range(5)]
        with pytest.raises(grpc.RpcError) as future:
            stubs.kv.Range(pb.RangeRequest(key=b"/rw/", range_end=b"/rw0", revision=lost_rev))
        assert future.value.code() == grpc.StatusCode.OUT_OF_RANGE  # a future revision now
        put = stubs.kv.Put(pb.PutRequest(key=b"/rw/after", value=b"v"))
        assert put.header.revision == backup_rev + 1
        # a new watch from the restored revision sees exactly the new history
        fresh = WatchClient(stubs)
        fresh.create(key=b"/rw/", range_end=b"/rw0", start_revision=backup_rev + 1)
        events = [(e.kv.key, e.kv.value) for e in fresh.events(1)]
        assert events == [(b"/rw/after", b"v")]
        fresh.close()
        watcher.close()
        stubs.close()
    finally:
        server.stop()


def _put_retrying(stubs: Stubs, key: bytes, value: bytes) -> int:
    """A put as clients make it after PostgreSQL restarted: retried while Unavailable (the
    first write on a connection PostgreSQL dropped finds it broken and reconnects)."""

    def put() -> int | None:
        try:
            return int(stubs.kv.Put(pb.PutRequest(key=key, value=value)).header.revision)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            return None

    revision = eventually(put, "a write got through", timeout=20, interval=0.2)
    assert revision is not None
    return revision


@pytest.mark.slow
def test_data_directory_restored_from_a_file_backup_under_two_processes(tmp_path: Path) -> None:
    # The real thing: PostgreSQL stopped, its data directory replaced by an older copy
    # (what a restore or a failover to a lagging replica does), started again.
    data = tmp_path / "pg"
    dsn = start_postgres(data)
    processes = [GeminiProcess(dsn).start(), GeminiProcess(dsn).start()]
    try:
        first, second = (p.stubs() for p in processes)
        for i in range(5):
            first.kv.Put(pb.PutRequest(key=b"/fb/old%d" % i, value=b"old"))
        backup_rev = first.kv.Range(pb.RangeRequest(key=b"/fb/old0")).header.revision
        stop_postgres(data)
        subprocess.run(["cp", "-a", str(data / "pgdata"), str(tmp_path / "backup")], check=True)
        start_postgres(data)
        lost_rev = _put_retrying(second, b"/fb/new", b"lost")
        assert lost_rev > backup_rev
        watchers = []
        for stubs in (first, second):
            watcher = WatchClient(stubs)
            watcher.create(key=b"/fb/", range_end=b"/fb0", start_revision=backup_rev + 1)
            assert [e.kv.value for e in watcher.events(1)] == [b"lost"]
            watchers.append(watcher)

        stop_postgres(data, signal.SIGQUIT)  # as a crash: no shutdown checkpoint
        subprocess.run(["rm", "-rf", str(data / "pgdata")], check=True)
        subprocess.run(["cp", "-a", str(tmp_path / "backup"), str(data / "pgdata")], check=True)
        start_postgres(data)

        for number, (stubs, watcher) in enumerate(zip((first, second), watchers, strict=True)):
            canceled = watcher.wait_canceled(f"process {number}: the watch cancelled", 20)
            assert f"revision went backwards from {lost_rev} to {backup_rev}" in (
                canceled.cancel_reason
            )
            got = range_once_rebuilt(
                stubs.kv, pb.RangeRequest(key=b"/fb/", range_end=b"/fb0"), "went backwards"
            )
            assert got.header.revision == backup_rev
            assert sorted(kv.key for kv in got.kvs) == [b"/fb/old%d" % i for i in range(5)]
            watcher.close()
        # both carry on from the restored revision, and see each other's writes
        assert _put_retrying(first, b"/fb/after", b"v") == backup_rev + 1
        got = second.kv.Range(pb.RangeRequest(key=b"/fb/after"))
        assert [(kv.key, kv.value) for kv in got.kvs] == [(b"/fb/after", b"v")]
        first.close()
        second.close()
    finally:
        for p in processes:
            p.stop()
        stop_postgres(data)
