"""Outputs kept in the default artifact store, a local directory beside the database:
a worker keeps what the globs match after a successful attempt, the API lists and
streams them, the CLI lists and downloads them."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from artifact_support import expected_db, outputs_pipeline, run_worker, work_dir

from api_support import make_env
from conftest import cli_env, run_cli, write_config
from conveyor.artifacts import ArtifactError, ArtifactMissing
from conveyor.artifacts.local import LocalStore
from conveyor.executors import ExecResult, TaskContext
from conveyor.worker import Worker, WorkerOptions

pytestmark = pytest.mark.anyio


def test_the_local_store_keeps_objects_inside_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    url = store.put_bytes("blobs/ab/cdef", b"large field", "text/plain")
    assert url == (tmp_path / "objects" / "blobs/ab/cdef").as_uri()
    assert store.exists("blobs/ab/cdef") and not store.exists("blobs/ab/none")
    body = store.open("blobs/ab/cdef")
    assert body.read() == b"large field"
    body.close()
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 3_000_000)
    ref = store.put_file("a/f.bin", src)
    assert (ref.size, ref.sha256) == (3_000_000, hashlib.sha256(b"x" * 3_000_000).hexdigest())
    store.delete("a/f.bin")
    assert not store.exists("a/f.bin")
    with pytest.raises(ArtifactMissing):
        store.open("a/f.bin")
    for hostile in ("../escape", "/etc/passwd", "a/../../b"):
        with pytest.raises(ArtifactError):
            store.put_bytes(hostile, b"no")
    # a symlink planted inside the store does not lead writes out of it
    (tmp_path / "objects" / "link").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="outside"):
        store.put_bytes("link/planted", b"no")
    assert not (tmp_path / "planted").exists()


def test_local_objects_get_the_usual_file_mode_and_describe_what_was_stored(
    tmp_path: Path,
) -> None:
    # readable by a server running as another user where the umask allows it (a
    # temporary file is made private), and no missing source passes as stored
    store = LocalStore(tmp_path / "objects")
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    old = os.umask(0o022)
    try:
        ref = store.put_file("a/f.bin", src)
        store.put_bytes("b/g.bin", b"more")
    finally:
        os.umask(old)
    for key in ("a/f.bin", "b/g.bin"):
        assert stat.S_IMODE((tmp_path / "objects" / key).stat().st_mode) == 0o644
    assert (ref.size, ref.sha256) == (4, hashlib.sha256(b"data").hexdigest())
    with pytest.raises(ArtifactError, match=r"reading .*nope"):
        store.put_file("c/nope", tmp_path / "nope")
    assert not store.exists("c/nope")
    assert [p.name for p in (tmp_path / "objects").rglob(".upload-*")] == []


async def test_outputs_are_kept_listed_and_streamed(make_app: Any, tmp_path: Path) -> None:
    app = make_app(outputs_pipeline())
    env = make_env(app)
    req = app.submit(
        "ranks", {"items": [{"name": "alpha", "code": 0}, {"name": "beta", "code": 3}]}
    )
    run_worker(app)
    done = app.get(req.request.id)
    ok, bad = done.tasks
    assert (ok.status.value, bad.status.value) == ("succeeded", "failed")

    kept = app.task_artifacts(ok.id)
    assert [(a.name, a.kind.value, a.attempt) for a in kept] == [
        ("alpha.csv", "output", 1),
        ("out/deep/alpha.db", "output", 1),
    ]
    db = kept[1]
    assert db.size == 200_000 and db.sha256 == hashlib.sha256(expected_db("alpha")).hexdigest()
    store_root = tmp_path / "artifacts" / "objects"
    assert Path(db.url.removeprefix("file://")).is_file()
    assert db.url.startswith(store_root.as_uri())
    assert db.key.endswith(f"/ranks/{done.id}/{ok.id}/out/deep/alpha.db")
    # a failed attempt keeps nothing (its files stay in its work dir only)
    assert app.task_artifacts(bad.id) == []

    async with env.client("read") as c:
        r = await c.get(f"/api/v1/requests/{done.id}")
        tasks = {t["id"]: t for t in r.json()["tasks"]}
        assert [o["name"] for o in tasks[ok.id]["outputs"]] == ["alpha.csv", "out/deep/alpha.db"]
        assert tasks[bad.id]["outputs"] == []
        r = await c.get(f"/api/v1/tasks/{ok.id}")
        assert len(r.json()["outputs"]) == 2
        r = await c.get(f"/api/v1/tasks/{ok.id}/artifacts")
        assert [(i["name"], i["size"], i["url"]) for i in r.json()["items"]] == [
            (a.name, a.size, a.url) for a in kept
        ]
        r = await c.get(f"/api/v1/tasks/{ok.id}/artifacts/out/deep/alpha.db")
        assert r.status_code == 200, r.text
        assert r.content == expected_db("alpha")
        assert r.headers["x-conveyor-sha256"] == db.sha256
        assert r.headers["content-length"] == "200000"
        r = await c.get(f"/api/v1/tasks/{ok.id}/artifacts/nothing.csv")
        assert r.status_code == 404 and "nothing.csv" in r.json()["detail"]
        r = await c.get("/api/v1/tasks/999999/artifacts")
        assert r.status_code == 404
    async with env.client(None) as anonymous:
        r = await anonymous.get(f"/api/v1/tasks/{ok.id}/artifacts/alpha.csv")
        assert r.status_code == 401
        r = await anonymous.get(f"/tasks/{ok.id}/outputs/alpha.csv")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")

    # the dashboard lists them on the request's page and hands them out to its viewers
    async with env.client(None) as browser:
        page = await browser.get("/login")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found
        r = await browser.post(
            "/login", data={"token": env.tokens["read"], "csrf": found.group(1), "next": "/"}
        )
        assert r.status_code == 303
        detail = (await browser.get(f"/requests/{done.id}")).text
        assert f'href="/tasks/{ok.id}/outputs/out/deep/alpha.db"' in detail
        r = await browser.get(f"/tasks/{ok.id}/outputs/out/deep/alpha.db")
        assert r.status_code == 200 and r.content == expected_db("alpha")
        assert (await browser.get(f"/tasks/{bad.id}/outputs/alpha.csv")).status_code == 404


def test_cli_lists_and_downloads_outputs(tmp_path: Path, db_url: str) -> None:
    config = write_config(tmp_path, outputs_pipeline())
    env = cli_env(db_url, config)
    r = run_cli(
        "submit", "ranks", "--set", 'items=[{"name": "gamma", "code": 0}]', env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    env_worker = run_cli("worker", "--burst", env=env, cwd=tmp_path)
    assert env_worker.returncode == 0, env_worker.stderr
    listed = run_cli("outputs", "1", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert '"out/deep/gamma.db"' in listed.stdout
    got = run_cli("download", "1", "out/deep/gamma.db", "-o", "g.db", env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "g.db").read_bytes() == expected_db("gamma")
    missing = run_cli("download", "1", "nope.csv", env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "conveyor: task 1 has no artifact 'nope.csv'"
    # an object changed in the store since it was recorded: refused to a file, and an
    # error after the bytes when they go to stdout
    stored = next((tmp_path / "artifacts").rglob("gamma.db"))
    stored.write_bytes(b"not what was kept")
    for target in ("again.db", "-"):
        bad = run_cli("download", "1", "out/deep/gamma.db", "-o", target, env=env, cwd=tmp_path)
        assert bad.returncode == 1
        assert "is not the recorded" in bad.stderr
        assert bad.stderr.strip().endswith("not kept" if target != "-" else "written out")
    assert not (tmp_path / "again.db").exists()


# Attempt 1 writes an output and fails; attempt 2 writes nothing and succeeds.
FLAKY_SCRIPT = (
    "import sys, pathlib; a = int(sys.argv[1]); "
    "a == 1 and pathlib.Path('stale.csv').write_text('x'); sys.exit(1 if a == 1 else 0)"
)
FLAKY = f"""
[pipelines.flaky]
executor = "command"
command = ["{{conveyor.python}}", "-c", "{FLAKY_SCRIPT}", "{{conveyor.attempt}}"]
outputs = ["*.csv"]
retries = 1
backoff = 0
"""


def test_an_attempt_keeps_only_what_it_wrote(make_app: Any) -> None:
    app = make_app(FLAKY)
    rid = app.submit("flaky", {}).request.id
    run_worker(app)
    (task,) = app.get(rid).tasks
    assert task.status.value == "succeeded" and task.attempts == 2
    assert app.task_artifacts(task.id) == []
    assert "removed stale.csv, left by an earlier attempt" in app.log(task.id).read().decode()


WRITE_THREE = (
    "import os\n"
    "for name in ('a.txt', 'b/c.txt', 'logs/attempt-1.log', 'logs/attempt-2.log'):\n"
    "    os.makedirs(os.path.dirname(name) or '.', exist_ok=True)\n"
    "    open(name, 'w').write(name)\n"
)
TWO_FILES = f"""
[pipelines.two]
executor = "command"
command = ["{{conveyor.python}}", "-c", {WRITE_THREE!r}]
outputs = ["**/*.txt", "**/*.log"]

[artifacts]
key = "{{task_id}}/{{name}}"
upload_logs = true
"""


def test_what_was_uploaded_before_an_upload_failed_is_recorded(make_app: Any) -> None:
    # The second output cannot be stored (a file stands where its folder must go): the
    # attempt fails, and the first output, which is in the store, is recorded with it.
    app = make_app(TWO_FILES)
    rid = app.submit("two", {}).request.id
    root = Path(app.config.artifacts.url.removeprefix("file://"))
    (root / "1").mkdir(parents=True)
    (root / "1" / "b").write_text("in the way")
    run_worker(app)
    (task,) = app.get(rid).tasks
    assert task.status.value == "failed" and "keeping outputs failed" in (task.error or "")
    kept = {a.name: a for a in app.task_artifacts(task.id)}
    assert set(kept) == {"a.txt", "attempt-1.log"}
    stored = (root / kept["a.txt"].key).read_bytes()
    assert stored == b"a.txt" and hashlib.sha256(stored).hexdigest() == kept["a.txt"].sha256


def test_an_output_named_as_the_attempts_log_does_not_replace_it(make_app: Any) -> None:
    app = make_app(TWO_FILES)
    rid = app.submit("two", {}).request.id
    run_worker(app)
    (task,) = app.get(rid).tasks
    assert task.status.value == "succeeded"
    root = Path(app.config.artifacts.url.removeprefix("file://"))
    logs = [a for a in app.task_artifacts(task.id) if a.kind.value == "log"]
    assert [a.name for a in logs] == ["attempt-1.log"]
    assert (root / logs[0].key).read_bytes() == app.log(task.id).read()
    log = app.log(task.id).read().decode()
    for name in ("logs/attempt-1.log", "logs/attempt-2.log"):  # a later attempt's too
        assert f"{name} is where an attempt's log is kept" in log


def test_an_attempt_stopped_before_its_outputs_are_kept_is_no_success(make_app: Any) -> None:
    # Its time ran out after its command succeeded and before its outputs were kept:
    # the attempt fails, saying so, rather than succeeding with none of its outputs.
    app = make_app(outputs_pipeline())
    rid = app.submit("ranks", {"items": [{"name": "a", "code": 0}]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=1, poll_interval=0.05))
    (task,) = app.store.claim(worker.id, ["default"], 1, 30, app.clock())
    work = work_dir(app, rid, task.id)
    work.mkdir(parents=True)
    (work / "a.csv").write_text("1,2\n")
    log_file = app.artifacts.attempt_paths(rid, task.id, task.attempts)[0]
    ctx = TaskContext(task, lambda: (Path(log_file), work), lambda _: None)
    ctx.stop("timed out")
    pipeline = app.config.pipelines["ranks"]
    result = worker.publisher.after_attempt(pipeline, ctx, ExecResult(ok=True))
    assert not result.ok and result.retryable
    assert result.error == "stopped before its outputs were kept (timed out)"
    assert app.task_artifacts(task.id) == []
    assert "stopped before its outputs were kept" in Path(log_file).read_text()
