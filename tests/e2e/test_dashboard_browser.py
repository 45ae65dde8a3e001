"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against `conveyor up` run as a user runs it: log in with a token, watch a request
submitted through the API appear and finish without reloading the page, read its log,
pause a queue by clicking and see the worker stop taking from it, resume it.

A screenshot of each main page (at 1280 px, and some at phone width) is kept under
$CONVEYOR_TEST_ARTIFACTS, else tests/artifacts/."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import Processes, toml_list, wait_for

from conftest import _missing, cli_env, run_cli, write_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# A task that takes a while and says what it is doing: progress and log lines. (No
# braces: the command's items are templates.)
SLOW = (
    "import sys, time\n"
    "steps = 4\n"
    "for i in range(steps):\n"
    "    print('conveyor:progress %d/%d step %d' % (i, steps, i), flush=True)\n"
    "    print('working on step %d' % i, flush=True)\n"
    "    time.sleep(float(sys.argv[1]))\n"
    "print('all done', flush=True)\n"
)
FAIL = "import sys; print('boom: the disk is on fire', flush=True); sys.exit(3)"


def artifacts_dir() -> Path:
    where = os.environ.get("CONVEYOR_TEST_ARTIFACTS")
    path = Path(where) if where else Path(__file__).resolve().parents[1] / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


def start_up(
    procs: Processes, env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen[bytes], str]:
    proc = procs.start("up", "--port", "0", "--concurrency", "2", "--grace", "2", env=env, cwd=cwd)

    def url() -> str | None:
        assert proc.poll() is None, procs.output(proc)
        found = re.search(r"http://127\.0\.0\.1:\d+", procs.output(proc))
        return found.group(0) if found else None

    where = wait_for(url, 30, "conveyor up to say where it listens")

    def ready() -> bool:
        try:
            return httpx.get(f"{where}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 30, "the server to answer")
    return proc, where


def shoot(page: Any, name: str) -> None:
    page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)


def fits_the_width(page: Any) -> bool:
    """Nothing makes the page scroll sideways (wide tables scroll in their own box)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_dashboard_in_a_browser(tmp_path: Path, procs: Processes, browser: Any) -> None:
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.slow]
        executor = "command"
        command = {toml_list(["{conveyor.python}", "-c", SLOW, "{pause}"])}
        split = "parts"
        queue = "default"

        [pipelines.breaks]
        executor = "command"
        command = {toml_list(["{conveyor.python}", "-c", FAIL])}
        queue = "test"
        """,
    )
    env = cli_env(f"sqlite:///{tmp_path / 'conveyor.db'}", config)
    env["CONVEYOR_ARTIFACTS"] = str(tmp_path / "artifacts")
    made = run_cli(
        "token", "create", "--name", "operator", "--role", "admin", env=env, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    up, url = start_up(procs, env, tmp_path)
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def submit(pipeline: str, params: dict[str, Any]) -> int:
        r = api.post("/api/v1/requests", json={"pipeline": pipeline, "params": params})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def status(request_id: int) -> str:
        return str(api.get(f"/api/v1/requests/{request_id}").json()["status"])

    context = browser.new_context(viewport=WIDE)
    context.set_default_timeout(20_000)
    page = context.new_page()
    complaints: list[str] = []
    page.on("console", lambda m: complaints.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: complaints.append(str(e)))
    try:
        # -------------------------------------------------------------- log in
        page.goto(f"{url}/requests")
        assert page.url.startswith(f"{url}/login")
        page.get_by_label("Token").fill(token)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{url}/requests")
        assert page.get_by_role("heading", name="Requests").is_visible()
        page.evaluate("window.notReloaded = true")

        # ---------------- a request appears and finishes, the page never reloads
        rid = submit("slow", {"pause": 0.6, "parts": ["a", "b", "c"]})
        row = page.locator(f"#request-{rid}")
        row.wait_for()
        row.locator(".badge", has_text="succeeded").wait_for(timeout=30_000)
        assert page.evaluate("window.notReloaded") is True
        shoot(page, "requests")

        # --------------------------- its detail, with the log of a running task
        running = submit("slow", {"pause": 1.5, "parts": ["x"]})
        page.goto(f"{url}/requests/{running}")
        page.locator("#live .badge", has_text="running").first.wait_for(timeout=30_000)
        page.locator(".log-link", has_text="attempt 1").first.click()
        page.locator("#log-view pre.log", has_text="working on step 0").wait_for()
        assert page.locator("#log-view .live").is_visible()  # following while it runs
        page.locator("#log-view pre.log", has_text="all done").wait_for(timeout=30_000)
        page.locator("p.status-line .badge", has_text="succeeded").wait_for(timeout=30_000)
        assert page.locator("progress[value='100']").count() == 1
        shoot(page, "request-detail")
        page.goto(f"{url}/requests/{rid}")
        assert page.locator("svg.gantt rect.succeeded").count() == 3

        # ------------------------------------------------------- failed tasks
        broken = submit("breaks", {})
        wait_for(lambda: status(broken) == "failed", 30, "the broken request to fail")
        page.goto(f"{url}/failed")
        page.get_by_label("Task or request id, or text in the error or params").fill(str(broken))
        page.get_by_role("button", name="Search").click()
        page.locator("article.failure pre.log", has_text="boom: the disk is on fire").wait_for()
        shoot(page, "failed")

        # ------------------------------------ pause by clicking; the worker stops taking
        page.goto(f"{url}/queues")
        page.get_by_role("button", name="Pause queue default").click()
        page.locator("#queue-default .badge", has_text="paused").wait_for()
        held = submit("slow", {"pause": 0.1, "parts": ["p"]})
        page.locator("#queue-default td:nth-child(3)", has_text="1").wait_for()
        time.sleep(2.0)  # ten times the worker's poll interval
        assert status(held) == "requested"
        task = api.get(f"/api/v1/requests/{held}").json()["tasks"][0]
        assert task["status"] == "queued" and task["attempts"] == 0
        shoot(page, "queues")
        page.get_by_role("button", name="Resume queue default").click()
        page.locator("#queue-default .badge", has_text="open").wait_for()
        wait_for(lambda: status(held) == "succeeded", 30, "the held request to run")

        # ----------------------------------------------------- workers, overview
        page.goto(f"{url}/workers")
        page.locator("table.workers .badge", has_text="running").first.wait_for()
        assert str(up.pid) in page.locator("table.workers").inner_text()
        shoot(page, "workers")
        page.goto(f"{url}/")
        assert page.locator("svg.chart rect.ok").count() > 0
        assert page.locator("svg.chart rect.bad").count() > 0
        shoot(page, "overview")
        assert fits_the_width(page)

        # ------------------------------------------------------- phone width
        page.set_viewport_size(PHONE)
        for path, name in (
            ("/", "overview-phone"),
            ("/requests", "requests-phone"),
            (f"/requests/{rid}", "request-detail-phone"),
            ("/queues", "queues-phone"),
        ):
            page.goto(f"{url}{path}")
            assert fits_the_width(page), f"{path} scrolls sideways at phone width"
            shoot(page, name)

        # --------------------------------------------------------------- log out
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(re.compile(r".*/login$"))
        # no script error, nothing the content security policy had to stop
        assert not complaints, complaints
    finally:
        context.close()
        api.close()
