"""etcd's alarms (Maintenance.Alarm) and its backend quota, for the whole database.

Alarms live in ``geminikv_alarm``, so every process sees the same set: the process that
raises or clears one notifies the others (``storage/notify.py``), and each re-reads the
set every second as well. While NOSPACE is raised, requests that add data (Put, a Txn with
a Put, LeaseGrant) are refused with etcd's "database space exceeded"; while CORRUPT is
raised, every write is refused with "corrupt cluster" (etcd's capped and corrupt
appliers). ``--quota-backend-bytes`` raises NOSPACE when a request would take Kine's table
past it, as etcd's quota layer does.
"""

from __future__ import annotations

import logging

import asyncpg

from geminikv import errors, tasks
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.storage import alarms as table
from geminikv.storage import kine, notify

log = logging.getLogger(__name__)

NOSPACE: int = pb.NOSPACE
CORRUPT: int = pb.CORRUPT

# etcd's cost of a request against the quota (server/etcdserver/quota.go)
KV_OVERHEAD = 256
LEASE_OVERHEAD = 64

Alarm = tuple[int, int]  # (member id, alarm type)


def put_cost(key: bytes, value: bytes) -> int:
    return KV_OVERHEAD + len(key) + len(value)


def txn_cost(req: pb.TxnRequest) -> int:
    """The larger branch's puts (etcd counts the top-level ones only)."""

    def branch(ops: list[pb.RequestOp]) -> int:
        return sum(
            put_cost(op.request_put.key, op.request_put.value)
            for op in ops
            if op.WhichOneof("request") == "request_put"
        )

    return max(branch(req.success), branch(req.failure))


def describe(alarm: Alarm) -> str:
    """An alarm as etcd's Status lists it in ``errors`` (Go's compact text format)."""
    member, kind = alarm
    return f"memberID:{member} alarm:{pb.AlarmType.Name(kind)} "


class Alarms:
    def __init__(self, pool: asyncpg.Pool, member_id: int, quota_bytes: int) -> None:
        self.pool = pool
        self.member_id = member_id
        self.quota_bytes = quota_bytes
        self.raised: frozenset[Alarm] = frozenset()
        self.db_size = 0  # Kine's table, as of the last refresh plus what was written since

    async def refresh(self) -> None:
        """Re-read the raised alarms (and the table's size, with a quota)."""
        async with self.pool.acquire() as conn:
            self.raised = frozenset(await table.all_alarms(conn))
            if self.quota_bytes:
                self.db_size = await kine.db_size(conn)

    def changed(self) -> None:
        """Another process raised or cleared an alarm (its notification)."""
        tasks.spawn(self._refresh_logged())

    async def _raise_nospace(self) -> None:
        try:
            await self.activate(self.member_id, NOSPACE)
        except Exception as err:  # the next write over the quota tries again
            log.warning("alarms: cannot raise NOSPACE (%r)", err)

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as err:  # the next periodic refresh tries again
            log.warning("alarms: cannot re-read them (%r)", err)

    # -- the Alarm RPC -----------------------------------------------------------------

    async def get(self, kind: int) -> list[Alarm]:
        await self.refresh()
        return sorted(a for a in self.raised if kind == pb.NONE or a[1] == kind)

    async def activate(self, member_id: int, kind: int) -> list[Alarm]:
        if kind not in (NOSPACE, CORRUPT):
            return []  # etcd 3.5 ignores NONE (and panics on a type it does not know)
        async with self.pool.acquire() as conn:
            if await table.activate(conn, member_id, kind):
                log.warning("alarm raised: %s", describe((member_id, kind)))
                await notify.alarms(conn)
        await self.refresh()
        return [(member_id, kind)]

    async def deactivate(self, member_id: int, kind: int) -> list[Alarm]:
        async with self.pool.acquire() as conn:
            cleared = await table.deactivate(conn, member_id, kind)
            if cleared:
                log.warning("alarm disarmed: %s", describe((member_id, kind)))
                await notify.alarms(conn)
        await self.refresh()
        return [(member_id, kind)] if cleared else []

    # -- what writes must pass ---------------------------------------------------------

    def check_write(self, cost: int) -> None:
        """Refuse a write as etcd would under the raised alarms and the quota; ``cost``:
        the bytes it adds (0 for one that adds none, e.g. a delete)."""
        if self.raised:
            kinds = {kind for _, kind in self.raised}
            if CORRUPT in kinds:
                raise errors.Corrupt()
            if cost and NOSPACE in kinds:
                raise errors.NoSpace()
        if cost and self.quota_bytes:
            if self.db_size + cost >= self.quota_bytes:
                tasks.spawn(self._raise_nospace())
                raise errors.NoSpace()
            self.db_size += cost
