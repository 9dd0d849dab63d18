"""The key-value store: start-up, reads, writes through the writer, compaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import asyncpg

from geminikv import errors
from geminikv._native.kvwire import GuardedPut
from geminikv.alarms import Alarms, put_cost, txn_cost
from geminikv.config import DEFRAGMENT_TIMEOUT
from geminikv.mvcc import index as index_mod
from geminikv.mvcc import ranges, txn
from geminikv.mvcc.compaction import Compaction
from geminikv.mvcc.follower import Follower
from geminikv.mvcc.index import Index
from geminikv.mvcc.keys import COMPACT_KEY
from geminikv.mvcc.ranges import RevisionOf
from geminikv.mvcc.read_index import ReadIndex
from geminikv.mvcc.rewind import Rebuilding, Rewind
from geminikv.mvcc.values import Values
from geminikv.mvcc.writer import Operation, Writer
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import kine, locks
from geminikv.storage.rows import Entry, State
from geminikv.storage.session import Session

log = logging.getLogger(__name__)

# A Range's answer: (header revision, entries by row id, values by row id, count, more,
# the entries' row id -> mod revision, or None when every revision is its id:
# docs/architecture.md#revisions)
Ranged = tuple[int, list[Entry], dict[int, bytes] | None, int, bool, RevisionOf]


class KVStore:
    """The store the services call: reads from the index, writes through the writer,
    compaction. Its parts are built in ``server/app.py`` (``build``); it starts and stops
    them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        session: Session,
        index: Index,
        values: Values,
        follower: Follower,
        reads: ReadIndex,
        writer: Writer,
        compaction: Compaction,
        rewind: Rewind,
        rebuilding: Rebuilding,
        alarms: Alarms,
        on_compact: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.session = session
        self.index = index
        self.values = values
        self.follower = follower
        self.reads = reads
        self.writer = writer
        self.compaction = compaction
        self.rewind = rewind
        self.rebuilding = rebuilding
        self.alarms = alarms  # what writes must pass (etcd's quota and alarm appliers)
        self._on_compact = on_compact  # told of every logical compaction (the leader)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._ensure_special_rows()
        started = time.monotonic()
        await index_mod.load(self.pool, self.index)
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
        await self.rewind.stop()
        await self.writer.stop()
        await self.compaction.stop()
        await self.follower.stop()

    async def _ensure_special_rows(self) -> None:
        """Kine's compact_rev_key row, which holds the compact revision: as revision 1 of a
        fresh table it leaves the store as etcd's starts, empty at revision 1. (Go Kine
        adds its /registry/health key itself when it starts; geminikv needs none.)"""
        async with locks.locked(self.session.conn) as conn:
            await kine.insert_if_missing(conn, COMPACT_KEY, b"")

    @property
    def revision(self) -> int:
        """The revision applied here: what response headers carry."""
        return self.index.revision_of(self.index.rev)

    def _check_serving(self) -> None:
        self.rebuilding.check()

    # -- reads -------------------------------------------------------------------------

    async def range(self, req: pb.RangeRequest) -> Ranged:
        """The RangeResponse's contents, without the message (the service encodes them in
        wire format, _native/kvwire)."""
        txn.check_range(req)
        self._check_serving()
        if not req.serializable:
            await self.reads.read(urgent=bool(req.range_end))
        elif not req.range_end:
            await self.reads.together()
        index = self.index
        # Read in one event-loop turn: the index at row id ``at`` is the store at revision
        # ``req.revision`` (or now) (docs/architecture.md#revisions).
        rid = int(index.rev)
        rev = index.revision_of(rid)
        at = ranges.read_revision(rev, int(index.compact_revision), req.revision)
        at = index.id_at(at) if at != rev else rid
        revision_of = index.revision_of if index.has_anchors else None
        end = ranges.range_end(req.range_end)
        if req.count_only:
            return rev, [], None, index.count(req.key, end, at), False, None
        entries, count = index.range(req.key, end, at, ranges.fetch_limit(req))
        values = None
        if ranges.needs_values_to_sort(req):
            values = await self._values(entries)
        entries, more = ranges.select(req, entries, values, revision_of)
        if req.keys_only:
            return rev, entries, None, count, more, revision_of
        if values is None:
            values = await self._values(entries)
        return rev, entries, values, count, more, revision_of

    async def get(self, key: bytes, serializable: bool) -> tuple[int, State | None, bytes]:
        """``range`` for one key at the current revision, without messages: (revision,
        the key's (mod, create, version, lease) or None when absent, its value)."""
        self._check_serving()
        if serializable:
            await self.reads.together()
        else:
            await self.reads.read(urgent=False)
        index = self.index
        rid = int(index.rev)
        rev = index.revision_of(rid)
        ranges.read_revision(rev, int(index.compact_revision), 0)
        entries = index.range(key, None, rid, 0)[0]
        if not entries:
            return rev, None, b""
        _key, mod, create, version, lease = entries[0]
        value = (await self._values(entries))[mod]
        return rev, (index.revision_of(mod), create, version, lease), value

    async def _values(self, entries: list[Entry]) -> dict[int, bytes]:
        if not entries:
            return {}
        values = await self.values.get(e[1] for e in entries)
        if len(values) < len(entries):
            raise errors.Compacted()  # a concurrent compaction removed the rows
        return values

    # -- writes ------------------------------------------------------------------------

    async def put(self, req: pb.PutRequest) -> pb.PutResponse:
        self.alarms.check_write(put_cost(req.key, req.value))
        txn.check_size(req)
        txn.check_put(req)
        self._check_serving()
        leases = (req.lease,) if req.lease else ()
        resp: pb.PutResponse = await self.writer.submit(lambda ev: ev.put(req), leases)
        return resp

    async def delete_range(self, req: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        self.alarms.check_write(0)
        txn.check_size(req)
        txn.check_delete(req)
        self._check_serving()
        resp: pb.DeleteRangeResponse = await self.writer.submit(lambda ev: ev.delete_range(req))
        return resp

    async def txn(self, req: pb.TxnRequest) -> pb.TxnResponse:
        if not txn.is_read_only(req):
            self.alarms.check_write(txn_cost(req))
        txn.check_size(req)
        leases = txn.check_txn(req)
        txn.check_branch(req.success)
        txn.check_branch(req.failure)
        self._check_serving()
        resp: pb.TxnResponse = await self.writer.submit(lambda ev: ev.txn(req), leases)
        return resp

    async def guarded_put(self, request: GuardedPut) -> tuple[bool, int, State | None, bytes]:
        """kube-apiserver's create, update and delete txn (Evaluator.guarded_put); no
        request check can fail for that shape (its parser admits no other)."""
        self.alarms.check_write(0 if request.delete else put_cost(request.key, request.value))
        self._check_serving()
        lease = request.lease
        result: tuple[bool, int, State | None, bytes] = await self.writer.submit(
            lambda ev: ev.guarded_put(request), (lease,) if lease else ()
        )
        return result

    async def compact(self, req: pb.CompactionRequest) -> pb.CompactionResponse:
        """Logical compaction: reads and watches below the revision fail from now on."""
        self.alarms.check_write(0)
        self._check_serving()
        current = await self.compaction.compact(req.revision, self.follower.wait_for)
        self._on_compact()
        if req.physical:
            await self.compaction.wait_physical(self.index.id_at(req.revision))
        resp = pb.CompactionResponse()
        resp.header.revision = current
        return resp

    async def write(
        self, operation: Operation, leases: Collection[int] = (), revokes: Collection[int] = ()
    ) -> Any:
        """Any other write (lease revocation and expiry): see ``Writer.submit``."""
        return await self.writer.submit(operation, leases, revokes)

    async def db_size(self) -> int:
        async with self.pool.acquire() as conn:
            return await kine.db_size(conn)

    async def db_sizes(self) -> tuple[int, int]:
        """etcd's dbSize and dbSizeInUse: the table's bytes, and those holding data."""
        async with self.pool.acquire() as conn:
            return await kine.db_size(conn), await kine.db_size_in_use(conn)

    async def vacuum(self) -> None:
        """Defragment: the space compaction freed becomes reusable (a plain VACUUM)."""
        async with self.pool.acquire() as conn:
            await kine.vacuum(conn, DEFRAGMENT_TIMEOUT)
