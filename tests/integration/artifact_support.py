"""Helpers of the artifact and notification tests: a command that writes outputs, and a
worker run until the queues are empty."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conveyor.app import Conveyor
from conveyor.worker import Worker, WorkerOptions, WorkerStats

# Writes <name>.csv, out/deep/<name>.db (200 kB, different for each name) and a file
# no glob matches, in its work dir; exits with params.code.
WRITE_OUTPUTS = (
    "import hashlib, pathlib, sys; name, code = sys.argv[1], int(sys.argv[2]); "
    "pathlib.Path(name + '.csv').write_text('id,rank\\n1,' + name + '\\n'); "
    "d = pathlib.Path('out/deep'); d.mkdir(parents=True, exist_ok=True); "
    "(d / (name + '.db')).write_bytes(b''.join(hashlib.sha256(name.encode() "
    "+ bytes([i % 256, i // 256])).digest() for i in range(6250))); "
    "pathlib.Path('scratch.tmp').write_text('not an output'); "
    "print('wrote outputs for', name); sys.exit(code)"
)


def outputs_pipeline(name: str = "ranks", extra: str = "") -> str:
    return f"""
[pipelines.{name}]
executor = "command"
command = ["{{conveyor.python}}", "-c", {WRITE_OUTPUTS!r}, "{{name}}", "{{code}}"]
split = "items"
outputs = ["*.csv", "out/**/*.db"]
{extra}
"""


def expected_db(name: str) -> bytes:
    return b"".join(
        hashlib.sha256(name.encode() + bytes([i % 256, i // 256])).digest() for i in range(6250)
    )


def run_worker(app: Conveyor, concurrency: int = 2) -> WorkerStats:
    """A real worker, until nothing is left to do."""
    w = Worker(app, WorkerOptions(concurrency=concurrency, burst=True, poll_interval=0.05, grace=5))
    return w.run()


def work_dir(app: Conveyor, request_id: int, task_id: int) -> Path:
    return app.artifacts.work_dir(request_id, task_id)
