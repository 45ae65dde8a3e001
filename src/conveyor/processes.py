"""Several processes of one command (`conveyor serve --workers N`, `conveyor worker
--processes N`): the first process forks them, passes the stop signals it gets on to
them and waits for them.

Each process makes its own application object (database connections, event hub), so
they are forked before any connection or thread exists. Ctrl-C reaches every process
of the terminal's group: only the first acts on it, passing it on as SIGTERM (a second
one again, which stops workers at once). If one process fails, the others are stopped;
if the first is killed, the others notice within a second and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def _watch_parent(parent: int) -> None:
    """Stop this process (as SIGTERM would) when the process that forked it is gone:
    killed, it could not pass a signal on, and nothing else would."""
    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("the first process is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    pass


def run_processes(target: Callable[[], bool], processes: int, ends_ok: bool = False) -> bool:
    """Run `target()` in `processes` forked processes until they end;
    True if all of them succeeded. Without `ends_ok` a process is expected to run until
    a stop signal: one that ends on its own, or fails, stops the others. With it (a
    worker's --burst), each may end when it is done."""
    parent = os.getpid()
    children: set[int] = set()
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:  # a child: it only ever leaves through os._exit
            code = 1
            try:
                # A handler that does nothing, not SIG_IGN: an ignored signal stays
                # ignored in the programs a process starts (a worker's commands).
                signal.signal(signal.SIGINT, _ignore)
                threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
                code = 0 if target() else 1
            except BaseException:
                log.exception("process %s failed", os.getpid())
            finally:
                os._exit(code)
        children.add(pid)
    stopping = 0

    def forward(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping += 1
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    ok = True
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 or not (stopping or ends_ok):
                ok = False
                log.error("process %s ended (exit %s): stopping the others", pid, code)
                if not stopping:
                    forward(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ok
