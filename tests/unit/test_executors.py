"""The command and Python executors, run with real tiny programs."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conveyor.executors import ExecResult, TaskContext, executor_for
from conveyor.executors.command import CommandExecutor
from conveyor.executors.launcher import LINE_MAX, Lines, which
from conveyor.executors.loop import CommandLoop, Job, Slots
from conveyor.executors.python import NonRetryable, PythonExecutor
from conveyor.pipelines import Pipeline
from conveyor.tasks import Progress
from proc_support import alive

from .factories import make_task

pytestmark = pytest.mark.timeout(30)


def run_in_a_loop(
    self: CommandExecutor, pipeline: Pipeline, ctx: TaskContext, deadline: float | None
) -> ExecResult:
    """An attempt run as a worker runs plain commands: by a command loop."""
    ended: list[ExecResult] = []
    done = threading.Event()

    def end(_item: str, result: ExecResult) -> None:
        ended.append(result)
        done.set()

    loop: CommandLoop[str] = CommandLoop(
        self, Slots(1), lambda _item: Job(pipeline, ctx, deadline), end
    )
    try:
        loop.submit("the attempt")
        assert done.wait(60)
    finally:
        loop.close()
    return ended[0]


def no_launcher(*_args: object) -> None:
    raise OSError("no launcher here")


@pytest.fixture(autouse=True, params=["pidfd", "waitpid", "loop", "loop-here"])
def exit_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every command test runs four times: the attempt alone in its thread, its exit
    seen through a pidfd (Linux) or through waitpid between polls (where the system has
    no pidfd); in a command loop, whose launcher runs the command, as a worker runs
    plain commands; and in a command loop that could not start its launcher and runs
    its commands itself."""
    if request.param == "waitpid":
        monkeypatch.setattr("conveyor.executors.command._pidfd", lambda pid: None)
    if request.param.startswith("loop"):
        monkeypatch.setattr(CommandExecutor, "run", run_in_a_loop)
    if request.param == "loop-here":
        monkeypatch.setattr("conveyor.executors.loop.Launcher", no_launcher)
    return str(request.param)


class Run:
    """One attempt's context, with what it reported and logged."""

    def __init__(self, tmp_path: Path, params=None, timeout=None):
        self.reports: list[Progress] = []
        self.log_file = tmp_path / "logs" / "11.log"
        self.work = tmp_path / "work" / "11"
        self.ctx = TaskContext(
            make_task(params, timeout=timeout),
            lambda: (self.log_file, self.work),
            self.reports.append,
            min_report_interval=0,
        )

    @property
    def log(self) -> str:
        self.ctx.close()
        return self.log_file.read_text() if self.log_file.exists() else ""


def script(code: str, *args: str, **kw) -> Pipeline:
    return Pipeline(
        name="p",
        executor="command",
        command=(sys.executable, "-c", textwrap.dedent(code), *args),
        **kw,
    )


def run_command(tmp_path, code, *args, params=None, deadline=None, timeout=None, **kw):
    run = Run(tmp_path, params, timeout)
    result = CommandExecutor().run(script(code, *args, **kw), run.ctx, deadline)
    return run, result


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def wait_gone(pids, pgid=None, within=3.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not any(alive(p) for p in pids) and (pgid is None or not group_members(pgid)):
            return True
        time.sleep(0.05)
    return False


def numbers_after(text: str, label: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith(label + " ")]


def kill_leftovers(pids):
    for pid in pids:
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass


# command: exit codes ----------------------------------------------------------------------------


def test_exit_zero_succeeds(tmp_path):
    run, result = run_command(tmp_path, "print('hello')")
    assert result == ExecResult(ok=True, result={"exit_code": 0})
    assert "exit code 0" in run.log


@pytest.mark.parametrize("code", [1, 3, 255])
def test_nonzero_exit_fails_and_may_be_retried(tmp_path, code):
    _, result = run_command(tmp_path, f"import sys; sys.exit({code})")
    assert not result.ok
    assert result.error == f"exit code {code}"
    assert result.retryable


def test_killed_by_a_signal(tmp_path):
    _, result = run_command(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert not result.ok
    assert result.error == "killed by signal 9"


def test_program_that_cannot_start_fails_for_good(tmp_path):
    run = Run(tmp_path)
    pipeline = Pipeline(name="p", executor="command", command=(str(tmp_path / "no-such-program"),))
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert not result.ok
    assert not result.retryable
    assert "cannot start" in result.error
    assert "cannot start" in run.log


def test_a_program_not_in_path_cannot_start(tmp_path):
    run = Run(tmp_path)
    pipeline = Pipeline(name="p", executor="command", command=("no-such-program-here",))
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert not result.ok
    assert not result.retryable
    assert "cannot start no-such-program-here" in result.error


def test_a_program_in_path_that_is_not_executable_is_refused_as_such(tmp_path):
    # As a shell says it: the program is there, but may not be run.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "not-runnable").write_text("#!/bin/sh\necho ran\n")
    run = Run(tmp_path)
    pipeline = Pipeline(
        name="p", executor="command", command=("not-runnable",), env={"PATH": str(bin_dir)}
    )
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert not result.ok
    assert not result.retryable
    assert result.error == "cannot start not-runnable: Permission denied"
    assert "ran" not in run.log


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_a_working_directory_that_cannot_be_entered_is_named_in_the_error(tmp_path, where):
    cwd = tmp_path / "nowhere"
    if where == "a file":
        cwd.write_text("")
    run = Run(tmp_path)
    pipeline = Pipeline(name="p", executor="command", command=("true",), cwd=str(cwd))
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert not result.ok
    assert not result.retryable
    problem = "No such file or directory" if where == "missing" else "Not a directory"
    assert result.error == f"cannot start true: its working directory {cwd}: {problem}"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_argument_that_is_no_c_string_fails_for_good_and_leaves_no_descriptor_open(tmp_path):
    # A lone surrogate (which JSON may carry) has no encoding to pass to a program.
    pipeline = Pipeline(name="p", executor="command", command=("echo", "{x}"))
    before = open_descriptors()
    for _ in range(5):
        run = Run(tmp_path, params={"x": "a\ud800b"})
        result = CommandExecutor().run(pipeline, run.ctx, None)
        run.ctx.close()
        assert not result.ok
        assert not result.retryable
        assert result.error.startswith("cannot start echo: ")
        assert "surrogate" in result.error
    assert open_descriptors() <= before


def test_a_program_found_in_path_is_found_again_after_it_moves(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    prog = first / "say-hi"
    prog.write_text("#!/bin/sh\necho hi from $0\n")
    prog.chmod(0o755)
    pipeline = Pipeline(
        name="p",
        executor="command",
        command=("say-hi",),
        env={"PATH": f"{first}:{second}:{os.environ['PATH']}"},
    )
    executor = CommandExecutor()  # one per worker: it remembers where programs are
    run = Run(tmp_path / "1")
    assert executor.run(pipeline, run.ctx, None).ok
    assert f"hi from {prog}" in run.log
    prog.rename(second / "say-hi")
    run = Run(tmp_path / "2")
    assert executor.run(pipeline, run.ctx, None).ok
    assert f"hi from {second / 'say-hi'}" in run.log


def test_a_relative_path_entry_is_looked_in_from_each_commands_working_directory(tmp_path):
    # PATH=bin:/elsewhere: as execvp does, `bin` is the working directory's own, so the
    # same program name may be another program in another working directory.
    elsewhere, plain, own = tmp_path / "elsewhere", tmp_path / "plain", tmp_path / "own"
    for folder in (elsewhere, plain, own / "bin"):
        folder.mkdir(parents=True)
    for prog in (elsewhere / "say-hi", own / "bin" / "say-hi"):
        prog.write_text("#!/bin/sh\necho hi from $0\n")
        prog.chmod(0o755)
    executor = CommandExecutor()  # one per worker: it remembers where programs are
    path = f"bin:{elsewhere}:{os.environ['PATH']}"
    for n, cwd, expected in [
        (1, plain, f"hi from {elsewhere / 'say-hi'}"),
        (2, own, "hi from bin/say-hi"),
        (3, plain, f"hi from {elsewhere / 'say-hi'}"),
    ]:
        pipeline = Pipeline(
            name="p", executor="command", command=("say-hi",), env={"PATH": path}, cwd=str(cwd)
        )
        run = Run(tmp_path / str(n))
        assert executor.run(pipeline, run.ctx, None).ok, run.log
        assert expected in run.log.splitlines()


def test_a_launcher_remembers_no_program_found_through_a_relative_path_entry(tmp_path, monkeypatch):
    # The launcher looks programs up from the command's working directory, and remembers
    # what it found for the next commands only where that cannot depend on it.
    (tmp_path / "own" / "bin").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "own" / "bin" / "say-hi").write_text("")
    (tmp_path / "own" / "bin" / "say-hi").chmod(0o755)
    found: dict[tuple[str, str | None], str] = {}
    fixed = os.path.dirname(sys.executable)
    path = f"bin:{fixed}"
    monkeypatch.chdir(tmp_path / "plain")
    assert which(found, "python3", path) == os.path.join(fixed, "python3")
    assert which(found, "say-hi", path) is None
    monkeypatch.chdir(tmp_path / "own")
    assert which(found, "say-hi", path) == "bin/say-hi"
    assert found == {}
    assert which(found, "python3", fixed) == os.path.join(fixed, "python3")
    assert found == {("python3", fixed): os.path.join(fixed, "python3")}


def test_template_error_at_run_time_fails_for_good(tmp_path):
    run = Run(tmp_path, params={"a": 1})
    pipeline = Pipeline(name="p", executor="command", command=("echo", "{missing}"))
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert not result.ok
    assert not result.retryable
    assert "missing" in result.error


# command: output and progress -----------------------------------------------------------------


def test_output_and_errors_are_captured_in_the_log(tmp_path):
    code = """
        import sys
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        sys.stdout.write("no newline at the end")
    """
    run, result = run_command(tmp_path, code)
    assert result.ok
    lines = run.log.splitlines()
    assert lines[0].startswith("$ ")  # the command line comes first
    assert "to stdout" in lines
    assert "to stderr" in lines
    assert "no newline at the end" in lines
    assert lines[-1] == "exit code 0"


def test_non_utf8_output_does_not_break_the_run(tmp_path):
    run, result = run_command(tmp_path, "import sys; sys.stdout.buffer.write(b'bad \\xff byte\\n')")
    assert result.ok
    assert "bad \ufffd byte" in run.log


def test_progress_lines_reach_the_report_callback(tmp_path):
    code = """
        for i in range(1, 4):
            # braces in a command item are template placeholders: none here
            print("conveyor:progress %d/3 step %d" % (i, i), flush=True)
        print("conveyor:progress 9")
        print("conveyor:progress nonsense")
        print("not progress 1/2")
    """
    run, result = run_command(tmp_path, code)
    assert result.ok
    assert run.reports == [
        Progress(1, 3, "step 1"),
        Progress(2, 3, "step 2"),
        Progress(3, 3, "step 3"),
        Progress(9, None, None),
    ]
    assert "conveyor:progress 2/3 step 2" in run.log


def test_progress_that_is_not_a_finite_number_is_only_logged(tmp_path):
    # nan and infinities are no progress (and SQLite would refuse to store a NaN)
    code = """
        for line in ("nan/10", "1/inf", "1e999", "-inf/3", "2/4 fine"):
            print("conveyor:progress " + line)
    """
    run, result = run_command(tmp_path, code)
    assert result.ok
    assert run.reports == [Progress(2, 4, "fine")]
    assert "conveyor:progress 1e999" in run.log.splitlines()


def test_the_rest_of_a_long_line_is_never_taken_as_progress(tmp_path):
    # A line longer than LINE_MAX is logged in pieces; a piece that happens to start
    # with the progress prefix is still the middle of a line, not a report.
    code = f"""
        import sys
        sys.stdout.write("x" * {LINE_MAX} + "conveyor:progress 5/6 inside a line\\n")
        sys.stdout.write("conveyor:progress 1/2 real\\n")
        sys.stdout.write("y" * {LINE_MAX} + "conveyor:progress 7/8 at the end")
    """
    run, result = run_command(tmp_path, code)
    assert result.ok
    assert run.reports == [Progress(1, 2, "real")]
    lines = run.log.splitlines()
    assert "conveyor:progress 5/6 inside a line" in lines  # logged all the same
    assert "conveyor:progress 7/8 at the end" in lines


def test_large_output_is_not_lost(tmp_path):
    run, result = run_command(tmp_path, "for i in range(20000): print('line', i)")
    assert result.ok
    lines = run.log.splitlines()
    assert "line 0" in lines
    assert "line 19999" in lines
    assert sum(1 for line in lines if line.startswith("line ")) == 20000


def test_output_without_newlines_is_logged_whole_in_bounded_pieces(tmp_path):
    # 3 MB with no newline, then a line of two-byte characters longer than a piece:
    # nothing is lost, no log line is longer than LINE_MAX bytes, and no piece is cut
    # inside a character.
    code = (
        "import sys; w = sys.stdout.write; w('x' * 3_000_000); "
        "w('\\n' + '\\u00e9' * 100_000 + '\\n'); print('after')"
    )
    run, result = run_command(tmp_path, code)
    assert result.ok
    lines = run.log.splitlines()
    assert max(len(line.encode()) for line in lines) <= LINE_MAX
    output = lines[1:-1]  # between the command line and its exit
    assert sum(line.count("x") for line in output) == 3_000_000
    assert sum(line.count("\u00e9") for line in output) == 100_000
    assert "\ufffd" not in run.log
    assert lines[-2:] == ["after", "exit code 0"]


def feed(reads: list[bytes]) -> tuple[list[tuple[bytes, bool]], Lines]:
    lines = Lines()
    out = []
    for chunk in reads:
        out += lines.feed(chunk)
        assert len(lines.held) <= LINE_MAX
    return out, lines


def test_lines_hold_at_most_a_piece_and_never_cut_a_character():
    got, lines = feed([b"ab", b"c\nde\nf"])
    assert (got, lines.end()) == ([(b"abc", True), (b"de", True)], (b"f", True))
    for filler in (b"x", "\u00e9".encode(), "\u20ac".encode(), "\U0001f600".encode()):
        data = filler * (3 * LINE_MAX // len(filler) + 7)
        got, lines = feed([data[at : at + 4096] for at in range(0, len(data), 4096)])
        last = lines.end()
        assert last is not None
        pieces = [p for p, _ in got] + [last[0]]
        assert b"".join(pieces) == data
        assert all(0 < len(p) <= LINE_MAX for p in pieces)
        assert all(p.decode() for p in pieces)  # each piece is whole characters
        # only the first piece starts a line
        assert [starts for _, starts in [*got, last]] == [True] + [False] * (len(pieces) - 1)
    # a CRLF line end just past LINE_MAX: no piece is only its CR (an empty line)
    long = b"x" * LINE_MAX
    for reads in ([long + b"\r\n"], [long + b"\r", b"\n"], [long, b"\r", b"\n"]):
        got, lines = feed(reads)
        assert lines.end() is None
        assert [(p.rstrip(b"\r"), s) for p, s in got] == [(long[:-1], True), (b"x", False)]
    # bytes that are not UTF-8 are cut at LINE_MAX, not lost
    data = b"\x80" * (LINE_MAX + 10)
    got, lines = feed([data])
    assert got == [(data[:LINE_MAX], True)] and lines.end() == (data[LINE_MAX:], False)


def test_lines_know_which_start_a_line_across_reads():
    # the rest of a cut line, ended by a later read, does not start a line; the next does
    got, _ = feed([b"x" * (LINE_MAX + 5), b"rest\nnext\n"])
    assert got == [(b"x" * LINE_MAX, True), (b"xxxxxrest", False), (b"next", True)]
    # a cut line's end coming whole in one read, after lines cut in the same read
    got, _ = feed([b"a" * (LINE_MAX + 1) + b"\nb\n" + b"c" * (LINE_MAX + 2) + b"\nd\n"])
    assert got == [
        (b"a" * LINE_MAX, True),
        (b"a", False),
        (b"b", True),
        (b"c" * LINE_MAX, True),
        (b"cc", False),
        (b"d", True),
    ]


# command: arguments, environment, directory ------------------------------------------------------


def test_params_reach_the_program_as_single_arguments(tmp_path):
    hostile = "two words; touch pwned $(touch pwned2) `touch pwned3` 'q' \"d\" | cat > out"
    code = "import json, sys; print('ARGV', json.dumps(sys.argv[1:]))"
    run, result = run_command(
        tmp_path,
        code,
        "{value}",
        "--n={n}",
        "{conveyor.task_id}",
        params={"value": hostile, "n": 3},
    )
    assert result.ok
    line = next(x for x in run.log.splitlines() if x.startswith("ARGV "))
    assert json.loads(line[5:]) == [hostile, "--n=3", "11"]
    for name in ("pwned", "pwned2", "pwned3", "out"):
        assert not (run.work / name).exists()
        assert not (tmp_path / name).exists()


def test_environment_and_working_directory(tmp_path):
    code = """
        import os
        for k in ("CONVEYOR_REQUEST_ID", "CONVEYOR_TASK_ID", "CONVEYOR_ATTEMPT",
                  "CONVEYOR_WORK_DIR", "MODE"):
            print("ENV", k, os.environ.get(k))
        print("CWD", os.getcwd())
    """
    run, result = run_command(tmp_path, code, env={"MODE": "fast"})
    assert result.ok
    log = run.log
    assert "ENV CONVEYOR_REQUEST_ID 5" in log
    assert "ENV CONVEYOR_TASK_ID 11" in log
    assert "ENV CONVEYOR_ATTEMPT 1" in log
    assert f"ENV CONVEYOR_WORK_DIR {run.work}" in log
    assert "ENV MODE fast" in log
    assert f"CWD {run.work.resolve()}" in log


def test_pipeline_cwd_is_used_when_set(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run, result = run_command(tmp_path, "import os; print('CWD', os.getcwd())", cwd=str(elsewhere))
    assert result.ok
    assert f"CWD {elsewhere.resolve()}" in run.log


def test_stdin_is_closed(tmp_path):
    run, result = run_command(tmp_path, "import sys; print('IN', repr(sys.stdin.read()))")
    assert result.ok
    assert "IN ''" in run.log


def test_a_command_inherits_no_descriptor_but_its_standard_three(tmp_path):
    code = """
        import os
        open_fds = []
        for fd in range(3, 1024):
            try:
                os.fstat(fd)
            except OSError:
                continue
            open_fds.append(fd)
        print("OPEN", open_fds)
    """
    run, result = run_command(tmp_path, code)
    assert result.ok
    assert "OPEN []" in run.log


def test_a_command_starts_with_no_signal_ignored_or_blocked(tmp_path):
    # cat changes no signal disposition: it shows what it was started with.
    pipeline = Pipeline(name="p", executor="command", command=("cat", "/proc/self/status"))
    run = Run(tmp_path)
    result = CommandExecutor().run(pipeline, run.ctx, None)
    assert result.ok
    masks = {
        name: int(value, 16)
        for name, _, value in (line.partition(":\t") for line in run.log.splitlines())
        if name in ("SigIgn", "SigBlk")
    }
    # Signal n is bit n - 1. glibc's posix_spawn leaves its own two (32 and 33, which no
    # program sees: glibc and musl set them up again at start) ignored.
    glibc_own = 1 << 31 | 1 << 32
    assert masks["SigIgn"] & ~glibc_own == 0
    assert masks["SigBlk"] == 0


def test_a_long_command_line_runs_whole(tmp_path):
    words = [f"argument-{i:06d}" for i in range(20000)]  # about 320 kB
    run, result = run_command(
        tmp_path, "import sys; print('ARGS', len(sys.argv) - 1, sys.argv[-1])", *words
    )
    assert result.ok
    assert "ARGS 20000 argument-019999" in run.log


# command: killing ------------------------------------------------------------------------

SPAWNS_GRANDCHILD = """
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "30"])
    print("GRANDCHILD", child.pid, flush=True)
    print("GROUP", os.getpgid(0), flush=True)
    time.sleep(30)
"""


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr("conveyor.executors.command.KILL_GRACE", 0.5)
    code = """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("PID", os.getpid(), flush=True)
        time.sleep(30)
    """
    start = time.monotonic()
    run, result = run_command(tmp_path, code, deadline=time.time() + 0.3, timeout=0.3)
    pids = numbers_after(run.log, "PID")
    try:
        assert result == ExecResult(ok=False, error="timed out after 0.3s")
        assert 0.7 < time.monotonic() - start < 4  # SIGTERM at 0.3 s, SIGKILL 0.5 s later
        assert "killed: timed out after 0.3s" in run.log
        assert pids and wait_gone(pids)
    finally:
        kill_leftovers(pids)


def test_timeout_kills_the_whole_process_group(tmp_path):
    start = time.monotonic()
    run, result = run_command(tmp_path, SPAWNS_GRANDCHILD, deadline=time.time() + 0.5, timeout=0.5)
    elapsed = time.monotonic() - start
    log = run.log
    grandchildren = numbers_after(log, "GRANDCHILD")
    try:
        assert not result.ok
        assert result.retryable
        assert "timed out" in result.error
        assert "killed: timed out" in log
        assert elapsed < 4
        assert grandchildren, log
        (group,) = numbers_after(log, "GROUP")
        assert wait_gone(grandchildren, group), "the command's grandchild outlived the timeout"
        assert run.ctx.stopping
    finally:
        kill_leftovers(grandchildren)


def test_stop_from_another_thread_kills_the_command(tmp_path):
    run = Run(tmp_path)
    timer = threading.Timer(0.5, run.ctx.stop, args=("cancelled",))
    timer.start()
    start = time.monotonic()
    try:
        result = CommandExecutor().run(script(SPAWNS_GRANDCHILD), run.ctx, None)
    finally:
        timer.cancel()
    grandchildren = numbers_after(run.log, "GRANDCHILD")
    try:
        assert time.monotonic() - start < 4
        assert not result.ok
        assert result.error == "cancelled"
        assert wait_gone(grandchildren)
    finally:
        kill_leftovers(grandchildren)


def test_already_stopped_context_never_lets_the_command_run_on(tmp_path):
    run = Run(tmp_path)
    run.ctx.stop("worker shutting down")
    start = time.monotonic()
    result = CommandExecutor().run(script("import time; time.sleep(30)"), run.ctx, None)
    assert time.monotonic() - start < 4
    assert not result.ok
    assert result.error == "worker shutting down"


def test_leftover_background_process_is_killed_after_a_normal_exit(tmp_path):
    # The command exits, leaving a child that no longer writes to the output.
    code = """
        import subprocess
        child = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        print("GRANDCHILD", child.pid, flush=True)
    """
    start = time.monotonic()
    run, result = run_command(tmp_path, code)
    grandchildren = numbers_after(run.log, "GRANDCHILD")
    try:
        assert result.ok
        assert time.monotonic() - start < 4
        assert wait_gone(grandchildren), "a process left behind by the command survived"
    finally:
        kill_leftovers(grandchildren)


def test_command_exit_is_not_held_up_by_a_leftover_child_holding_its_output(tmp_path):
    # The command exits at once; a background child it started still has its stdout.
    # The attempt is over when the command exits: the leftover goes with it, rather than
    # holding the task (and a worker slot) until the leftover ends by itself.
    code = """
        import subprocess
        child = subprocess.Popen(["sleep", "2"])
        print("GRANDCHILD", child.pid, flush=True)
    """
    start = time.monotonic()
    run, result = run_command(tmp_path, code)
    elapsed = time.monotonic() - start
    grandchildren = numbers_after(run.log, "GRANDCHILD")
    try:
        assert result.ok
        assert elapsed < 1.5, f"run() returned only after {elapsed:.1f}s, when the leftover ended"
    finally:
        kill_leftovers(grandchildren)


# python executor -------------------------------------------------------------------------------

# Handlers for the tests below, named by this module's import path.


def handler_ok(ctx):
    ctx.progress(1, 2, "half")
    ctx.log("working on " + ctx.params["name"])
    return {"greeting": f"hello {ctx.params['name']}", "attempt": ctx.attempt}


def handler_none(ctx):
    return None


def handler_raises(ctx):
    raise KeyError("no_such_thing")


def handler_non_retryable(ctx):
    raise NonRetryable("input file is corrupt")


def handler_non_retryable_bare(ctx):
    raise NonRetryable()


def handler_not_json(ctx):
    return {"when": object()}


def handler_set(ctx):
    return {1, 2}


def handler_work_dir(ctx):
    (ctx.work_dir / "out.txt").write_text("x")
    return str(ctx.work_dir)


def python_pipeline(handler: str) -> Pipeline:
    return Pipeline(name="p", executor="python", handler=handler)


def run_python(tmp_path, handler, params=None):
    run = Run(tmp_path, params)
    result = PythonExecutor().run(python_pipeline(handler), run.ctx, None)
    return run, result


def here(name: str) -> str:
    return f"{__name__}:{name}"


def test_handler_result_becomes_the_task_result(tmp_path):
    run, result = run_python(tmp_path, here("handler_ok"), {"name": "ada"})
    assert result == ExecResult(ok=True, result={"greeting": "hello ada", "attempt": 1})
    assert run.reports == [Progress(1, 2, "half")]
    assert "working on ada" in run.log


def test_handler_returning_nothing_succeeds(tmp_path):
    _, result = run_python(tmp_path, here("handler_none"))
    assert result == ExecResult(ok=True, result=None)


def test_handler_exception_fails_the_attempt_with_the_traceback_logged(tmp_path):
    run, result = run_python(tmp_path, here("handler_raises"))
    assert not result.ok
    assert result.retryable
    assert result.error == "KeyError: 'no_such_thing'"
    log = run.log
    assert "Traceback (most recent call last)" in log
    assert "handler_raises" in log
    assert "KeyError: 'no_such_thing'" in log


def test_non_retryable_fails_the_task_at_once(tmp_path):
    run, result = run_python(tmp_path, here("handler_non_retryable"))
    assert not result.ok
    assert result.retryable is False
    assert result.error == "input file is corrupt"
    assert "NonRetryable" in run.log
    _, bare = run_python(tmp_path, here("handler_non_retryable_bare"))
    assert bare.retryable is False
    assert bare.error


@pytest.mark.parametrize("name", ["handler_not_json", "handler_set"])
def test_non_json_result_is_refused(tmp_path, name):
    _, result = run_python(tmp_path, here(name))
    assert not result.ok
    assert result.retryable is False
    assert "not JSON" in result.error


def test_handler_work_dir(tmp_path):
    run, result = run_python(tmp_path, here("handler_work_dir"))
    assert result.ok
    assert result.result == str(run.work)
    assert (run.work / "out.txt").read_text() == "x"


@pytest.mark.parametrize(
    "handler",
    [
        "conveyor_no_such_module_xyz:f",
        "conveyor.examples.handlers:no_such_function",
        "conveyor.examples.handlers:",
        ":noop",
    ],
)
def test_handler_that_cannot_be_loaded_fails_for_good(tmp_path, handler):
    _, result = run_python(tmp_path, handler)
    assert not result.ok
    assert result.retryable is False
    assert result.error


def test_handler_that_is_not_callable(tmp_path):
    _, result = run_python(tmp_path, "conveyor.executors.command:KILL_GRACE")
    assert not result.ok
    assert result.retryable is False
    assert "not callable" in result.error


def test_builtin_sleep_handler_stops_early_when_asked(tmp_path):
    run = Run(tmp_path, {"seconds": 20})
    timer = threading.Timer(0.2, run.ctx.stop, args=("cancelled",))
    timer.start()
    start = time.monotonic()
    try:
        result = PythonExecutor().run(
            python_pipeline("conveyor.examples.handlers:sleep"), run.ctx, None
        )
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert not result.ok
    assert "cancelled" in result.error
    assert run.reports[0] == Progress(0, 20, "sleeping")


def test_builtin_sleep_handler_reports_done(tmp_path):
    run, result = run_python(tmp_path, "conveyor.examples.handlers:sleep", {"seconds": 0.05})
    assert result == ExecResult(ok=True, result={"slept": 0.05})
    assert run.reports[-1] == Progress(1, 1, "done")


def test_executor_for_picks_by_kind():
    assert isinstance(executor_for(script("pass")), CommandExecutor)
    assert isinstance(executor_for(python_pipeline("m:f")), PythonExecutor)


def live_children() -> list[int]:
    """This process's children that are not zombies."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in pids if alive(p)]


def test_a_command_whose_log_cannot_be_written_is_not_left_running(tmp_path):
    """Alone, it is not started; in a loop, whose launcher opens the log at the first
    output (a command that prints nothing keeps its log in the database), it is killed
    then."""
    (tmp_path / "logs").write_text("a file where the log's folder should be")
    before = live_children()
    run = Run(tmp_path)
    code = "import time; print('started', flush=True); time.sleep(30)"
    try:
        result = CommandExecutor().run(script(code), run.ctx, None)
    except NotADirectoryError:  # alone in its thread: the worker's runner reports it
        pass
    else:  # in a loop, which reports it itself
        assert not result.ok and "Not a directory" in (result.error or "")
    # no child of its left (one of an earlier test's may have ended meanwhile)
    assert set(live_children()) <= set(before)
