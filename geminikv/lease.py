"""Leases: etcd's lease service, stored in PostgreSQL (``geminikv_lease``).

Expiry is absolute and on PostgreSQL's clock, so it survives restarts and is the same
for every process. One process at a time (holding a session advisory lock) expires
leases: it revokes them through the writer, which deletes all their keys in one write.
Keys whose ``lease`` column names no lease row were written by Go Kine, which stores a
TTL in seconds there; they expire that many seconds after this process first sees them,
as Kine does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import asyncpg

from geminikv import errors, metrics
from geminikv.alarms import LEASE_OVERHEAD
from geminikv.config import EXPIRED_PER_RUN, REVOKES_PER_WRITE
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
                        Event(mod, key, False, create, version, lease, None, None, None)
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
                    self._deadlines[e.key] = (now + e.lease, e.revision)
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


class Leases:
    def __init__(self, store: KVStore, kine_ttls: KineTtls) -> None:
        self.store = store
        self.pool = store.pool
        self.kine_ttls = kine_ttls

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
        async with self.pool.acquire() as conn:
            if lease_id:
                if not await table.grant(conn, lease_id, ttl):
                    raise errors.LeaseExists()
                return lease_id, ttl
            while True:
                candidate = random.randint(1, MAX_LEASE_ID)
                if await table.grant(conn, candidate, ttl):
                    return candidate, ttl

    async def revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        self.store.alarms.check_write(0)
        resp: pb.LeaseRevokeResponse = await self.store.write(
            lambda ev: ev.revoke(lease_id, only_if_expired=False), revokes=(lease_id,)
        )
        return resp

    async def keep_alive(self, lease_id: int) -> int:
        """The granted TTL after renewing, 0 if the lease is unknown or expired."""
        async with self.pool.acquire() as conn:
            ttl = await table.keep_alive(conn, lease_id)
        return ttl if ttl is not None else 0

    async def time_to_live(self, lease_id: int, keys: bool) -> pb.LeaseTimeToLiveResponse:
        async with self.pool.acquire() as conn:
            found = await table.get(conn, lease_id)
        resp = pb.LeaseTimeToLiveResponse(ID=lease_id)
        if found is None or found[1] <= 0:
            resp.TTL = -1
            return resp
        granted, remaining_ms = found
        resp.grantedTTL = granted
        resp.TTL = max(0, remaining_ms // 1000)
        if keys:
            resp.keys.extend(self.store.index.lease_keys(lease_id))
        return resp

    async def leases(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await table.all_ids(conn)

    async def count(self) -> int:
        """Leases in the table, granted by any process (the geminikv_leases metric)."""
        async with self.pool.acquire() as conn:
            return await table.count(conn)

    # -- expiry (a Leader duty) ----------------------------------------------------------

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
