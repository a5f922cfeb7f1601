"""Request ids, the access log and the request-latency metric of every API request (docs/operations.md).

A request keeps the ``x-request-id`` it came with when that is a sane token (1–128 of
``A-Z a-z 0-9 . _ : -``), else it gets a new one; either way the response echoes it in
``x-request-id``, every log line written while serving it carries it, and so does its audit record
when the id is this server's (analytics_api/audit.py). The latency
histogram is labelled by route *template* (``/v1/logs/{logId}``), never the raw path, so
its cardinality is bounded; a path no route matches counts as ``<unmatched>``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollgate import logs, monitoring

access = logging.getLogger("tollgate.access")

HEADER = "x-request-id"
REQUEST_ID_SCOPE_KEY = "tollgate.request_id"  # (id, whether this server made it) for the audit middleware
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED = "<unmatched>"


def incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE.match(text) else None
    return None


class RouteTemplates:
    """The full template of the route that served a request. The matched route FastAPI leaves in the scope
    knows only its path inside its router (``/logs/{logId}``); the full one (``/v1/logs/{logId}``) is the
    OpenAPI path that ends with it and matches the request's path."""

    def __init__(self, app: FastAPI):
        self.app = app
        self._candidates: dict[int, list[tuple[re.Pattern, str]]] = {}

    def __call__(self, scope: Scope) -> str:
        route = scope.get("route")
        suffix = getattr(route, "path", None)
        if suffix is None:
            return UNMATCHED
        candidates = self._candidates.get(id(route))
        if candidates is None:
            paths = self.app.openapi()["paths"]
            candidates = self._candidates[id(route)] = [(compile_path(t)[0], t) for t in paths if t.endswith(suffix)]
        for regex, template in candidates:
            if regex.match(scope["path"]):
                return template
        return suffix  # a route outside the OpenAPI document (/docs): its path is the whole path


class ObserveMiddleware:
    """Pure ASGI, the outermost of the app's own middlewares (it times the audit middleware too)."""

    def __init__(self, app: ASGIApp, templates: RouteTemplates):
        self.app = app
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = incoming_id(scope)
        rid = incoming or str(uuid.uuid4())
        scope[REQUEST_ID_SCOPE_KEY] = (rid, incoming is None)
        token = logs.request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            template = self.templates(scope)
            monitoring.API_REQUEST_SECONDS.labels(scope["method"], template, str(status)).observe(seconds)
            if access.isEnabledFor(logging.INFO):
                access.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000,
                            extra={"method": scope["method"], "path": scope["path"], "route": template,
                                   "status": status, "duration_ms": round(seconds * 1000, 3)})
            logs.request_id.reset(token)


router = APIRouter(tags=["Operations"])


@router.get("/metrics", summary="Prometheus metrics of this process (and its ingest workers); no API key",
            response_class=Response, responses={200: {"content": {monitoring.CONTENT_TYPE: {"schema": {"type": "string"}}}}})
def metrics() -> Response:
    return Response(monitoring.exposition(), media_type=monitoring.CONTENT_TYPE)


def install(app: FastAPI) -> None:
    app.include_router(router)  # /metrics: not under /v1 (scrapers send no API key)
    app.add_middleware(ObserveMiddleware, templates=RouteTemplates(app))
