"""Logging in to the dashboard: a token, checked once, opens a session kept in a signed
cookie (HttpOnly, SameSite=Lax; Secure over HTTPS). The cookie holds the token's hash,
never the token, and each page checks that the token is still active: revoking it ends
its sessions. Every form that changes something carries the session's CSRF token.

The signing key: `$CONVEYOR_DASHBOARD_SECRET`, else the file `[dashboard] secret_file`
(default: `dashboard.secret` in the artifacts directory), made with a random key on first
use. There is no default key.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

from conveyor.config import Config
from conveyor.tokens import Role, Token

SESSION_COOKIE = "conveyor_session"
LOGIN_COOKIE = "conveyor_login"  # the CSRF token of the login form (before any session)
SECRET_ENV = "CONVEYOR_DASHBOARD_SECRET"  # noqa: S105 (the name of a variable)
MIN_SECRET = 32


class SecretError(RuntimeError):
    pass


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard."""

    name: str
    role: Role
    csrf: str  # "" for an anonymous viewer (read_open): it has no forms to send
    logged_in: bool = True

    @property
    def admin(self) -> bool:
        return self.logged_in and self.role.allows(Role.ADMIN)


@dataclass(frozen=True)
class Session:
    token_hash: str
    csrf: str


def secret_key(config: Config, env: Mapping[str, str]) -> str:
    """The key that signs cookies; made and stored (mode 0600) on first use."""
    given = env.get(SECRET_ENV)
    if given:
        if len(given) < MIN_SECRET:
            raise SecretError(f"${SECRET_ENV} must be at least {MIN_SECRET} characters")
        return given
    path = config.dashboard.secret_file or config.artifacts_dir / "dashboard.secret"
    return _stored_secret(path)


def _stored_secret(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) >= MIN_SECRET:
        return text
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_urlsafe(48)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(fresh + "\n")
    try:
        # Several server processes may start at once: the first link wins, the others
        # read what it wrote.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    text = path.read_text().strip()
    if len(text) < MIN_SECRET:
        raise SecretError(f"{path} holds no usable key: delete it to make a new one")
    return text


class Sessions:
    def __init__(self, key: str, max_age: float) -> None:
        self.max_age = max_age
        self._session = URLSafeTimedSerializer(key, salt="conveyor.dashboard.session")
        self._login = URLSafeTimedSerializer(key, salt="conveyor.dashboard.login")

    def open(self, token: Token, token_hash: str) -> tuple[str, Session]:
        """The cookie value of a new session for `token`."""
        session = Session(token_hash, secrets.token_urlsafe(24))
        return self._session.dumps([session.token_hash, session.csrf]), session

    def read(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            value = self._session.loads(cookie, max_age=int(self.max_age))
        except BadSignature:
            return None
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        ):
            return None
        return Session(value[0], value[1])

    def login_form(self) -> tuple[str, str]:
        """A CSRF token for the login form, and the cookie that vouches for it."""
        csrf = secrets.token_urlsafe(24)
        return csrf, self._login.dumps(csrf)

    def login_form_ok(self, cookie: str | None, sent: str | None) -> bool:
        if not cookie or not sent:
            return False
        try:
            expected = self._login.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return isinstance(expected, str) and same(expected, sent)


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
