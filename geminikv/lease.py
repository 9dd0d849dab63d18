"""Leases: etcd's lease service, stored in PostgreSQL (``geminikv_lease``).

Expiry is absolute and on PostgreSQL's clock, so it survives restarts and is the same
for every process. One process at a time (holding a session advisory lock) expires
leases: it revokes them through the writer, which deletes all their keys in one write.
A process that takes the lock first gives every lease its TTL again, as etcd's lessor
does on a leader change (Lessor.Promote): no lease expires because the previous leader,
or PostgreSQL's primary, was gone for a while.
Keys whose ``lease`` column names no lease row were written by Go Kine, which stores a
TTL in seconds there; they expire that many seconds after this process first sees them,
as Kine does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import asyncpg

from geminikv import errors, metrics
from geminikv.alarms import LEASE_OVERHEAD
from geminikv.config import (
    EXPIRED_PER_RUN,
    LEASE_PROMOTE_EXTENSION,
    OVERDUE_LEASE_POLL,
    OVERDUE_LEASE_WAIT,
    REVOKES_PER_WRITE,
)
from geminikv.mvcc.events import Event
from geminikv.mvcc.index import Index
from geminikv.mvcc.kvstore import KVStore
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import leases as table
from geminikv.storage.queries import MAX_LEASE_ID

log = logging.getLogger(__name__)

MAX_LEASE_TTL = 9_000_000_000  # etcd's MaxLeaseTTL
MIN_LEASE_TTL = 2  # ceil(1.5 x etcd's default election timeout of 1 s)


class KineTtls:
    """Go Kine's TTL keys: a key whose ``lease`` column names no lease row was written by
    Go Kine, which stores a TTL in seconds there; it expires that many seconds after the
    leading process first sees it. Tracked only while this process leads."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.is_leader = False
        self._deadlines: dict[bytes, tuple[float, int]] = {}  # key → (deadline, mod rev)
        self._candidates: list[Event] = []  # leased puts not yet looked up

    def on_events(self, events: list[Event]) -> None:
        """Applied revisions (the applier's subscriber)."""
        if self.is_leader:
            self._candidates.extend(e for e in events if not e.deleted and e.lease)

    def leadership(self, leading: bool) -> None:
        self.is_leader = leading
        if leading:
            self._adopt()
        else:
            self._deadlines.clear()
            self._candidates.clear()

    def _adopt(self) -> None:
        """Every leased key in the index is a candidate (as if just written)."""
        index = self.index
        rev = int(index.rev)
        for lease in index.leases_in_use():
            for key in index.lease_keys(lease):
                state = index.get(key, rev)
                if state is not None:
                    mod, create, version, _ = state
                    self._candidates.append(
                        Event(mod, mod, key, False, create, version, lease, None, None, None)
                    )

    async def due(self, pool: asyncpg.Pool) -> list[tuple[bytes, int]]:
        """Keys whose TTL ran out, with the mod revision they expire at (forgotten here:
        the caller deletes them)."""
        if self._candidates:
            candidates, self._candidates = self._candidates, []
            ids = sorted({e.lease for e in candidates})
            async with pool.acquire() as conn:
                real = await table.existing(conn, ids)
            now = time.monotonic()
            for e in candidates:
                if e.lease not in real:
                    self._deadlines[e.key] = (now + e.lease, e.rid)
        now = time.monotonic()
        due = [(k, mod) for k, (deadline, mod) in self._deadlines.items() if deadline <= now]
        for key, _ in due:
            del self._deadlines[key]
        return due

    def soonest(self) -> float | None:
        """Seconds until the next TTL runs out (None if none is tracked)."""
        if not self._deadlines:
            return None
        return max(min(d for d, _ in self._deadlines.values()) - time.monotonic(), 0.0)


@dataclass(slots=True)
class _Grant:
    lease_id: int  # 0: any free id
    ttl: int
    future: asyncio.Future[int]


class Grants:
    """Concurrent LeaseGrants inserted together, as the writer batches puts: one
    statement (one commit) for every grant that arrived while the previous one ran."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._pending: list[_Grant] = []
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()  # once: 3.11's makes a system call

    async def grant(self, lease_id: int, ttl: int) -> int:
        """The lease's id (``lease_id``, or a free one if 0); LeaseExists if taken."""
        fut: asyncio.Future[int] = self._loop.create_future()
        self._pending.append(_Grant(lease_id, ttl, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lease-grants")
        return await fut

    async def _run(self) -> None:
        batch: list[_Grant] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with self.pool.acquire() as conn:
                        await _insert(conn, batch)
                except Exception as err:  # handed to every grant of the batch
                    for g in batch:
                        if not g.future.done():
                            g.future.set_exception(err)
        except asyncio.CancelledError:
            for g in (*batch, *self._pending):
                if not g.future.done():
                    g.future.set_exception(errors.ServerStopped())
            raise
        finally:
            self._task = None


async def _insert(conn: asyncpg.Connection, batch: list[_Grant]) -> None:
    """Insert the batch's leases in one statement per round: explicit ids first, in
    arrival order (a second grant of an id is LeaseExists, as it would be after the
    first), then random ids for the others, drawn again for any that were taken."""
    todo = sorted(batch, key=lambda g: g.lease_id == 0)  # stable: explicit ids first
    while todo:
        chosen: dict[int, _Grant] = {}
        for g in todo:
            if g.lease_id:
                if g.lease_id not in chosen:
                    chosen[g.lease_id] = g
                elif not g.future.done():
                    g.future.set_exception(errors.LeaseExists())
                continue
            candidate = random.randint(1, MAX_LEASE_ID)
            while candidate in chosen:
                candidate = random.randint(1, MAX_LEASE_ID)
            chosen[candidate] = g
        created = await table.grant(conn, list(chosen), [g.ttl for g in chosen.values()])
        todo = []
        for lease_id, g in chosen.items():
            if lease_id in created:
                if not g.future.done():
                    g.future.set_result(lease_id)
            elif g.lease_id:
                if not g.future.done():
                    g.future.set_exception(errors.LeaseExists())
            else:
                todo.append(g)  # the random id was taken: another


class Leases:
    def __init__(self, store: KVStore, kine_ttls: KineTtls) -> None:
        self.store = store
        self.pool = store.pool
        self.kine_ttls = kine_ttls
        self.grants = Grants(store.pool)

    # -- RPCs --------------------------------------------------------------------------

    async def grant(self, ttl: int, lease_id: int) -> tuple[int, int]:
        self.store.alarms.check_write(LEASE_OVERHEAD)
        if ttl > MAX_LEASE_TTL:
            raise errors.LeaseTTLTooLarge()
        ttl = max(ttl, MIN_LEASE_TTL)
        if lease_id < 0 or lease_id > MAX_LEASE_ID:
            raise errors.InvalidArgument(
                f"geminikv: lease ID must be between 1 and {MAX_LEASE_ID} "
                "(Kine's lease column holds 32 bits)"
            )
        return await self.grants.grant(lease_id, ttl), ttl

    async def revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        self.store.alarms.check_write(0)
        resp: pb.LeaseRevokeResponse = await self.store.write(
            lambda ev: ev.revoke(lease_id, only_if_expired=False), revokes=(lease_id,)
        )
        return resp

    async def keep_alive(self, lease_id: int) -> int:
        """The granted TTL after renewing, 0 if the lease is unknown or revoked."""
        while True:
            async with self.pool.acquire() as conn:
                ttl = await table.keep_alive(conn, lease_id)
            if ttl is not None:
                return ttl
            if await self._settled(lease_id) is None:
                return 0

    async def time_to_live(self, lease_id: int, keys: bool) -> pb.LeaseTimeToLiveResponse:
        found = await self._settled(lease_id)
        resp = pb.LeaseTimeToLiveResponse(ID=lease_id)
        if found is None:
            resp.TTL = -1
            return resp
        granted, remaining_ms = found
        resp.grantedTTL = granted
        resp.TTL = max(0, remaining_ms // 1000)
        if keys:
            resp.keys.extend(self.store.index.lease_keys(lease_id))
        return resp

    async def _settled(self, lease_id: int) -> tuple[int, int] | None:
        """(granted TTL, milliseconds left) of a live lease; None if unknown or revoked.

        A lease past its expiry but not revoked yet is waited on, as etcd's Lessor.Renew
        waits: the leader revokes it (None), or a process taking over as leader renews it
        first (``promote``: after a failover or a restart, before which nobody expired
        it). Unavailable if neither happens within etcd's request timeout."""
        deadline = time.monotonic() + OVERDUE_LEASE_WAIT
        while True:
            async with self.pool.acquire() as conn:
                found = await table.get(conn, lease_id)
            if found is None or found[1] > 0:
                return found
            if time.monotonic() >= deadline:
                raise errors.Unavailable()
            await asyncio.sleep(OVERDUE_LEASE_POLL)

    async def leases(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await table.all_ids(conn)

    async def count(self) -> int:
        """Leases in the table, granted by any process (the geminikv_leases metric)."""
        async with self.pool.acquire() as conn:
            return await table.count(conn)

    # -- expiry (a Leader duty) ----------------------------------------------------------

    async def promote(self, conn: asyncpg.Connection) -> None:
        """On taking the leader lock (``conn`` holds it), before expiring anything: every
        lease gets its full TTL plus etcd's election timeout from now (etcd's
        Lessor.Promote(ElectionTimeout); etcd's checkpointed remaining TTLs are off by
        default, so its new leader renews to the full TTL too)."""
        renewed = await table.promote(conn, int(LEASE_PROMOTE_EXTENSION * 1000))
        if renewed:
            log.info(
                "taking over lease expiry: %d leases renewed to their TTL + %.1fs",
                renewed,
                LEASE_PROMOTE_EXTENSION,
            )

    def leadership(self, leading: bool) -> None:
        self.kine_ttls.leadership(leading)

    async def expire(self) -> float:
        """Revoke every expired lease; returns the seconds until the next may expire."""
        async with self.pool.acquire() as conn:
            expired = await table.expired(conn, EXPIRED_PER_RUN)
            chunks = [
                expired[i : i + REVOKES_PER_WRITE]
                for i in range(0, len(expired), REVOKES_PER_WRITE)
            ]
            await asyncio.gather(*(self._revoke_expired(chunk) for chunk in chunks))
            if expired:
                log.info("expired %d leases", len(expired))
                metrics.LEASES_EXPIRED.inc(len(expired))
            await self._expire_kine_ttls()
            ms = await table.next_expiry_ms(conn)
        wait = 60.0 if ms is None else max(ms, 0) / 1000
        soonest = self.kine_ttls.soonest()
        if soonest is not None:
            wait = min(wait, soonest)
        return wait

    async def _revoke_expired(self, lease_ids: list[int]) -> None:
        async def revoke_all(ev):  # type: ignore[no-untyped-def]
            for lease_id in lease_ids:
                await ev.revoke(lease_id, only_if_expired=True)

        await self.store.write(revoke_all, revokes=lease_ids)

    async def _expire_kine_ttls(self) -> None:
        due = await self.kine_ttls.due(self.pool)
        if due:

            async def delete_all(ev):  # type: ignore[no-untyped-def]
                for key, mod in due:
                    await ev.delete_if_unchanged(key, mod)

            await self.store.write(delete_all)
