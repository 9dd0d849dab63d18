"""The NOTIFY listener: one connection of its own, listening on geminikv's channel.

Other processes' writers notify after each commit; compactions notify too
(``storage/notify.py``). After an outage the connection is gone and is opened again.
The connection is otherwise idle, so the read index runs its query on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from geminikv.storage import notify

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        pool: asyncpg.Pool,
        on_notice: notify.OnNotice,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        self.pool = pool
        # LISTEN needs a connection of its own; without a factory it comes from the pool.
        self._connect = connect
        self._receiver = notify.Receiver(on_notice)
        self.conn: asyncpg.Connection | None = None

    @property
    def listening(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def start(self) -> None:
        conn = await self._open()
        await self._receiver.attach(conn)
        self.conn = conn

    async def stop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._receiver.detach(conn)
                await self._close(conn)

    async def pause(self) -> None:
        """Stop hearing notifications, keeping the connection (the poll and reads go
        on): how a test makes a process fall behind."""
        if self.conn is not None:
            await self._receiver.detach(self.conn)

    def broken(self) -> None:
        """A query on the connection failed midway (e.g. asyncpg's "another operation is
        in progress" after an outage): drop it, ``listen_again`` opens a new one."""
        if self.conn is not None:
            self.conn.terminate()

    async def listen_again(self) -> None:
        """After an outage the connection is gone: open a new one (logs if it cannot)."""
        conn = self.conn
        if conn is not None and not conn.is_closed():
            return
        self.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._close(conn)
        try:
            fresh = await self._open()
            await self._receiver.attach(fresh)
        except Exception as err:
            log.warning("follower: cannot listen yet (%s)", err)
            return
        self.conn = fresh
        log.info("follower listening again")

    async def _open(self) -> asyncpg.Connection:
        if self._connect is not None:
            return await self._connect()
        return await self.pool.acquire()

    async def _close(self, conn: asyncpg.Connection) -> None:
        if self._connect is not None:
            await conn.close()
        else:
            await self.pool.release(conn)
