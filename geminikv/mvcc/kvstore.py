"""The key-value store: start-up, reads, writes through the writer, logical compaction."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from geminikv import errors, tasks
from geminikv.mvcc import ranges, txn
from geminikv.mvcc.follower import FETCH_LIMIT, Follower
from geminikv.mvcc.index import Index, apply_row
from geminikv.mvcc.keys import COMPACT_KEY, check_writable
from geminikv.mvcc.values import Values
from geminikv.mvcc.view import State
from geminikv.mvcc.writer import Writer
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import kine, locks, notify

log = logging.getLogger(__name__)

HEALTH_KEY = b"/registry/health"
HEALTH_VALUE = b'{"health":"true"}'


class KVStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        writer_conn: asyncpg.Connection,
        poll_interval: float = 1.0,
        value_cache_bytes: int = 128 * 1024 * 1024,
        reconnect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        batch_wait: float = 0.0,
        poll_batch_size: int = FETCH_LIMIT,
    ) -> None:
        self.pool = pool
        self.index = Index()
        self.values = Values(pool, value_cache_bytes)
        self.follower = Follower(
            pool, self.index, self.values, poll_interval, reconnect, batch_wait, poll_batch_size
        )
        self.writer = Writer(
            writer_conn, self.index, self.follower, self.values, reconnect, batch_wait
        )
        self.on_compact: list[Callable[[], None]] = []  # told of every logical compaction
        # told (with a reason) when the database lost revisions this process served
        self.on_rewind: list[Callable[[str], None]] = []
        self.rebuilding = False
        self.rebuild_message = errors.Rewound.message
        self._rebuild_task: asyncio.Task[None] | None = None
        self.follower.on_rewind = self.rewound
        self.follower.on_behind_compaction = self.behind_compaction

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._ensure_special_rows()
        started = time.monotonic()
        await self._load_index()
        log.info(
            "index loaded: %d keys, revision %d, compact revision %d (%.2fs)",
            self.index.live,
            self.index.rev,
            self.index.compact_rev,
            time.monotonic() - started,
        )
        await self.follower.start()
        await self.writer.start()

    async def stop(self) -> None:
        await tasks.stop(self._rebuild_task)
        await self.writer.stop()
        await self.follower.stop()

    async def _ensure_special_rows(self) -> None:
        """Kine's compact_rev_key row (holds the compact revision) and /registry/health."""
        async with locks.locked(self.writer.conn) as conn:
            for name, value in ((COMPACT_KEY, b""), (HEALTH_KEY, HEALTH_VALUE)):
                await kine.insert_if_missing(conn, name, value)

    async def _load_index(self, index: Index | None = None) -> None:
        index = self.index if index is None else index
        async with self.pool.acquire() as conn:
            index.compact_rev = await kine.load_all(conn, functools.partial(apply_row, index))

    # -- a database that went back in time --------------------------------------------

    def rewound(self, newest: int) -> None:
        """PostgreSQL's newest revision is below the one this process applied: it was
        restored from an older backup or failed over to a lagging replica. Stop serving
        the lost future, cancel every watch, rebuild the index from the table."""
        self._resync(
            f"geminikv: the database revision went backwards from {int(self.index.rev)} "
            f"to {newest} (restored from a backup, or failed over to a lagging replica); "
            "watch again from a current revision",
            errors.Rewound.message,
        )

    def behind_compaction(self, missing: int, compacted: int) -> None:
        """Revision ``missing`` is not in the table and the table is compacted to
        ``compacted`` >= it: the rows this process had yet to apply may have been deleted
        (a delete's tombstone among them), so they cannot be replayed. Rebuild instead."""
        self._resync(
            f"geminikv: this process fell behind compaction (revision {missing} not applied, "
            f"compacted to {compacted}); watch again from a current revision",
            errors.BEHIND_COMPACTION,
        )

    def _resync(self, reason: str, message: str) -> None:
        """Stop serving, cancel every watch with ``reason``, rebuild the index; requests
        meanwhile fail with Unavailable and ``message``."""
        if self.rebuilding:
            return
        log.error("%s; rebuilding the index", reason.removeprefix("geminikv: "))
        self.rebuilding = True
        self.rebuild_message = message
        for callback in self.on_rewind:
            callback(reason)
        self._rebuild_task = asyncio.create_task(self._rebuild(), name="index-rebuild")

    async def _rebuild(self) -> None:
        while True:
            try:
                fresh = Index()
                await self._load_index(fresh)
                break
            except Exception as err:  # e.g. PostgreSQL still restarting: try again
                log.warning("rebuilding the index failed (%s); retrying", err)
                await asyncio.sleep(1.0)
        self.follower.reset(self.rebuild_message)
        self.values.clear()
        self.writer.reset()
        self.index.take(fresh)  # in one step: no request sees a half-built index
        self.rebuilding = False
        log.info("index rebuilt: %d keys, revision %d", self.index.live, self.index.rev)

    def _check_serving(self) -> None:
        if self.rebuilding:
            raise errors.Rewound(self.rebuild_message)

    # -- reads -------------------------------------------------------------------------

    async def range(self, req: pb.RangeRequest) -> pb.RangeResponse:
        txn.check_range(req)
        self._check_serving()
        if not req.serializable:
            await self.follower.read_index(urgent=bool(req.range_end))
        index = self.index
        rev = int(index.rev)
        if req.revision > rev:
            raise errors.FutureRevision()
        at = req.revision if req.revision > 0 else rev
        if at < index.compact_rev:
            raise errors.Compacted()
        end = ranges.range_end(req.range_end)
        resp = pb.RangeResponse()
        resp.header.revision = rev
        if req.count_only:
            resp.count = index.count(req.key, end, at)
            return resp
        entries, resp.count = index.range(req.key, end, at, ranges.fetch_limit(req))
        values = None
        if ranges.needs_values_to_sort(req):
            values = await self._values(entries)
        entries, resp.more = ranges.select(req, entries, values)
        if not req.keys_only and values is None:
            values = await self._values(entries)
        ranges.add_key_values(resp.kvs, entries, None if req.keys_only else values)
        return resp

    async def get(self, key: bytes, serializable: bool) -> tuple[int, State | None, bytes]:
        """``range`` for one key at the current revision, without messages: (revision,
        the key's (mod, create, version, lease) or None when absent, its value)."""
        self._check_serving()
        if not serializable:
            await self.follower.read_index(urgent=False)
        index = self.index
        rev = int(index.rev)
        if rev < index.compact_rev:
            raise errors.Compacted()
        entries = index.range(key, None, rev, 0)[0]
        if not entries:
            return rev, None, b""
        entry = entries[0]
        value = (await self._values(entries))[entry[1]]
        return rev, (entry[1], entry[2], entry[3], entry[4]), value

    async def _values(self, entries: list[ranges.Entry]) -> dict[int, bytes]:
        if not entries:
            return {}
        values = await self.values.get(e[1] for e in entries)
        if len(values) < len(entries):
            raise errors.Compacted()  # a concurrent compaction removed the rows
        return values

    # -- writes ------------------------------------------------------------------------

    async def put(self, req: pb.PutRequest) -> pb.PutResponse:
        txn.check_size(req)
        txn.check_put(req)
        self._check_serving()
        leases = (req.lease,) if req.lease else ()
        resp: pb.PutResponse = await self.writer.submit(lambda ev: ev.put(req), leases)
        return resp

    async def delete_range(self, req: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        txn.check_size(req)
        txn.check_delete(req)
        self._check_serving()
        resp: pb.DeleteRangeResponse = await self.writer.submit(lambda ev: ev.delete_range(req))
        return resp

    async def txn(self, req: pb.TxnRequest) -> pb.TxnResponse:
        txn.check_size(req)
        leases = txn.check_txn(req)
        txn.check_branch(req.success)
        txn.check_branch(req.failure)
        self._check_serving()
        resp: pb.TxnResponse = await self.writer.submit(lambda ev: ev.txn(req), leases)
        return resp

    async def guarded_put(
        self, key: bytes, want_mod: int, value: bytes, lease: int, read_on_failure: bool
    ) -> tuple[bool, int, State | None, bytes]:
        """kube-apiserver's create and update txn (Evaluator.guarded_put). Of txn's request
        checks only this one can fail for that shape (the parser holds the rest)."""
        check_writable(key)
        self._check_serving()
        result: tuple[bool, int, State | None, bytes] = await self.writer.submit(
            lambda ev: ev.guarded_put(key, want_mod, value, lease, read_on_failure),
            (lease,) if lease else (),
        )
        return result

    async def compact(self, req: pb.CompactionRequest) -> pb.CompactionResponse:
        """Logical compaction: reads and watches below the revision fail from now on."""
        self._check_serving()
        async with self.pool.acquire() as pooled, locks.locked(pooled) as conn:
            current = await kine.current_rev(conn)
            if req.revision <= await kine.compact_rev(conn):
                raise errors.Compacted()
            if req.revision > current:
                raise errors.FutureRevision()
            await kine.set_compact_rev(conn, req.revision)
            await notify.compact(conn)
        self.index.compact_rev = max(int(self.index.compact_rev), req.revision)
        for callback in self.on_compact:
            callback()
        if req.physical:
            await self.follower.wait_compacted(req.revision)
        resp = pb.CompactionResponse()
        resp.header.revision = current
        return resp

    async def db_size(self) -> int:
        async with self.pool.acquire() as conn:
            return await kine.db_size(conn)
