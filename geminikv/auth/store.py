"""The auth store: etcd's server/auth/store.go rules over geminikv's auth tables.

Every process keeps the whole auth state in memory (users, roles, each user's merged
permissions, the enabled flag and the auth revision) and checks requests against it. A
change runs in one PostgreSQL transaction under the state row's lock, moves the revision
on and notifies every process, which reloads the state; a poll of the revision every
``poll_interval`` catches a notification that was lost (a dropped listening connection),
so a process can be stale for at most that long plus one query after such a loss.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import bcrypt

from geminikv import errors, tasks
from geminikv.auth.perms import Permissions, valid_permission
from geminikv.auth.tokens import AuthInfo, Tokens
from geminikv.storage import auth as storage
from geminikv.storage.auth import AuthRows, PermissionRow, UserRow

log = logging.getLogger(__name__)

ROOT = "root"  # etcd's root user and root role
_ROOT = ROOT.encode()
BCRYPT_MIN_COST, BCRYPT_MAX_COST, BCRYPT_DEFAULT_COST = 4, 31, 10  # Go's bcrypt
BCRYPT_MAX_PASSWORD = 72  # bytes; Go's bcrypt refuses longer passwords


def hash_password(password: str, cost: int) -> bytes:
    data = password.encode()
    if len(data) > BCRYPT_MAX_PASSWORD:
        raise errors.PasswordTooLong()
    return bcrypt.hashpw(data, bcrypt.gensalt(cost))


def password_matches(hashed: bytes | None, password: str) -> bool:
    data = password.encode()
    if not hashed or len(data) > BCRYPT_MAX_PASSWORD:
        return False
    try:
        return bcrypt.checkpw(data, hashed)
    except ValueError:
        return False


class AuthStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        tokens: Tokens,
        bcrypt_cost: int,
        poll_interval: float,
    ) -> None:
        self.pool = pool
        self._connect = connect
        self.tokens = tokens
        self.bcrypt_cost = (
            bcrypt_cost
            if BCRYPT_MIN_COST <= bcrypt_cost <= BCRYPT_MAX_COST
            else BCRYPT_DEFAULT_COST
        )
        self.poll_interval = poll_interval
        self.enabled = False
        self.revision = 0
        self.users: dict[bytes, UserRow] = {}
        self.roles: dict[bytes, tuple[PermissionRow, ...]] = {}
        self.perms: dict[bytes, Permissions] = {}
        self._listener = storage.Listener(self._notified)
        self._conn: asyncpg.Connection | None = None
        self._poller: asyncio.Task[None] | None = None
        self._reload_wanted = asyncio.Event()
        self._loading = asyncio.Lock()
        self._reloader: asyncio.Task[None] | None = None

    # -- the state every process shares ---------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        await self.reload()
        self._poller = asyncio.create_task(self._poll(), name="auth-poll")
        self._reloader = asyncio.create_task(self._reload_on_notice(), name="auth-reload")

    async def stop(self) -> None:
        await tasks.stop(self._poller)
        await tasks.stop(self._reloader)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def reload(self) -> None:
        # one at a time, so a load that started earlier never replaces a newer state
        async with self._loading, self.pool.acquire() as conn:
            rows = await storage.load(conn)
            if rows.revision != self.revision or rows.enabled != self.enabled:
                self._adopt(rows)

    async def refresh(self) -> None:
        """Catch up with changes made through other processes, as a linearizable read
        would (one query when nothing changed)."""
        async with self.pool.acquire() as conn:
            current = await storage.state(conn)
        if current != (self.enabled, self.revision):
            await self.reload()

    def _adopt(self, rows: AuthRows) -> None:
        self.users = {u.name: u for u in rows.users}
        self.roles = dict(rows.roles)
        self.perms = {
            u.name: Permissions(
                (p.key, p.range_end, p.perm_type)
                for role in u.roles
                for p in self.roles.get(role, ())
            )
            for u in rows.users
        }
        self.enabled = rows.enabled
        self.revision = rows.revision
        self.tokens.forget()

    def _notified(self) -> None:
        self._reload_wanted.set()

    async def _reload_on_notice(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except Exception as err:
                log.warning("auth: cannot reload the auth state yet (%s)", err)

    async def _listen(self) -> None:
        conn = await self._connect()
        await self._listener.attach(conn)
        self._conn = conn

    async def _poll(self) -> None:
        """The revision check behind the notifications, and the listening connection
        opened again after an outage; expired simple tokens go now and then."""
        turns = 0
        while True:
            await asyncio.sleep(self.poll_interval)
            turns += 1
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._listen()
                async with self.pool.acquire() as conn:
                    if await storage.state(conn) != (self.enabled, self.revision):
                        self._reload_wanted.set()
                    if turns % 60 == 0:
                        await storage.drop_expired_tokens(conn)
            except Exception as err:
                log.warning("auth: cannot check the auth revision (%s)", err)

    # -- who asks, and may they ------------------------------------------------------------

    def has_root(self, user: str) -> bool:
        found = self.users.get(user.encode())
        return found is not None and _ROOT in found.roles

    def check_op(self, info: AuthInfo | None, key: bytes, range_end: bytes, write: bool) -> None:
        """etcd's isOpPermitted: ``range_end`` empty for a single key."""
        if not self.enabled:
            return
        if info is None or info.revision == 0:
            raise errors.UserEmpty()
        if info.revision < self.revision:
            raise errors.AuthOldRevision()
        name = info.user.encode()
        user = self.users.get(name)
        if user is None:
            raise errors.PermissionDenied()
        if _ROOT in user.roles:
            return
        perms = self.perms.get(name)
        if perms is None or not perms.permits(key, range_end, write):
            raise errors.PermissionDenied()

    def check_admin(self, info: AuthInfo | None) -> None:
        """etcd's IsAdminPermitted."""
        if not self.enabled:
            return
        if info is None or not info.user:
            raise errors.UserEmpty()
        user = self.users.get(info.user.encode())
        if user is None:
            raise errors.UserNotFound()
        if _ROOT not in user.roles:
            raise errors.PermissionDenied()

    def is_admin(self, info: AuthInfo | None) -> bool:
        try:
            self.check_admin(info)
        except errors.EtcdError:
            return False
        return True

    async def info_from_token(self, token: str) -> AuthInfo:
        info = await self.tokens.info(token, self.revision)
        if info is None:
            raise errors.InvalidAuthToken()
        return info

    async def authenticate(self, name: str, password: str) -> str:
        """etcd's CheckPassword then Authenticate: a token for the user."""
        await self.refresh()  # linearizable, as etcd's Authenticate
        if not self.enabled:
            raise errors.AuthNotEnabled()
        user = self.users.get(name.encode())
        if user is None:
            raise errors.AuthFailed()
        if user.no_password:
            raise errors.NoPasswordUser()
        if not await asyncio.to_thread(password_matches, user.password, password):
            raise errors.AuthFailed()
        return await self.tokens.assign(name, self.revision)

    # -- changes (each as etcd's authStore method of the same name) -------------------------

    async def _commit(
        self,
        ch: storage.Change,
        enabled: bool | None = None,
        bump: bool = True,
    ) -> None:
        rows = ch.rows
        revision = rows.revision + 1 if bump else rows.revision
        await ch.set_state(rows.enabled if enabled is None else enabled, revision)

    async def auth_enable(self) -> None:
        async with storage.change(self.pool) as ch:
            if ch.rows.enabled:
                return
            root = _user(ch.rows, _ROOT)
            if root is None:
                raise errors.RootUserNotExist()
            if _ROOT not in root.roles:
                raise errors.RootRoleNotExist()
            await ch.drop_tokens(None)
            await self._commit(ch, enabled=True, bump=False)
        await self.reload()

    async def auth_disable(self) -> None:
        async with storage.change(self.pool) as ch:
            if not ch.rows.enabled:
                return
            await ch.drop_tokens(None)
            await self._commit(ch, enabled=False)
        await self.reload()

    async def user_add(self, name: str, password: str, no_password: bool) -> None:
        hashed = None
        if not no_password:
            hashed = await asyncio.to_thread(hash_password, password, self.bcrypt_cost)
        if not name:
            raise errors.UserEmpty()
        async with storage.change(self.pool) as ch:
            if _user(ch.rows, name.encode()) is not None:
                raise errors.UserAlreadyExist()
            await ch.put_user(UserRow(name.encode(), hashed, no_password, ()))
            await self._commit(ch)
        await self.reload()

    async def user_delete(self, name: str) -> None:
        async with storage.change(self.pool) as ch:
            if ch.rows.enabled and name == ROOT:
                raise errors.InvalidAuthMgmt()
            if _user(ch.rows, name.encode()) is None:
                raise errors.UserNotFound()
            await ch.delete_user(name.encode())
            await ch.drop_tokens([name.encode()])
            await self._commit(ch)
        await self.reload()

    async def user_change_password(self, name: str, password: str, hashed_b64: str) -> None:
        hashed = None
        if password:
            hashed = await asyncio.to_thread(hash_password, password, self.bcrypt_cost)
        async with storage.change(self.pool) as ch:
            user = _user(ch.rows, name.encode())
            if user is None:
                raise errors.UserNotFound()
            if not user.no_password and hashed is None:
                try:
                    hashed = base64.b64decode(hashed_b64, validate=True)
                except binascii.Error:
                    raise errors.NoPasswordUser() from None
            new = UserRow(
                user.name, None if user.no_password else hashed, user.no_password, user.roles
            )
            await ch.put_user(new)
            await ch.drop_tokens([user.name])
            await self._commit(ch)
        await self.reload()

    async def user_grant_role(self, name: str, role: str) -> None:
        async with storage.change(self.pool) as ch:
            user = _user(ch.rows, name.encode())
            if user is None:
                raise errors.UserNotFound()
            if role != ROOT and role.encode() not in ch.rows.roles:
                raise errors.RoleNotFound()
            if role.encode() in user.roles:
                return  # etcd ignores it, and the revision stays
            roles = tuple(sorted((*user.roles, role.encode())))
            await ch.put_user(UserRow(user.name, user.password, user.no_password, roles))
            await self._commit(ch)
        await self.reload()

    async def user_revoke_role(self, name: str, role: str) -> None:
        async with storage.change(self.pool) as ch:
            if ch.rows.enabled and name == ROOT and role == ROOT:
                raise errors.InvalidAuthMgmt()
            user = _user(ch.rows, name.encode())
            if user is None:
                raise errors.UserNotFound()
            roles = tuple(r for r in user.roles if r != role.encode())
            if len(roles) == len(user.roles):
                raise errors.RoleNotGranted()
            await ch.put_user(UserRow(user.name, user.password, user.no_password, roles))
            await self._commit(ch)
        await self.reload()

    def user_get(self, name: str) -> list[str]:
        user = self.users.get(name.encode())
        if user is None:
            raise errors.UserNotFound()
        return [r.decode() for r in user.roles]

    def user_list(self) -> list[str]:
        return [name.decode() for name in sorted(self.users)]

    async def role_add(self, name: str) -> None:
        if not name:
            raise errors.RoleEmpty()
        async with storage.change(self.pool) as ch:
            if name.encode() in ch.rows.roles:
                raise errors.RoleAlreadyExist()
            await ch.put_role(name.encode(), ())
            await self._commit(ch)
        await self.reload()

    async def role_delete(self, name: str) -> None:
        role = name.encode()
        async with storage.change(self.pool) as ch:
            if ch.rows.enabled and name == ROOT:
                raise errors.InvalidAuthMgmt()
            if role not in ch.rows.roles:
                raise errors.RoleNotFound()
            await ch.delete_role(role)
            for user in ch.rows.users:
                if role in user.roles:
                    roles = tuple(r for r in user.roles if r != role)
                    await ch.put_user(UserRow(user.name, user.password, user.no_password, roles))
            await self._commit(ch)
        await self.reload()

    def role_get(self, name: str) -> tuple[PermissionRow, ...]:
        perms = self.roles.get(name.encode())
        if perms is None:
            raise errors.RoleNotFound()
        return perms

    def role_list(self) -> list[str]:
        return [name.decode() for name in sorted(self.roles)]

    async def role_grant_permission(
        self, name: str, key: bytes, range_end: bytes, perm_type: int
    ) -> None:
        if not valid_permission(key, range_end):
            raise errors.InvalidAuthMgmt()
        async with storage.change(self.pool) as ch:
            perms = ch.rows.roles.get(name.encode())
            if perms is None:
                raise errors.RoleNotFound()
            kept = [p for p in perms if (p.key, p.range_end) != (key, range_end)]
            kept.append(PermissionRow(key, range_end, perm_type))
            kept.sort(key=lambda p: p.key)
            await ch.put_role(name.encode(), kept)
            await self._commit(ch)
        await self.reload()

    async def role_revoke_permission(self, name: str, key: bytes, range_end: bytes) -> None:
        async with storage.change(self.pool) as ch:
            perms = ch.rows.roles.get(name.encode())
            if perms is None:
                raise errors.RoleNotFound()
            kept = [p for p in perms if (p.key, p.range_end) != (key, range_end)]
            if len(kept) == len(perms):
                raise errors.PermissionNotGranted()
            await ch.put_role(name.encode(), kept)
            await self._commit(ch)
        await self.reload()


def _user(rows: AuthRows, name: bytes) -> UserRow | None:
    return next((u for u in rows.users if u.name == name), None)
