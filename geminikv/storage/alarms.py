"""etcd's alarms in ``geminikv_alarm``: one set for every process on the database."""

from __future__ import annotations

import asyncpg

from geminikv.storage.queries import SQL

_UINT64 = 1 << 64


def _stored(member_id: int) -> int:
    """etcd's uint64 member id as the BIGINT with the same bits."""
    return member_id - _UINT64 if member_id >= 1 << 63 else member_id


async def all_alarms(conn: asyncpg.Connection) -> list[tuple[int, int]]:
    """Every raised alarm as (member id, alarm type)."""
    rows = await conn.fetch(SQL["alarms"])
    return [(int(r[0]) % _UINT64, int(r[1])) for r in rows]


async def activate(conn: asyncpg.Connection, member_id: int, alarm: int) -> bool:
    """Raise an alarm; whether it was not raised already."""
    return bool(await conn.fetchval(SQL["alarm_activate"], _stored(member_id), alarm))


async def deactivate(conn: asyncpg.Connection, member_id: int, alarm: int) -> bool:
    """Clear an alarm; whether it was raised."""
    return bool(await conn.fetchval(SQL["alarm_deactivate"], _stored(member_id), alarm))
