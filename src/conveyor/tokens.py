"""API tokens: who may call the HTTP API, and with which role.

A token is shown once, when it is made; only its SHA-256 hash is stored, with a short
prefix of the token (not enough to use it) so `conveyor token list` can tell tokens apart.

Everything here is pure; the store keeps the records.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "cvy_"  # noqa: S105 - the marker every token starts with, not a secret
# Enough of the token to recognise it in a list: "cvy_" and 6 of its 43 random characters.
SHOWN_CHARS = len(TOKEN_PREFIX) + 6
# last_used_at is written at most this often per token, so reads stay reads.
TOUCH_INTERVAL = 60.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")


class Role(enum.StrEnum):
    """What a token may do; each role may do everything the ones before it may."""

    READ = "read"  # look: requests, tasks, logs, events, queues, workers, pipelines
    SUBMIT = "submit"  # and submit, cancel and retry its own requests
    ADMIN = "admin"  # and pause and resume queues, cancel and retry anyone's requests

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READ: 0, Role.SUBMIT: 1, Role.ADMIN: 2}


class TokenNameError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    id: int
    name: str
    role: Role
    prefix: str  # the first characters of the token, for telling tokens apart
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewToken:
    """A token about to be stored: what the store keeps, never the token itself."""

    name: str
    role: Role
    token_hash: str
    prefix: str


def check_name(name: str) -> str:
    """Token names become the submitter of what the token submits: keep them plain."""
    if not _NAME.fullmatch(name):
        raise TokenNameError(
            f"invalid token name {name!r}: use 1-64 letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return name


def generate_secret() -> str:
    """A new token: `cvy_` and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def shown_prefix(secret: str) -> str:
    return secret[:SHOWN_CHARS]


def new_token(name: str, role: Role) -> tuple[NewToken, str]:
    """What to store for a new token, and the token itself (to show once)."""
    secret = generate_secret()
    return NewToken(check_name(name), role, hash_secret(secret), shown_prefix(secret)), secret


def plausible(secret: str) -> bool:
    """Cheap check before asking the store: the shape of a token Conveyor made."""
    return (
        secret.startswith(TOKEN_PREFIX)
        and 16 <= len(secret) <= 128
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in secret[len(TOKEN_PREFIX) :])
    )


def needs_touch(token: Token, now: float) -> bool:
    return token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL


def may_manage(role: Role, caller: str, submitter: str | None) -> bool:
    """Whether a caller may cancel or retry a request: its own with a submit token,
    anyone's with an admin token."""
    if role.allows(Role.ADMIN):
        return True
    return role.allows(Role.SUBMIT) and submitter == caller
