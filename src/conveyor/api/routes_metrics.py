"""`/metrics`: the Prometheus endpoint (see conveyor.metrics). Scraping needs a read
token (`Authorization: Bearer`, which Prometheus sends with `authorization:
credentials_file`), unless `[metrics] public` or `[api] read_open` is set."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool

from conveyor.api.auth import bearer, conveyor_of, require
from conveyor.metrics import CONTENT_TYPE, ApiMetrics, DatabaseCollector
from conveyor.tokens import Role

_reader = require(Role.READ)


async def metrics(request: Request) -> Response:
    app = conveyor_of(request)
    if not app.config.metrics.public:
        await _reader(request, await bearer(request))
    api_metrics: ApiMetrics = request.app.state.metrics
    collector: DatabaseCollector = request.app.state.metrics_collector
    body = await run_in_threadpool(api_metrics.render, collector)
    return Response(body, media_type=CONTENT_TYPE)
