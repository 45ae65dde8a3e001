"""The web dashboard at `/`: server-rendered pages (Jinja2) kept live by htmx, over
the same application object as the API. `mount_dashboard(api, conveyor)` adds it to
the API's app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from conveyor.app import Conveyor
from conveyor.dashboard import actions, pages
from conveyor.dashboard.ui import HERE, Dashboard, Forbidden, LoginNeeded, login_url


def mount_dashboard(api: FastAPI, conveyor: Conveyor) -> None:
    api.state.dashboard = Dashboard(conveyor)
    api.include_router(pages.router)
    api.include_router(actions.router)
    api.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    async def on_login_needed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginNeeded)
        target = login_url(exc.next_url)
        if request.headers.get("hx-request") == "true":
            # a live update after the session ended: htmx takes the whole page there
            return Response(status_code=200, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        ui: Dashboard = request.app.state.dashboard
        return ui.render(
            request, "error.html", None, status_code=403, title="Not allowed", message=exc.detail
        )

    api.add_exception_handler(LoginNeeded, on_login_needed)
    api.add_exception_handler(Forbidden, on_forbidden)


__all__ = ["mount_dashboard"]
