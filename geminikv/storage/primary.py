"""Several PostgreSQL hosts, one primary: finding it, and noticing when it changes.

``--endpoint`` may name several hosts in libpq's form (``postgres://u@h1:5432,h2:5432/db``),
a primary and its standbys. Every connection geminikv opens is tried on all hosts at once
and the first one that is a writable primary wins: a host that is frozen (its processes
stopped, its connections open) costs nothing while another answers. A host that answers as
a standby (``pg_is_in_recovery()``), read-only (``transaction_read_only``) or as a primary
of an older timeline than one already seen (an old primary that came back after a
promotion, not demoted) is refused and its connection dropped.

``Primary`` remembers which host and timeline this process is on; a change is a failover:
counted, timed, and handed to the listeners (the index is checked against the new primary).
``Heartbeat`` asks the primary every ``--datastore-heartbeat-interval`` whether it is still
the primary, and when it does not answer within ``--datastore-heartbeat-timeout`` drops
every connection to it, so nothing waits on a dead server (see docs/architecture.md#failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from geminikv import metrics, tasks
from geminikv.config import HEARTBEAT_RETRY
from geminikv.storage.queries import SQL

log = logging.getLogger(__name__)


class NotPrimary(ConnectionError):
    """The host answered, but is not a primary this process may write to."""


class Host(NamedTuple):
    label: str  # host:port, as metrics and logs name it
    dsn: str  # a single-host DSN for it


class Role(NamedTuple):
    recovery: bool
    read_only: bool
    timeline: int  # 0 on a standby


def hosts(dsn: str) -> list[Host]:
    """The hosts of a DSN, each with a DSN of its own (libpq's comma-separated netloc).

    ``target_session_attrs`` is dropped: geminikv checks each host itself (it always needs
    a writable primary). A DSN naming its host in the query (a Unix socket) is one host."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "target_session_attrs"]
    parts = parts._replace(query=urlencode(query))
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    found = []
    for hostport in hostlist.split(",") if hostlist else [""]:
        single = urlunsplit(parts._replace(netloc=userinfo + at + hostport))
        label = hostport or dict(query).get("host", "") or "localhost"
        found.append(Host(label, single))
    return found


def role_acceptable(role: Role) -> str:
    """Why a host cannot be written to ("" if it can)."""
    if role.recovery:
        return "a standby (in recovery)"
    if role.read_only:
        return "read-only (transaction_read_only)"
    return ""


async def read_role(conn: asyncpg.Connection) -> Role:
    row = await conn.fetchrow(SQL["role"])
    assert row is not None
    return Role(bool(row[0]), bool(row[1]), int(row[2]))


class Standby(NamedTuple):
    name: str  # application_name@address
    sync_state: str  # sync, async, potential, quorum
    replay_lag: float | None  # seconds; None while nothing is being replayed
    lag_bytes: float | None  # WAL the primary has written and the standby not replayed


async def read_standbys(conn: asyncpg.Connection) -> list[Standby]:
    rows = await conn.fetch(SQL["standbys"])
    return [Standby(bytes(r[0]).decode(), bytes(r[1]).decode(), r[2], r[3]) for r in rows]


def set_tcp_timeouts(conn: asyncpg.Connection, seconds: float) -> None:
    """Keepalives and TCP_USER_TIMEOUT: a peer whose machine is gone (or cut off) is
    noticed after about ``seconds`` by the kernel, also when nothing is being sent."""
    if seconds <= 0:
        return
    # asyncpg does not expose the socket; the asyncio (or uvloop) transport does
    sock = conn._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, int(seconds / 2))
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(seconds) - idle))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


OnChange = Callable[[str], None]


class Primary:
    """Which host this process writes to, and the newest timeline it has seen there."""

    def __init__(self) -> None:
        self.host: str | None = None
        self.timeline = 0
        self.failovers = 0
        self.lost_at: float | None = None  # when the primary stopped answering
        self._on_change: list[OnChange] = []
        self._on_lost: list[Callable[[], None]] = []
        self.silent: set[str] = set()  # hosts whose last connection attempt timed out
        self._hosts: weakref.WeakKeyDictionary[asyncpg.Connection, str] = (
            weakref.WeakKeyDictionary()
        )

    def on_change(self, callback: OnChange) -> None:
        """``callback(host)`` after this process moved to another primary (a failover)."""
        self._on_change.append(callback)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the heartbeat finds the primary gone: drop its connections."""
        self._on_lost.append(callback)

    def host_of(self, conn: asyncpg.Connection) -> str | None:
        return self._hosts.get(conn)

    def accept(self, host: str, role: Role, conn: asyncpg.Connection) -> None:
        """``conn`` reached ``host`` as ``role``: refuse it (NotPrimary) unless it is a
        writable primary of at least the newest timeline seen; note a change of primary."""
        why = role_acceptable(role)
        if not why and role.timeline < self.timeline:
            why = (
                f"an old primary (timeline {role.timeline}, this process has seen "
                f"timeline {self.timeline} on {self.host})"
            )
            # two writable primaries: the failover manager has not fenced the old one
            log.warning("refusing PostgreSQL at %s: it is %s", host, why)
        if why:
            raise NotPrimary(f"PostgreSQL at {host} is {why}")
        self._hosts[conn] = host
        if host == self.host and role.timeline == self.timeline:
            self._reconnected()
            return
        first, previous = self.host is None, self.host
        self.host, self.timeline = host, role.timeline
        metrics.POSTGRES_PRIMARY.clear()
        metrics.POSTGRES_PRIMARY.labels(host).set(1)
        if first:
            log.info("PostgreSQL primary: %s (timeline %d)", host, role.timeline)
            return
        self.failovers += 1
        metrics.POSTGRES_FAILOVERS.inc()
        if previous is not None and previous != host:
            self.drop(previous)  # whatever still talks to the old primary
        log.warning("PostgreSQL primary is now %s (timeline %d)", host, role.timeline)
        self._reconnected()
        for callback in self._on_change:
            callback(host)

    def missing(self) -> None:
        """No host answered as a primary: the reconnect time counts from the first miss."""
        if self.lost_at is None:
            self.lost_at = time.monotonic()

    def lost(self) -> None:
        """The primary stopped answering: every connection to it is dropped (a statement
        waiting on it fails now, not after --datastore-command-timeout)."""
        self.missing()
        if self.host is not None:
            self.silent.add(self.host)  # reconnects do not wait for it (see race)
            self.drop(self.host)
        for callback in self._on_lost:
            callback()

    def drop(self, host: str) -> None:
        """Terminate every connection this process opened to ``host``."""
        for conn, where in list(self._hosts.items()):
            if where == host and not conn.is_closed():
                conn.terminate()

    def _reconnected(self) -> None:
        if self.lost_at is not None:
            seconds = time.monotonic() - self.lost_at
            self.lost_at = None
            metrics.POSTGRES_RECONNECT_SECONDS.observe(seconds)
            log.info("PostgreSQL primary %s reached again after %.2fs", self.host, seconds)


async def race(
    candidates: list[Host],
    open_host: Callable[[Host], Coroutine[Any, Any, asyncpg.Connection]],
    silent: set[str],
) -> asyncpg.Connection:
    """The first of ``candidates`` that ``open_host`` opens (it refuses non-primaries and
    closes what it refuses); the other attempts are abandoned.

    ``silent`` holds the hosts whose last attempt timed out (frozen, or cut off): once
    every other host has failed, the race fails without waiting for them, so a reconnect
    loop tries the promoted standby again soon. Their attempt goes on in the background
    and, if it gets an answer, the host is waited for again next time."""
    if len(candidates) == 1:
        return await open_host(candidates[0])
    attempts: dict[asyncio.Task[asyncpg.Connection], Host] = {
        asyncio.create_task(open_host(host)): host for host in candidates
    }
    for attempt, host in attempts.items():
        attempt.add_done_callback(functools.partial(_attempt_done, host.label, silent))
    errors: list[BaseException] = []
    pending = set(attempts)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in done:
                if attempt.exception() is None:
                    winner = attempt.result()
                    _abandon(pending)
                    return winner
                errors.append(attempt.exception())  # type: ignore[arg-type]
            if all(attempts[attempt].label in silent for attempt in pending):
                break
    except BaseException:
        _abandon(pending)
        raise
    _abandon(pending)
    # the server's own answer (a missing database) first, then a refusal, then the rest
    errors.sort(
        key=lambda err: (
            0 if isinstance(err, asyncpg.PostgresError) else 1 if isinstance(err, NotPrimary) else 2
        )
    )
    if not errors:
        raise ConnectionError("no PostgreSQL host answered")
    raise errors[0]


def _attempt_done(label: str, silent: set[str], attempt: asyncio.Task[asyncpg.Connection]) -> None:
    if attempt.cancelled():
        return
    err = attempt.exception()
    if isinstance(err, TimeoutError):
        silent.add(label)
    else:
        silent.discard(label)


def _abandon(attempts: set[asyncio.Task[asyncpg.Connection]]) -> None:
    """Let the attempts still running finish in the background; close what they open."""
    for attempt in attempts:
        attempt.add_done_callback(_close_result)


def _close_result(attempt: asyncio.Task[asyncpg.Connection]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().terminate()


def _report(standbys: list[Standby]) -> None:
    metrics.POSTGRES_STANDBY_LAG_SECONDS.clear()
    metrics.POSTGRES_STANDBY_LAG_BYTES.clear()
    for standby in standbys:
        labels = (standby.name, standby.sync_state)
        metrics.POSTGRES_STANDBY_LAG_SECONDS.labels(*labels).set(standby.replay_lag or 0.0)
        if standby.lag_bytes is not None:
            metrics.POSTGRES_STANDBY_LAG_BYTES.labels(*labels).set(standby.lag_bytes)


class Heartbeat:
    """Asks the primary every ``interval`` what it is; when it does not answer within
    ``timeout`` (or answers as a standby), ``primary.lost()`` drops every connection."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        primary: Primary,
        interval: float,
        timeout: float,
    ) -> None:
        self.connect = connect
        self.primary = primary
        self.interval = interval
        self.timeout = timeout
        self.reachable = False  # the last beat reached a primary
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval <= 0:
            self.reachable = True  # no heartbeat: nothing says otherwise
            return
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                async with asyncio.timeout(self.timeout or None):
                    await self._beat()
                self.reachable, failing = True, False
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.reachable = False
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                if not failing:  # once per loss: later connections are to a new primary
                    log.warning("heartbeat: PostgreSQL primary not answering (%r)", err)
                    failing = True
                    self.primary.lost()
                await asyncio.sleep(min(self.interval, HEARTBEAT_RETRY))

    async def _beat(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self.connect()
        role = await read_role(self._conn)
        why = role_acceptable(role)
        if why or role.timeline < self.primary.timeline:
            host = self.primary.host_of(self._conn)
            raise NotPrimary(f"PostgreSQL at {host} is no longer the primary")
        _report(await read_standbys(self._conn))
