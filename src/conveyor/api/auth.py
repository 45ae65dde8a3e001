"""Who is calling: `Authorization: Bearer <token>`, checked against the stored hashes.

Every endpoint but the health checks needs a token whose role allows it (read < submit <
admin), unless `[api] read_open = true`, which lets reading go without one. A token that
is sent is always checked, even where none is needed: a wrong token is never ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from conveyor.api.problems import Problem
from conveyor.app import Conveyor
from conveyor.tokens import Role

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


def identify(app: Conveyor, secret: str | None, needed: Role, open_reading: bool) -> Caller:
    """The caller a token stands for, if it may do what needs `needed`; raises a 401 or
    403 problem."""
    if secret is None:
        if open_reading and needed == Role.READ:
            return ANONYMOUS
        raise unauthorized("this needs a token: send `Authorization: Bearer <token>`")
    token = app.authenticate(secret)
    if token is None:
        raise unauthorized("the token is not valid (unknown or revoked)")
    if not token.role.allows(needed):
        raise Problem(
            403,
            f"token {token.name!r} has role {token.role.value}; this needs {needed.value}",
            "forbidden",
        )
    return Caller(token.name, token.role, token.id)


def secret_from(request: Request, creds: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token sent, if any. An Authorization header of another scheme is a
    malformed credential, not an absent one."""
    if creds is not None:
        return creds.credentials
    header = request.headers.get("authorization")
    if header is not None:
        raise unauthorized("the Authorization header must be `Bearer <token>`")
    return None


def require(needed: Role) -> Callable[[Request, HTTPAuthorizationCredentials | None], Caller]:
    """A dependency: the caller, whose token allows `needed`."""

    def dependency(request: Request, creds: BearerCredentials) -> Caller:
        app = conveyor_of(request)
        return identify(app, secret_from(request, creds), needed, app.config.api.read_open)

    return dependency


Reader = Annotated[Caller, Depends(require(Role.READ))]
Submitter = Annotated[Caller, Depends(require(Role.SUBMIT))]
Admin = Annotated[Caller, Depends(require(Role.ADMIN))]
