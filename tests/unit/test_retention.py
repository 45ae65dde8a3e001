"""Retention ages and the tally of what pruning removed."""

from __future__ import annotations

import pytest

from conveyor.config import ConfigError, parse_config
from conveyor.retention import AgeError, Pruned, parse_age


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("90m", 5400),
        ("45s", 45),
        ("2w", 1209600),
        ("1.5d", 129600),
        (" 7 d ", 7 * 86400),
        ("3", 3 * 86400),
        (2, 2 * 86400),
        (0.5, 43200),
    ],
)
def test_ages(text: str | float, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30x", "-3d", "0", "0h", "thirty days", "1e3d"])
def test_bad_ages_say_what_an_age_looks_like(text: str) -> None:
    with pytest.raises(AgeError, match=repr(text)):
        parse_age(text)


def test_the_config_checks_retention(tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    cfg = parse_config({"conveyor": {"retention": "14d"}}, base, {})
    assert cfg.retention == 14 * 86400
    assert parse_config({}, base, {}).retention is None
    with pytest.raises(ConfigError, match="retention"):
        parse_config({"conveyor": {"retention": "soon"}}, base, {})


def test_tallies_add_up() -> None:
    a = Pruned(requests=2, tasks=5, events=9, request_ids=(1, 2), artifact_keys=("k",))
    b = Pruned(requests=1, tasks=1, events=3, artifacts=2, notifications=1)
    total = a + b
    assert total.summary() == {
        "requests": 3,
        "tasks": 6,
        "events": 12,
        "artifacts": 2,
        "notifications": 1,
    }
