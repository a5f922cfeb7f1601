"""Reads of the audit trail (GET /v1/audit-logs).

Filters come from a fixed allow-list of (column, type); every value is bound as a
``{name:Type}`` parameter. FINAL shows each request once, as its latest record
(the final one when it arrived, else the pending one with status 0); the WHERE
applies after FINAL, so a status filter sees the final status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from warehouse.filters import ms_bounds

# filter name (the API's query parameter) → (column, ClickHouse type); matched with =
FILTERS: dict[str, tuple[str, str]] = {
    "method": ("method", "String"),
    "uri": ("uri", "String"),
    "request_id": ("request_id", "String"),
    "user_id": ("user_id", "String"),
    "user_type": ("user_type", "String"),
    "workspace_id": ("workspace_id", "String"),
    "response_status_code": ("response_status_code", "UInt16"),
    "resource_type": ("resource_type", "String"),
    "action": ("action", "String"),
    "client_ip": ("client_ip", "String"),
    "country": ("country", "String"),
}

COLUMNS = [
    "timestamp", "method", "uri", "request_id", "request_body", "query_params", "request_headers", "user_id",
    "user_type", "organisation_id", "workspace_id", "response_status_code", "resource_type", "action", "client_ip",
    "country",
]


@dataclass(frozen=True)
class AuditQuery:
    organisation_id: str
    workspace_id: str | None  # a workspace key's own workspace; None for an organisation key
    start: datetime  # timezone-aware, inclusive
    end: datetime  # timezone-aware, inclusive
    filters: dict[str, Any] = field(default_factory=dict)
    limit: int = 20
    offset: int = 0


def compile_where(q: AuditQuery) -> tuple[str, dict[str, Any]]:
    parts = [
        "organisation_id = {org:String}",
        "timestamp >= {t_start:DateTime64(3, 'UTC')}",
        "timestamp <= {t_end:DateTime64(3, 'UTC')}",
    ]
    t_start, t_end = ms_bounds(q.start, q.end)
    params: dict[str, Any] = {"org": q.organisation_id, "t_start": t_start, "t_end": t_end}
    if q.workspace_id is not None:
        parts.append("workspace_id = {scope_ws:String}")
        params["scope_ws"] = q.workspace_id
    for name, value in q.filters.items():
        column, ch_type = FILTERS[name]  # anything not allow-listed is a KeyError, never SQL
        parts.append(f"{column} = {{f_{name}:{ch_type}}}")
        params[f"f_{name}"] = value
    return " AND ".join(parts), params


def search(client: Client, q: AuditQuery) -> tuple[list[dict[str, Any]], int]:
    """One page of matching records, newest first, and the number of all matching records."""
    where, params = compile_where(q)
    total = int(client.command(f"SELECT count() FROM audit_logs FINAL WHERE {where}", parameters=params))
    if q.limit == 0:
        return [], total
    result = client.query(
        f"SELECT {', '.join(COLUMNS)} FROM audit_logs FINAL WHERE {where} "
        "ORDER BY timestamp DESC, request_id DESC LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        parameters={**params, "limit": q.limit, "offset": q.offset},
    )
    return [dict(zip(result.column_names, row)) for row in result.result_rows], total
