"""Connecting to PostgreSQL: the DSN, creating the database, waiting for the server."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "kubernetes"


class DatabaseUnreachable(RuntimeError):
    """PostgreSQL could not be reached at start-up (reported without a traceback)."""


def normalise_dsn(dsn: str) -> tuple[str, str]:
    """(dsn, database name): Kine's rules, an empty path means /kubernetes, lower-cased."""
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


async def init_connection(conn: asyncpg.Connection) -> None:
    """Keys travel as bytes: decode text/varchar as raw UTF-8 without a Python str."""
    for typename in ("text", "varchar"):
        await conn.set_type_codec(
            typename,
            schema="pg_catalog",
            encoder=_identity,
            decoder=_identity,
            format="binary",
        )


def _identity(value: Any) -> Any:
    return value


async def connect(dsn: str, timeout: float = 300.0) -> asyncpg.Connection:
    """Connect, creating the database if missing; retry (logging) until ``timeout``."""
    dsn, database = normalise_dsn(dsn)
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        try:
            conn = await asyncpg.connect(dsn)
            await init_connection(conn)
            return conn
        except asyncpg.InvalidCatalogNameError:
            await _create_database(dsn, database)
            continue
        except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as err:
            if time.monotonic() >= deadline:
                raise DatabaseUnreachable(
                    f"cannot connect to PostgreSQL at {redact(dsn)}: {err}"
                ) from None
            if not logged:
                log.info("waiting for PostgreSQL at %s (%s)", redact(dsn), err)
                logged = True
            await asyncio.sleep(1.0)
        except asyncpg.PostgresError as err:
            raise DatabaseUnreachable(f"PostgreSQL at {redact(dsn)} refused: {err}") from None


async def connect_once(dsn: str) -> asyncpg.Connection:
    """One attempt (for reconnecting after an outage: the caller retries with backoff)."""
    dsn, _ = normalise_dsn(dsn)
    conn = await asyncpg.connect(dsn, timeout=5)
    await init_connection(conn)
    return conn


# What a lost or restarting PostgreSQL raises (reported to clients as Unavailable).
CONNECTION_ERRORS = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    dsn, _ = normalise_dsn(dsn)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max(1, size),
        init=init_connection,
        reset=_keep_session,
        statement_cache_size=256,
    )
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's RESET ALL round trip: geminikv leaves no session
    state behind (advisory locks are transaction-scoped; LISTEN uses its own connection)."""


async def _create_database(dsn: str, database: str) -> None:
    admin = urlunsplit(urlsplit(dsn)._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        log.info("creating database %r", database)
        await conn.execute(f'CREATE DATABASE "{database}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await conn.close()
