"""`conveyor bench-exec`: what the command executor costs over running the processes
by hand.

One round times N tasks running `true` through a worker with concurrency C on a scratch
SQLite database (submit to last outcome recorded), and a bare Python loop running the
same N `true` processes with the same parallelism (`ThreadPoolExecutor(C)` and
`subprocess.run`). Rounds alternate which goes first, so drift on a shared machine
falls on both; the figures are the medians.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.app import Conveyor
from conveyor.config import parse_config
from conveyor.queues import DEFAULT_QUEUE
from conveyor.worker import Worker, WorkerOptions


@dataclass(frozen=True)
class ExecBenchOptions:
    tasks: int = 1000
    concurrency: int = 8
    rounds: int = 5
    command: tuple[str, ...] = ("true",)


def bare_loop(opts: ExecBenchOptions) -> float:
    argv = list(opts.command)

    def one(_: int) -> int:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode

    start = time.perf_counter()
    with ThreadPoolExecutor(opts.concurrency) as pool:
        codes = list(pool.map(one, range(opts.tasks)))
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"{argv[0]} failed {sum(1 for c in codes if c)} times")
    return elapsed


def conveyor_run(opts: ExecBenchOptions) -> float:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-exec-") as tmp:
        base = Path(tmp)
        data = {
            "pipelines": {
                "true": {"executor": "command", "command": list(opts.command), "split": "items"}
            }
        }
        env = {
            "CONVEYOR_DATABASE_URL": f"sqlite:///{base / 'conveyor.db'}",
            "CONVEYOR_ARTIFACTS": str(base / "artifacts"),
        }
        app = Conveyor(parse_config(data, base, env))
        try:
            app.store.upgrade()
            params = {"items": list(range(opts.tasks))}
            worker = Worker(
                app,
                WorkerOptions(
                    queues=[DEFAULT_QUEUE],
                    concurrency=opts.concurrency,
                    burst=True,
                    poll_interval=0.05,
                ),
            )
            start = time.perf_counter()
            submitted = app.submit("true", params)
            stats = worker.run()
            elapsed = time.perf_counter() - start
            req = app.get(submitted.request.id, with_tasks=False)
            if stats.succeeded != opts.tasks or req.status.value != "succeeded":
                raise RuntimeError(
                    f"only {stats.succeeded} of {opts.tasks} tasks succeeded ({req.status.value})"
                )
        finally:
            app.close()
        return elapsed


def run_exec_bench(
    opts: ExecBenchOptions, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    bare: list[float] = []
    conveyor: list[float] = []
    # warm up: imports, the first database, the page cache
    conveyor_run(ExecBenchOptions(tasks=opts.concurrency * 2, concurrency=opts.concurrency))
    for i in range(opts.rounds):
        order = [("bare", bare_loop, bare), ("conveyor", conveyor_run, conveyor)]
        if i % 2:
            order.reverse()
        for name, fn, times in order:
            t = fn(opts)
            times.append(t)
            if say:
                say(f"round {i + 1}/{opts.rounds}: {name} {t:.2f}s")
    bare_med = statistics.median(bare)
    conv_med = statistics.median(conveyor)
    return {
        "command": list(opts.command),
        "tasks": opts.tasks,
        "concurrency": opts.concurrency,
        "rounds": opts.rounds,
        "bare_seconds": [round(t, 3) for t in bare],
        "conveyor_seconds": [round(t, 3) for t in conveyor],
        "bare_median_s": round(bare_med, 3),
        "conveyor_median_s": round(conv_med, 3),
        "ratio": round(conv_med / bare_med, 3),
        "ratio_per_round": [round(c / b, 3) for b, c in zip(bare, conveyor, strict=True)],
        "bare_tasks_per_s": round(opts.tasks / bare_med, 1),
        "conveyor_tasks_per_s": round(opts.tasks / conv_med, 1),
    }
