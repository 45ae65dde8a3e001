"""Progress lines, and what a running attempt can see and do through its TaskContext."""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest

from conveyor.executors import TaskContext, parse_progress_line
from conveyor.tasks import Progress

from .factories import make_task as make_task_with

make_task = partial(make_task_with, attempts=2)


class Recorder:
    def __init__(self):
        self.reports: list[Progress] = []

    def __call__(self, progress):
        self.reports.append(progress)


def make_ctx(tmp_path, task=None, interval=0.5):
    calls = []

    def paths():
        calls.append(1)
        return tmp_path / "logs" / "deep" / "task.log", tmp_path / "work" / "t11"

    rec = Recorder()
    ctx = TaskContext(task or make_task(), paths, rec, min_report_interval=interval)
    return ctx, rec, calls


# parse_progress_line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("conveyor:progress 3/10 reading logs", Progress(3, 10, "reading logs")),
        ("conveyor:progress 5", Progress(5, None, None)),
        ("conveyor:progress 5/8", Progress(5, 8, None)),
        ("conveyor:progress 2.5/10", Progress(2.5, 10, None)),
        ("conveyor:progress 1/2   spaced  out  ", Progress(1, 2, "spaced  out")),
        ("conveyor:progress 7 done", Progress(7, None, "done")),
    ],
)
def test_parse_progress_line(line, expected):
    assert parse_progress_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello",
        "progress 3/10",
        " conveyor:progress 3/10",
        "conveyor:progress",
        "conveyor:progress ",
        "conveyor:progress x/10",
        "conveyor:progress 3/ten",
        "conveyor:progress three",
        "conveyor:progress 3/10/20",
        "conveyor:progress3/10",
        "CONVEYOR:PROGRESS 3/10",
    ],
)
def test_malformed_progress_lines_are_not_progress(line):
    assert parse_progress_line(line) is None


# the context ---------------------------------------------------------------------------


def test_context_exposes_the_task(tmp_path):
    task = make_task({"x": 1}, attempts=2)
    ctx, _, _ = make_ctx(tmp_path, task)
    assert ctx.task is task
    assert ctx.params == {"x": 1}
    assert ctx.attempt == 2


def test_nothing_is_made_until_needed(tmp_path):
    ctx, _, calls = make_ctx(tmp_path)
    ctx.progress(1, 2)
    ctx.stop("cancelled")
    assert calls == []
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "work").exists()


def test_work_dir_is_made_on_first_use(tmp_path):
    ctx, _, calls = make_ctx(tmp_path)
    work = ctx.work_dir
    assert work == tmp_path / "work" / "t11"
    assert work.is_dir()
    assert ctx.work_dir == work
    assert len(calls) == 1  # the paths are worked out once


def test_log_appends_lines_and_makes_folders(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.log("first")
    ctx.log("second\n")
    ctx.log("")
    ctx.close()
    assert ctx.log_path == tmp_path / "logs" / "deep" / "task.log"
    assert ctx.log_path.read_text() == "first\nsecond\n\n"


def test_log_appends_to_an_earlier_attempts_log(tmp_path):
    log = tmp_path / "logs" / "deep" / "task.log"
    log.parent.mkdir(parents=True)
    log.write_text("attempt 1\n")
    ctx, _, _ = make_ctx(tmp_path)
    ctx.log("attempt 2")
    ctx.close()
    assert log.read_text() == "attempt 1\nattempt 2\n"


def test_log_is_readable_while_the_attempt_runs(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.log("live")
    assert ctx.log_path.read_text() == "live\n"
    ctx.close()
    ctx.close()  # closing twice is harmless


def test_log_after_close_reopens(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.log("a")
    ctx.close()
    ctx.log("b")
    ctx.close()
    assert ctx.log_path.read_text() == "a\nb\n"


def test_a_quiet_log_is_held_for_the_outcome_until_something_more_is_logged(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.keep_quiet_log("$ true\nexit code 0\n")
    assert ctx.quiet_log == "$ true\nexit code 0\n"
    assert not ctx.log_path.exists()  # no file: it goes into the database
    ctx.log("conveyor: one more line")  # then the file gets it all, in order
    ctx.close()
    assert ctx.quiet_log is None
    assert ctx.log_path.read_text() == "$ true\nexit code 0\nconveyor: one more line\n"


def test_a_quiet_log_holds_only_what_utf8_can(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.keep_quiet_log("$ run \udc80\nexit code 0\n")  # a lone surrogate from JSON params
    assert ctx.quiet_log == "$ run ?\nexit code 0\n"


def test_a_quiet_log_whose_outcome_is_not_recorded_goes_to_the_file(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.write_quiet_log()  # nothing held: nothing made
    assert not ctx.log_path.exists()
    ctx.keep_quiet_log("$ true\nexit code 0\n")
    ctx.write_quiet_log()
    assert ctx.quiet_log is None
    assert ctx.log_path.read_text() == "$ true\nexit code 0\n"
    ctx.write_quiet_log()  # once only
    ctx.log("after")  # the log is closed in between: it opens again
    ctx.close()
    assert ctx.log_path.read_text() == "$ true\nexit code 0\nafter\n"


def test_log_from_many_threads_keeps_whole_lines(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)

    def write(n):
        for i in range(50):
            ctx.log(f"thread {n} line {i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.close()
    lines = ctx.log_path.read_text().splitlines()
    assert sorted(lines) == sorted(f"thread {n} line {i}" for n in range(4) for i in range(50))


# progress -------------------------------------------------------------------------------


def test_first_report_goes_through_at_once(tmp_path):
    ctx, rec, _ = make_ctx(tmp_path, interval=60)
    ctx.progress(1, 10, "start")
    assert rec.reports == [Progress(1, 10, "start")]


def test_reports_are_rate_limited_and_the_last_is_flushed(tmp_path):
    ctx, rec, _ = make_ctx(tmp_path, interval=60)
    ctx.progress(1, 10)
    ctx.progress(2, 10)
    ctx.progress(3, 10, "three")
    assert rec.reports == [Progress(1, 10)]
    ctx.flush_progress()
    assert rec.reports == [Progress(1, 10), Progress(3, 10, "three")]
    ctx.flush_progress()  # nothing pending: nothing sent again
    assert len(rec.reports) == 2


def test_flush_with_nothing_pending_sends_nothing(tmp_path):
    ctx, rec, _ = make_ctx(tmp_path)
    ctx.flush_progress()
    assert rec.reports == []
    ctx.progress(1)
    ctx.flush_progress()
    assert rec.reports == [Progress(1)]


def test_a_report_after_the_interval_goes_through(tmp_path):
    ctx, rec, _ = make_ctx(tmp_path, interval=0.05)
    ctx.progress(1)
    ctx.progress(2)
    time.sleep(0.08)
    ctx.progress(3)
    assert rec.reports == [Progress(1), Progress(3)]
    ctx.flush_progress()  # 2 was superseded by 3
    assert rec.reports == [Progress(1), Progress(3)]


def test_without_rate_limit_every_report_goes_through(tmp_path):
    ctx, rec, _ = make_ctx(tmp_path, interval=0)
    for i in range(5):
        ctx.report(Progress(i, 5))
    assert [p.current for p in rec.reports] == [0, 1, 2, 3, 4]


# stopping ---------------------------------------------------------------------------------


def test_stop_sets_stopping_and_keeps_the_first_reason(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    assert not ctx.stopping
    assert ctx.stop_reason is None
    ctx.stop("cancelled")
    ctx.stop("timed out")
    assert ctx.stopping
    assert ctx.stop_reason == "cancelled"


def test_wait_stop_times_out_when_nobody_asks(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    start = time.monotonic()
    assert ctx.wait_stop(0.05) is False
    assert time.monotonic() - start >= 0.04


def test_wait_stop_returns_at_once_when_already_stopped(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    ctx.stop("shutdown")
    start = time.monotonic()
    assert ctx.wait_stop(10) is True
    assert time.monotonic() - start < 1


def test_wait_stop_wakes_when_stopped_from_another_thread(tmp_path):
    ctx, _, _ = make_ctx(tmp_path)
    timer = threading.Timer(0.1, ctx.stop, args=("cancelled",))
    start = time.monotonic()
    timer.start()
    try:
        assert ctx.wait_stop(10) is True
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert ctx.stop_reason == "cancelled"


@pytest.mark.parametrize(
    ("current", "total", "named"),
    [
        (float("nan"), None, "current"),
        (1, float("inf"), "total"),
        (10**400, None, "current"),
        ("3", None, "current"),
        (None, 4, "current"),
    ],
    ids=["nan", "inf", "huge", "text", "none"],
)
def test_progress_must_be_finite_numbers(tmp_path, current, total, named):
    ctx, rec, _ = make_ctx(tmp_path, interval=0)
    with pytest.raises(ValueError, match=f"progress {named} must be a finite number"):
        ctx.progress(current, total)
    assert rec.reports == []
    ctx.progress(1, 2)
    assert rec.reports == [Progress(1, 2, None)]
