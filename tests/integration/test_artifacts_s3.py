"""The artifact store on a real S3-compatible server (moto's server mode on a loopback
port): objects in and out, outputs under the configured keys, downloads through the API
(streamed, or by a presigned link), and an endpoint that stalls."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import httpx
import pytest
from artifact_support import expected_db, outputs_pipeline, run_worker

from api_support import live_server, make_env
from conftest import _missing, make_config
from conveyor.api import create_app
from conveyor.app import Conveyor
from conveyor.artifacts import ArtifactError, ArtifactMissing, open_artifact_store
from conveyor.tasks import TaskStatus
from conveyor.worker import Worker, WorkerOptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        _missing(f"moto[server] is not installed: {exc}")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Throw-away credentials, as boto3 reads them from the environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "conveyor-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "conveyor-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = f"conveyor-{abs(hash(request.node.nodeid)) % 10**10}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _keys(endpoint: str, bucket: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture
def stalled_endpoint() -> Iterator[str]:
    """A TCP server on loopback that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        for conn in held:
            conn.close()
        server.close()


# --------------------------------------------------------------------- the store
def test_objects_go_in_and_come_out(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = open_artifact_store(f"s3://{bucket}/pre/fix", endpoint_url=s3_endpoint, timeout=5)
    assert store.remote
    url = store.put_bytes("blobs/ab/cd", b"a large log excerpt", "text/plain")
    assert url == f"s3://{bucket}/pre/fix/blobs/ab/cd"
    assert store.exists("blobs/ab/cd") and not store.exists("blobs/ab/none")
    body = store.open("blobs/ab/cd")
    assert body.read() == b"a large log excerpt"
    body.close()
    data = bytes(range(256)) * 40_000  # 10 MB
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    ref = store.put_file("big.bin", src)
    assert (ref.size, ref.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    link = store.link("big.bin", 60)
    assert link is not None and link.startswith(s3_endpoint)
    assert httpx.get(link, timeout=10).content == data
    store.delete("big.bin")
    assert not store.exists("big.bin")
    with pytest.raises(ArtifactMissing):
        store.open("big.bin")
    with pytest.raises(ArtifactError, match=r"'\.\.'"):
        store.put_bytes("../../escape", b"no")
    assert _keys(s3_endpoint, bucket) == ["pre/fix/blobs/ab/cd"]
    store.close()


def test_a_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    store = open_artifact_store("s3://no-such-bucket-here", endpoint_url=s3_endpoint, timeout=5)
    with pytest.raises(ArtifactError, match="NoSuchBucket"):
        store.put_bytes("k", b"v")


def test_a_stalled_endpoint_times_out_with_a_clear_reason(stalled_endpoint: str) -> None:
    store = open_artifact_store(
        "s3://stalled/x", endpoint_url=stalled_endpoint, timeout=0.5, retries=1
    )
    start = time.monotonic()
    with pytest.raises(ArtifactError, match=r"did not answer within 0\.5s \(2 attempts\)"):
        store.put_bytes("k", b"v")
    assert time.monotonic() - start < 10


# ------------------------------------------------------------ through a worker
def _s3_app(tmp_path: Path, db_url: str, endpoint: str, bucket: str, extra: str = "") -> Conveyor:
    toml = f"""
[artifacts]
url = "s3://{bucket}/conveyor"
endpoint_url = "{endpoint}"
key = "{{date}}/{{pipeline}}/{{request_id}}/{{task_id}}/{{attempt}}/{{name}}"
timeout = 5
retries = 1
{extra}
""" + outputs_pipeline()
    app = Conveyor(make_config(tmp_path, db_url, toml))
    app.store.upgrade()
    return app


def test_outputs_and_logs_land_under_the_key_template_and_download_through_the_api(
    s3_endpoint: str, bucket: str, tmp_path: Path, sqlite_url: str
) -> None:
    app = _s3_app(tmp_path, sqlite_url, s3_endpoint, bucket)
    rid = app.submit(
        "ranks", {"items": [{"name": "alpha", "code": 0}, {"name": "beta", "code": 1}]}
    ).request.id
    run_worker(app)
    ok, bad = app.get(rid).tasks
    assert (ok.status, bad.status) == (TaskStatus.SUCCEEDED, TaskStatus.FAILED)
    day = datetime.fromtimestamp(ok.created_at, UTC).strftime("%Y-%m-%d")
    assert _keys(s3_endpoint, bucket) == [
        f"conveyor/{day}/ranks/{rid}/{ok.id}/1/alpha.csv",
        f"conveyor/{day}/ranks/{rid}/{ok.id}/1/logs/attempt-1.log",
        f"conveyor/{day}/ranks/{rid}/{ok.id}/1/out/deep/alpha.db",
        # a failed attempt keeps its log (for whoever looks into it), not its outputs
        f"conveyor/{day}/ranks/{rid}/{bad.id}/1/logs/attempt-1.log",
    ]
    kept = {a.name: a for a in app.task_artifacts(ok.id)}
    assert kept["out/deep/alpha.db"].url == (
        f"s3://{bucket}/conveyor/{day}/ranks/{rid}/{ok.id}/1/out/deep/alpha.db"
    )
    assert kept["attempt-1.log"].kind.value == "log"

    env = make_env(app)
    with live_server(env.asgi) as base, httpx.Client(base_url=base, headers=env.auth("read")) as c:
        got = bytearray()
        with c.stream("GET", f"/api/v1/tasks/{ok.id}/artifacts/out/deep/alpha.db") as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                got += chunk
        assert bytes(got) == expected_db("alpha")
        log = c.get(f"/api/v1/tasks/{bad.id}/artifacts/attempt-1.log")
        assert log.status_code == 200 and "exit code 1" in log.text
        assert [
            o["name"] for o in c.get(f"/api/v1/requests/{rid}").json()["tasks"][0]["outputs"]
        ] == ["alpha.csv", "out/deep/alpha.db", "attempt-1.log"]
    app.close()

    # With presign set, the API hands out a time-limited link instead (or streams on ask).
    linked = _s3_app(tmp_path, sqlite_url, s3_endpoint, bucket, "presign = 120")
    with (
        live_server(create_app(linked)) as base,
        httpx.Client(base_url=base, headers=env.auth("read")) as c,
    ):
        r = c.get(f"/api/v1/tasks/{ok.id}/artifacts/alpha.csv")
        assert r.status_code == 307
        assert r.headers["location"].startswith(s3_endpoint)
        assert httpx.get(r.headers["location"], timeout=10).text == "id,rank\n1,alpha\n"
        r = c.get(f"/api/v1/tasks/{ok.id}/artifacts/alpha.csv", params={"stream": "true"})
        assert r.status_code == 200 and r.text == "id,rank\n1,alpha\n"
    linked.close()


SLOW = {
    "command": """
[pipelines.slow]
executor = "command"
command = ["{conveyor.python}", "-c", "import time; print('started', flush=True); time.sleep(30)"]
timeout = 1
""",
    "python": """
[pipelines.slow]
executor = "python"
handler = "worker_handlers:slow"
timeout = 1
""",
}


@pytest.mark.parametrize("executor", ["command", "python"])
def test_the_log_of_an_attempt_that_timed_out_is_kept(
    s3_endpoint: str, bucket: str, tmp_path: Path, sqlite_url: str, executor: str
) -> None:
    # the attempt most looked into: its log reaches the store like any other
    app = _s3_app(tmp_path, sqlite_url, s3_endpoint, bucket, SLOW[executor])
    rid = app.submit("slow", {}).request.id
    run_worker(app)
    (task,) = app.get(rid).tasks
    assert task.status == TaskStatus.FAILED and "timed out" in (task.error or "")
    (log,) = app.task_artifacts(task.id)
    assert log.name == "attempt-1.log" and log.kind.value == "log"
    body = app.open_artifact(log)
    text = body.read().decode()
    body.close()
    assert "started" in text
    assert executor == "python" or "killed: timed out" in text
    app.close()


QUICK = """
[pipelines.quick]
executor = "python"
handler = "conveyor.examples.handlers:noop"
"""


def test_a_stalled_store_fails_the_attempt_per_policy_and_the_worker_goes_on(
    stalled_endpoint: str, tmp_path: Path, sqlite_url: str
) -> None:
    toml = (
        f"""
[artifacts]
url = "s3://stalled/conveyor"
endpoint_url = "{stalled_endpoint}"
timeout = 0.5
retries = 0
upload_logs = false
"""
        + outputs_pipeline(extra="retries = 1\nbackoff = 0")
        + QUICK
    )
    app = Conveyor(make_config(tmp_path, sqlite_url, toml))
    app.store.upgrade()
    slow = app.submit("ranks", {"items": [{"name": "alpha", "code": 0}]}).request.id
    quick = [app.submit("quick", {"n": i}).request.id for i in range(6)]
    started = time.monotonic()
    w = Worker(app, WorkerOptions(concurrency=2, burst=True, poll_interval=0.05, grace=5))
    stats = w.run()
    took = time.monotonic() - started
    assert took < 30
    (task,) = app.get(slow).tasks
    assert task.status == TaskStatus.FAILED and task.attempts == 2
    assert task.error is not None
    assert "keeping outputs failed" in task.error and "did not answer within 0.5s" in task.error
    assert all(app.get(r).status.value == "succeeded" for r in quick)
    # the other slot kept working while the upload stalled
    quick_done = max(app.get(r).finished_at or 0 for r in quick)
    assert task.started_at is not None and task.finished_at is not None
    assert quick_done < task.finished_at
    assert (stats.succeeded, stats.failed, stats.retried) == (6, 1, 1)
    # the log says what happened
    log = app.log(task.id).read().decode()
    assert "conveyor: keeping outputs failed" in log
    app.close()
