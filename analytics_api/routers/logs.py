"""GET /v1/logs/{logId}: one stored generation as the spec's LogObject."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from analytics_api.auth import Principal, require
from warehouse.queries.logs import get_generation

router = APIRouter(tags=["Logs"])

# Columns that are LogObject.request / .response rather than metrics.
_REQUEST_RESPONSE = {
    "request_headers", "request_body", "request_portkey_headers", "response_headers", "response_body",
    "response_last_used_option_json_path", "debug_payloads",
}
_NULL_WHEN_EMPTY = {"workspace_slug"}


def iso_ms(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _json(text: str | bytes) -> Any:
    """Stored JSON text, spliced into the response without re-parsing."""
    return orjson.Fragment(text) if text else None


def log_object(row: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name, value in row.items():
        if name in _REQUEST_RESPONSE or name.startswith("metadata."):
            continue
        if isinstance(value, datetime):
            value = iso_ms(value)
        elif name in _NULL_WHEN_EMPTY and value == "":
            value = None
        metrics[name] = value
    metrics["metadata.key"] = list(row["metadata.key"])
    metrics["metadata.value"] = list(row["metadata.value"])
    obj: dict[str, Any] = {
        "_id": row["id"],
        "organisation_id": row["organisation_id"],
        "created_at": metrics["created_at"],
        "request": {
            "url": row["request_url"],
            "method": row["request_method"],
            "headers": _json(row["request_headers"]),
            "body": _json(row["request_body"]),
            "portkeyHeaders": _json(row["request_portkey_headers"]) or {},
        },
        "response": {
            "status": row["response_status_code"],
            "headers": _json(row["response_headers"]),
            "body": _json(row["response_body"]),
            "responseTime": row["response_time"],
            "lastUsedOptionJsonPath": row["response_last_used_option_json_path"],
        },
        "metrics": metrics,
    }
    for part in (obj["request"], obj["response"]):
        for key in ("headers", "body"):
            if part[key] is None:
                del part[key]
    if row["debug_payloads"]:
        for name, value in orjson.loads(row["debug_payloads"]).items():
            obj[name] = value
    return obj


@router.get("/logs/{logId}", summary="Get a specific log")
def get_log(logId: str, request: Request, principal: Principal = Depends(require("logs.read"))) -> Response:
    if len(logId) > 256:
        raise HTTPException(422, "`logId` is longer than 256 characters")
    with request.app.state.warehouse.borrow() as client:
        row = get_generation(client, principal.scope, logId)
    if row is None:
        raise HTTPException(404, f"log {logId} not found")
    return Response(orjson.dumps(log_object(row)), media_type="application/json")
