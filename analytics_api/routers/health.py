"""GET /v1/health: is the warehouse answering, is the broker reachable."""

from __future__ import annotations

import socket

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["Health"])


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


@router.get("/health", summary="Liveness of the API and its dependencies")
def health(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        with state.warehouse.borrow() as client:
            client.command("SELECT 1")
        checks["clickhouse"] = "ok"
    except Exception as exc:  # report, don't raise: this is the health endpoint
        checks["clickhouse"] = f"error: {exc}"
    error = _kafka_reachable(state.bootstrap) if state.bootstrap else "not configured"
    checks["kafka"] = "ok" if error is None else f"error: {error}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503)
