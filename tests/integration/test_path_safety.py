"""Paths outside a pipeline's roots are refused at submit, by the API (422 naming the
field) and by the CLI (one line, exit 1 like any bad input); accepted ones reach the task mapped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api_support import make_env, problem
from conftest import cli_env, run_cli, write_config
from conveyor.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(120)


def config(root: Path) -> str:
    return f"""
[pipelines.spot]
executor = "command"
command = ["cat", "{{bin}}"]
split = "logs"
paths = ["logs[*].bin", "out"]
path_map = {{ "P:/" = "{root}/" }}
roots = ["{root}"]
"""


HOSTILE: list[tuple[str, str]] = [
    ("P:/../etc/passwd", "outside the allowed roots"),
    ("P:\\2022\\..\\..\\..\\etc\\shadow", "outside the allowed roots"),
    ("/etc/passwd", "outside the allowed roots"),
    ("P:/link/secret", "symbolic link"),
    ("P:/%2e%2e/%2e%2e/etc/passwd", "percent-encoded"),
    ("P:/\uff0e\uff0e/etc", "looks like"),
    ("Q:/2022/rawbinlog.bin", "drive Q: is not mapped"),
    ("\\\\fileserver\\share\\rawbinlog.bin", "UNC"),
    ("P:/a\nb", "control character"),
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "mnt" / "p"
    (root / "2022").mkdir(parents=True)
    (root / "2022" / "rawbinlog.bin").write_text("field test data\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret").write_text("nope\n")
    (root / "link").symlink_to(secret)
    return root


def body(bin_path: str) -> dict[str, Any]:
    return {
        "pipeline": "spot",
        "params": {"logs": [{"bin": "P:/2022/rawbinlog.bin"}, {"bin": bin_path}], "out": "P:/"},
    }


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "why"), HOSTILE)
async def test_the_api_refuses_a_hostile_path_naming_the_field(
    make_app: Any, tree: Path, path: str, why: str
) -> None:
    api = make_env(make_app(config(tree)))
    async with api.client() as c:
        doc = problem(await c.post("/api/v1/requests", json=body(path)), 422)
    assert "$.params.logs[1].bin" in json.dumps(doc)
    assert why in doc["detail"], doc
    assert api.store.get_request(1) is None  # nothing stored


@pytest.mark.anyio
async def test_the_api_accepts_paths_inside_the_roots_and_the_task_sees_them_mapped(
    make_app: Any, tree: Path
) -> None:
    app = make_app(config(tree))
    api = make_env(app)
    ok = body("p:\\2022\\.\\sub\\..\\rawbinlog.bin")
    async with api.client("submit") as c:
        r = await c.post("/api/v1/requests", json=ok)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    req = app.get(rid)
    assert req.params == ok["params"]  # what was submitted is kept as submitted
    assert [t.params["bin"] for t in req.tasks] == [f"{tree}/2022/rawbinlog.bin"] * 2
    assert req.tasks[0].params["out"] == str(tree)
    Worker(app, WorkerOptions(concurrency=2, burst=True, poll_interval=0.05)).run()
    done = app.get(rid)
    assert [t.status.value for t in done.tasks] == ["succeeded", "succeeded"]
    assert "field test data" in app.log(done.tasks[1].id).read().decode()


# A task's params are the shared keys and its item's, an item's key winning: a declared
# field is checked wherever a request gives it.
AROUND = [
    # an item's own `out` in place of the checked shared one
    (
        {"out": "P:/", "logs": [{"bin": "P:/2022/rawbinlog.bin", "out": "/etc"}]},
        "$.params.logs[0].out",
    ),
    (
        {"out": "P:/", "logs": [{"bin": "P:/2022/rawbinlog.bin", "out": "P:/../../etc"}]},
        "$.params.logs[0].out",
    ),
    # a shared `bin` for an item that has none
    ({"out": "P:/", "bin": "/etc/passwd", "logs": [{"other": 1}]}, "$.params.bin"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("params", "field"), AROUND)
async def test_a_path_given_where_a_task_takes_it_from_is_checked_too(
    make_app: Any, tree: Path, params: dict[str, Any], field: str
) -> None:
    api = make_env(make_app(config(tree)))
    async with api.client() as c:
        doc = problem(
            await c.post("/api/v1/requests", json={"pipeline": "spot", "params": params}), 422
        )
    assert field in json.dumps(doc) and "outside the allowed roots" in doc["detail"], doc
    assert api.store.get_request(1) is None


@pytest.mark.anyio
async def test_an_items_own_path_inside_the_roots_is_mapped_for_its_task(
    make_app: Any, tree: Path
) -> None:
    app = make_app(config(tree))
    api = make_env(app)
    params = {
        "out": "P:/",
        "logs": [
            {"bin": "P:/2022/rawbinlog.bin", "out": "P:/2022"},
            {"bin": "P:/2022/rawbinlog.bin"},
        ],
    }
    async with api.client("submit") as c:
        r = await c.post("/api/v1/requests", json={"pipeline": "spot", "params": params})
    assert r.status_code == 201, r.text
    tasks = app.get(r.json()["id"]).tasks
    assert [t.params["out"] for t in tasks] == [f"{tree}/2022", str(tree)]


@pytest.mark.parametrize(("path", "why"), HOSTILE[:4] + HOSTILE[6:7])
def test_the_cli_refuses_a_hostile_path_in_one_line(
    tmp_path: Path, sqlite_url: str, tree: Path, path: str, why: str
) -> None:
    env = cli_env(sqlite_url, write_config(tmp_path, config(tree)))
    params = tmp_path / "params.json"
    params.write_text(json.dumps(body(path)["params"]))
    r = run_cli("submit", "spot", str(params), env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "$.logs[1].bin" in lines[0] and why in lines[0]
