"""Store contract, what the HTTP API adds: finding requests by text in their params (with
the other filters), the newest event id, and API tokens (only hashes kept).

Every test runs on SQLite and on PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import pytest
from store_helpers import T0, submit

from conveyor.store import Conflict, NotFound, RequestFilter, Store
from conveyor.tokens import NewToken, Role


def found(store: Store, **kw: object) -> list[int]:
    return [r.id for r in store.list_requests(RequestFilter(**kw))]  # type: ignore[arg-type]


def test_text_in_params_is_found_whatever_it_holds(store: Store) -> None:
    texts = {
        "plain": "A146B#11",
        "percent": "100% done",
        "underscore": "raw_bin",
        "quote": 'say "hi"',
        "backslash": "C:\\logs\\x",
        "accent": "Müller",
        "bang": "wow!",
    }
    ids = {key: submit(store, extra={"note": text}) for key, text in texts.items()}
    assert found(store, text="a146b#11") == [ids["plain"]]  # ASCII case does not matter
    assert found(store, text="100%") == [ids["percent"]]
    assert found(store, text="%") == [ids["percent"]]
    assert found(store, text="w_b") == [ids["underscore"]]
    assert found(store, text="_") == [ids["underscore"]]
    assert found(store, text='"hi"') == [ids["quote"]]
    assert found(store, text="\\logs\\") == [ids["backslash"]]
    assert found(store, text="Müller") == [ids["accent"]]
    assert found(store, text="!") == [ids["bang"]]
    assert found(store, text="nowhere") == []
    # keys and values alike: it is the params' text
    assert len(found(store, text="note")) == len(texts)


def test_text_combines_with_the_other_filters_and_the_cursor(store: Store) -> None:
    a = submit(store, pipeline="p", extra={"site": "north"}, submitter="ann")
    b = submit(store, pipeline="q", extra={"site": "north"}, queue="urgent", now=T0 + 10)
    c = submit(store, pipeline="p", extra={"site": "north"}, submitter="bob", now=T0 + 20)
    submit(store, pipeline="p", extra={"site": "south"}, now=T0 + 30)
    assert found(store, text="north") == [c, b, a]
    assert found(store, text="north", pipeline="p") == [c, a]
    assert found(store, text="north", queue="urgent") == [b]
    assert found(store, text="north", submitter="ann") == [a]
    assert found(store, text="north", status="requested", before_id=c) == [b, a]
    assert found(store, text="north", created_after=T0 + 10, created_before=T0 + 20) == [b]
    assert found(store, text="north", limit=2) == [c, b]


def test_latest_event_id(store: Store) -> None:
    assert store.latest_event_id() == 0
    submit(store)
    events = store.events()
    assert store.latest_event_id() == events[-1].id > 0


def _new(name: str, role: Role = Role.READ, digest: str | None = None) -> NewToken:
    return NewToken(name, role, digest or f"hash-of-{name}", f"cvy_{name[:6]}")


def test_tokens_are_created_found_by_hash_listed_and_revoked(store: Store) -> None:
    ann = store.create_token(_new("ann", Role.ADMIN), T0)
    bob = store.create_token(_new("bob"), T0 + 1)
    assert (ann.name, ann.role, ann.created_at, ann.active) == ("ann", Role.ADMIN, T0, True)
    assert store.token_by_hash("hash-of-ann") == ann
    assert store.token_by_hash("hash-of-nobody") is None
    assert store.list_tokens() == [ann, bob]

    with pytest.raises(Conflict, match="ann"):
        store.create_token(_new("ann", digest="another"), T0 + 2)

    store.touch_token(bob.id, T0 + 5)
    assert store.token_by_hash("hash-of-bob").last_used_at == T0 + 5  # type: ignore[union-attr]

    revoked = store.revoke_token("ann", T0 + 10)
    assert revoked.revoked_at == T0 + 10 and not revoked.active
    assert store.token_by_hash("hash-of-ann").revoked_at == T0 + 10  # type: ignore[union-attr]
    # revoking again (by id) changes nothing; the name is free for a new token
    assert store.revoke_token(str(ann.id), T0 + 20).revoked_at == T0 + 10
    again = store.create_token(_new("ann", digest="hash-2"), T0 + 30)
    assert again.id != ann.id and again.active
    assert [t.name for t in store.list_tokens()] == ["ann", "bob", "ann"]

    with pytest.raises(NotFound):
        store.revoke_token("nobody", T0)
    with pytest.raises(NotFound):
        store.revoke_token("99999", T0)


def test_a_hash_is_stored_once(store: Store) -> None:
    store.create_token(_new("one", digest="same"), T0)
    with pytest.raises(Conflict):
        store.create_token(_new("two", digest="same"), T0)
    assert [t.name for t in store.list_tokens()] == ["one"]
