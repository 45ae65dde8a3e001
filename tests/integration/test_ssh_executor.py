"""The SSH executor against a real sshd on a loopback port, through a real worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd_support import CuttableLink, Sshd, sshd_server  # noqa: F401  (the `sshd` fixture)

from conftest import make_config
from conveyor.app import Conveyor
from conveyor.executors.launcher import LINE_MAX
from conveyor.executors.ssh import _WRAPPER
from conveyor.tasks import Task, TaskStatus
from conveyor.worker import Worker, WorkerOptions
from proc_support import alive

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[[str], Conveyor]]:
    apps: list[Conveyor] = []

    def build(toml: str) -> Conveyor:
        app = Conveyor(make_config(tmp_path, sqlite_url, "[conveyor]\nlease = 3\n" + toml))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.close()


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)


def pipeline_toml(command: list[str], **extra: object) -> str:
    lines = ["[pipelines.remote]", 'executor = "ssh"', 'hosts = ["lab"]']
    lines.append(f"command = {json.dumps(command)}")
    for key, value in extra.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


class Running:
    """A worker in a thread of its own, stopped at the end."""

    def __init__(self, app: Conveyor) -> None:
        self.worker = Worker(app, WorkerOptions(concurrency=2, poll_interval=0.1, grace=5))
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop(hard=True)
        self.thread.join(20)


def run_to_end(app: Conveyor, params: dict[str, object], timeout: float = 30) -> Task:
    req = app.submit("remote", params)
    worker = Running(app)
    try:
        done = app.wait(req.request.id, timeout=timeout)
    finally:
        worker.stop()
    return done.tasks[0]


def wait_for(check: Callable[[], bool], within: float = 15) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def log_of(app: Conveyor, task_id: int) -> str:
    try:
        return app.log(task_id).read().decode()
    except Exception:
        return ""


# --------------------------------------------------------------------------- runs
def test_a_command_runs_over_ssh_with_each_argument_quoted(sshd: Sshd, make, tmp_path) -> None:
    hostile = "a b; touch " + str(tmp_path / "pwned") + " $(id) `id` 'q\" \\"
    app = make(
        sshd.host_toml()
        + pipeline_toml(
            [
                "sh",
                "-c",
                'printf "arg=[%s]\\n" "$1"; echo "task $CONVEYOR_TASK_ID"; '
                'echo "work [$CONVEYOR_WORK_DIR]"; '
                "echo conveyor:progress 1/2 halfway; echo to-stderr >&2",
                "x",
                "{name}",
            ]
        )
    )
    task = run_to_end(app, {"name": hostile})
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == {"exit_code": 0, "host": "lab"}
    log = log_of(app, task.id)
    assert f"arg=[{hostile}]" in log
    assert f"task {task.id}" in log and "to-stderr" in log and "exit code 0" in log
    assert "work [.]" in log  # no cwd: where sshd starts it, as {conveyor.work_dir} says
    assert "__conveyor_pgid__" not in log
    assert not (tmp_path / "pwned").exists()
    assert task.progress.current in (1, 2)


def test_a_nonzero_exit_fails_the_task(sshd: Sshd, make) -> None:
    app = make(sshd.host_toml() + pipeline_toml(["sh", "-c", "echo bad; exit 3"]))
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert "exit code 3" in (task.error or "")


def test_remote_output_without_newlines_is_logged_in_bounded_pieces(sshd: Sshd, make) -> None:
    # 1 MB with no newline: all of it reaches the log, in lines of at most LINE_MAX. The
    # piece of it that starts with the progress prefix is not a progress report.
    app = make(
        sshd.host_toml()
        + pipeline_toml(
            [
                "sh",
                "-c",
                "head -c 1000000 /dev/zero | tr '\\0' y; echo; echo end; "
                f"head -c {LINE_MAX} /dev/zero | tr '\\0' z; echo conveyor:progress 3/4 no",
            ]
        )
    )
    task = run_to_end(app, {})
    assert task.status == TaskStatus.SUCCEEDED, task.error
    lines = log_of(app, task.id).splitlines()
    assert max(len(line.encode()) for line in lines) <= LINE_MAX
    assert sum(line.count("y") for line in lines if set(line) == {"y"}) == 1_000_000
    assert "end" in lines and "conveyor:progress 3/4 no" in lines
    assert task.progress.current == 0 and task.progress.message is None


def test_logs_stream_back_while_the_command_runs(sshd: Sshd, make, tmp_path) -> None:
    gate = tmp_path / "gate"
    app = make(
        sshd.host_toml()
        + pipeline_toml(
            [
                "sh",
                "-c",
                'echo first line; i=0; while [ ! -e "$1" ] && [ $i -lt 200 ]; '
                "do sleep 0.05; i=$((i+1)); done; echo last-$((40+2))",
                "x",
                str(gate),
            ]
        )
    )
    req = app.submit("remote", {})
    worker = Running(app)
    try:
        task_id = req.request.tasks[0].id
        wait_for(lambda: "first line" in log_of(app, task_id))
        assert app.task(task_id).status == TaskStatus.RUNNING
        assert "last-42" not in log_of(app, task_id)
        gate.touch()
        done = app.wait(req.request.id, timeout=20)
    finally:
        worker.stop()
    assert done.tasks[0].status == TaskStatus.SUCCEEDED
    assert "last-42" in log_of(app, task_id)


def _pids_started(sshd: Sshd, make, tmp_path, **extra: object):
    pids = tmp_path / "pids"
    app = make(
        sshd.host_toml()
        + pipeline_toml(
            [
                "sh",
                "-c",
                'sleep 120 & echo $! > "$1"; echo $$ >> "$1"; printf "last words"; wait',
                "x",
                str(pids),
            ],
            **extra,
        )
    )
    return app, pids


def test_a_timeout_kills_the_remote_process_group(sshd: Sshd, make, tmp_path) -> None:
    app, pids = _pids_started(sshd, make, tmp_path, timeout=1.5)
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert "timed out" in (task.error or "")
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    wait_for(lambda: not any(alive(p) for p in started), within=10)
    # output with no newline yet, read before the kill, is in the log
    assert "last words" in log_of(app, task.id).splitlines()


def test_a_cancel_kills_the_remote_process_group(sshd: Sshd, make, tmp_path) -> None:
    app, pids = _pids_started(sshd, make, tmp_path)
    req = app.submit("remote", {})
    worker = Running(app)
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        started = [int(p) for p in pids.read_text().split()]
        app.cancel(req.request.id)
        wait_for(lambda: not any(alive(p) for p in started), within=15)
        # output with no newline yet, read before the kill, is logged
        wait_for(lambda: "last words" in log_of(app, req.request.tasks[0].id).splitlines())
    finally:
        worker.stop()
    assert app.task(req.request.tasks[0].id).status == TaskStatus.CANCELLED


def test_a_command_killed_by_a_signal_on_the_host_says_so(sshd: Sshd, make, tmp_path) -> None:
    """Under sshd, `setsid -w` forks, and a signal's death reaches the worker as an exit
    code (9) with setsid's word on stderr: the task says killed by signal 9, not exit
    code 9."""
    marker = tmp_path / "pid"
    app = make(
        sshd.host_toml()
        + pipeline_toml(["sh", "-c", 'echo $$ > "$1"; echo up; sleep 30', "x", str(marker)])
    )
    req = app.submit("remote", {})
    task_id = req.request.tasks[0].id
    worker = Running(app)
    try:
        wait_for(lambda: "up" in log_of(app, task_id).splitlines())
        os.kill(int(marker.read_text()), signal.SIGKILL)
        done = app.wait(req.request.id, timeout=20)
    finally:
        worker.stop()
    task = done.tasks[0]
    assert task.status == TaskStatus.FAILED
    assert task.error == "killed by signal 9 on lab"
    assert "did not exit normally" in log_of(app, task_id)


def test_a_last_line_is_logged_when_a_process_left_behind_holds_the_output(
    sshd: Sshd, make, tmp_path
) -> None:
    """The timeout kills the command's group, but a process in a session of its own still
    holds the output open: reading is cut short, and what was read is still logged."""
    escaped = tmp_path / "escaped"
    app = make(
        sshd.host_toml()
        + pipeline_toml(
            [
                "sh",
                "-c",
                'setsid sleep 60 & echo $! > "$1"; printf "last words"; sleep 60',
                "x",
                str(escaped),
            ],
            timeout=1.5,
        )
    )
    try:
        task = run_to_end(app, {})
        assert task.status == TaskStatus.FAILED and "timed out" in (task.error or "")
        assert "last words" in log_of(app, task.id).splitlines()
    finally:
        if escaped.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(escaped.read_text()), signal.SIGKILL)


# ------------------------------------------------------------------ lost hosts
def _flaky(sshd: Sshd, make, tmp_path, retries: int, **host: object):
    """A command that, the first time, says `tick` and then sleeps silently (writing its
    sleep's pid into `marker`); the second time it succeeds."""
    marker = tmp_path / "marker"
    app = make(
        sshd.host_toml(**host)
        + pipeline_toml(
            [
                "sh",
                "-c",
                'if [ -e "$1" ]; then echo second attempt; exit 0; fi; '
                'sleep 60 & echo $! > "$1"; echo tick; wait',
                "x",
                str(marker),
            ],
            retries=retries,
            backoff=0.1,
        )
    )
    return app


def test_a_connection_dropped_mid_task_is_retried_and_the_retry_succeeds(
    sshd: Sshd, make, tmp_path
) -> None:
    app = _flaky(sshd, make, tmp_path, retries=1)
    req = app.submit("remote", {})
    task_id = req.request.tasks[0].id
    worker = Running(app)
    try:
        wait_for(lambda: "tick" in log_of(app, task_id).splitlines())
        assert sshd.drop_sessions() >= 1
        done = app.wait(req.request.id, timeout=30)
    finally:
        worker.stop()
    task = done.tasks[0]
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.attempts == 2
    first = app.log(task_id, 1).read().decode()
    assert "lost" in first
    assert "second attempt" in app.log(task_id, 2).read().decode()
    # the first attempt's silent command did not run on after its connection was lost
    sleeper = int((tmp_path / "marker").read_text())
    wait_for(lambda: not alive(sleeper), within=10)


def test_a_host_that_hangs_mid_task_is_noticed_by_keepalives(sshd: Sshd, make, tmp_path) -> None:
    app = _flaky(sshd, make, tmp_path, retries=0, keepalive_interval=0.5, keepalive_count_max=2)
    req = app.submit("remote", {})
    task_id = req.request.tasks[0].id
    worker = Running(app)
    stopped: list[int] = []
    try:
        wait_for(lambda: "tick" in log_of(app, task_id).splitlines())
        stopped = sshd.session_pids()
        for pid in stopped:  # the host stops answering, the TCP connection stays up
            os.kill(pid, signal.SIGSTOP)
        done = app.wait(req.request.id, timeout=20)
    finally:
        for pid in stopped:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        worker.stop()
    task = done.tasks[0]
    assert task.status == TaskStatus.FAILED
    assert "lost" in (task.error or ""), task.error
    # once the stopped sshd is gone, the command's group goes too
    sleeper = int((tmp_path / "marker").read_text())
    wait_for(lambda: not alive(sleeper), within=10)


def test_a_command_cut_off_by_the_network_is_killed_on_the_host(sshd: Sshd, make, tmp_path) -> None:
    """A network cut closes nothing: the worker gives up on the host after its
    keepalives, but the host's sshd keeps the session. The dots the worker wrote on the
    command's stdin stop, and after its silence (10 s here) the watcher on the host
    kills the command's group."""
    link = CuttableLink(sshd.port)
    known = tmp_path / "known_hosts_link"
    known.write_text(sshd.known_hosts.read_text().replace(f"]:{sshd.port} ", f"]:{link.port} "))
    app = _flaky(
        sshd,
        make,
        tmp_path,
        retries=0,
        port=link.port,
        known_hosts=str(known),
        keepalive_interval=0.5,
        keepalive_count_max=2,
    )
    req = app.submit("remote", {})
    task_id = req.request.tasks[0].id
    worker = Running(app)
    try:
        wait_for(lambda: "tick" in log_of(app, task_id).splitlines())
        sessions = sshd.session_pids()
        sleeper = int((tmp_path / "marker").read_text())
        link.cut()
        time.sleep(3)
        assert alive(sleeper)  # the host waits 10 s from the last dot
        done = app.wait(req.request.id, timeout=20)
        task = done.tasks[0]
        assert task.status == TaskStatus.FAILED
        assert "lost" in (task.error or ""), task.error
        wait_for(lambda: not alive(sleeper), within=20)
        # killed on the host's side: sshd never learnt that the worker had gone
        assert sessions and all(alive(pid) for pid in sessions)
    finally:
        link.close()
        worker.stop()


def _wrapped_sleep(quiet_after: int, path: str) -> subprocess.Popen[bytes]:
    """The remote wrapper run here, as sshd runs it: `sleep 30` in a group of its own,
    its stdin a pipe from us."""
    proc = subprocess.Popen(
        [
            shutil.which("setsid") or "setsid",
            *("-w", "sh", "-c", _WRAPPER, "conveyor", str(quiet_after), "sleep", "30"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": path},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"__conveyor_pgid__ ")
    return proc


# `timeout` as busybox's works: the program is exec'd (inheriting the ignored TERM of
# the watcher), and a process of its own signals it after SECS.
_BUSYBOX_TIMEOUT = """#!/bin/sh
sig=TERM; if [ "$1" = -s ]; then sig=$2; shift 2; fi
secs=$1; shift
( sleep "$secs"; kill -"$sig" $$ ) >/dev/null 2>&1 &
exec "$@"
"""
_OLD_BUSYBOX_TIMEOUT = "#!/bin/sh\necho 'usage: timeout [-t SECS] [-s SIG] PROG ARGS' >&2\nexit 1\n"


@pytest.mark.parametrize("timeout_tool", ["gnu", "busybox", "old busybox", "none"])
def test_the_hosts_watcher_kills_on_silence_where_it_can_time_its_wait(
    tmp_path, timeout_tool: str
) -> None:
    """Fed a dot more often than its silence, the command runs on; then silence kills it.
    A host whose `timeout` cannot time `head` (none, or one that takes other options)
    falls back to the end of stdin alone: silence harms nothing there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "cat", "sleep", "head", "printf"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    fake = {"busybox": _BUSYBOX_TIMEOUT, "old busybox": _OLD_BUSYBOX_TIMEOUT}.get(timeout_tool)
    if timeout_tool == "gnu":
        (bin_dir / "timeout").symlink_to(shutil.which("timeout") or "timeout")
    elif fake is not None:
        (bin_dir / "timeout").write_text(fake)
        (bin_dir / "timeout").chmod(0o755)
    proc = _wrapped_sleep(3, str(bin_dir))
    assert proc.stdin is not None
    try:
        for _ in range(6):  # 1.8 s, fed every 0.3 s
            proc.stdin.write(b".")
            proc.stdin.flush()
            time.sleep(0.3)
        assert proc.poll() is None
        if timeout_tool in ("gnu", "busybox"):
            proc.wait(timeout=15)  # three seconds of silence, then TERM
        else:
            time.sleep(4)
            assert proc.poll() is None
            proc.stdin.close()
            proc.wait(timeout=10)
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()  # what the watcher left reading it ends too
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_progress_write_kept_waiting_by_the_database_does_not_starve_the_watcher(
    sshd: Sshd, tmp_path, sqlite_url: str
) -> None:
    """The attempt's event loop writes the dots that keep the host's watcher from
    killing the command; a progress line, written to the database, waits in a thread of
    its own while the database's write lock is held elsewhere for longer than the
    silence (10 s here), and the command runs to its end."""
    app = Conveyor(
        make_config(
            tmp_path,
            sqlite_url,
            "[conveyor]\nlease = 60\n"
            + sshd.host_toml(keepalive_interval=0.5, keepalive_count_max=2)
            + pipeline_toml(
                ["sh", "-c", "sleep 1; echo 'conveyor:progress 1/2 half'; sleep 14; echo done"]
            ),
        )
    )
    try:
        req = app.submit("remote", {})
        worker = Running(app)
        try:
            wait_for(lambda: app.get(req.request.id).tasks[0].status == TaskStatus.RUNNING)
            with contextlib.closing(
                sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
            ) as holder:
                holder.execute("BEGIN IMMEDIATE")  # before the progress line comes
                time.sleep(12)
                holder.execute("ROLLBACK")
            done = app.wait(req.request.id, timeout=30)
        finally:
            worker.stop()
        task = done.tasks[0]
        assert task.status == TaskStatus.SUCCEEDED, task.error
        assert "done" in log_of(app, task.id).splitlines()
        assert (task.progress.current, task.progress.total) == (1, 2)
    finally:
        app.close()


def test_an_unreachable_host_is_a_retryable_failure(sshd: Sshd, make, tmp_path) -> None:
    sshd.stop()
    app = make(sshd.host_toml() + pipeline_toml(["true"], retries=1, backoff=0.1))
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert task.attempts == 2  # retried on the pipeline's policy
    assert "cannot connect" in (task.error or "")


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_host_that_never_answers_the_connect_holds_up_no_timeout_or_cancel(
    sshd: Sshd, make, how: str
) -> None:
    # A listener that takes the connection and says nothing: the connect time-out is
    # 30 s, the task's 1 s (or it is cancelled after 1 s); it ends then, not after 30.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    app = make(
        sshd.host_toml(port=silent.getsockname()[1], connect_timeout=30)
        + pipeline_toml(["true"], **({"timeout": 1} if how == "timeout" else {}))
    )
    started = time.monotonic()
    req = app.submit("remote", {})
    worker = Running(app)
    try:
        if how == "cancel":
            wait_for(lambda: bool(accepted))
            time.sleep(0.5)
            app.cancel(req.request.id)
        task_id = req.request.tasks[0].id
        wait_for(lambda: app.task(task_id).status.terminal, within=10)
        took = time.monotonic() - started
    finally:
        worker.stop()
        silent.close()
        for conn in accepted:
            conn.close()
    task = app.task(task_id)
    if how == "timeout":
        assert task.status == TaskStatus.FAILED and task.error == "timed out after 1s"
    else:
        assert task.status == TaskStatus.CANCELLED
    assert took < 8
    assert "stopped while connecting or starting the command" in log_of(app, task_id)


# ------------------------------------------------------------- refused set-ups
def test_a_host_key_mismatch_is_refused_before_anything_runs(sshd: Sshd, make, tmp_path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = (tmp_path / "other_key.pub").read_text().split()[:2]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    marker = tmp_path / "ran"
    app = make(
        sshd.host_toml(known_hosts=str(wrong))
        + pipeline_toml(["touch", str(marker)], retries=2, backoff=0.1)
    )
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert task.attempts == 1  # configuration: not retried
    assert "not trusted" in (task.error or "") and "refusing" in (task.error or "")
    assert not marker.exists()


def test_an_unknown_host_is_refused_by_default(sshd: Sshd, make, tmp_path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    app = make(sshd.host_toml(known_hosts=str(empty)) + pipeline_toml(["true"]))
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert "not trusted" in (task.error or "")


@pytest.mark.parametrize("content", [None, "not a key\n"])
def test_a_bad_key_file_is_a_clear_error(sshd: Sshd, make, tmp_path, content) -> None:
    key = tmp_path / "bad_key"
    if content is not None:
        key.write_text(content)
    app = make(sshd.host_toml(key_file=str(key)) + pipeline_toml(["true"], retries=2))
    task = run_to_end(app, {})
    assert task.status == TaskStatus.FAILED
    assert task.attempts == 1
    assert str(key) in (task.error or ""), task.error


# ------------------------------------------------------------------ path mapping
def test_a_hosts_path_map_rewrites_declared_paths_for_it(sshd: Sshd, make, tmp_path) -> None:
    local = tmp_path / "mnt" / "p"
    remote = tmp_path / "data" / "p"
    for d in (local, remote):
        d.mkdir(parents=True)
    (remote / "in.bin").write_text("remote copy\n")
    host = sshd.host_toml() + f'path_map = {{ "{local}/" = "{remote}/" }}\n'
    app = make(
        host
        + pipeline_toml(
            ["cat", "{file}"],
            paths=["file"],
            roots=[str(local)],
            path_map={"P:/": f"{local}/"},
        )
    )
    task = run_to_end(app, {"file": "p:\\in.bin"})
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.params["file"] == f"{local}/in.bin"  # the worker's view, checked at submit
    log = log_of(app, task.id)
    assert "remote copy" in log and f"{remote}/in.bin" in log
