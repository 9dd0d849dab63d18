"""Notifications between geminikv processes (PostgreSQL NOTIFY on one channel): every
payload is encoded and parsed here.

Payloads: a committed revision (``"123"``: rows up to it are in the table; sent by the
writer, and by ``geminikv_write_v3`` in ``schema.py`` as ``id::text``); ``"compact"`` (a
logical compaction set Kine's compact revision); ``"compacted:123"`` (the leader deleted
the rows a compaction at 123 made unreachable); ``"alarms"`` (an alarm was raised or
cleared).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import asyncpg

from geminikv.storage.queries import NOTIFY_CHANNEL, SQL

_COMPACT = "compact"
_COMPACTED = "compacted:"
_ALARMS = "alarms"


class Kind(enum.Enum):
    COMMITTED = "committed"
    COMPACT = "compact"
    COMPACTED = "compacted"
    ALARMS = "alarms"


class Notice(NamedTuple):
    kind: Kind
    # COMMITTED: the newest revision committed, None if the payload did not say;
    # COMPACTED: the compaction revision; COMPACT, ALARMS: 0
    revision: int | None


def parse(payload: str) -> Notice:
    if payload.startswith(_COMPACTED):
        return Notice(Kind.COMPACTED, int(payload[len(_COMPACTED) :]))
    if payload == _COMPACT:
        return Notice(Kind.COMPACT, 0)
    if payload == _ALARMS:
        return Notice(Kind.ALARMS, 0)
    try:
        return Notice(Kind.COMMITTED, int(payload))
    except ValueError:
        return Notice(Kind.COMMITTED, None)


async def committed(conn: asyncpg.Connection, rev: int) -> None:
    """Rows up to ``rev`` are committed (sent inside the writing transaction)."""
    await conn.execute(SQL["notify"], b"%d" % rev)


async def compact(conn: asyncpg.Connection) -> None:
    """Kine's compact revision was raised."""
    await conn.execute(SQL["notify"], _COMPACT.encode())


async def compacted(conn: asyncpg.Connection, rev: int) -> None:
    """The rows a compaction at ``rev`` made unreachable are deleted."""
    await conn.execute(SQL["notify"], b"%s%d" % (_COMPACTED.encode(), rev))


async def alarms(conn: asyncpg.Connection) -> None:
    """An alarm was raised or cleared."""
    await conn.execute(SQL["notify"], _ALARMS.encode())


OnNotice = Callable[[int, Notice], None]


class Receiver:
    """Hands every notification on geminikv's channel, parsed, to ``on_notice(pid,
    notice)``, where ``pid`` is the backend pid of the session that sent it."""

    def __init__(self, on_notice: OnNotice) -> None:
        self._on_notice = on_notice

    async def attach(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener(NOTIFY_CHANNEL, self._received)

    async def detach(self, conn: asyncpg.Connection) -> None:
        await conn.remove_listener(NOTIFY_CHANNEL, self._received)

    def _received(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        self._on_notice(pid, parse(payload))
