"""`conveyor token create | list | revoke`, run in process: the token printed once,
never listed, revoked at once; a taken name and an unknown token said in one line.
(The CLI's process-level behaviour is tests/e2e's; names and roles are checked in
tests/unit/test_api_units.py.)

Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.store import open_store
from conveyor.tokens import hash_secret


def conveyor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_and_revoke(
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", db_url)

    code, out, err = conveyor(capsys, "token", "create", "--name", "etl", "--role", "submit")
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("cvy_") and len(secret) == 47
    assert "store it now, it cannot be shown again" in err

    code, out, _ = conveyor(capsys, "token", "list", "--json")
    (token,) = json.loads(out)
    assert (token["name"], token["role"], token["revoked_at"]) == ("etl", "submit", None)
    assert token["prefix"] == secret[:10] and secret not in out
    code, out, _ = conveyor(capsys, "token", "list")
    assert "etl" in out and secret[:10] in out and secret not in out

    code, _, err = conveyor(capsys, "token", "create", "--name", "etl")
    assert code == 1
    assert err.strip() == "conveyor: a token named 'etl' exists: revoke it first, or pick another"
    code, _, err = conveyor(capsys, "token", "create", "--name", "has space")
    assert code == 1 and err.startswith("conveyor: invalid token name")

    code, out, _ = conveyor(capsys, "token", "revoke", "etl")
    assert code == 0 and "revoked token" in out and "'etl'" in out
    store = open_store(db_url)
    try:
        found = store.token_by_hash(hash_secret(secret))
        assert found is not None and not found.active
    finally:
        store.close()
    code, _, err = conveyor(capsys, "token", "revoke", "etl")
    assert code == 1 and err.startswith("conveyor: no active token named 'etl'")
