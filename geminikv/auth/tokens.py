"""Auth tokens as etcd issues them (``--auth-token``): ``simple`` (16 random letters, a dot
and an index; server/auth/simple_token.go) and ``jwt`` (server/auth/jwt.go).

etcd's simple tokens live in every member's memory, replicated by raft; here they live in
PostgreSQL (storage/auth.py), so a token one geminikv process issued works on all of them.
Each process remembers the tokens it has checked for half their TTL, so a request pays a
round trip only then; a token dies ``ttl`` after its last use, as in etcd.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import asyncpg
import jwt

from geminikv import errors
from geminikv.config import auth_token_options, parse_duration
from geminikv.storage import auth as storage

SIMPLE_TOKEN_LETTERS = string.ascii_letters
SIMPLE_TOKEN_LENGTH = 16
SIMPLE_TOKENS_REMEMBERED = 1024  # past this, a login drops the ones no longer trusted
JWT_DEFAULT_TTL = 300.0  # etcd's jwt DefaultTTL (5m)
# sign methods golang-jwt knows, and the kind of key each takes
_JWT_METHODS = {
    **{f"RS{n}": "rsa" for n in (256, 384, 512)},
    **{f"PS{n}": "rsa" for n in (256, 384, 512)},
    **{f"ES{n}": "ec" for n in (256, 384, 512)},
    **{f"HS{n}": "hmac" for n in (256, 384, 512)},
}


class AuthInfo(NamedTuple):
    """Who a request comes from, and the auth revision its credentials were checked at
    (etcd's AuthInfo)."""

    user: str
    revision: int


class InvalidAuthOptions(ValueError):
    """etcd's ErrInvalidAuthOpts: --auth-token does not parse."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"auth: invalid auth options ({detail})")


class Tokens(Protocol):
    async def assign(self, user: str, revision: int) -> str: ...

    async def info(self, token: str, revision: int) -> AuthInfo | None:
        """Who ``token`` stands for; None if it is not a valid token."""

    def forget(self) -> None:
        """Auth changed: tokens remembered may have been revoked."""


class SimpleTokens:
    def __init__(self, pool: asyncpg.Pool, ttl: float) -> None:
        self.pool = pool
        self.ttl_ms = int(ttl * 1000)
        self.ttl = ttl
        self._known: dict[str, tuple[str, float]] = {}  # token -> (user, trusted until)

    async def assign(self, user: str, revision: int) -> str:
        prefix = "".join(secrets.choice(SIMPLE_TOKEN_LETTERS) for _ in range(SIMPLE_TOKEN_LENGTH))
        async with self.pool.acquire() as conn:
            index = await storage.add_token(conn, prefix, user.encode(), self.ttl_ms)
        token = f"{prefix}.{index}"
        self._remember(token, user, time.monotonic())
        return token

    async def info(self, token: str, revision: int) -> AuthInfo | None:
        now = time.monotonic()
        known = self._known.get(token)
        if known is not None and known[1] > now:
            return AuthInfo(known[0], revision)
        prefix, dot, index = token.partition(".")
        if not dot or not index.isdigit() or int(index) >= 2**63:
            return None
        async with self.pool.acquire() as conn:
            found = await storage.use_token(conn, int(index), self.ttl_ms)
        if found is None or found[0] != prefix:
            self._known.pop(token, None)
            return None
        user = found[1].decode()
        self._remember(token, user, now)
        return AuthInfo(user, revision)

    def forget(self) -> None:
        self._known.clear()

    def _remember(self, token: str, user: str, now: float) -> None:
        if len(self._known) >= SIMPLE_TOKENS_REMEMBERED:
            # etcdctl --user logs in at every command: forget what is no longer trusted
            self._known = {t: known for t, known in self._known.items() if known[1] > now}
        self._known[token] = (user, now + self.ttl / 2)


class JwtTokens:
    """Signed tokens carrying the user, the auth revision and an expiry: any process with
    the key checks them without asking PostgreSQL."""

    def __init__(self, method: str, sign_key: Any, verify_key: Any, ttl: float) -> None:
        self.method = method
        self.sign_key = sign_key  # None: verify only (a public key alone)
        self.verify_key = verify_key
        self.ttl = ttl

    async def assign(self, user: str, revision: int) -> str:
        if self.sign_key is None:
            raise errors.VerifyOnly()
        claims = {"username": user, "revision": revision, "exp": int(time.time() + self.ttl)}
        return jwt.encode(claims, self.sign_key, algorithm=self.method)

    async def info(self, token: str, revision: int) -> AuthInfo | None:
        try:
            claims = jwt.decode(token, self.verify_key, algorithms=[self.method])
        except jwt.PyJWTError:
            return None
        user, rev = claims.get("username"), claims.get("revision")
        if not isinstance(user, str) or not isinstance(rev, int | float):
            return None
        return AuthInfo(user, int(rev))

    def forget(self) -> None:
        pass


def make_tokens(text: str, simple_ttl: float) -> Callable[[asyncpg.Pool], Tokens]:
    """The token provider --auth-token names, given the pool (``simple`` tokens live
    ``simple_ttl``); JWT keys are read now, so a bad one stops geminikv before it starts."""
    kind, options = auth_token_options(text)
    if kind == "simple":
        return lambda pool: SimpleTokens(pool, simple_ttl)
    tokens = _jwt(options)
    return lambda _pool: tokens


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise InvalidAuthOptions(f"cannot read {path}: {err.strerror}") from None


def _jwt(options: dict[str, str]) -> JwtTokens:
    from cryptography.hazmat.primitives import serialization

    method = options.get("sign-method", "")
    kind = _JWT_METHODS.get(method)
    if kind is None:
        raise InvalidAuthOptions(f"unknown sign-method {method!r}")
    ttl = parse_duration(options["ttl"]) if options.get("ttl") else JWT_DEFAULT_TTL
    private = _read(options["priv-key"]) if options.get("priv-key") else None
    public = _read(options["pub-key"]) if options.get("pub-key") else None
    if kind == "hmac":
        if private is None:
            raise InvalidAuthOptions("auth: missing key data")
        return JwtTokens(method, private, private, ttl)
    sign_key: Any = None
    verify_key: Any = None
    if private is not None:
        sign_key = serialization.load_pem_private_key(private, password=None)
        verify_key = sign_key.public_key()
    if public is not None:
        verify_key = serialization.load_pem_public_key(public)
    if verify_key is None:
        raise InvalidAuthOptions("auth: missing key data")
    return JwtTokens(method, sign_key, verify_key, ttl)
