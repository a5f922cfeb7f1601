"""Liveness and readiness (docs/operations.md).

``GET /v1/health`` is liveness: the process answers (it checks nothing else, so a
warehouse or broker outage never gets a healthy API process restarted).
``GET /v1/ready`` is readiness: the warehouse answers a query and the API's Kafka
producer has the brokers' metadata (and a broker takes connections); 503 otherwise,
naming what failed. Neither needs an API key.
"""

from __future__ import annotations

import socket

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter(tags=["Health"])


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    clickhouse: str
    kafka: str


def _kafka_reachable(bootstrap: str, timeout: float = 1.0) -> str | None:
    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                return None
        except OSError as exc:
            errors.append(f"{server}: {exc}")
    return "; ".join(errors) or "no bootstrap servers"


@router.get("/health", summary="Liveness: the API process answers", response_model=Liveness)
def health() -> Liveness:
    return Liveness(status="ok")


def _warehouse_error(state) -> str | None:
    try:
        with state.warehouse.borrow() as client:
            client.command("SELECT 1")
        return None
    except Exception as exc:  # report, don't raise: this is the readiness probe
        return str(exc)


def _kafka_error(state) -> str | None:
    if not state.bootstrap:
        return "not configured"
    error = _kafka_reachable(state.bootstrap)  # fails fast when no broker answers
    return error if error is not None else state.publisher.metadata_error(state.settings.topic_gateway_logs)


@router.get("/ready", summary="Readiness: the warehouse answers and Kafka takes events", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready: the failing dependency says why"}})
def ready(request: Request) -> JSONResponse:
    state = request.app.state
    checks = {name: "ok" if error is None else f"error: {error}"
              for name, error in (("clickhouse", _warehouse_error(state)), ("kafka", _kafka_error(state)))}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503)
