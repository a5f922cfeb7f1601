"""Point reads of single generations (GET /v1/logs/{id})."""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client

from warehouse.queries.scope import TenantScope


def get_generation(client: Client, scope: TenantScope, log_id: str) -> dict[str, Any] | None:
    where, params = scope.where()
    result = client.query(
        f"SELECT * FROM generations FINAL WHERE {where} AND id = {{log_id:String}} LIMIT 1",
        parameters={**params, "log_id": log_id},
    )
    if not result.result_rows:
        return None
    return dict(zip(result.column_names, result.result_rows[0]))
