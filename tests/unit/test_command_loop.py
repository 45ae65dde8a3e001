"""The command loop: many commands at once in one thread, sharing a worker's slots with
other threads. Real commands (tiny Python programs), real process groups."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.executors import ExecResult, TaskContext
from conveyor.executors.command import CommandExecutor, Launched
from conveyor.executors.launcher import Launcher, command_line
from conveyor.executors.loop import CommandLoop, Job, Slots
from conveyor.pipelines import Pipeline
from conveyor.tasks import Progress
from proc_support import alive

from .factories import make_task

pytestmark = pytest.mark.timeout(60)


def script(code: str) -> Pipeline:
    return Pipeline(
        name="p", executor="command", command=(sys.executable, "-c", textwrap.dedent(code))
    )


class Item:
    """One attempt handed to the loop, with where its log goes."""

    def __init__(
        self, tmp_path: Path, n: int, pipeline: Pipeline, timeout: float | None = None
    ) -> None:
        self.n = n
        self.pipeline = pipeline
        self.log_file = tmp_path / "logs" / f"{n}.log"
        work = tmp_path / "work" / str(n)
        self.ctx = TaskContext(
            make_task(id=n, timeout=timeout), lambda: (self.log_file, work), lambda _p: None
        )

    @property
    def log(self) -> str:
        """Its log: the file, or the quiet log held for the database."""
        if self.log_file.exists():
            return self.log_file.read_text()
        return self.ctx.quiet_log or ""


class Harness:
    """A loop, with what it began and ended."""

    def __init__(
        self, slots: Slots, begin: Any = None, end: Any = None, launchers: int = 1
    ) -> None:
        self.slots = slots
        self.begun: list[Item] = []
        self.ended: dict[int, ExecResult] = {}
        self._cond = threading.Condition()

        def default_begin(item: Item) -> Job | None:
            self.begun.append(item)
            return Job(item.pipeline, item.ctx, None)

        def default_end(item: Item, result: ExecResult) -> None:
            item.ctx.close()
            with self._cond:
                self.ended[item.n] = result
                self._cond.notify_all()
            if end is not None:
                end(item, result)

        self.loop: CommandLoop[Item] = CommandLoop(
            CommandExecutor(), slots, begin or default_begin, default_end, launchers=launchers
        )

    def wait_ended(self, n: int, timeout: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.ended) >= n, timeout), self.ended


@contextlib.contextmanager
def running(slots: Slots, begin: Any = None, launchers: int = 1) -> Iterator[Harness]:
    """A harness whose loop is closed (its commands killed) when the test ends."""
    h = Harness(slots, begin, launchers=launchers)
    try:
        yield h
    finally:
        h.loop.close(timeout=10)


def no_launcher(*_args: object) -> None:
    raise OSError("no launcher here")


@pytest.fixture(params=["launcher", "here"])
def harnesses(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Loops whose launcher runs their commands, and loops that run them themselves
    (their launcher could not start)."""
    if request.param == "here":
        monkeypatch.setattr("conveyor.executors.loop.Launcher", no_launcher)
    made: list[Harness] = []

    def make(slots: Slots, begin: Any = None, end: Any = None) -> Harness:
        h = Harness(slots, begin, end)
        made.append(h)
        return h

    yield make
    for h in made:
        h.loop.close(timeout=10)
        assert free_slots(h.slots) == h.slots.made, "a slot was lost or given back twice"


def made_slots(n: int) -> Slots:
    slots = Slots(n)
    slots.made = n  # type: ignore[attr-defined]
    return slots


def free_slots(slots: Slots) -> int:
    n = 0
    while slots.try_take(lambda: None):
        n += 1
    for _ in range(n):
        slots.give()
    return n


TIMED = """
    import time
    print("START", time.time(), flush=True)
    time.sleep(0.4)
    print("END", time.time(), flush=True)
"""


def span(log: str) -> tuple[float, float]:
    values = {
        line.split()[0]: float(line.split()[1])
        for line in log.splitlines()
        if line.startswith(("START ", "END "))
    }
    return values["START"], values["END"]


def test_as_many_commands_run_at_once_as_there_are_slots(tmp_path, harnesses) -> None:
    h = harnesses(made_slots(3))
    items = [Item(tmp_path, n, script(TIMED)) for n in range(7)]
    start = time.monotonic()
    for item in items:
        h.loop.submit(item)
    h.wait_ended(7)
    elapsed = time.monotonic() - start
    assert all(r.ok for r in h.ended.values()), h.ended
    spans = [span(item.log) for item in items]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 3
    assert elapsed < 7 * 0.4  # they did run side by side


def test_each_result_and_log_belongs_to_its_own_command(tmp_path, harnesses) -> None:
    h = harnesses(made_slots(4))
    code = "import sys; n = int(sys.argv[1]); print('item', n); sys.exit(n % 3)"
    items = []
    for n in range(24):
        pipeline = Pipeline(
            name="p", executor="command", command=(sys.executable, "-c", code, str(n))
        )
        items.append(Item(tmp_path, n, pipeline))
        h.loop.submit(items[-1])
    h.wait_ended(24)
    for item in items:
        result = h.ended[item.n]
        if item.n % 3 == 0:
            assert result == ExecResult(ok=True, result={"exit_code": 0})
        else:
            assert result.error == f"exit code {item.n % 3}"
        lines = item.log.splitlines()
        assert lines[0].startswith("$ ")
        assert lines[1:] == [f"item {item.n}", f"exit code {item.n % 3}"]


def test_a_launched_command_that_prints_nothing_makes_no_log_file(tmp_path: Path) -> None:
    """Its log, the command line and how it ended, is held for the worker to keep with
    the outcome. One that prints, one killed and one whose attempt left a log before
    (run again under the same number) have their files."""
    with running(made_slots(4)) as h:
        quiet = Item(tmp_path, 1, script("pass"))
        failing = Item(tmp_path, 2, script("import sys; sys.exit(4)"))
        noisy = Item(tmp_path, 3, script("print('hello')"))
        again = Item(tmp_path, 4, script("pass"))
        again.log_file.parent.mkdir(parents=True, exist_ok=True)
        again.log_file.write_text("$ before\nkilled: the worker stopped\n")
        killed = Item(tmp_path, 5, script("import time; time.sleep(30)"))
        for item in (quiet, failing, noisy, again, killed):
            h.loop.submit(item)
        h.wait_ended(4)
        killed.ctx.stop("cancelled")
        h.wait_ended(5)
        assert not quiet.log_file.exists() and not failing.log_file.exists()
        assert quiet.ctx.quiet_log == f"$ {sys.executable} -c pass\nexit code 0\n"
        assert failing.ctx.quiet_log == (
            f"$ {sys.executable} -c import sys; sys.exit(4)\nexit code 4\n"
        )
        assert h.ended[2].error == "exit code 4"
        assert noisy.ctx.quiet_log is None
        assert noisy.log_file.read_text().splitlines()[1:] == ["hello", "exit code 0"]
        assert again.ctx.quiet_log is None
        assert again.log_file.read_text().splitlines() == [
            "$ before",
            "killed: the worker stopped",
            f"$ {sys.executable} -c pass",
            "exit code 0",
        ]
        assert killed.ctx.quiet_log is None
        assert killed.log_file.read_text().splitlines()[1:] == ["killed: cancelled"]


def test_a_stop_request_kills_only_its_own_command(tmp_path, harnesses) -> None:
    h = harnesses(made_slots(3))
    code = "import time; print('up', flush=True); time.sleep(30)"
    items = [Item(tmp_path, n, script(code)) for n in range(3)]
    for item in items:
        h.loop.submit(item)
    deadline = time.monotonic() + 10
    while len(h.begun) < 3 or not all("up" in i.log for i in items):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    items[1].ctx.stop("cancelled")
    h.wait_ended(1, timeout=5)
    assert list(h.ended) == [1]
    assert h.ended[1] == ExecResult(ok=False, error="cancelled")
    assert "killed: cancelled" in items[1].log
    time.sleep(0.3)
    assert list(h.ended) == [1]  # the others run on
    for item in (items[0], items[2]):
        item.ctx.stop("done with")
    h.wait_ended(3, timeout=5)


def test_a_timed_out_command_is_killed(tmp_path, harnesses) -> None:
    def begin(item: Item) -> Job:
        return Job(item.pipeline, item.ctx, time.time() + 0.3)

    item = Item(tmp_path, 1, script("import time; time.sleep(30)"), timeout=0.3)
    h = harnesses(made_slots(1), begin)
    start = time.monotonic()
    h.loop.submit(item)
    h.wait_ended(1, timeout=5)
    assert time.monotonic() - start < 3
    assert h.ended[1].error == "timed out after 0.3s"
    assert item.ctx.stopping


def test_a_slot_given_back_by_another_thread_starts_a_waiting_command(tmp_path, harnesses) -> None:
    slots = made_slots(1)
    slots.take()  # a runner thread has the only slot
    h = harnesses(slots)
    h.loop.submit(Item(tmp_path, 1, script("pass")))
    time.sleep(0.3)
    assert h.begun == [] and h.ended == {}
    slots.give()
    h.wait_ended(1, timeout=5)
    assert h.ended[1].ok
    slots.take()  # and the loop has given it back
    slots.give()


def test_a_thread_waiting_for_a_slot_gets_the_one_the_loop_gives_back(tmp_path, harnesses) -> None:
    slots = made_slots(1)
    h = harnesses(slots)
    h.loop.submit(Item(tmp_path, 1, script("import time; time.sleep(0.3)")))
    while not h.begun:
        time.sleep(0.01)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (slots.take(), got.set()), daemon=True)
    waiter.start()
    assert not got.wait(0.1)
    h.wait_ended(1)
    assert got.wait(5)
    slots.give()


def test_an_item_no_longer_to_run_is_skipped_and_its_slot_freed(tmp_path, harnesses) -> None:
    h: Harness

    def begin(item: Item) -> Job | None:
        if item.n == 1:
            return None  # handed back while it waited
        h.begun.append(item)
        return Job(item.pipeline, item.ctx, None)

    h = harnesses(made_slots(1), begin)
    skipped = Item(tmp_path, 1, script("open('ran', 'w')"))
    h.loop.submit(skipped)
    h.loop.submit(Item(tmp_path, 2, script("pass")))
    h.wait_ended(1)
    assert list(h.ended) == [2]
    assert not skipped.log_file.exists()


def test_what_fails_to_start_is_a_result_and_the_rest_still_run(tmp_path, harnesses) -> None:
    def begin(item: Item) -> Job:
        if item.n == 1:
            raise RuntimeError("no such thing")
        return Job(item.pipeline, item.ctx, None)

    h = harnesses(made_slots(2), begin)
    h.loop.submit(Item(tmp_path, 1, script("pass")))
    missing = Pipeline(name="p", executor="command", command=(str(tmp_path / "nothing-here"),))
    h.loop.submit(Item(tmp_path, 2, missing))
    h.loop.submit(Item(tmp_path, 3, script("pass")))
    h.wait_ended(3)
    assert h.ended[1] == ExecResult(ok=False, error="executor error: no such thing")
    assert not h.ended[2].ok and not h.ended[2].retryable
    assert "cannot start" in (h.ended[2].error or "")
    assert h.ended[3].ok


def test_closing_kills_commands_that_were_not_stopped(tmp_path, harnesses) -> None:
    h = harnesses(made_slots(1))
    code = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(30)"
    item = Item(tmp_path, 1, script(code))
    h.loop.submit(item)
    while "PID " not in item.log:
        time.sleep(0.02)
    pid = int(item.log.split("PID ")[1].split()[0])
    start = time.monotonic()
    h.loop.close(timeout=0.5)
    assert time.monotonic() - start < 5
    assert not h.ended[1].ok
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_failing_result_callback_stops_neither_the_loop_nor_the_others(
    tmp_path, harnesses
) -> None:
    def end(item: Item, _result: ExecResult) -> None:
        if item.n == 1:
            raise RuntimeError("a bug in the caller")

    h = harnesses(made_slots(2), end=end)
    for n in range(1, 5):
        h.loop.submit(Item(tmp_path, n, script("pass")))
    h.wait_ended(4)
    assert all(r.ok for r in h.ended.values())
    h.loop.submit(Item(tmp_path, 5, script("pass")))
    h.wait_ended(5)


def test_a_thread_waiting_for_a_slot_is_not_overtaken_by_the_loop(tmp_path, harnesses) -> None:
    slots = made_slots(1)
    h = harnesses(slots)
    for n in range(6):  # the loop always has more to start
        h.loop.submit(Item(tmp_path, n, script("import time; time.sleep(0.1)")))
    while not h.begun:
        time.sleep(0.01)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (slots.take(), got.set()), daemon=True)
    waiter.start()
    assert got.wait(5)
    assert len(h.begun) <= 2  # the first slot given back went to the thread
    slots.give()
    h.wait_ended(6)


# the launcher -----------------------------------------------------------------------------


def launchers() -> list[int]:
    """This process's launchers still running (not zombies)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if b"launcher.py" in cmdline and alive(int(pid)):
                found.append(int(pid))
    return found


def wait_until(condition: Any, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


SLEEPER = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(30)"


def pid_in(item: Item) -> int:
    assert wait_until(lambda: "PID " in item.log)
    return int(item.log.split("PID ")[1].split()[0])


def test_a_launcher_that_dies_fails_its_attempts_kills_their_commands_and_is_replaced(
    tmp_path: Path,
) -> None:
    with running(made_slots(2)) as h:
        items = [Item(tmp_path, n, script(SLEEPER)) for n in (1, 2)]
        for item in items:
            h.loop.submit(item)
        pids = [pid_in(item) for item in items]
        [launcher] = launchers()
        os.kill(launcher, 9)
        h.wait_ended(2)
        for item in items:
            result = h.ended[item.n]
            assert not result.ok and result.retryable
            assert result.error == "the command launcher stopped"
            assert "killed: the command launcher stopped" in item.log
        assert wait_until(lambda: not any(alive(pid) for pid in pids))
        # the next command gets a new launcher
        again = Item(tmp_path, 3, script("print('again')"))
        h.loop.submit(again)
        h.wait_ended(3)
        assert h.ended[3].ok and "again" in again.log
        assert len(launchers()) == 1 and launchers() != [launcher]
    assert not launchers()


def test_a_loop_with_two_launchers_spreads_its_commands_and_loses_only_a_dead_ones(
    tmp_path: Path,
) -> None:
    """Each new command goes to the launcher running the fewest (a second one starts
    once the first runs something); when one dies, only the attempts it ran fail, and
    the other's commands run on."""
    parent = "import os, time; print('PARENT', os.getppid(), flush=True); time.sleep(30)"
    with running(made_slots(4), launchers=2) as h:
        items = [Item(tmp_path, n, script(parent)) for n in (1, 2, 3, 4)]
        for item in items:
            h.loop.submit(item)
        assert wait_until(lambda: all("PARENT " in item.log for item in items))
        parents = [int(item.log.split("PARENT ")[1].split()[0]) for item in items]
        assert sorted(set(parents)) == sorted(launchers())
        assert sorted(parents.count(p) for p in set(parents)) == [2, 2]
        dead = parents[1]
        os.kill(dead, 9)
        h.wait_ended(2)
        time.sleep(0.2)  # a wrong failure of the others would show by now
        failed = {item.n for item, p in zip(items, parents, strict=True) if p == dead}
        assert set(h.ended) == failed
        assert all(h.ended[n].error == "the command launcher stopped" for n in failed)
        assert launchers() == [p for p in set(parents) if p != dead]
    assert not launchers()


def test_after_three_launchers_died_the_loop_goes_on_with_the_one_still_running(
    tmp_path: Path,
) -> None:
    """Three deaths in a row, none after a command ended: no launcher is started any
    more, but the one that runs is still used, rather than commands starting in the
    worker."""
    parent = "import os, time; print('PARENT', os.getppid(), flush=True); time.sleep(30)"

    def parent_of(item: Item) -> int:
        assert wait_until(lambda: "PARENT " in item.log)
        return int(item.log.split("PARENT ")[1].split()[0])

    with running(made_slots(8), launchers=2) as h:
        first, second = Item(tmp_path, 1, script(parent)), Item(tmp_path, 2, script(parent))
        h.loop.submit(first)
        h.loop.submit(second)
        keep = parent_of(first)
        doomed = parent_of(second)
        assert keep != doomed
        for n in (3, 4):
            os.kill(doomed, 9)
            h.wait_ended(n - 2)
            item = Item(tmp_path, n, script(parent))
            h.loop.submit(item)  # a new launcher for it: the running one is busy
            doomed = parent_of(item)
            assert doomed not in (keep, os.getpid())
        os.kill(doomed, 9)
        h.wait_ended(3)
        last = Item(tmp_path, 5, script("import os; print('PARENT', os.getppid())"))
        h.loop.submit(last)
        h.wait_ended(4)
        assert h.ended[5].ok and parent_of(last) == keep
        assert launchers() == [keep] and 1 not in h.ended


def test_an_attempt_let_go_after_its_launcher_died_still_has_its_command_killed(
    tmp_path: Path,
) -> None:
    """Its launcher is dead before the loop has seen it (so before the loop would kill
    what it ran): letting the attempt go (`abandon`) kills the command by its group."""
    item = Item(tmp_path, 1, script(SLEEPER))
    launcher = Launcher(dict(os.environ))
    try:
        prepared = CommandExecutor()._prepare(item.pipeline, item.ctx, make=False)
        assert isinstance(prepared, tuple)
        argv, cwd, changes, work_dir = prepared
        key = launcher.run(argv, cwd, changes, str(item.log_file), work_dir)
        attempt = Launched(launcher, key, item.ctx, None, command_line(argv))
        launcher.flush()
        pid = pid_in(item)
        while attempt.pid is None:  # the launcher sends it right after the start
            for message in launcher.read():
                if message[0] == "pid":
                    attempt.pid = message[2]
        launcher.proc.kill()
        launcher.proc.wait()
        attempt.abandon()
        assert wait_until(lambda: not alive(pid))
        assert attempt.result is not None and not attempt.result.ok
    finally:
        launcher.close()


def test_closing_the_loop_stops_its_launcher_and_every_command(tmp_path: Path) -> None:
    h = Harness(made_slots(2))
    item = Item(tmp_path, 1, script(SLEEPER))
    h.loop.submit(item)
    pid = pid_in(item)
    assert len(launchers()) == 1
    h.loop.close(timeout=0.5)
    assert not launchers()
    assert not alive(pid)
    assert h.ended[1].error == "stopped"


def test_progress_is_neither_lost_nor_held_up_while_the_loop_is_busy(tmp_path: Path) -> None:
    """While the loop does not read (here, busy starting another attempt), its launcher
    goes on: all of a command's output goes to its log, only the command's latest
    progress line waits for the worker, and the progress reported ends at the last."""
    lines = 100_000
    code = f"""
        for i in range(1, {lines + 1}):
            print("conveyor:progress %d/{lines}" % i)  # (braces would be a placeholder)
        print("done")
    """
    busy = threading.Event()

    def begin(item: Item) -> Job:
        if item.n == 2:
            busy.set()
            time.sleep(1.5)  # the loop's thread, held up
        return Job(item.pipeline, item.ctx, None)

    with running(made_slots(2), begin) as h:
        reports: list[Progress] = []
        talker = Item(tmp_path, 1, script(code))
        talker.ctx = TaskContext(
            talker.ctx.task,
            lambda: (talker.log_file, tmp_path / "work" / "1"),
            reports.append,
            min_report_interval=0,
        )
        h.loop.submit(talker)
        assert wait_until(lambda: talker.log.startswith("$ "))
        h.loop.submit(Item(tmp_path, 2, script("pass")))
        h.wait_ended(2)
        assert busy.is_set()
        assert h.ended[1].ok
        log = talker.log.splitlines()
        progress = [line for line in log if line.startswith("conveyor:progress ")]
        assert progress == [f"conveyor:progress {i}/{lines}" for i in range(1, lines + 1)]
        assert log[-2:] == ["done", "exit code 0"]
        assert reports[-1] == Progress(lines, lines, None)
        assert len(reports) < lines / 2  # not every line waited for the worker


def test_an_attempt_whose_log_cannot_be_written_fails(tmp_path: Path) -> None:
    """The launcher opens a log at the command's first output or its end (a quiet
    command's log goes to the database), so the command has run; its attempt fails all
    the same, to be tried again, rather than succeed with its log lost."""
    with running(made_slots(1)) as h:
        ran = tmp_path / "ran"
        item = Item(tmp_path, 1, script(f"open({str(ran)!r}, 'w')"))
        item.log_file.parent.mkdir(parents=True)
        item.log_file.symlink_to("/dev/full")  # opens, and every write fails: disk full
        h.loop.submit(item)
        h.wait_ended(1)
        result = h.ended[1]
        assert not result.ok and result.retryable
        assert "No space left on device" in (result.error or "")
        assert item.ctx.quiet_log is None


def test_an_attempt_whose_log_cannot_be_written_here_fails_before_its_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("conveyor.executors.loop.Launcher", no_launcher)
    with running(made_slots(1)) as h:
        ran = tmp_path / "ran"
        item = Item(tmp_path, 1, script(f"open({str(ran)!r}, 'w')"))
        item.log_file.parent.mkdir(parents=True)
        item.log_file.symlink_to("/dev/full")
        h.loop.submit(item)
        h.wait_ended(1)
        result = h.ended[1]
        assert not result.ok
        assert "No space left on device" in (result.error or "")
        assert not ran.exists()


def test_an_attempt_whose_log_fills_up_midway_fails_and_its_command_is_killed(
    tmp_path: Path,
) -> None:
    with running(made_slots(1)) as h:
        h.loop.submit(Item(tmp_path, 1, script("pass")))  # the launcher is up
        h.wait_ended(1)
        [launcher] = launchers()
        resource.prlimit(launcher, resource.RLIMIT_FSIZE, (20_000, 20_000))  # bytes a file
        code = """
            import os, time
            print("PID", os.getpid(), flush=True)
            for _ in range(100):
                print("x" * 1000, flush=True)
            time.sleep(30)
        """
        item = Item(tmp_path, 2, script(code))
        start = time.monotonic()
        h.loop.submit(item)
        pid = pid_in(item)
        h.wait_ended(2)
        assert time.monotonic() - start < 10
        result = h.ended[2]
        assert not result.ok and result.retryable
        assert f"cannot write the log {item.log_file}: File too large" == result.error
        assert wait_until(lambda: not alive(pid))


def test_a_launcher_that_cannot_run_leaves_the_loop_to_run_its_commands_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit(3)\n")
    monkeypatch.setattr("conveyor.executors.launcher.PROGRAM", str(broken))
    with running(made_slots(1)) as h:
        h.loop.submit(Item(tmp_path, 1, script("pass")))
        h.wait_ended(1)
        assert h.ended[1] == ExecResult(ok=False, error="the command launcher stopped")
        again = Item(tmp_path, 2, script("print('here')"))
        h.loop.submit(again)
        h.wait_ended(2)
        assert h.ended[2].ok and "here" in again.log
        assert not launchers()


def test_relative_paths_mean_what_they_meant_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher changes its own working directory for each command: a relative
    working directory or log is the worker's, as it would be for a command it started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running(made_slots(1)) as h:
        for n, where in ((1, "a"), (2, "b")):
            pipeline = Pipeline(
                name="p",
                executor="command",
                command=(sys.executable, "-c", "import os; print('CWD', os.getcwd())"),
                cwd=where,
            )
            item = Item(Path("relative"), n, pipeline)
            h.loop.submit(item)
            h.wait_ended(n)
            assert h.ended[n].ok
            assert f"CWD {tmp_path / where}" in (tmp_path / item.log_file).read_text()


def test_a_command_its_launcher_cannot_run_fails_alone(tmp_path: Path) -> None:
    with running(made_slots(1)) as h:
        h.loop.submit(Item(tmp_path, 1, script("pass")))  # the launcher is up
        h.wait_ended(1)
        [launcher] = launchers()
        limits = resource.prlimit(launcher, resource.RLIMIT_NOFILE)
        resource.prlimit(launcher, resource.RLIMIT_NOFILE, (5, limits[1]))  # no room
        h.loop.submit(Item(tmp_path, 2, script("pass")))
        h.wait_ended(2)
        result = h.ended[2]
        assert not result.ok and result.retryable
        assert "Too many open files" in (result.error or "")
        resource.prlimit(launcher, resource.RLIMIT_NOFILE, limits)
        h.loop.submit(Item(tmp_path, 3, script("pass")))
        h.wait_ended(3)
        assert h.ended[3].ok
        assert launchers() == [launcher]  # the same one, still running


def test_a_launcher_started_with_sigchld_ignored_still_sees_exit_codes(tmp_path: Path) -> None:
    h = Harness(made_slots(2))
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # as a worker may inherit it
    try:
        first = Item(tmp_path, 1, script("import sys; sys.exit(3)"))
        h.loop.submit(first)  # starts the launcher, which inherits it
        h.wait_ended(1)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    try:
        h.loop.submit(Item(tmp_path, 2, script("pass")))
        h.wait_ended(2)
        assert h.ended[1] == ExecResult(ok=False, error="exit code 3")
        assert first.log.splitlines()[-1] == "exit code 3"
        assert h.ended[2].ok
    finally:
        h.loop.close(timeout=10)


def test_a_launcher_of_another_version_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker running since before an upgrade starts the launcher file now on disk,
    which may speak other messages: it refuses, and the loop runs its commands itself."""
    monkeypatch.setattr("conveyor.executors.launcher.PROTOCOL", 999)
    with running(made_slots(1)) as h:
        h.loop.submit(Item(tmp_path, 1, script("pass")))
        h.wait_ended(1)
        assert h.ended[1].error == "the command launcher stopped"
        h.loop.submit(Item(tmp_path, 2, script("pass")))
        h.wait_ended(2)
        assert h.ended[2].ok
        assert not launchers()
    assert "the worker speaks protocol 999" in capfd.readouterr().err
