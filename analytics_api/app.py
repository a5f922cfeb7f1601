"""The FastAPI application: Portkey-compatible routes under /v1, OpenAPI at /docs."""

from __future__ import annotations

from fastapi import FastAPI

from analytics_api import audit, observe, openapi
from analytics_api.auth import KeyVerifier
from analytics_api.publish import Publisher
from analytics_api.routers import analytics, api_keys, custom_logs, feedback, health, logs
from analytics_api.routers import audit_logs
from analytics_api.routers import export_schedules, exports
from analytics_api.routers import policies
from exports.jobs import ExportRunner
from exports.signing import signing_secret
from tollgate.settings import Settings
from warehouse.client import ClientPool


def create_app(settings: Settings, bootstrap: str | None = None, pool_size: int = 4) -> FastAPI:
    """``bootstrap`` is the Kafka the API produces to (the embedded broker under `tollgate up`)."""
    app = FastAPI(
        title="Tollgate",
        version="0.1.0",
        description="Portkey-compatible analytics, logs, feedback, exports and policies for LLM gateways.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.bootstrap = bootstrap or settings.kafka_bootstrap
    app.state.warehouse = ClientPool(settings.warehouse_dsn, size=pool_size)
    app.state.keys = KeyVerifier(app.state.warehouse, settings.auth_cache_seconds)
    app.state.publisher = Publisher(app.state.bootstrap, timeout=settings.publish_timeout_seconds)
    app.router.add_event_handler("shutdown", app.state.publisher.close)  # FastAPI keeps it on the router (Starlette 1 dropped it)
    app.state.exports = ExportRunner(settings, app.state.warehouse)  # runs started exports (exports/jobs.py)
    app.state.export_secret = signing_secret(settings)
    app.router.add_event_handler("shutdown", app.state.exports.close)
    # Before logs.router, whose GET /logs/{logId} would take GET /logs/exports; schedules before
    # exports, whose /logs/exports/{exportId} would take /logs/exports/schedules.
    app.include_router(export_schedules.router, prefix="/v1")
    app.include_router(exports.router, prefix="/v1")
    for router in (health.router, logs.router, custom_logs.router, analytics.router, feedback.router, api_keys.router):
        app.include_router(router, prefix="/v1")
    app.include_router(audit_logs.router, prefix="/v1")
    app.include_router(policies.router, prefix="/v1")
    audit.install(app, settings)  # every mutating request leaves an audit record (analytics_api/audit.py)
    openapi.install(app)  # error answers and Portkey's response bodies declared (analytics_api/openapi.py)
    observe.install(app)  # request ids, access log, latency metric, GET /metrics (outermost: times the audit too)
    return app
