"""etcd's member list: every geminikv process serving the database is a member.

Each process announces itself in ``geminikv_member`` every second (the app's health
task) and removes its row when it stops; one not seen for ``MEMBER_SEEN_WITHIN_MS`` (it
was killed) is no longer listed. So ``etcdctl --cluster`` and clients that sync their
endpoints find every process.
"""

from __future__ import annotations

import asyncpg

from geminikv.config import MEMBER_SEEN_WITHIN_MS
from geminikv.storage import members as table
from geminikv.storage.members import Member


class Members:
    def __init__(self, pool: asyncpg.Pool, me: Member) -> None:
        self.pool = pool
        self.me = me

    async def announce(self) -> None:
        async with self.pool.acquire() as conn:
            await table.announce(conn, self.me)

    async def withdraw(self) -> None:
        async with self.pool.acquire() as conn:
            await table.withdraw(conn, self.me[0])

    async def list(self) -> list[Member]:
        """The live members, this process always among them."""
        async with self.pool.acquire() as conn:
            seen = await table.live(conn, MEMBER_SEEN_WITHIN_MS)
        others = [m for m in seen if m[0] != self.me[0]]
        return sorted([self.me, *others])

    async def ids(self) -> set[int]:
        return {m[0] for m in await self.list()}
