"""Fixtures shared by every tier.

PostgreSQL: the server in CONVEYOR_TEST_DATABASE_URL, else 127.0.0.1:5432 as user
postgres (a local cluster that is down is started as .ci/run does). Each test session
makes a database of its own there and drops it at the end.
Under CI=true a test that needs PostgreSQL fails when the server cannot be reached;
elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conveyor.app import Conveyor
from conveyor.config import Config, parse_config
from conveyor.store import Store, open_store
from conveyor.store.postgres import sqlalchemy_url

# The HTTP API's fixtures (make_api, api, anyio_backend) and helpers.
pytest_plugins = ["api_support"]

PG_SERVER = os.environ.get(
    "CONVEYOR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TABLES = [
    "events",
    "tasks",
    "requests",
    "workers",
    "queue_settings",
    "api_tokens",
    "artifacts",
    "notifications",
    "event_cursors",
    "annotation",
    "annotation_header",
    "ingest_counters",
    "kcidb_checkouts",
    "kcidb_builds",
    "kcidb_tests",
    "kcidb_issues",
    "kcidb_incidents",
]


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (CI=true: tests needing it fail rather than skip)")
    pytest.skip(what)


def _pg_reachable() -> Exception | None:
    engine = sa.create_engine(sqlalchemy_url(PG_SERVER), connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return None
    except Exception as exc:
        return exc
    finally:
        engine.dispose()


def _start_local_pg() -> str:
    """Start this machine's PostgreSQL cluster the way .ci/run does; what happened."""
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not clusters or shutil.which("pg_ctlcluster") is None:
        return "no local PostgreSQL cluster to start"
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[0], "main", "start"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"tried `pg_ctlcluster {clusters[0]} main start`: {done.stderr.strip() or 'ok'}"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    problem = _pg_reachable()
    if problem is None:
        return PG_SERVER
    if "127.0.0.1" in PG_SERVER or "localhost" in PG_SERVER:
        tried = _start_local_pg()
        for _ in range(30):
            problem = _pg_reachable()
            if problem is None:
                break
            time.sleep(1)
        if problem is not None:
            _missing(f"PostgreSQL not reachable at {PG_SERVER} ({tried}): {problem}")
    else:
        _missing(f"PostgreSQL not reachable at {PG_SERVER}: {problem}")
    return PG_SERVER


@pytest.fixture(scope="session")
def pg_session_url(pg_server_url: str) -> Iterator[str]:
    """A database of this test session's own, migrated to the latest schema."""
    name = f"conveyor_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(sqlalchemy_url(pg_server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = (
        sa.engine.make_url(sqlalchemy_url(pg_server_url))
        .set(database=name)
        .render_as_string(hide_password=False)
    )
    store = open_store(url)
    store.upgrade()
    store.close()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _clean_pg(url: str) -> None:
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture
def pg_url(pg_session_url: str) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    _clean_pg(pg_session_url)
    return pg_session_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    store = open_store(url)
    store.upgrade()
    store.close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def make_config(tmp_path: Path, db_url: str, toml: str = "") -> Config:
    """A Config from TOML text, its database at `db_url`, its artifacts under tmp_path."""
    data: dict[str, Any] = tomllib.loads(textwrap.dedent(toml))
    return parse_config(
        data,
        tmp_path,
        {"CONVEYOR_DATABASE_URL": db_url, "CONVEYOR_ARTIFACTS": str(tmp_path / "artifacts")},
    )


@pytest.fixture
def make_app(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """make_app(toml) -> Conveyor on this test's database; closed at the end."""
    apps: list[Conveyor] = []

    def make(toml: str = "") -> Conveyor:
        app = Conveyor(make_config(tmp_path, db_url, toml))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def write_config(folder: Path, toml: str) -> Path:
    path = folder / "conveyor.toml"
    path.write_text(textwrap.dedent(toml))
    return path


def cli_env(db_url: str, config: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CONVEYOR_CONFIG", None)
    env["CONVEYOR_DATABASE_URL"] = db_url
    if config is not None:
        env["CONVEYOR_CONFIG"] = str(config)
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS…` as a user would, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
