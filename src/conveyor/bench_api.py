"""`conveyor bench-api`: how many submits a second the HTTP API takes, and how fast it
answers `GET /api/v1/requests/{id}` meanwhile.

It makes a scratch database (created and dropped on the PostgreSQL server `--database`
names, or a temporary SQLite file), migrates it, makes an admin token, and starts
`conveyor serve` on a free loopback port against it, as a process of its own. This
process is the load: `clients` connections submitting to the `noop` pipeline back to
back, and `readers` connections reading the requests submitted so far, for `seconds`
(after a short warm-up that is not counted). Then it stops the server and drops the
database. Only 127.0.0.1 is ever sent anything, and both the count of connections and
the time are bounded.

The load speaks HTTP/1.1 over keep-alive connections itself (a few lines on asyncio
streams): a general-purpose client library would cost more CPU than the server it
measures, on a machine the two share.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.bench import scratch_database
from conveyor.store import open_store
from conveyor.tokens import Role, new_token

HOST = "127.0.0.1"
MAX_CLIENTS = 512
MAX_SECONDS = 600.0
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class ApiBenchOptions:
    database: str | None = None  # a PostgreSQL server URL; None: a temporary SQLite file
    clients: int = 32  # connections submitting
    readers: int = 4  # connections reading requests meanwhile
    seconds: float = 20.0
    warmup: float = 2.0
    workers: int = 2  # server processes (`conveyor serve --workers`)
    pipeline: str = "noop"


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it go one after another."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.head = f"Host: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        reader, writer = await self._open()
        extra = (
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            if method == "POST"
            else ""
        )
        writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{extra}\r\n".encode() + body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise HttpError(f"connection lost: {exc}") from None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        if "content-length" not in headers:
            self.close()
            raise HttpError(f"{method} {path}: an answer without Content-Length")
        content = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, content


@dataclass
class _Tally:
    measuring: bool = False
    submits: int = 0
    reads: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    def error(self, what: str) -> None:
        if self.measuring:
            self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


async def _submitter(conn: Connection, tally: _Tally, pipeline: str, until: float) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        body = json.dumps({"pipeline": pipeline, "params": {"n": n}}).encode()
        start = time.perf_counter()
        try:
            status, content = await conn.request("POST", "/api/v1/requests", body)
        except (HttpError, OSError) as exc:
            tally.error(str(exc))
            await asyncio.sleep(0.05)
            continue
        took = (time.perf_counter() - start) * 1000
        if status != 201:
            tally.error(f"submit: {status} {content[:200]!r}")
            continue
        tally.ids.append(json.loads(content)["id"])
        if tally.measuring:
            tally.submits += 1
            tally.submit_ms.append(took)


async def _reader(conn: Connection, tally: _Tally, until: float, rnd: random.Random) -> None:
    while time.monotonic() < until:
        if not tally.ids:
            await asyncio.sleep(0.01)
            continue
        rid = tally.ids[rnd.randrange(len(tally.ids))]
        start = time.perf_counter()
        try:
            status, content = await conn.request("GET", f"/api/v1/requests/{rid}")
        except (HttpError, OSError) as exc:
            tally.error(str(exc))
            await asyncio.sleep(0.05)
            continue
        took = (time.perf_counter() - start) * 1000
        if status != 200:
            tally.error(f"status: {status} {content[:200]!r}")
            continue
        if tally.measuring:
            tally.reads += 1
            tally.read_ms.append(took)


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


async def load(port: int, token: str, opts: ApiBenchOptions) -> dict[str, Any]:
    """Submit and read for warm-up + seconds; what was measured after the warm-up."""
    tally = _Tally()
    start = time.monotonic()
    until = start + opts.warmup + opts.seconds
    conns = [Connection(port, token) for _ in range(opts.clients + opts.readers)]
    rnd = random.Random(1)
    jobs = [_submitter(c, tally, opts.pipeline, until) for c in conns[: opts.clients]]
    jobs += [_reader(c, tally, until, rnd) for c in conns[opts.clients :]]

    async def measure() -> float:
        await asyncio.sleep(opts.warmup)
        tally.measuring = True
        began = time.monotonic()
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        return time.monotonic() - began

    try:
        timer = asyncio.ensure_future(measure())
        await asyncio.gather(*jobs)
        measured = await timer
    finally:
        for c in conns:
            c.close()
    return {
        "submits": tally.submits,
        "submits_per_s": round(tally.submits / measured, 1),
        "submit_p50_ms": _percentile(tally.submit_ms, 0.5),
        "submit_p99_ms": _percentile(tally.submit_ms, 0.99),
        "status_reads": tally.reads,
        "status_per_s": round(tally.reads / measured, 1),
        "status_p50_ms": _percentile(tally.read_ms, 0.5),
        "status_p99_ms": _percentile(tally.read_ms, 0.99),
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "measured_s": round(measured, 2),
    }


# ---------------------------------------------------------------------- the server
def _admin_token(url: str) -> str:
    store = open_store(url)
    try:
        store.upgrade()
        new, secret = new_token("bench", Role.ADMIN)
        store.create_token(new, time.time())
    finally:
        store.close()
    return secret


class _Server:
    """`conveyor serve` on a free loopback port, in a process of its own."""

    def __init__(self, url: str, workers: int, folder: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["CONVEYOR_DATABASE_URL"] = url
        self.log = folder / "serve.log"
        self._out = self.log.open("wb")
        args = [sys.executable, "-m", "conveyor", "serve", "--host", HOST, "--port", "0"]
        self.proc = subprocess.Popen(
            [*args, "--workers", str(workers)],
            env=env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"conveyor serve exited: {self.output()[-2000:]}")
            found = re.search(rf"http://{re.escape(HOST)}:(\d+)", self.output())
            if found:
                return int(found.group(1))
            time.sleep(0.05)
        raise RuntimeError("conveyor serve did not say where it listens")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


async def _ready(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            conn = Connection(port, "-")
            status, _ = await conn.request("GET", "/readyz")
            conn.close()
            if status == 200:
                return
        except (HttpError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("conveyor serve did not get ready")
        await asyncio.sleep(0.1)


def run_api_bench(
    opts: ApiBenchOptions, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    if not 1 <= opts.clients + opts.readers <= MAX_CLIENTS:
        raise ValueError(f"clients + readers must be 1 to {MAX_CLIENTS}")
    if not 0 < opts.seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be over 0 and at most {MAX_SECONDS:g}")
    tell = say or (lambda _msg: None)
    with scratch_database(opts.database) as url, tempfile.TemporaryDirectory() as tmp:
        dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        tell(f"scratch {dialect} database; migrating and making an admin token")
        token = _admin_token(url)
        server = _Server(url, opts.workers, Path(tmp))
        try:
            port = server.port()
            asyncio.run(_ready(port))
            tell(
                f"conveyor serve ({opts.workers} worker(s)) on {HOST}:{port}: "
                f"{opts.clients} clients submitting, {opts.readers} reading, "
                f"{opts.warmup:g}s warm-up + {opts.seconds:g}s"
            )
            measured = asyncio.run(load(port, token, opts))
        finally:
            code = server.stop()
            output = server.output()
        if code != 0:
            raise RuntimeError(f"conveyor serve exited with {code}: {output[-2000:]}")
        return {
            "database": dialect,
            "server_workers": opts.workers,
            "clients": opts.clients,
            "readers": opts.readers,
            "pipeline": opts.pipeline,
            **measured,
        }
