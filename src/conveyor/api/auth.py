"""Who is calling: `Authorization: Bearer <token>`, checked against the stored hashes.

Every endpoint but the health checks needs a token whose role allows it (read < submit <
admin), unless `[api] read_open = true`, which lets reading go without one. A token that
is sent is always checked, even where none is needed: a wrong token is never ignored.

A valid token, once checked, is trusted for `[api] token_cache` seconds (default 2)
without asking the database again: most calls then cost no database round trip for
authentication, and a revoked token stops working within those seconds. Unknown and
revoked tokens are never cached: they are looked up every time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from conveyor.api.problems import Problem
from conveyor.app import Conveyor
from conveyor.tokens import Role, Token, hash_secret, plausible

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A token from `conveyor token create --name N --role read|submit|admin`.",
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="conveyor"'}


@dataclass(frozen=True)
class Caller:
    name: str  # the token's name; the submitter of what it submits
    role: Role
    token_id: int | None = None  # None: nobody in particular (reading while read_open)


ANONYMOUS = Caller("anonymous", Role.READ)


def conveyor_of(request: Request) -> Conveyor:
    app: Conveyor = request.app.state.conveyor
    return app


def unauthorized(detail: str) -> Problem:
    return Problem(401, detail, "unauthorized", headers=CHALLENGE)


def trusted(checked_at: float, now: float, ttl: float) -> bool:
    """Whether a token checked at `checked_at` may be used without checking again."""
    return 0 <= now - checked_at < ttl


class TokenCache:
    """Valid tokens checked in the last `ttl` seconds, by hash, in this process; at
    most `size` of them (the oldest go first)."""

    def __init__(
        self, ttl: float, size: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, Token]] = {}

    def get(self, secret: str) -> Token | None:
        if self.ttl <= 0 or not plausible(secret):
            return None
        key = hash_secret(secret)
        entry = self._tokens.get(key)
        if entry is None:
            return None
        if not trusted(entry[0], self.clock(), self.ttl):
            with self._lock:
                self._tokens.pop(key, None)
            return None
        return entry[1]

    def put(self, secret: str, token: Token) -> None:
        if self.ttl <= 0 or not token.active:
            return
        with self._lock:
            while len(self._tokens) >= self.size:
                self._tokens.pop(next(iter(self._tokens)))
            self._tokens[hash_secret(secret)] = (self.clock(), token)


def allowed(token: Token, needed: Role) -> Caller:
    """The caller of a valid token, if its role allows `needed`; raises a 403 problem."""
    if not token.role.allows(needed):
        raise Problem(
            403,
            f"token {token.name!r} has role {token.role.value}; this needs {needed.value}",
            "forbidden",
        )
    return Caller(token.name, token.role, token.id)


def identify(
    app: Conveyor,
    secret: str | None,
    needed: Role,
    open_reading: bool,
    cache: TokenCache | None = None,
) -> Caller:
    """The caller a token stands for, if it may do what needs `needed`; raises a 401 or
    403 problem. Blocking: it may ask the database."""
    if secret is None:
        if open_reading and needed == Role.READ:
            return ANONYMOUS
        raise unauthorized("this needs a token: send `Authorization: Bearer <token>`")
    token = cache.get(secret) if cache is not None else None
    if token is None:
        token = app.authenticate(secret)
        if token is None:
            raise unauthorized("the token is not valid (unknown or revoked)")
        if cache is not None:
            cache.put(secret, token)
    return allowed(token, needed)


def secret_from(request: Request, creds: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token sent, if any. An Authorization header of another scheme is a
    malformed credential, not an absent one."""
    if creds is not None:
        return creds.credentials
    header = request.headers.get("authorization")
    if header is not None:
        raise unauthorized("the Authorization header must be `Bearer <token>`")
    return None


def require(
    needed: Role,
) -> Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[Caller]]:
    """A dependency: the caller, whose token allows `needed`. A token trusted from the
    cache is answered on the event loop; anything else asks the database in a thread."""

    async def dependency(request: Request, creds: BearerCredentials) -> Caller:
        app = conveyor_of(request)
        secret = secret_from(request, creds)
        cache: TokenCache = request.app.state.tokens
        if secret is not None and (token := cache.get(secret)) is not None:
            return allowed(token, needed)
        open_reading = app.config.api.read_open
        return await run_in_threadpool(identify, app, secret, needed, open_reading, cache)

    return dependency


Reader = Annotated[Caller, Depends(require(Role.READ))]
Submitter = Annotated[Caller, Depends(require(Role.SUBMIT))]
Admin = Annotated[Caller, Depends(require(Role.ADMIN))]
