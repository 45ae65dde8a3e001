"""Workers as real processes: killed with SIGKILL, stopped with SIGTERM, two of them
sharing PostgreSQL, commands that hang, fail, or are cancelled while they run, paused
queues and queue priority. Requests are submitted with the `conveyor` CLI; the tests read
the outcome from the database (and from the side effects the tasks leave)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import (
    E2E_DIR,
    Processes,
    events_of,
    live_pids_in_group,
    live_pids_with,
    run_many,
    toml_list,
    wait_for,
)

from conftest import cli_env, run_cli, write_config
from conveyor.store import Store, open_store
from conveyor.tasks import Task, TaskStatus


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Worker processes of the test; at its end they, and every process whose command
    line names a file under tmp_path (the tasks' commands), are killed."""
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


OpenDb = Callable[[str], Store]


@pytest.fixture
def open_db() -> Iterator[OpenDb]:
    opened: list[Store] = []

    def open_(url: str) -> Store:
        opened.append(open_store(url))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


def submit(env: dict[str, str], cwd: Path, pipeline: str, params: object, *opts: str) -> int:
    """`conveyor submit PIPELINE - OPTS…` with the params on standard input; the id."""
    result = run_cli("submit", pipeline, "-", *opts, env=env, cwd=cwd, input=json.dumps(params))
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def only_task(store: Store, request_id: int) -> Task:
    req = store.get_request(request_id)
    assert req is not None
    (task,) = req.tasks
    return task


def request_status(store: Store, request_id: int) -> str:
    req = store.get_request(request_id, with_tasks=False)
    assert req is not None
    return req.status.value


def finished(store: Store, *request_ids: int) -> bool:
    return all(
        request_status(store, rid) in ("succeeded", "failed", "cancelled") for rid in request_ids
    )


def stop(procs: Processes, worker: subprocess.Popen[bytes], timeout: float = 15) -> str:
    """SIGTERM a worker; it must exit 0 in time. Its output."""
    assert worker.poll() is None, "the worker died early:\n" + procs.output(worker)
    worker.send_signal(signal.SIGTERM)
    code = procs.wait(worker, timeout)
    output = procs.output(worker)
    assert code == 0, output
    assert "Traceback" not in output, output
    return output


# --------------------------------------------------------------------- scenario 2
SLEEP3 = "import sys, time; time.sleep(3)"


def record_env(tmp_path: Path, db_url: str, handler: str, poll_interval: float) -> dict[str, str]:
    """The CLI's environment for a config with one pipeline, `record`, running the e2e
    handler `handler` on each item."""
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = {poll_interval}

        [pipelines.record]
        executor = "python"
        handler = "e2e_handlers:{handler}"
        split = "items"
        """,
    )
    pythonpath = os.pathsep.join(filter(None, [str(E2E_DIR), os.environ.get("PYTHONPATH")]))
    return cli_env(db_url, config, PYTHONPATH=pythonpath)


def test_sigkill_drill(tmp_path: Path, db_url: str, procs: Processes, open_db: OpenDb) -> None:
    """A worker killed mid-task: its lease expires, another worker runs the task again,
    and the task succeeds once."""
    marker = f"{tmp_path}/drill-task"
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.slow]
        executor = "command"
        command = {toml_list(["{conveyor.python}", "-c", SLEEP3, "{marker}"])}
        retries = 1
        backoff = 0
        """,
    )
    env = cli_env(db_url, config)
    store = open_db(db_url)
    rid = submit(env, tmp_path, "slow", {"marker": marker})

    worker_a = procs.start("worker", "--lease", "2", env=env, cwd=tmp_path)
    task = wait_for(
        lambda: (t := only_task(store, rid)).status == TaskStatus.RUNNING and t,
        20,
        "worker A to start the task",
    )
    assert task.attempts == 1
    wait_for(lambda: live_pids_with(marker), 10, "the task's command to start")

    os.killpg(worker_a.pid, signal.SIGKILL)
    assert procs.wait(worker_a, 5) == -signal.SIGKILL
    # Its command runs in a session of its own and may live on as an orphan: acceptable
    # (the fixture kills it at the end).
    wait_for(
        lambda: (only_task(store, rid).lease_expires_at or 0) < time.time(),
        10,
        "worker A's lease to expire",
    )

    worker_b = procs.start("worker", "--burst", "--lease", "2", env=env, cwd=tmp_path)
    assert procs.wait(worker_b, 30) == 0, procs.output(worker_b)

    task = only_task(store, rid)
    assert task.status == TaskStatus.SUCCEEDED, (task, procs.output(worker_b))
    assert task.attempts == 2
    assert request_status(store, rid) == "succeeded"
    events = events_of(store, rid)
    kinds = [e.kind for e in events if e.task_id == task.id]
    assert kinds.count("task.succeeded") == 1, kinds
    assert kinds.count("task.lease_expired") == 1, kinds
    runs = [e for e in events if e.kind == "task.running"]
    assert [e.data["attempt"] for e in runs] == [1, 2]
    assert runs[0].data["worker"] != runs[1].data["worker"]


# --------------------------------------------------------------------- scenario 3
def test_two_workers_drain_2000_tasks_each_once(
    tmp_path: Path, pg_url: str, procs: Processes, open_db: OpenDb
) -> None:
    out = tmp_path / "ran"
    out.mkdir()
    env = record_env(tmp_path, pg_url, "record", poll_interval=0.2)
    store = open_db(pg_url)

    workers = [procs.start("worker", "--concurrency", "8", env=env, cwd=tmp_path) for _ in range(2)]
    # Both compete from the first task on.
    wait_for(
        lambda: len(store.list_workers(alive_since=time.time() - 60)) == 2,
        20,
        "both workers to register",
    )

    per_request = 1000
    batches = []
    for n in range(2):
        path = tmp_path / f"batch-{n}.json"
        path.write_text(json.dumps({"out_dir": str(out), "items": list(range(per_request))}))
        batches.append(["submit", "record", str(path)])
    results = run_many(batches, env=env, cwd=tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    rids = [int(r.stdout) for r in results]

    wait_for(
        lambda: store.count_tasks(status="succeeded") == 2000,
        90,
        "2000 tasks to succeed",
        interval=0.2,
    )
    outputs = [stop(procs, w) for w in workers]

    task_ids: set[int] = set()
    for rid in rids:
        req = store.get_request(rid)
        assert req is not None and req.status.value == "succeeded"
        assert len(req.tasks) == per_request
        task_ids |= {t.id for t in req.tasks}
    assert len(task_ids) == 2000
    assert store.count_tasks() == 2000
    assert store.count_tasks(status="succeeded", attempts=1) == 2000

    files = sorted(out.glob("worker-*.ids"))
    ran = {f.name: [int(line) for line in f.read_text().split()] for f in files}
    assert set(ran) == {f"worker-{w.pid}.ids" for w in workers}, (
        f"expected both workers to run tasks: {list(ran)}\n{outputs}"
    )
    assert all(ran.values()), {k: len(v) for k, v in ran.items()}
    every_run = [tid for ids in ran.values() for tid in ids]
    assert len(every_run) == 2000, f"{len(every_run)} runs of 2000 tasks"
    assert set(every_run) == task_ids

    succeeded = [
        e.task_id for rid in rids for e in events_of(store, rid) if e.kind == "task.succeeded"
    ]
    assert sorted(succeeded) == sorted(task_ids)


# --------------------------------------------------------------------- scenario 4
def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, sqlite_url: str, procs: Processes, open_db: OpenDb
) -> None:
    marker = f"{tmp_path}/hang-marker"
    pidfile = tmp_path / "hang.pid"
    # sh leads the group; one sleep is its child, the other is orphaned at once (its
    # parent subshell exits), so only the process group still ties it to the task.
    script = 'echo $$ > "$1"; (sleep 60 &); sleep 60'
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.hang]
        executor = "command"
        command = {toml_list(["sh", "-c", script, "{marker}", "{pidfile}"])}
        timeout = 1
        retries = 0
        """,
    )
    env = cli_env(sqlite_url, config)
    store = open_db(sqlite_url)
    rid = submit(env, tmp_path, "hang", {"marker": marker, "pidfile": str(pidfile)})

    worker = procs.start("worker", "--burst", env=env, cwd=tmp_path)
    pgid = int(
        wait_for(
            lambda: pidfile.is_file() and pidfile.read_text().strip(), 20, "the command to start"
        )
    )
    wait_for(lambda: len(live_pids_in_group(pgid)) >= 3, 5, "both sleeps to start")
    assert procs.wait(worker, 20) == 0, procs.output(worker)

    task = only_task(store, rid)
    assert task.status == TaskStatus.FAILED
    assert task.error is not None and "timed out" in task.error, task.error
    assert task.attempts == 1
    assert task.started_at is not None and task.finished_at is not None
    assert task.finished_at - task.started_at < 4, "the time-out took too long"
    assert request_status(store, rid) == "failed"
    wait_for(lambda: not live_pids_in_group(pgid), 3, "the process group to be gone")
    assert not live_pids_with(marker)


# --------------------------------------------------------------------- scenario 5
FLAKY = (
    "import os, sys\n"
    "p = sys.argv[1]\n"
    "n = (int(open(p).read()) if os.path.exists(p) else 0) + 1\n"
    "open(p, 'w').write(str(n))\n"
    "print('attempt', n)\n"
    "sys.exit(0 if n >= 3 else 1)\n"
)
FLAKY_CONFIG = f"""
[conveyor]
poll_interval = 0.2

[pipelines.flaky]
executor = "command"
command = {toml_list(["{conveyor.python}", "-c", FLAKY, "{counter}"])}
retries = 2
backoff = 0.2
"""


def test_retry_with_backoff(
    tmp_path: Path, sqlite_url: str, procs: Processes, open_db: OpenDb
) -> None:
    counter = tmp_path / "counter"
    env = cli_env(sqlite_url, write_config(tmp_path, FLAKY_CONFIG))
    store = open_db(sqlite_url)
    rid = submit(env, tmp_path, "flaky", {"counter": str(counter)})

    worker = procs.start("worker", env=env, cwd=tmp_path)
    wait_for(lambda: finished(store, rid), 20, "the request to finish")
    stop(procs, worker)

    assert counter.read_text() == "3"
    task = only_task(store, rid)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.attempts == 3
    assert request_status(store, rid) == "succeeded"

    events = events_of(store, rid)
    retrying = [e for e in events if e.kind == "task.retrying"]
    assert len(retrying) == 2
    delays = [e.data["delay"] for e in retrying]
    assert all(e.data["error"] == "exit code 1" for e in retrying)
    assert 0 < delays[0] < delays[1], delays
    assert 0.15 <= delays[0] <= 0.25 and 0.3 <= delays[1] <= 0.5, delays  # 0.2 * 2**n +/-25%
    # each retry waited for its back-off before it ran again
    runs = [e for e in events if e.kind == "task.running"]
    assert [e.data["attempt"] for e in runs] == [1, 2, 3]
    for retry, delay, rerun in zip(retrying, delays, runs[1:], strict=True):
        assert rerun.ts - retry.ts >= delay - 0.01, (retry, rerun)


def test_burst_worker_stays_for_a_pending_retry(
    tmp_path: Path, sqlite_url: str, open_db: OpenDb
) -> None:
    """`worker --burst` exits when nothing is left to do; a task waiting 0.2 s for its
    retry is still something to do."""
    counter = tmp_path / "counter"
    env = cli_env(sqlite_url, write_config(tmp_path, FLAKY_CONFIG))
    store = open_db(sqlite_url)
    rid = submit(env, tmp_path, "flaky", {"counter": str(counter)})

    result = run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    task = only_task(store, rid)
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 3), (
        f"the burst worker left the task {task.status.value} after {task.attempts} "
        f"attempt(s); it said: {result.stderr.strip()}"
    )


# --------------------------------------------------------------------- scenario 6
def test_cancel_stops_the_running_command(
    tmp_path: Path, db_url: str, procs: Processes, open_db: OpenDb
) -> None:
    marker = f"{tmp_path}/long-marker"
    pidfile = tmp_path / "long.pid"
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.long]
        executor = "command"
        command = {toml_list(["sh", "-c", 'echo $$ > "$1"; sleep 60', "{marker}", "{pidfile}"])}

        [pipelines.noop]
        executor = "python"
        handler = "conveyor.examples.handlers:noop"
        """,
    )
    env = cli_env(db_url, config)
    store = open_db(db_url)
    rid = submit(env, tmp_path, "long", {"marker": marker, "pidfile": str(pidfile)})

    worker = procs.start("worker", "--lease", "3", env=env, cwd=tmp_path)
    pgid = int(
        wait_for(
            lambda: pidfile.is_file() and pidfile.read_text().strip(), 20, "the command to start"
        )
    )
    assert only_task(store, rid).status == TaskStatus.RUNNING

    cancelled = run_cli("cancel", str(rid), env=env, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"request {rid} cancelled"
    start = time.monotonic()
    wait_for(lambda: not live_pids_in_group(pgid), 10, "the cancelled command to be killed")
    assert time.monotonic() - start < 8
    assert not live_pids_with(marker)

    task = only_task(store, rid)
    assert task.status == TaskStatus.CANCELLED
    assert request_status(store, rid) == "cancelled"
    assert [e.kind for e in events_of(store, rid)].count("task.succeeded") == 0

    # the worker carries on
    assert worker.poll() is None, procs.output(worker)
    after = submit(env, tmp_path, "noop", {})
    wait_for(
        lambda: request_status(store, after) == "succeeded",
        15,
        "the worker to run the next request",
    )
    assert only_task(store, after).lease_owner == task.lease_owner
    stop(procs, worker)


# --------------------------------------------------------------------- scenario 7
PAUSE_CONFIG = """
[conveyor]
poll_interval = 0.2
queues = ["qx", "qy"]

[pipelines.noop]
executor = "python"
handler = "conveyor.examples.handlers:noop"
"""


def test_pause_and_resume_with_a_live_worker(
    tmp_path: Path, sqlite_url: str, procs: Processes, open_db: OpenDb
) -> None:
    env = cli_env(sqlite_url, write_config(tmp_path, PAUSE_CONFIG))
    store = open_db(sqlite_url)

    # The worker starts meanwhile: there is nothing to take before the pause.
    worker = procs.start("worker", env=env, cwd=tmp_path)
    paused = run_cli("pause", "qx", env=env, cwd=tmp_path)
    assert (paused.returncode, paused.stdout.strip()) == (0, "paused qx"), paused.stderr
    sub_x, sub_y, queues = run_many(
        [
            ["submit", "noop", "--queue", "qx"],
            ["submit", "noop", "--queue", "qy"],
            ["queues", "--json"],
        ],
        env=env,
        cwd=tmp_path,
    )
    rx, ry = int(sub_x.stdout), int(sub_y.stdout)
    states = {q["name"]: q["paused"] for q in json.loads(queues.stdout)}
    assert states["qx"] is True and states["qy"] is False

    wait_for(lambda: request_status(store, ry) == "succeeded", 20, "qy's request to be done")
    time.sleep(1.0)  # five polls of the worker: it would have taken qx's task by now
    assert request_status(store, rx) == "requested"
    assert only_task(store, rx).attempts == 0

    resumed = run_cli("resume", "qx", env=env, cwd=tmp_path)
    assert resumed.stdout.strip() == "resumed qx", resumed.stderr
    wait_for(lambda: request_status(store, rx) == "succeeded", 10, "qx's request to be done")

    # the global stop flag: nothing is taken from any queue
    everything = run_cli("pause", env=env, cwd=tmp_path)
    assert everything.stdout.strip() == "paused all queues", everything.stderr
    sub_x, sub_y = run_many(
        [["submit", "noop", "--queue", "qx"], ["submit", "noop", "--queue", "qy"]],
        env=env,
        cwd=tmp_path,
    )
    rx2, ry2 = int(sub_x.stdout), int(sub_y.stdout)
    time.sleep(1.0)
    assert [request_status(store, r) for r in (rx2, ry2)] == ["requested", "requested"]

    resumed = run_cli("resume", env=env, cwd=tmp_path)
    assert resumed.stdout.strip() == "resumed all queues", resumed.stderr
    wait_for(
        lambda: [request_status(store, r) for r in (rx2, ry2)] == ["succeeded"] * 2,
        10,
        "both requests to be done after the global resume",
    )
    stop(procs, worker)


# --------------------------------------------------------------------- scenario 8
def test_urgent_queue_and_higher_priority_go_first(
    tmp_path: Path, sqlite_url: str, open_db: OpenDb
) -> None:
    config = write_config(
        tmp_path,
        """
        [conveyor]
        poll_interval = 0.2
        queues = ["urgent", "production", "default", "test", "dev"]

        [pipelines.quick]
        executor = "python"
        handler = "conveyor.examples.handlers:noop"
        split = "items"
        queue = "dev"
        """,
    )
    env = cli_env(sqlite_url, config)
    store = open_db(sqlite_url)
    items = {"items": [1, 2, 3]}
    # No worker yet: the low-priority work is queued first.
    dev_low = submit(env, tmp_path, "quick", items)
    dev_high = submit(env, tmp_path, "quick", items, "--priority", "5")
    urgent = submit(env, tmp_path, "quick", items, "--queue", "urgent")

    result = run_cli("worker", "--burst", "--concurrency", "1", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr

    def starts(rid: int) -> list[float]:
        req = store.get_request(rid)
        assert req is not None and req.status.value == "succeeded"
        return [t.started_at for t in req.tasks if t.started_at is not None]

    first, second, third = starts(urgent), starts(dev_high), starts(dev_low)
    assert len(first) == len(second) == len(third) == 3
    assert max(first) <= min(second), "dev tasks started before the urgent ones"
    assert max(second) <= min(third), "priority 0 started before priority 5 in dev"


# --------------------------------------------------------------------- scenario 9
TWO_SECONDS = (
    "import sys, time; open(sys.argv[1] + '.started', 'w').close(); time.sleep(2); "
    "open(sys.argv[1] + '.done', 'w').close()"
)


def two_seconds_config(tmp_path: Path) -> Path:
    """A config whose pipeline `two` runs TWO_SECONDS once per item of `runs`."""
    return write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.two]
        executor = "command"
        command = {toml_list(["{conveyor.python}", "-c", TWO_SECONDS, "{path}"])}
        split = "runs"
        """,
    )


def test_sigterm_lets_the_running_task_finish(
    tmp_path: Path, sqlite_url: str, procs: Processes, open_db: OpenDb
) -> None:
    config = two_seconds_config(tmp_path)
    env = cli_env(sqlite_url, config)
    store = open_db(sqlite_url)
    first, second = tmp_path / "first", tmp_path / "second"
    rid = submit(env, tmp_path, "two", {"runs": [{"path": str(first)}, {"path": str(second)}]})

    worker = procs.start("worker", "--concurrency", "1", env=env, cwd=tmp_path)
    wait_for(lambda: Path(f"{first}.started").exists(), 20, "the first task to start")
    start = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = procs.wait(worker, 15)
    output = procs.output(worker)
    assert code == 0, output
    assert "Traceback" not in output
    assert time.monotonic() - start < 10
    assert "1 succeeded" in output, output

    req = store.get_request(rid)
    assert req is not None
    done, waiting = req.tasks
    assert Path(f"{first}.done").exists()
    assert (done.status, done.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert (waiting.status, waiting.attempts) == (TaskStatus.QUEUED, 0)
    assert not Path(f"{second}.started").exists()
    assert req.status.value == "running"


def test_worker_processes_share_the_queues_and_stop_together(
    tmp_path: Path, db_url: str, procs: Processes, open_db: OpenDb
) -> None:
    """`conveyor worker --processes 2`: two worker processes under the first, both
    running tasks, each once; SIGTERM to the first stops both gracefully; with --burst
    they leave when the queues are empty."""
    out = tmp_path / "ran"
    out.mkdir()
    env = record_env(tmp_path, db_url, "record_slowly", poll_interval=0.1)
    store = open_db(db_url)
    first = procs.start("worker", "--processes", "2", "--concurrency", "2", env=env, cwd=tmp_path)
    wait_for(
        lambda: len(store.list_workers(alive_since=time.time() - 60)) == 2,
        30,
        "both worker processes to register",
    )
    rid = submit(env, tmp_path, "record", {"out_dir": str(out), "items": list(range(60))})
    wait_for(lambda: finished(store, rid), 60, "the request to finish", interval=0.1)
    assert request_status(store, rid) == "succeeded"
    output = stop(procs, first)
    assert output.count("stopped: ") == 2, output
    assert not live_pids_in_group(first.pid)  # the children went with it

    ran = {f.name: f.read_text().split() for f in out.glob("worker-*.ids")}
    assert len(ran) == 2 and f"worker-{first.pid}.ids" not in ran, ran  # the two children
    every_run = [tid for ids in ran.values() for tid in ids]
    assert len(every_run) == len(set(every_run)) == 60
    assert not store.list_workers(alive_since=time.time() - 60)  # both said they stopped

    # --burst: they leave by themselves once nothing is left, and the command succeeds
    rid = submit(env, tmp_path, "record", {"out_dir": str(out), "items": list(range(10))})
    burst = run_cli("worker", "--processes", "2", "--burst", env=env, cwd=tmp_path, timeout=60)
    assert burst.returncode == 0, burst.stderr
    assert request_status(store, rid) == "succeeded"


def test_ctrl_c_lets_the_running_tasks_of_worker_processes_finish(
    tmp_path: Path, sqlite_url: str, procs: Processes, open_db: OpenDb
) -> None:
    """Ctrl-C reaches every process of the terminal's group: the worker processes under
    `--processes` let their running tasks finish, as one worker does, rather than take
    it with the first process's SIGTERM as a second signal."""
    config = two_seconds_config(tmp_path)
    env = cli_env(sqlite_url, config)
    store = open_db(sqlite_url)
    paths = [tmp_path / f"run-{i}" for i in range(2)]
    rid = submit(env, tmp_path, "two", {"runs": [{"path": str(p)} for p in paths]})
    first = procs.start("worker", "--processes", "2", "--concurrency", "1", env=env, cwd=tmp_path)
    wait_for(lambda: all(Path(f"{p}.started").exists() for p in paths), 30, "both tasks to start")
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    code = procs.wait(first, 20)
    output = procs.output(first)
    assert code == 0, output
    assert output.count("1 succeeded") == 2 and "released" not in output.replace(
        "0 released", ""
    ), output
    assert all(Path(f"{p}.done").exists() for p in paths)
    req = store.get_request(rid)
    assert req is not None and req.status.value == "succeeded"
    assert all(t.attempts == 1 for t in req.tasks)


def test_commands_of_worker_processes_keep_the_default_ctrl_c(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The worker processes under `--processes` do not act on Ctrl-C themselves (the
    first process passes it on), yet the commands they start get Ctrl-C's default
    handling, as under one worker: an ignored signal would stay ignored in them."""
    script = "import signal, sys; open(sys.argv[1], 'w').write(str(signal.getsignal(2)))"
    config = write_config(
        tmp_path,
        f"""
        [pipelines.show]
        executor = "command"
        command = {toml_list(["{conveyor.python}", "-c", script, "{path}"])}
        split = "runs"
        """,
    )
    env = cli_env(sqlite_url, config)
    paths = [tmp_path / f"sigint-{i}" for i in range(4)]
    submit(env, tmp_path, "show", {"runs": [{"path": str(p)} for p in paths]})
    burst = run_cli("worker", "--processes", "2", "--burst", env=env, cwd=tmp_path, timeout=60)
    assert burst.returncode == 0, burst.stderr
    seen = {p.read_text() for p in paths}
    assert seen == {"<built-in function default_int_handler>"}, seen
