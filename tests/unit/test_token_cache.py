"""The API's cache of checked tokens: how long a token is trusted, what is never kept,
and its bound."""

from __future__ import annotations

from conveyor.api.auth import TokenCache, trusted
from conveyor.tokens import Role, Token, generate_secret


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def token(n: int = 1, revoked: bool = False) -> Token:
    return Token(n, f"t{n}", Role.SUBMIT, "cvy_abcdef", 0.0, revoked_at=5.0 if revoked else None)


def test_a_checked_token_is_trusted_for_ttl_seconds() -> None:
    assert trusted(10.0, 10.0, 2.0) and trusted(10.0, 11.99, 2.0)
    assert not trusted(10.0, 12.0, 2.0)
    assert not trusted(10.0, 9.0, 2.0)  # a clock that went back: check again
    assert not trusted(10.0, 10.0, 0.0)

    clock = Clock()
    cache = TokenCache(2.0, clock=clock)
    secret = generate_secret()
    assert cache.get(secret) is None
    cache.put(secret, token())
    assert cache.get(secret) == token()
    assert cache.get(generate_secret()) is None
    clock.now += 1.9
    assert cache.get(secret) == token()
    clock.now += 0.2
    assert cache.get(secret) is None  # stale: the database is asked again
    assert cache.get(secret) is None


def test_revoked_tokens_and_a_zero_ttl_keep_nothing() -> None:
    secret = generate_secret()
    cache = TokenCache(2.0)
    cache.put(secret, token(revoked=True))
    assert cache.get(secret) is None
    off = TokenCache(0.0)
    off.put(secret, token())
    assert off.get(secret) is None
    assert cache.get("not a token") is None


def test_the_cache_is_bounded_oldest_out_first() -> None:
    cache = TokenCache(60.0, size=3)
    secrets = [generate_secret() for _ in range(4)]
    for i, s in enumerate(secrets):
        cache.put(s, token(i))
    assert cache.get(secrets[0]) is None
    assert [cache.get(s) for s in secrets[1:]] == [token(1), token(2), token(3)]
