"""GET /v1/audit-logs: the audit trail of the key's organisation (docs/api.md, "Audit trail")."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from analytics_api.auth import Principal, require
from analytics_api.params import invalid, parse_time
from warehouse.queries.audit_logs import AuditQuery, search

router = APIRouter(tags=["Audit Logs"])

MAX_PAGE_SIZE = 100


def _iso_ms(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@router.get("/audit-logs", summary="Get Audit Logs")
def get_audit_logs(
    request: Request,
    start_time: str = Query(..., description="ISO 8601 with a UTC offset; inclusive"),
    end_time: str = Query(..., description="ISO 8601 with a UTC offset; inclusive"),
    organisation_id: str = Query(..., description="must be the API key's own organisation (else 403)"),
    method: Literal["POST", "PUT", "PATCH", "DELETE"] | None = None,
    uri: str | None = None,
    request_id: str | None = None,
    user_id: str | None = None,
    user_type: Literal["user", "api_key"] | None = None,
    workspace_id: str | None = None,
    response_status_code: int | None = Query(None, ge=0, le=599, description="0: the request's outcome was never recorded"),
    resource_type: str | None = None,
    action: str | None = None,
    client_ip: str | None = None,
    country: str | None = None,
    current_page: int = Query(0, ge=0, le=2**31, description="0 is the first page"),
    page_size: int = Query(20, ge=0, le=MAX_PAGE_SIZE),
    principal: Principal = Depends(require("audit_logs.read")),
) -> dict[str, Any]:
    start, end = parse_time("start_time", start_time), parse_time("end_time", end_time)
    if start > end:
        raise invalid("start_time", "must not be after end_time", start_time)
    if organisation_id != principal.organisation_id:
        raise HTTPException(403, "`organisation_id` is not the organisation of this API key")
    given = dict(method=method, uri=uri, request_id=request_id, user_id=user_id, user_type=user_type,
                 workspace_id=workspace_id, response_status_code=response_status_code, resource_type=resource_type,
                 action=action, client_ip=client_ip, country=country)
    filters = {name: value for name, value in given.items() if value not in (None, "")}
    query = AuditQuery(principal.organisation_id, principal.workspace_slug, start, end, filters,
                       limit=page_size, offset=current_page * page_size)
    with request.app.state.warehouse.borrow() as client:
        rows, total = search(client, query)
    for row in rows:
        row["timestamp"] = _iso_ms(row["timestamp"])
    return {"object": "analytics-graph", "total": total, "records": rows}
