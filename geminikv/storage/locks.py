"""The advisory locks geminikv processes coordinate with.

The writer lock is transaction-scoped: ``locked`` is the one way to write under it.
The leader lock is session-scoped: held as long as the connection that took it lives.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from geminikv.storage.queries import LEADER_LOCK_KEY, SQL


@contextlib.asynccontextmanager
async def locked(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A transaction holding the cluster-wide writer lock (ids drawn and committed under
    it commit in id order). Committed when the block ends, rolled back if it raises."""
    # BEGIN and the lock in one round trip (simple protocol: two statements in one)
    await conn.execute(SQL["begin_locked"])
    try:
        yield conn
        await conn.execute(SQL["commit"])
    except BaseException:
        # the error that got us here is the one to report (a lost connection fails both)
        with contextlib.suppress(Exception):
            await conn.execute(SQL["rollback"])
        raise


async def try_leader_lock(conn: asyncpg.Connection) -> bool:
    """Take the leader's session lock if free; True if this session holds it now."""
    return bool(await conn.fetchval(SQL["try_leader_lock"], LEADER_LOCK_KEY))


async def ping(conn: asyncpg.Connection) -> None:
    """One round trip: fails if the session (and any session lock it holds) is gone."""
    await conn.fetchval(SQL["ping"])
