"""geminikv's auth tables (``geminikv_auth*``, schema.py): one typed function per statement.

Every change runs in one transaction holding the state row's lock (``change``), so changes
from all processes are serialised and each one moves the auth revision on and notifies
``AUTH_NOTIFY_CHANNEL`` with it. Names are bytes, as etcd keys its auth buckets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from geminikv.storage.queries import AUTH_NOTIFY_CHANNEL, SQL


@dataclass(frozen=True, slots=True)
class UserRow:
    name: bytes
    password: bytes | None  # the bcrypt hash; None for a no-password user
    no_password: bool
    roles: tuple[bytes, ...]  # sorted


@dataclass(frozen=True, slots=True)
class PermissionRow:
    key: bytes
    range_end: bytes
    perm_type: int  # authpb.Permission.Type: READ 0, WRITE 1, READWRITE 2


@dataclass(frozen=True, slots=True)
class AuthRows:
    enabled: bool
    revision: int
    users: tuple[UserRow, ...]
    roles: dict[bytes, tuple[PermissionRow, ...]]  # role name -> its permissions, sorted


async def load(conn: asyncpg.Connection) -> AuthRows:
    """The whole auth state, consistent (one snapshot)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _load(conn, SQL["auth_state"])


async def _load(conn: asyncpg.Connection, state_query: str) -> AuthRows:
    state = await conn.fetchrow(state_query)
    users = tuple(
        UserRow(bytes(r[0]), None if r[1] is None else bytes(r[1]), r[2], tuple(r[3]))
        for r in await conn.fetch(SQL["auth_users"])
    )
    roles: dict[bytes, list[PermissionRow]] = {
        r[0]: [] for r in await conn.fetch(SQL["auth_roles"])
    }
    for r in await conn.fetch(SQL["auth_permissions"]):
        roles[r[0]].append(PermissionRow(r[1], r[2], r[3]))
    return AuthRows(
        state[0], state[1], users, {name: tuple(perms) for name, perms in roles.items()}
    )


async def state(conn: asyncpg.Connection) -> tuple[bool, int]:
    """(enabled, revision): AuthEnable changes the first alone, as etcd's leaves the
    revision as it is."""
    row = await conn.fetchrow(SQL["auth_state"])
    return bool(row[0]), int(row[1])


class Change:
    """One auth change inside the locked transaction: ``rows`` as it stands, then writes."""

    def __init__(self, conn: asyncpg.Connection, rows: AuthRows) -> None:
        self.conn = conn
        self.rows = rows

    async def put_user(self, user: UserRow) -> None:
        await self.conn.execute(
            SQL["auth_put_user"], user.name, user.password, user.no_password, list(user.roles)
        )

    async def delete_user(self, name: bytes) -> None:
        await self.conn.execute(SQL["auth_delete_user"], name)

    async def put_role(self, name: bytes, permissions: Sequence[PermissionRow]) -> None:
        await self.conn.execute(SQL["auth_put_role"], name)
        await self.conn.execute(SQL["auth_clear_permissions"], name)
        if permissions:
            await self.conn.execute(
                SQL["auth_put_permissions"],
                name,
                [p.key for p in permissions],
                [p.range_end for p in permissions],
                [p.perm_type for p in permissions],
            )

    async def delete_role(self, name: bytes) -> None:
        await self.conn.execute(SQL["auth_delete_role"], name)

    async def drop_tokens(self, users: Sequence[bytes] | None) -> None:
        """Simple tokens of ``users`` stop working; of everybody if None."""
        if users is None:
            await self.conn.execute(SQL["auth_tokens_drop_all"])
        elif users:
            await self.conn.execute(SQL["auth_tokens_drop_users"], list(users))

    async def set_state(self, enabled: bool, revision: int) -> None:
        """The enabled flag and the auth revision; every process is told at commit."""
        await self.conn.execute(SQL["auth_set_state"], enabled, revision)
        await self.conn.execute(SQL["auth_notify"], b"%d" % revision)


@contextlib.asynccontextmanager
async def change(pool: asyncpg.Pool) -> AsyncIterator[Change]:
    """A transaction holding the auth state's row lock, with the state as it is now."""
    async with pool.acquire() as conn, conn.transaction():
        yield Change(conn, await _load(conn, SQL["auth_state_for_update"]))


async def add_token(conn: asyncpg.Connection, prefix: str, user: bytes, ttl_ms: int) -> int:
    """A simple token for ``user`` living ``ttl_ms``; its index (the part after the dot)."""
    return int(await conn.fetchval(SQL["auth_token_add"], prefix.encode(), user, ttl_ms))


async def use_token(conn: asyncpg.Connection, index: int, ttl_ms: int) -> tuple[str, bytes] | None:
    """(prefix, user) of the live token ``index``, whose life starts again (etcd resets a
    simple token's TTL on every use); None if there is none."""
    row = await conn.fetchrow(SQL["auth_token_use"], index, ttl_ms)
    return None if row is None else (bytes(row[0]).decode(), bytes(row[1]))


async def drop_expired_tokens(conn: asyncpg.Connection) -> None:
    await conn.execute(SQL["auth_tokens_drop_expired"])


class Listener:
    """Calls ``on_change`` at every change notification."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    async def attach(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener(AUTH_NOTIFY_CHANNEL, self._received)

    def _received(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._on_change()
