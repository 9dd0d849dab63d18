"""Connecting to PostgreSQL: the DSN, creating the database, waiting for the server."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from geminikv.storage import primary as primaries
from geminikv.storage.primary import Host, Primary
from geminikv.storage.sqlstats import SqlObserver

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "kubernetes"


class DatabaseUnreachable(RuntimeError):
    """PostgreSQL could not be reached at start-up (reported without a traceback)."""


def normalise_dsn(dsn: str) -> tuple[str, str]:
    """(dsn, database name): Kine's rules, an empty path means /kubernetes, lower-cased.
    Several hosts (``postgres://u@h1:5432,h2:5432/db``) pass through unchanged."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"unsupported endpoint {dsn!r}: expected postgres://…")
    database = parts.path.lstrip("/").lower() or DEFAULT_DATABASE
    return urlunsplit(parts._replace(path="/" + database)), database


def redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


def client_tls(
    ca_file: str = "", cert_file: str = "", key_file: str = "", skip_verify: bool = False
) -> ssl.SSLContext | None:
    """Kine's backend TLS flags as an SSL context; None leaves TLS to the DSN's sslmode."""
    if not (ca_file or cert_file or key_file or skip_verify):
        return None
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Timeouts:
    """How long a connection attempt, a statement and an unanswered TCP peer may take
    before geminikv gives up on that host (0 = no limit)."""

    connect: float = 0.0
    command: float = 0.0
    tcp: float = 0.0


@dataclass(frozen=True)
class Backend:
    """How to reach PostgreSQL: the DSN (one host or several), TLS, the observer timing
    every statement, the timeouts, and which host is the primary (``storage/primary.py``)."""

    dsn: str
    database: str
    tls: ssl.SSLContext | None = None
    observer: SqlObserver = field(default_factory=SqlObserver)
    timeouts: Timeouts = field(default_factory=Timeouts)
    primary: Primary = field(default_factory=Primary)
    hosts: tuple[Host, ...] = ()

    @classmethod
    def create(
        cls,
        dsn: str,
        tls: ssl.SSLContext | None = None,
        observer: SqlObserver | None = None,
        timeouts: Timeouts | None = None,
    ) -> Backend:
        dsn, database = normalise_dsn(dsn)
        hosts = tuple(primaries.hosts(dsn))
        return cls(
            dsn, database, tls, observer or SqlObserver(), timeouts or Timeouts(), Primary(), hosts
        )

    async def init_connection(self, conn: asyncpg.Connection) -> None:
        """Keys travel as bytes: decode text/varchar as raw UTF-8 without a Python str."""
        for typename in ("text", "varchar"):
            await conn.set_type_codec(
                typename,
                schema="pg_catalog",
                encoder=_identity,
                decoder=_identity,
                format="binary",
            )
        conn.add_query_logger(self.observer)

    async def open_primary(self, timeout: float = 60.0) -> asyncpg.Connection:
        """A connection to the primary: every host tried at once, each within the connect
        timeout (and ``timeout``); standbys and old primaries refused."""
        if self.timeouts.connect:
            timeout = min(timeout, self.timeouts.connect)
        try:
            return await primaries.race(
                list(self.hosts or primaries.hosts(self.dsn)),
                lambda host: self._open_host(host, timeout),
                self.primary.silent,
            )
        except Exception:
            self.primary.missing()
            raise

    async def _open_host(self, host: Host, timeout: float) -> asyncpg.Connection:
        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.tls is not None:
            kwargs["ssl"] = self.tls
        if self.timeouts.command:
            kwargs["command_timeout"] = self.timeouts.command
        conn = await asyncpg.connect(host.dsn, **kwargs)
        try:
            primaries.set_tcp_timeouts(conn, self.timeouts.tcp)
            async with asyncio.timeout(timeout):
                role = await primaries.read_role(conn)
            self.primary.accept(host.label, role, conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _open(self, timeout: float = 60.0) -> asyncpg.Connection:
        conn = await self.open_primary(timeout)
        await self.init_connection(conn)
        return conn


def _identity(value: Any) -> Any:
    return value


async def connect(backend: Backend, timeout: float = 300.0) -> asyncpg.Connection:
    """Connect, creating the database if missing; retry (logging) until ``timeout``."""
    deadline = time.monotonic() + timeout
    logged = False
    where = redact(backend.dsn)
    while True:
        try:
            return await backend._open()
        except asyncpg.InvalidCatalogNameError:
            await _create_database(backend)
            continue
        except ssl.SSLError as err:  # a certificate problem does not go away by retrying
            raise DatabaseUnreachable(f"TLS to PostgreSQL at {where} failed: {err}") from None
        except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as err:
            if time.monotonic() >= deadline:
                raise DatabaseUnreachable(
                    f"cannot connect to PostgreSQL at {where}: {err}"
                ) from None
            if not logged:
                log.info("waiting for PostgreSQL at %s (%s)", where, err)
                logged = True
            await asyncio.sleep(1.0)
        except asyncpg.PostgresError as err:
            raise DatabaseUnreachable(f"PostgreSQL at {where} refused: {err}") from None


async def connect_once(backend: Backend) -> asyncpg.Connection:
    """One attempt (for reconnecting after an outage: the caller retries with backoff)."""
    return await backend._open(timeout=5)


async def _pool_connect(backend: Backend, *_args: Any, **_kwargs: Any) -> asyncpg.Connection:
    """The pool's connections: to the primary, as every other (the pool calls init)."""
    return await backend.open_primary(timeout=5)


# What a lost or restarting PostgreSQL raises (reported to clients as Unavailable);
# NotPrimary, a host that is not (or no longer) the primary, is a ConnectionError.
CONNECTION_ERRORS = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    # a connection an outage broke mid-operation can be left in a state asyncpg refuses
    # to use ("cannot switch to state 12; another operation (2) is in progress")
    asyncpg.InternalClientError,
)


async def create_pool(backend: Backend, size: int, max_idle_time: float) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        backend.dsn,
        connect=functools.partial(_pool_connect, backend),
        min_size=0,  # no floor to restore (and log) while PostgreSQL is away
        max_size=max(1, size),
        max_inactive_connection_lifetime=max_idle_time,
        init=backend.init_connection,
        reset=_keep_session,
        statement_cache_size=256,
    )
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's RESET ALL round trip: geminikv leaves no session
    state behind (advisory locks are transaction-scoped; LISTEN uses its own connection)."""


async def _create_database(backend: Backend) -> None:
    # on the primary, found as every other connection is (a standby cannot create it, and
    # a frozen first host must not hold the start-up)
    admin = urlunsplit(urlsplit(backend.dsn)._replace(path="/postgres"))
    conn = await Backend.create(admin, backend.tls, timeouts=backend.timeouts).open_primary()
    try:
        log.info("creating database %r", backend.database)
        await conn.execute(f'CREATE DATABASE "{backend.database}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # another process created it first (a concurrent CREATE DATABASE fails on the
        # catalog's unique index, not as a duplicate): two nodes starting at once
        pass
    finally:
        await conn.close()
