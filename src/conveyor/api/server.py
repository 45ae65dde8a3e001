"""Serving the API with uvicorn: `conveyor serve` (the API alone, in one process or
several sharing the listening socket) and `conveyor up` (the API in the main thread and
a worker in another, in one process).

SIGTERM or SIGINT: the server stops accepting connections, ends event streams and
followed logs, and lets answers in flight finish; the worker stops claiming and lets its
running tasks finish (within its grace period). A second signal stops both at once (the
worker hands its running tasks back to the queue).

With several server processes (`conveyor.processes.run_processes`), the first process
binds the socket and forks the others; it passes the signals it gets on to them and
waits for them. Each serves on its own event loop, with its own database connections
and event hub.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from conveyor.worker import Worker

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free port); raises OSError, e.g. when in use."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Shutdown:
    """What a stop signal does: the first asks for a graceful stop, the next for a
    quick one."""

    def __init__(self, api: FastAPI, worker: Worker | None) -> None:
        self.api = api
        self.worker = worker
        self.signals = 0
        self.server: _Server | None = None

    def signal(self) -> None:
        self.signals += 1
        self.api.state.hub.close()
        if self.worker is not None:
            self.worker.stop(hard=self.signals > 1)
        if self.server is not None:
            if self.server.should_exit:
                self.server.force_exit = True
            self.server.should_exit = True

    def handler(self, _signum: int, _frame: FrameType | None) -> None:
        self.signal()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown: _Shutdown) -> None:
        super().__init__(config)
        self._shutdown = shutdown
        shutdown.server = self

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would raise the signal again once the server has stopped,
        # which would stop the worker a second time (a quick stop).
        self._shutdown.signal()


def run(
    api: FastAPI,
    sock: socket.socket,
    worker: Worker | None = None,
    graceful: int = 10,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> bool:
    """Serve until a stop signal (and run `worker` beside the server, if given).
    Returns False when the worker died of an error."""
    shutdown = _Shutdown(api, worker)
    config = uvicorn.Config(
        api,
        log_config=None,
        access_log=False,  # conveyor.api.access logs requests, with tokens hidden
        server_header=False,
        timeout_graceful_shutdown=graceful,
        lifespan="on",
    )
    server = _Server(config, shutdown)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, shutdown.handler)
    worker_ok = True
    thread = None
    if worker is not None:

        def work(w: Worker = worker) -> None:
            nonlocal worker_ok
            try:
                w.run()
            except Exception:
                worker_ok = False
                log.exception("the worker stopped on an error; stopping the server")
                server.should_exit = True

        thread = threading.Thread(target=work, name="conveyor-worker")
        thread.start()
    try:
        server.run(sockets=[sock])
    finally:
        if worker is not None and thread is not None:
            if shutdown.signals == 0:
                worker.stop()
            thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return worker_ok
