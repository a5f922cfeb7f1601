"""Point reads of feedback (PUT /v1/feedback/{id} reads the current version)."""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client

from warehouse.queries.scope import TenantScope

COLUMNS = ["id", "organisation_id", "workspace_slug", "trace_id", "value", "weight", "metadata.key", "metadata.value",
           "created_at", "updated_at"]


def get_feedback(client: Client, scope: TenantScope, feedback_id: str) -> dict[str, Any] | None:
    """The latest version of a feedback id of this tenant (None when there is none)."""
    where, params = scope.where()
    result = client.query(
        f"SELECT {', '.join(f'`{c}`' for c in COLUMNS)} FROM feedback FINAL WHERE {where} AND id = {{id:String}} LIMIT 1",
        parameters={**params, "id": feedback_id},
    )
    if not result.result_rows:
        return None
    return dict(zip(COLUMNS, result.result_rows[0]))
