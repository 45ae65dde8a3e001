"""`conveyor bench-exec`: what the command executor costs over running the processes
by hand.

One round times N tasks running `true` through a worker with concurrency C on a scratch
SQLite database, and a bare Python loop running the same N `true` processes with the
same parallelism (`ThreadPoolExecutor(C)` and `subprocess.run`). The sides take turns going
first, so drift on a shared machine falls on all; the figures are the medians.

The Conveyor side is timed as a running service would see it: the worker is already up
(it has run a few tasks: its threads, watchdog and database connections exist), the N
tasks are stored in a paused queue, and the time runs from resuming the queue (the
tasks become claimable) to the last outcome recorded (the request's `finished_at`).
Everything each task costs is inside: claim, work directory, log, the process, the
outcome, events and request counters.

A third side, the bare loop with files, runs the same loop with what each attempt has
on disk besides its process, where a worker puts them: a work directory of its own (its
working directory) and, if the command printed anything, a log file holding its output
(read through a pipe, as a launcher reads it; a quiet command's log is kept in the
database). Against the bare loop it shows what the file system of the scratch costs;
against Conveyor, what the rest does. The ratio the target is about stays Conveyor's
against the bare loop.

A fourth side runs Conveyor with the pipeline's `work_dir = false`: its commands get
no folder of their own, as the bare loop's processes have none (`no_work_dir_ratio`).
The four sides take turns in a balanced order: over each four rounds, each goes in each
place once and follows each other side once.

Each round numbers its request from a random point, as a service that has run a while
does, not from 1 in its fresh database: on ext4 a request's folders are placed by a
hash of their name (`spread_subfolders`), and folders named as in the run before would
land where that run's cleanup has just deleted thousands of files, which on ext4
without a journal makes each new file cost up to a millisecond for minutes.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.app import Conveyor
from conveyor.artifacts import LocalArtifacts
from conveyor.config import Config, parse_config
from conveyor.executors.launcher import command_line, make_dir, open_log
from conveyor.queues import DEFAULT_QUEUE
from conveyor.requests import Request
from conveyor.worker import Worker, WorkerOptions


@dataclass(frozen=True)
class ExecBenchOptions:
    tasks: int = 1000
    concurrency: int = 8
    rounds: int = 5
    command: tuple[str, ...] = ("true",)
    scratch: Path | None = None  # where the rounds' files go; None: the system's temp dir
    # Worker processes sharing `concurrency` (`conveyor worker --processes`); 1: the
    # worker runs in a thread of this process
    processes: int = 1


def _timed(opts: ExecBenchOptions, one: Callable[[int], int]) -> float:
    """Seconds to run `one(n)` for each task, `opts.concurrency` at a time; each must
    return 0, its command's exit code."""
    start = time.perf_counter()
    with ThreadPoolExecutor(opts.concurrency) as pool:
        codes = list(pool.map(one, range(opts.tasks)))
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"{opts.command[0]} failed {sum(1 for c in codes if c)} times")
    return elapsed


def bare_loop(opts: ExecBenchOptions) -> float:
    argv = list(opts.command)

    def one(_: int) -> int:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode

    return _timed(opts, one)


def bare_loop_with_files(opts: ExecBenchOptions, folder: Path, request: int) -> float:
    """`bare_loop`, each process with an attempt's files, made as a launcher makes them,
    where a worker keeps them under `folder` for task n of `request`: its work
    directory (its working directory), and, if it printed anything, its log, headed by
    the command line and holding its stdout and stderr.

    Output goes to a spool file of the thread's own (made once), not a pipe: reading a
    pipe in this process would add Python's cost to the loop, which a launcher bears in
    a process of its own. What a command wrote is moved from the spool to its log."""
    argv = list(opts.command)
    header = (command_line(argv) + "\n").encode()
    files = LocalArtifacts(folder)
    files.prepare()
    spools = threading.local()
    opened: list[int] = []

    def spool() -> int:
        fd: int | None = getattr(spools, "fd", None)
        if fd is None:
            fd = spools.fd = os.open(
                folder / f"spool-{threading.get_ident()}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            )
            opened.append(fd)
        return fd

    def one(n: int) -> int:
        log_file, cwd = files.attempt_paths(request, n, 1)
        make_dir(cwd)  # as the launcher makes them, with the request's folders if need be
        out = spool()
        code = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, check=False
        ).returncode
        size = os.fstat(out).st_size
        if size:
            with os.fdopen(open_log(log_file), "ab") as log:
                log.write(header + os.pread(out, size, 0) + f"exit code {code}\n".encode())
            os.ftruncate(out, 0)
            os.lseek(out, 0, os.SEEK_SET)
        return code

    try:
        return _timed(opts, one)
    finally:
        for fd in opened:
            os.close(fd)


def first_request_id() -> int:
    """Where a round's request ids start (see the module's docstring)."""
    return random.randrange(1_000_000, 1_000_000_000)


def _number_requests_from(database: Path, first: int) -> None:
    """Make the next request stored in the scratch `database` get id `first`. SQLite
    gives a new row the largest id so far plus one: a finished request with no tasks
    holds `first - 1`."""
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute(
            "INSERT INTO requests (id, pipeline, params, params_hash, queue, status, "
            "created_at) VALUES (?, 'true', '{}', '', ?, 'succeeded', 0)",
            (first - 1, DEFAULT_QUEUE),
        )


def _finished(app: Conveyor, request_id: int, poll: float) -> Request:
    deadline = time.monotonic() + 600
    while True:
        req = app.get(request_id, with_tasks=False)
        if req.status.terminal:
            return req
        if time.monotonic() > deadline:
            raise RuntimeError(f"request {request_id} did not finish in 600 s")
        time.sleep(poll)


def conveyor_run(opts: ExecBenchOptions, scratch: Path, work_dir: bool = True) -> float:
    """One timed round of Conveyor; `work_dir`: the pipeline's setting of that name
    (false: its commands get no folder of their own)."""
    base = Path(tempfile.mkdtemp(prefix="round-", dir=scratch))
    pipeline: dict[str, Any] = {
        "executor": "command",
        "command": list(opts.command),
        "split": "items",
        "work_dir": work_dir,
    }
    data = {"pipelines": {"true": pipeline}}
    env = {
        "CONVEYOR_DATABASE_URL": f"sqlite:///{base / 'conveyor.db'}",
        "CONVEYOR_ARTIFACTS": str(base / "artifacts"),
    }
    app = Conveyor(parse_config(data, base, env))
    try:
        app.store.upgrade()
        _number_requests_from(base / "conveyor.db", first_request_id())
        stop = _start_workers(app, opts)
        try:
            warm = app.submit("true", {"items": list(range(opts.concurrency * 2))})
            _finished(app, warm.request.id, 0.01)
            app.pause(DEFAULT_QUEUE)
            submitted = app.submit("true", {"items": list(range(opts.tasks))})
            start = time.time()
            app.resume(DEFAULT_QUEUE)
            # Polled slowly: the polling is load on the worker's machine, not work of it.
            req = _finished(app, submitted.request.id, 0.05)
        finally:
            stop()
        if req.status.value != "succeeded" or req.finished_at is None:
            raise RuntimeError(
                f"only {req.counts.succeeded} of {opts.tasks} tasks succeeded ({req.status.value})"
            )
        return req.finished_at - start
    finally:
        app.close()


def _start_workers(app: Conveyor, opts: ExecBenchOptions) -> Callable[[], None]:
    """The worker(s) of a round, started; returns how to stop them. One process: a
    worker in a thread of this one. Several: forked worker processes sharing the
    concurrency, as `conveyor worker --processes` runs them."""
    if opts.processes == 1:
        worker = _worker(app, opts.concurrency)
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        thread.start()

        def stop_thread() -> None:
            worker.stop(hard=True)
            thread.join(60)

        return stop_thread
    ctx = multiprocessing.get_context("fork")
    each = max(1, opts.concurrency // opts.processes)
    children = [
        ctx.Process(target=_worker_process, args=(app.config, each), daemon=True)
        for _ in range(opts.processes)
    ]
    for child in children:
        child.start()

    def stop_processes() -> None:
        for child in children:
            child.terminate()  # SIGTERM: the worker stops
        for child in children:
            child.join(60)

    return stop_processes


def _worker(app: Conveyor, concurrency: int) -> Worker:
    return Worker(
        app, WorkerOptions(queues=[DEFAULT_QUEUE], concurrency=concurrency, poll_interval=0.05)
    )


def _worker_process(config: Config, concurrency: int) -> None:
    app = Conveyor(config)
    worker = _worker(app, concurrency)
    signal.signal(signal.SIGTERM, lambda _s, _f: worker.stop(hard=True))
    try:
        worker.run()
    finally:
        app.close()


def balanced_orders(n: int) -> list[list[int]]:
    """n orders of the sides 0..n-1 (n even) in which each side goes in each place once
    and follows each other side once: a Williams design, so that drift, and what a
    round leaves behind for the next (deleted files, say), fall on every side alike.
    Rounds take the orders in turn: the default 5 rounds repeat the first."""
    if n % 2:
        raise ValueError(f"a balanced order of {n} sides needs an even number of them")
    base = [0]
    for k in range(1, n):
        base.append((k + 1) // 2 if k % 2 else n - k // 2)
    return [[(b + r) % n for b in base] for r in range(n)]


def run_exec_bench(
    opts: ExecBenchOptions, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    bare: list[float] = []
    files: list[float] = []
    conveyor: list[float] = []
    unplaced: list[float] = []
    # The rounds' files are deleted at the end, not between rounds: deleting thousands of
    # files just before a round makes creating files in it slower on some file systems
    # (ext4 skips recently freed inodes), which would load the rounds that make files.
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-exec-", dir=opts.scratch) as tmp:
        scratch = Path(tmp)

        conveyor_round = functools.partial(conveyor_run, scratch=scratch)
        unplaced_round = functools.partial(conveyor_run, scratch=scratch, work_dir=False)

        def files_round(o: ExecBenchOptions) -> float:
            folder = Path(tempfile.mkdtemp(prefix="files-", dir=scratch))
            return bare_loop_with_files(o, folder, first_request_id())

        # warm up: imports, the first database, the page cache
        conveyor_round(
            ExecBenchOptions(
                tasks=opts.concurrency * 2,
                concurrency=opts.concurrency,
                processes=opts.processes,
            )
        )
        sides: list[tuple[str, Callable[[ExecBenchOptions], float], list[float]]] = [
            ("bare", bare_loop, bare),
            ("bare with files", files_round, files),
            ("conveyor", conveyor_round, conveyor),
            ("conveyor, work_dir = false", unplaced_round, unplaced),
        ]
        orders = balanced_orders(len(sides))
        for i in range(opts.rounds):
            for side in orders[i % len(orders)]:
                name, fn, times = sides[side]
                t = fn(opts)
                times.append(t)
                if say:
                    say(f"round {i + 1}/{opts.rounds}: {name} {t:.2f}s")
    bare_med = statistics.median(bare)
    files_med = statistics.median(files)
    conv_med = statistics.median(conveyor)
    unplaced_med = statistics.median(unplaced)
    return {
        "command": list(opts.command),
        "scratch": str(opts.scratch or tempfile.gettempdir()),
        "tasks": opts.tasks,
        "concurrency": opts.concurrency,
        "processes": opts.processes,
        "rounds": opts.rounds,
        "bare_seconds": [round(t, 3) for t in bare],
        "conveyor_seconds": [round(t, 3) for t in conveyor],
        "bare_median_s": round(bare_med, 3),
        "conveyor_median_s": round(conv_med, 3),
        "ratio": round(conv_med / bare_med, 3),
        "ratio_per_round": [round(c / b, 3) for b, c in zip(bare, conveyor, strict=True)],
        "bare_tasks_per_s": round(opts.tasks / bare_med, 1),
        "conveyor_tasks_per_s": round(opts.tasks / conv_med, 1),
        "bare_with_files_seconds": [round(t, 3) for t in files],
        "bare_with_files_median_s": round(files_med, 3),
        # what an attempt's files cost on this scratch, and Conveyor against that loop
        "files_ratio": round(files_med / bare_med, 3),
        "ratio_to_bare_with_files": round(conv_med / files_med, 3),
        # the pipeline with `work_dir = false`: no folder made for each task
        "no_work_dir_seconds": [round(t, 3) for t in unplaced],
        "no_work_dir_median_s": round(unplaced_med, 3),
        "no_work_dir_ratio": round(unplaced_med / bare_med, 3),
    }
