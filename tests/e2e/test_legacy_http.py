"""The legacy Spotbot protocol against a real `conveyor serve`, over a raw socket, byte
for byte as the seed's curl lines send it:

    curl -d @my_config.json "http://HOST/spotbot/spotbot_offline_submitter.php?context=SUBMIT"
    curl "http://HOST/spotbot/spotbot_offline_submitter.php?context=STATUS_CHECK&spotbot_offline_req_id=N"

`curl -d @file` strips the file's carriage returns and newlines and sends the rest as
`application/x-www-form-urlencoded`. And `conveyor up`: the API and a worker in one
process, watched over server-sent events, stopped with SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Processes, wait_for

from conftest import cli_env, run_cli, write_config
from conveyor.config import builtin_config_path
from conveyor.examples.spotbot import make_field_test_tree

LEGACY = "/spotbot/spotbot_offline_submitter.php"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


# ------------------------------------------------------------------- raw HTTP/1.1
def exchange(port: int, raw: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` as it is; the answer's status, headers (lower-case names) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the headers: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return int(status_line.split()[1]), headers, body


def curl_post(port: int, target: str, file_bytes: bytes, extra: str = "") -> bytes:
    """What `curl -d @file URL` sends (curl 7.88; only the version differs by curl)."""
    body = file_bytes.replace(b"\r", b"").replace(b"\n", b"")
    return (
        f"POST {target} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "User-Agent: curl/7.88.1\r\n"
        "Accept: */*\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "\r\n"
    ).encode() + body


def curl_get(port: int, target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "User-Agent: curl/7.88.1\r\n"
        "Accept: */*\r\n"
        f"{extra}"
        "\r\n"
    ).encode()


def status_check(port: int, rid: object, extra: str = "") -> bytes:
    target = f"{LEGACY}?context=STATUS_CHECK&spotbot_offline_req_id={rid}"
    code, headers, body = exchange(port, curl_get(port, target, extra))
    assert code == 200, body
    assert headers["content-type"] == "text/plain; charset=utf-8"
    return body


def start_server(
    procs: Processes, env: dict[str, str], cwd: Path, *args: str
) -> tuple[subprocess.Popen[bytes], int]:
    """`conveyor [-v] serve|up --port 0 …`; the process and the port it says it took."""
    proc = procs.start(*args, "--port", "0", env=env, cwd=cwd)

    def port() -> int | None:
        assert proc.poll() is None, procs.output(proc)
        found = re.search(r"http://127\.0\.0\.1:(\d+)", procs.output(proc))
        return int(found.group(1)) if found else None

    number = wait_for(port, 30, "the server to say where it listens")

    def healthy() -> bool:
        try:
            return exchange(number, curl_get(number, "/healthz"), timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(healthy, 30, "the server to answer")
    return proc, number


def stop(procs: Processes, proc: subprocess.Popen[bytes], within: float = 15) -> str:
    proc.send_signal(signal.SIGTERM)
    code = procs.wait(proc, within)
    output = procs.output(proc)
    assert code == 0, output
    assert "Traceback" not in output, output
    return output


def pretty_windows_file(params: object) -> bytes:
    """A config file as an editor on Windows writes it: indented, CRLF line ends."""
    return json.dumps(params, indent=4).replace("\n", "\r\n").encode() + b"\r\n"


# ------------------------------------------------------------------------ tests
def test_the_seeds_curl_lines_work_unchanged(tmp_path: Path, procs: Processes) -> None:
    """No config file: the built-in Spotbot example pipeline takes the requests."""
    env = cli_env(f"sqlite:///{tmp_path / 'conveyor.db'}")
    server, port = start_server(procs, env, tmp_path, "serve")

    logs = make_field_test_tree(tmp_path / "V", devices=2, records=50)
    params = {
        "logs_to_process": [
            {
                "rawbinlog_bin": str(b),
                "rawbinlog_time": str(b.with_suffix(".time")),
                "protocols_xml": str(b.with_suffix(".protocols.xml")),
                "output_dir": str(b.parent),
            }
            for b in logs
        ]
    }
    my_config = pretty_windows_file(params)
    (tmp_path / "my_config.json").write_bytes(my_config)

    code, headers, body = exchange(port, curl_post(port, f"{LEGACY}?context=SUBMIT", my_config))
    assert code == 200, body
    assert re.fullmatch(rb"[0-9]+", body), body  # the id alone: no newline, no JSON
    assert headers["content-type"] == "text/plain; charset=utf-8"
    rid = int(body)
    assert status_check(port, rid) == b"REQUESTED"
    assert status_check(port, 999999) == b"REQ_NOT_FOUND"

    if shutil.which("curl"):  # and the real thing, where there is one
        url = f"http://127.0.0.1:{port}{LEGACY}"
        out = subprocess.run(
            ["curl", "-s", "-d", "@my_config.json", f"{url}?context=SUBMIT"],
            cwd=tmp_path, capture_output=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert re.fullmatch(rb"[0-9]+", out) and int(out) == rid + 1
        status = subprocess.run(
            ["curl", "-s", f"{url}?context=STATUS_CHECK&spotbot_offline_req_id={rid}"],
            capture_output=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert status == b"REQUESTED"

    worker = run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert status_check(port, rid) == b"REQ_SUCCESS"
    for b in logs:
        assert (b.parent / "spotbot.db").is_file()

    # bad input: a problem document, and nothing stored
    code, headers, body = exchange(port, curl_post(port, f"{LEGACY}?context=SUBMIT", b"{oops"))
    assert code == 400 and headers["content-type"] == "application/problem+json"
    assert "not valid JSON" in json.loads(body)["detail"]
    stop(procs, server)


def test_a_required_token_and_a_failed_request(tmp_path: Path, procs: Processes) -> None:
    schema = builtin_config_path().parent / "spotbot.schema.json"
    config = write_config(
        tmp_path,
        f"""
        [legacy]
        pipeline = "spot"
        require_token = true

        [pipelines.spot]
        executor = "command"
        command = ["{{conveyor.python}}", "-m", "conveyor.examples.spotbot", "--bin",
                   "{{rawbinlog_bin}}", "--time", "{{rawbinlog_time}}", "--protocols",
                   "{{protocols_xml}}", "--output-dir", "{{output_dir}}"]
        split = "logs_to_process"
        schema = {json.dumps(str(schema))}
        """,
    )
    env = cli_env(f"sqlite:///{tmp_path / 'conveyor.db'}", config)
    made = run_cli("token", "create", "--name", "etl", "--role", "submit", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("cvy_") and "cannot be shown again" in made.stderr
    server, port = start_server(procs, env, tmp_path, "-v", "serve")

    missing = tmp_path / "nowhere" / "rawbinlog.bin"
    params = {
        "logs_to_process": [
            {
                "rawbinlog_bin": str(missing),
                "rawbinlog_time": str(missing),
                "protocols_xml": str(missing),
                "output_dir": str(missing.parent),
            }
        ]
    }
    file = pretty_windows_file(params)
    submit = f"{LEGACY}?context=SUBMIT"
    code, headers, body = exchange(port, curl_post(port, submit, file))
    assert code == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["status"] == 401
    assert (
        exchange(port, curl_get(port, f"{LEGACY}?context=STATUS_CHECK&spotbot_offline_req_id=1"))[0]
        == 401
    )

    header = f"Authorization: Bearer {token}\r\n"
    code, _, body = exchange(port, curl_post(port, submit, file, extra=header))
    assert code == 200 and body.isdigit(), body
    rid = int(body)
    code, _, body = exchange(port, curl_post(port, f"{submit}&token={token}", file))
    assert code == 200 and int(body) == rid + 1

    assert status_check(port, rid, extra=header) == b"REQUESTED"
    worker = run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert status_check(port, rid, extra=header) == b"REQ_FAILED"

    output = stop(procs, server)
    assert "token=***" in output  # requests are logged (-v) with the token hidden
    assert token not in output


def test_up_serves_the_api_runs_the_work_and_stops_on_sigterm(
    tmp_path: Path, sqlite_url: str, procs: Processes
) -> None:
    """On the embedded default, as `make run` starts it."""
    env = cli_env(sqlite_url)
    made = run_cli("token", "create", "--name", "ann", "--role", "submit", env=env, cwd=tmp_path)
    token = made.stdout.strip()
    server, port = start_server(procs, env, tmp_path, "up", "--concurrency", "2")
    auth = f"Authorization: Bearer {token}\r\n"

    body = json.dumps({"pipeline": "sleep", "params": {"seconds": 0.3}}).encode()
    raw = (
        f"POST /api/v1/requests HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    code, _, answer = exchange(port, raw)
    assert code == 201, answer
    rid = json.loads(answer)["id"]
    assert json.loads(answer)["submitter"] == "ann"

    # watch it over server-sent events until it succeeds
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sse:
        sse.sendall(curl_get(port, f"/api/v1/events/stream?selector=request.{rid}&after=0", auth))
        seen = b""
        deadline = time.monotonic() + 20
        while b"event: request.succeeded" not in seen:
            assert time.monotonic() < deadline, seen
            chunk = sse.recv(65536)
            assert chunk, seen
            seen += chunk
        assert b"text/event-stream" in seen
        # SIGTERM with the stream still open: the server ends it and exits in time
        start = time.monotonic()
        stop(procs, server, within=20)
        assert time.monotonic() - start < 15
