"""A connection of one's own (the writer's): kept open, replaced after an outage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg


class Session:
    def __init__(
        self,
        conn: asyncpg.Connection,
        reconnect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        self.conn = conn
        self._reconnect = reconnect

    def pid(self) -> int | None:
        """The backend pid (how PostgreSQL names the sender of a notification)."""
        return None if self.conn.is_closed() else int(self.conn.get_server_pid())

    def unusable(self) -> bool:
        """Closed, or still inside a transaction after a failure (its ROLLBACK failed too)."""
        return bool(self.conn.is_closed() or self.conn.is_in_transaction())

    @property
    def can_reconnect(self) -> bool:
        return self._reconnect is not None

    async def reconnect(self) -> None:
        """One attempt to replace the connection (raises if PostgreSQL is still away)."""
        assert self._reconnect is not None
        self.conn = await self._reconnect()

    async def close(self) -> None:
        await self.conn.close()
