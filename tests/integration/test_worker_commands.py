"""A worker runs plain command attempts in its command loop: they share the worker's
slots with its other attempts, and time-outs, cancels and stopping reach them as they
reach any attempt. On SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from worker_support import finish_with, start, wait_for

from conveyor.app import Conveyor
from conveyor.tasks import Outcome, TaskAction, TaskStatus
from conveyor.worker import Worker, WorkerOptions
from fs_support import EXTENTS_FL, TOPDIR_FL, folder_flags
from proc_support import alive

pytestmark = pytest.mark.timeout(90)

PIPELINES = """
[pipelines.short]
executor = "command"
command = ["{conveyor.python}", "-c", "import sys; print('item', sys.argv[1])", "{n}"]
split = "items"

[pipelines.hang]
executor = "command"
command = [
    "{conveyor.python}", "-c",
    "import os, time; print('PID', os.getpid(), flush=True); time.sleep(60)",
]
split = "items"
timeout = 0.5
retries = 1
backoff = 0

[pipelines.nap]
executor = "command"
command = [
    "{conveyor.python}", "-c",
    "import time; s = time.time(); time.sleep(0.4); print('SPAN', s, time.time())",
]
split = "items"

[pipelines.steps]
executor = "command"
command = [
    "{conveyor.python}", "-c",
    '''
import time
from pathlib import Path
for i in 1, 2, 3:
    print('conveyor:progress %d/3 step %d' % (i, i), flush=True)
    time.sleep(0.6)
''',
]
split = "items"

[pipelines.twice]
executor = "command"
command = [
    "{conveyor.python}", "-c",
    '''
import os, sys, time
print('PID', os.getpid(), flush=True)
attempt = os.environ['CONVEYOR_ATTEMPT']
time.sleep(1.5 if attempt == '1' else 3)
open(sys.argv[1] + '.' + attempt, 'w').close()
''',
    "{marker}",
]

[pipelines.odd]
executor = "python"
handler = "worker_handlers:odd"
split = "items"
retries = 0

[pipelines.pynap]
executor = "python"
handler = "worker_handlers:timed"
split = "items"
"""


def pids_logged(app: Conveyor, request_id: int) -> list[int]:
    pids = []
    for task in app.get(request_id).tasks:
        for attempt in app.artifacts.attempts_logged(request_id, task.id):
            log = app.artifacts.log_path(request_id, task.id, attempt).read_text()
            pids += [int(line.split()[1]) for line in log.splitlines() if line.startswith("PID ")]
    return pids


def test_many_short_commands_each_succeed_with_its_own_log(make_app: Any) -> None:
    app = make_app(PIPELINES)
    rid = app.submit("short", {"items": [{"n": n} for n in range(120)]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=8, burst=True, poll_interval=0.05))
    thread, stats = start(worker)
    thread.join(60)
    assert not thread.is_alive()
    assert worker._loop is not None and worker._loop._n_launchers == 2  # one per four slots
    req = app.get(rid)
    assert req.status.value == "succeeded"
    assert stats[0].succeeded == 120
    for task in req.tasks:
        log = app.artifacts.log_path(rid, task.id, 1).read_text().splitlines()
        assert log[1:] == [f"item {task.params['n']}", "exit code 0"]
        assert task.result == {"exit_code": 0}
    # the worker marked its folders for the file system's placement (ext4: "T")
    for kind in ("logs", "work"):
        flags = folder_flags(app.artifacts.root / kind) or 0
        assert flags & TOPDIR_FL or not flags & EXTENTS_FL  # on ext4: marked


QUIET = """
[pipelines.quiet]
executor = "command"
command = ["true"]
split = "items"

[pipelines.quiet-fails]
executor = "command"
command = ["false"]
retries = 1
backoff = 0

[pipelines.quiet-hangs]
executor = "command"
command = ["sleep", "30"]
timeout = 0.3
"""


def test_a_command_that_prints_nothing_keeps_its_log_in_the_database(make_app: Any) -> None:
    """No log file is made for it (an inode and a disk block for two lines); its
    log, the command line and how it ended, is read from the database like any other."""
    app = make_app(QUIET)
    ok = app.submit("quiet", {"items": list(range(20))}).request.id
    bad = app.submit("quiet-fails", {}).request.id
    hung = app.submit("quiet-hangs", {}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, burst=True, poll_interval=0.05))
    thread, _ = start(worker)
    thread.join(60)
    assert not thread.is_alive()
    assert worker._loop is not None  # these ran in the command loop, through launchers
    done = app.get(ok)
    assert done.status.value == "succeeded"
    for task in done.tasks:
        assert app.log(task.id).read() == b"$ true\nexit code 0\n"
    assert not (app.artifacts.root / "logs" / str(ok)).exists()
    (failed,) = app.get(bad).tasks
    assert failed.status == TaskStatus.FAILED and failed.attempts == 2
    assert list(app.task_logs(failed.id)[1]) == [1, 2]
    for attempt in (1, 2):
        assert app.log(failed.id, attempt).read() == b"$ false\nexit code 1\n"
    # a command killed at its time-out has the reason to say: its log is a file
    (timed_out,) = app.get(hung).tasks
    assert timed_out.error == "timed out after 0.3s"
    path = app.artifacts.log_path(hung, timed_out.id, 1)
    assert path.read_text().splitlines() == ["$ sleep 30", "killed: timed out after 0.3s"]
    assert app.log(timed_out.id).read() == path.read_bytes()


NO_WORK_DIR = """
[pipelines.placed]
executor = "command"
command = [
    "{conveyor.python}", "-c",
    "import os; print('CWD', os.getcwd()); print('WORK', os.environ.get('CONVEYOR_WORK_DIR'))",
]
split = "items"
work_dir = false
cwd = "jobs"

[pipelines.unplaced]
executor = "command"
command = ["{conveyor.python}", "-c", "import os; print('CWD', os.getcwd())"]
work_dir = false

[pipelines.quiet]
executor = "command"
command = ["true"]
split = "items"
work_dir = false
"""


@pytest.mark.parametrize("loop", [True, False], ids=["launchers", "threads"])
def test_a_pipeline_without_work_directories_runs_its_commands_where_it_says_and_makes_none(
    make_app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: bool
) -> None:
    if not loop:
        monkeypatch.setattr("conveyor.worker.usable", lambda: False)
    (tmp_path / "jobs").mkdir()
    # a worker started inside another task passes on none of its task's variables
    monkeypatch.setenv("CONVEYOR_WORK_DIR", str(tmp_path / "stale"))
    app = make_app(NO_WORK_DIR)
    placed = app.submit("placed", {"items": list(range(6))}).request.id
    unplaced = app.submit("unplaced", {}).request.id
    quiet = app.submit("quiet", {"items": list(range(6))}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, burst=True, poll_interval=0.05))
    thread, _ = start(worker)
    thread.join(60)
    assert not thread.is_alive()
    assert (worker._loop is not None) is loop
    for task in app.get(placed).tasks:
        assert task.status == TaskStatus.SUCCEEDED
        lines = app.log(task.id).read().decode().splitlines()
        assert lines[1:] == [f"CWD {tmp_path / 'jobs'}", "WORK None", "exit code 0"]
    (task,) = app.get(unplaced).tasks
    assert task.status == TaskStatus.SUCCEEDED
    # no `cwd`: where the worker was started
    assert app.log(task.id).read().decode().splitlines()[1] == f"CWD {Path.cwd()}"
    assert app.get(quiet).status.value == "succeeded"
    for rid in (placed, unplaced, quiet):
        assert not (app.artifacts.root / "work" / str(rid)).exists()
    if loop:  # a quiet command run by a launcher makes no file at all
        assert not (app.artifacts.root / "logs" / str(quiet)).exists()


def test_commands_and_other_attempts_share_the_workers_slots(make_app: Any) -> None:
    app = make_app(PIPELINES)
    # taken in the order submitted: the two kinds by turns
    submitted = [
        (
            app.submit("nap", {"items": [n]}).request.id,
            app.submit("pynap", {"items": [n]}).request.id,
        )
        for n in range(4)
    ]
    worker = Worker(app, WorkerOptions(concurrency=3, burst=True, poll_interval=0.05))
    thread, _ = start(worker)
    thread.join(60)
    assert not thread.is_alive()
    spans = []
    for nap, pynap in submitted:
        (task,) = app.get(pynap).tasks
        assert task.status == TaskStatus.SUCCEEDED
        spans.append((task.result["start"], task.result["end"], "python"))
        (task,) = app.get(nap).tasks
        assert task.status == TaskStatus.SUCCEEDED
        log = app.artifacts.log_path(nap, task.id, 1).read_text()
        (line,) = [x for x in log.splitlines() if x.startswith("SPAN ")]
        spans.append((float(line.split()[1]), float(line.split()[2]), "command"))
    at_once = [[k for s, e, k in spans if s <= t < e] for t, _, _ in spans]
    assert max(len(kinds) for kinds in at_once) == 3
    assert any(set(kinds) == {"python", "command"} for kinds in at_once)  # side by side


def test_a_command_that_times_out_is_killed_and_retried_by_policy(make_app: Any) -> None:
    app = make_app(PIPELINES)
    rid = app.submit("hang", {"items": [1]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, burst=True, poll_interval=0.05))
    started = time.monotonic()
    thread, _ = start(worker)
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 15
    (task,) = app.get(rid).tasks
    assert task.status == TaskStatus.FAILED
    assert task.attempts == 2
    assert task.error == "timed out after 0.5s"
    pids = pids_logged(app, rid)
    assert len(pids) == 2
    assert not any(alive(p) for p in pids)


def test_cancelling_a_request_kills_its_running_commands(make_app: Any) -> None:
    app = make_app(PIPELINES.replace("timeout = 0.5", "timeout = 60"))
    rid = app.submit("hang", {"items": [1, 2]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, lease=1.5, poll_interval=0.05))
    thread, _ = start(worker)
    try:
        wait_for(lambda: len(pids_logged(app, rid)) == 2)
        pids = pids_logged(app, rid)
        app.cancel(rid)
        wait_for(lambda: not any(alive(p) for p in pids), timeout=10)
        wait_for(lambda: not worker._running, timeout=10)
    finally:
        worker.stop(hard=True)
        thread.join(15)
    assert app.get(rid).status.value == "cancelled"


def test_a_task_claimed_again_stops_its_earlier_attempt_and_only_the_new_one_counts(
    make_app: Any, tmp_path: Path
) -> None:
    # Cancelled and retried at once: the worker claims the task again before its
    # heartbeat (every 2 s with this lease) tells it the first attempt was cancelled.
    app = make_app(PIPELINES)
    marker = tmp_path / "done"
    rid = app.submit("twice", {"marker": str(marker)}).request.id
    worker = Worker(app, WorkerOptions(concurrency=2, lease=30, poll_interval=0.05))
    thread, _ = start(worker)
    try:
        wait_for(lambda: len(pids_logged(app, rid)) == 1)
        (first,) = pids_logged(app, rid)
        app.cancel(rid)
        app.retry(rid)
        wait_for(lambda: not alive(first), timeout=10)
        done = app.wait(rid, timeout=30)
    finally:
        worker.stop(hard=True)
        thread.join(15)
    (task,) = done.tasks
    assert (done.status.value, task.status, task.attempts) == ("succeeded", TaskStatus.SUCCEEDED, 2)
    # the first attempt never finished; the task succeeded when the second did
    assert not Path(f"{marker}.1").exists() and Path(f"{marker}.2").exists()


def test_a_stopping_worker_kills_its_commands_and_hands_their_tasks_back(
    make_app: Any,
) -> None:
    app = make_app(PIPELINES.replace("timeout = 0.5", "timeout = 60"))
    rid = app.submit("hang", {"items": [1, 2, 3]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, poll_interval=0.05, grace=0.5))
    thread, stats = start(worker)
    wait_for(lambda: len(pids_logged(app, rid)) == 3)
    pids = pids_logged(app, rid)
    worker.stop()
    thread.join(20)
    assert not thread.is_alive()
    assert not any(alive(p) for p in pids)
    assert stats[0].released == 3
    assert [(t.status, t.attempts) for t in app.get(rid).tasks] == [(TaskStatus.QUEUED, 0)] * 3


def test_progress_from_a_looped_command_is_stored_before_its_outcome(make_app: Any) -> None:
    app = make_app(PIPELINES)
    rid = app.submit("steps", {"items": [1]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, burst=True, poll_interval=0.05))
    thread, _ = start(worker)
    seen = []
    while thread.is_alive():
        (task,) = app.get(rid).tasks
        if task.status == TaskStatus.RUNNING and task.progress.current:
            seen.append(task.progress.current)
        time.sleep(0.05)
    thread.join()
    (task,) = app.get(rid).tasks
    assert task.status == TaskStatus.SUCCEEDED
    assert 1 in seen or 2 in seen  # seen while it ran
    assert (task.progress.current, task.progress.total) == (3, 3)  # the last one, kept
    assert task.progress.message == "step 3"


def test_without_pidfds_commands_run_in_threads_as_before(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("conveyor.worker.usable", lambda: False)
    app = make_app(PIPELINES)
    rid = app.submit("short", {"items": [{"n": n} for n in range(12)]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=4, burst=True, poll_interval=0.05))
    thread, stats = start(worker)
    thread.join(60)
    assert worker._loop is None
    assert stats[0].succeeded == 12
    assert app.get(rid).status.value == "succeeded"


def test_values_a_database_cannot_keep_fail_the_task_with_a_clear_error(make_app: Any) -> None:
    # PostgreSQL's json has no NaN and its text no NUL: neither may stop the worker
    # from recording this outcome or any other.
    app = make_app(PIPELINES)
    items = [{"what": "nan"}, {"what": "nul"}, {"what": "nan-progress"}]
    rid = app.submit("odd", {"items": items}).request.id
    done = finish_with(Worker(app, WorkerOptions(concurrency=2, poll_interval=0.05)), app, rid)
    assert done.status.value == "failed"
    nan, nan_progress, nul = sorted(done.tasks, key=lambda t: t.params["what"])
    assert nan.error == "result is not JSON: $.x: nan is not a JSON number"
    assert nul.error == "RuntimeError: a\ufffdb"
    assert nan_progress.error == "ValueError: progress current must be a finite number, not nan"


def test_an_outcome_the_store_refuses_is_recorded_as_a_failure_and_costs_no_other(
    make_app: Any,
) -> None:
    app = make_app(PIPELINES)
    rid = app.submit("short", {"items": [{"n": 1}, {"n": 2}]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=2, poll_interval=0.05))
    one, two = app.store.claim(worker.id, ["default"], 2, 30, app.clock())
    worker._record(
        [
            Outcome(one.id, TaskAction.SUCCEED, result={"ok": 1}, attempt=one.attempts),
            Outcome(two.id, TaskAction.SUCCEED, result={"x": float("inf")}, attempt=two.attempts),
        ]
    )
    got = {t.id: t for t in app.get(rid).tasks}
    assert got[one.id].status == TaskStatus.SUCCEEDED and got[one.id].result == {"ok": 1}
    assert got[two.id].status == TaskStatus.FAILED
    assert got[two.id].error == (
        "its outcome could not be recorded: Out of range float values are not JSON compliant"
    )


def test_a_task_its_worker_lost_track_of_is_not_kept_alive_by_its_heartbeat(
    make_app: Any,
) -> None:
    # Leased to this worker's id, but not among its attempts (its outcome could not be
    # recorded, say): its lease runs out, and the pipeline's policy decides (no retries).
    app = make_app(PIPELINES)
    rid = app.submit("short", {"items": [{"n": 1}]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=2, lease=1.0, poll_interval=0.05))
    (forgotten,) = app.store.claim(worker.id, ["default"], 1, 1.0, app.clock())
    (task,) = finish_with(worker, app, rid, timeout=20).tasks
    assert (task.id, task.status) == (forgotten.id, TaskStatus.FAILED)
    assert "lease expired" in (task.error or "")


def test_an_outcome_that_keeps_failing_to_record_holds_up_the_others_one_lease_at_most(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault the worker cannot place (not the database away, not a value it refuses)
    # is tried again for as long as a lease lasts, then taken for one that repeats.
    app = make_app(PIPELINES)
    rid = app.submit("short", {"items": [{"n": 1}, {"n": 2}]}).request.id
    worker = Worker(app, WorkerOptions(concurrency=2, lease=1.0, poll_interval=0.05))
    one, two = app.store.claim(worker.id, ["default"], 2, 30, app.clock())
    finish = app.store.finish

    def failing(worker_id: str, outcomes: Any, now: float) -> list[int]:
        if any(o.task_id == two.id for o in outcomes):
            raise RuntimeError("a fault of the store's own")
        return finish(worker_id, outcomes, now)

    monkeypatch.setattr(app.store, "finish", failing)
    started = time.monotonic()
    worker._record(
        [
            Outcome(one.id, TaskAction.SUCCEED, attempt=one.attempts),
            Outcome(two.id, TaskAction.SUCCEED, attempt=two.attempts),
        ]
    )
    assert time.monotonic() - started < 5
    got = {t.id: t for t in app.get(rid).tasks}
    assert got[one.id].status == TaskStatus.SUCCEEDED
    assert got[two.id].status == TaskStatus.RUNNING  # its lease, no longer renewed, decides
