"""What the dashboard changes: logging in and out, pausing and resuming queues. Every
action is a POST carrying the session's CSRF token; pausing and resuming need an admin
token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response

from conveyor.dashboard.session import LOGIN_COOKIE, SESSION_COOKIE
from conveyor.dashboard.ui import dashboard_of, safe_next
from conveyor.tokens import Role, hash_secret

router = APIRouter(include_in_schema=False)
QueueName = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f/]+$")]
FormText = Annotated[str | None, Form(max_length=1000)]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:
    ui = dashboard_of(request)
    csrf, cookie = ui.sessions.login_form()
    response = ui.render(
        request, "login.html", None, csrf=csrf, next_url=safe_next(next), error=None
    )
    response.set_cookie(
        LOGIN_COOKIE, cookie, max_age=3600, httponly=True, samesite="lax", secure=_secure(request)
    )
    return response


@router.post("/login")
def login(
    request: Request,
    token: FormText = None,
    csrf: FormText = None,
    next: FormText = None,
) -> Response:
    ui = dashboard_of(request)
    target = safe_next(next)
    error = None
    found = None
    if not ui.sessions.login_form_ok(request.cookies.get(LOGIN_COOKIE), csrf):
        error = "The login form has expired: try again."
    elif not token or not token.strip():
        error = "Enter a token."
    else:
        found = ui.app.authenticate(token.strip())
        if found is None:
            error = "That token is not valid (unknown or revoked)."
    if error is not None or found is None:
        fresh, cookie = ui.sessions.login_form()
        response = ui.render(
            request,
            "login.html",
            None,
            status_code=401 if error and "token" in error else 400,
            csrf=fresh,
            next_url=target,
            error=error,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            cookie,
            max_age=3600,
            httponly=True,
            samesite="lax",
            secure=_secure(request),
        )
        return response
    value, _ = ui.sessions.open(found, hash_secret(token.strip() if token else ""))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(ui.sessions.max_age),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, csrf: FormText = None) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request)
    ui.check_form(request, viewer, csrf)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax")
    return response


def _set_paused(request: Request, name: str, csrf: str | None, paused: bool) -> Response:
    ui = dashboard_of(request)
    viewer = ui.viewer(request, Role.ADMIN)
    ui.check_form(request, viewer, csrf)
    if paused:
        ui.app.pause(name)
    else:
        ui.app.resume(name)
    if request.headers.get("hx-request") == "true":
        from conveyor.dashboard.pages import queues_page

        return queues_page(request)
    return RedirectResponse("/queues", status_code=303)


@router.post("/queues/{name}/pause")
def pause(request: Request, name: QueueName, csrf: FormText = None) -> Response:
    return _set_paused(request, name, csrf, True)


@router.post("/queues/{name}/resume")
def resume(request: Request, name: QueueName, csrf: FormText = None) -> Response:
    return _set_paused(request, name, csrf, False)
