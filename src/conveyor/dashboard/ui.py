"""The dashboard's state (templates, sessions, short-lived figures) and what every page
shares: who is looking, rendering a page or, for htmx's live updates, just its
fragment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from conveyor import __version__
from conveyor.app import Conveyor
from conveyor.dashboard import views
from conveyor.dashboard.session import (
    SESSION_COOKIE,
    Sessions,
    Viewer,
    same,
    secret_key,
)
from conveyor.stats import HOUR, RATE_BUCKET, RATE_WINDOW, ActivityRow, Recent, rates
from conveyor.tokens import Role

HERE = Path(__file__).resolve().parent
ACTIVITY_WINDOW = 14 * 86400.0  # the longest chart: tasks per day over two weeks


# Pages load nothing from elsewhere and run no inline script; nobody may frame them
# (their buttons pause queues).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


class LoginNeeded(Exception):
    def __init__(self, next_url: str) -> None:
        super().__init__("log in to see the dashboard")
        self.next_url = next_url


class Forbidden(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Dashboard:
    def __init__(self, app: Conveyor) -> None:
        self.app = app
        settings = app.config.dashboard
        self.sessions = Sessions(secret_key(app.config, os.environ), settings.session_hours * 3600)
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(views.FILTERS)
        self.env.globals.update(version=__version__, refresh=settings.refresh)
        self._activity: Recent[list[ActivityRow]] = Recent(settings.stats_cache)
        self._recent: Recent[list[ActivityRow]] = Recent(settings.stats_cache)

    # ------------------------------------------------------------------ figures
    def activity(self) -> list[ActivityRow]:
        """Tasks finished over the last two weeks, by hour: the charts. Reused for
        `[dashboard] stats_cache` seconds, so pages refreshing every other second in
        many browsers cost one aggregate query per period."""
        return self._activity.get(lambda: self.app.activity(ACTIVITY_WINDOW, HOUR))

    def rates(self) -> dict[str, float]:
        """Tasks finished per minute in each queue, lately."""
        rows = self._recent.get(lambda: self.app.activity(RATE_WINDOW, RATE_BUCKET))
        return rates(rows, self.app.clock())

    # -------------------------------------------------------------- who is looking
    def viewer(self, request: Request, needed: Role = Role.READ) -> Viewer:
        """The viewer of this request; raises LoginNeeded or Forbidden. Blocking."""
        session = self.sessions.read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            token = self.app.session_token(session.token_hash)
            if token is not None:
                viewer = Viewer(token.name, token.role, session.csrf)
                if not token.role.allows(needed):
                    raise Forbidden(
                        f"this needs the {needed.value} role; you have {token.role.value}"
                    )
                return viewer
        if needed == Role.READ and self.app.config.api.read_open:
            return Viewer("anonymous", Role.READ, "", logged_in=False)
        raise LoginNeeded(_here(request))

    def check_form(self, request: Request, viewer: Viewer, sent: str | None) -> None:
        """An action's form must carry the session's CSRF token and come from this site."""
        if not viewer.logged_in or not sent or not same(viewer.csrf, sent):
            raise Forbidden("the form has expired or did not come from this dashboard: reload")
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            raise Forbidden("the form was sent from another site")

    # ----------------------------------------------------------------- rendering
    def render(
        self,
        request: Request,
        page: str,
        viewer: Viewer | None,
        fragment: str | None = None,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        """The page, or only its live fragment when htmx asks for it."""
        live = request.headers.get("hx-request") == "true" and fragment is not None
        template = self.env.get_template(fragment if live and fragment else page)
        html = template.render(
            request=request,
            viewer=viewer,
            now=self.app.clock(),
            path=request.url.path,
            here=_here(request),
            config=self.app.config,
            **context,
        )
        return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def dashboard_of(request: Request) -> Dashboard:
    ui: Dashboard = request.app.state.dashboard
    return ui


def _here(request: Request) -> str:
    path = request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


def login_url(next_url: str) -> str:
    return "/login?next=" + quote(next_url, safe="/")


def safe_next(value: str | None) -> str:
    """Where to go after logging in: a path on this site only."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value
