"""Every geminikv process serving the database, in ``geminikv_member``: etcd's member list."""

from __future__ import annotations

import asyncpg

from geminikv.storage.queries import SQL

Member = tuple[int, str, list[str]]  # (member id, name, client URLs)


async def announce(conn: asyncpg.Connection, member: Member) -> None:
    """This process serves the database (refreshed every second)."""
    member_id, name, client_urls = member
    # text travels as bytes on geminikv's connections (database.py); arrays of it do not
    await conn.execute(SQL["member_announce"], member_id, name.encode(), client_urls)


async def withdraw(conn: asyncpg.Connection, member_id: int) -> None:
    await conn.execute(SQL["member_withdraw"], member_id)


async def live(conn: asyncpg.Connection, within_ms: int) -> list[Member]:
    """The processes seen within the last ``within_ms`` milliseconds."""
    rows = await conn.fetch(SQL["members_live"], within_ms)
    return [(int(r[0]), bytes(r[1]).decode(), [str(u) for u in r[2]]) for r in rows]
