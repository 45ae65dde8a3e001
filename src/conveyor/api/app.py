"""The web application: `create_app(conveyor)` builds the HTTP API (under /api/v1), the
legacy Spotbot endpoint, the OpenAPI document (/openapi.json), the dashboard (at /) and
the Prometheus metrics (/metrics) around one application object. Nothing happens at
import time; each call makes a new, independent app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from conveyor import __version__
from conveyor.api import (
    legacy,
    problems,
    routes_artifacts,
    routes_events,
    routes_metrics,
    routes_requests,
    routes_system,
    routes_tasks,
)
from conveyor.api.auth import TokenCache
from conveyor.api.middleware import AccessLog, BodyLimit, RequestMetrics
from conveyor.api.models import Submit
from conveyor.api.problems import ProblemModel
from conveyor.api.stream import EventHub
from conveyor.app import Conveyor
from conveyor.dashboard import mount_dashboard
from conveyor.metrics import ApiMetrics, DatabaseCollector

API_PREFIX = "/api/v1"

DESCRIPTION = """\
Durable data-processing requests: submit to a pipeline, follow the request and its tasks,
read their logs, watch the events.

Send `Authorization: Bearer <token>` (tokens come from `conveyor token create`). Roles:
`read` < `submit` < `admin`; each operation names the one it needs in `x-required-role`.
Errors are problem documents (RFC 9457, `application/problem+json`); for bad input,
`errors` names each failing field: a JSON path into the body (`$.params.items[0]`) or
`query.<name>`, `path.<name>`, `header.<name>`.
"""


def create_app(conveyor: Conveyor, *, heartbeat: float = 15.0) -> FastAPI:
    """The API over `conveyor`. `heartbeat`: seconds between keep-alive comments on an
    idle event stream."""
    hub = EventHub(conveyor)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            hub.close()

    api = FastAPI(
        title="Conveyor",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # The interactive explorer would load its scripts from a CDN; the document is
        # served, the explorer is not.
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,
    )
    api.state.conveyor = conveyor
    api.state.hub = hub
    api.state.tokens = TokenCache(conveyor.config.api.token_cache)
    api.state.heartbeat = heartbeat
    problems.install(api)

    v1 = APIRouter(prefix=API_PREFIX)
    for router in (
        routes_requests.router,
        routes_tasks.router,
        routes_artifacts.router,
        routes_events.router,
        routes_system.router,
        routes_system.health,
    ):
        v1.include_router(router)
    api.include_router(v1)
    api.include_router(legacy.router)
    # The usual places for probes, besides the documented ones under /api/v1.
    api.add_api_route("/healthz", routes_system.healthz, include_in_schema=False)
    api.add_api_route("/readyz", routes_system.readyz, include_in_schema=False)
    api.state.metrics = ApiMetrics()
    api.state.metrics_collector = DatabaseCollector(conveyor, conveyor.config.metrics.cache)
    api.add_api_route("/metrics", routes_metrics.metrics, include_in_schema=False)
    mount_dashboard(api, conveyor)

    api.add_middleware(BodyLimit, limit=conveyor.config.api.max_body)
    api.add_middleware(RequestMetrics, metrics=api.state.metrics)
    api.add_middleware(AccessLog)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _document(api, conveyor)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _component(schemas: dict[str, Any], name: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for sub, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(sub, definition)
    schemas[name] = schema
    return schema


def _document(api: FastAPI, conveyor: Conveyor) -> dict[str, Any]:
    doc = get_openapi(
        title=api.title,
        version=api.version,
        description=api.description,
        routes=api.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _component(schemas, "Problem", ProblemModel)
    submit = _component(schemas, "Submit", Submit)
    # The pipelines this server has: an unknown one is refused (422) all the same.
    names = sorted(conveyor.config.pipelines)
    if names:
        submit["properties"]["pipeline"]["enum"] = names
    if conveyor.config.api.read_open:
        for path in doc.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict) and op.get("x-required-role") == "read":
                    op["security"] = [{"token": []}, {}]
    return doc
