"""The ``api_keys`` control-plane table: versioned rows, read with FINAL.

Every change writes the whole row again with a larger ``version``;
ReplacingMergeTree(version) keeps the latest. A rotation changes ``key_hash``
under the same id, so lookups by hash go through FINAL too (the old hash is then
no longer the row's).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

COLUMNS = ["id", "key_hash", "name", "organisation_id", "workspace_slug", "scopes", "status", "created_at", "updated_at", "version"]
# Added by migration 0005 (keys managed through /v1/api-keys).
DETAIL_COLUMNS = ["description", "sub_type", "user_id"]
ALL_COLUMNS = COLUMNS + DETAIL_COLUMNS
_SELECT = ", ".join(ALL_COLUMNS)


@dataclass(frozen=True)
class ApiKeyRow:
    id: str
    key_hash: str
    name: str
    organisation_id: str
    workspace_slug: str
    scopes: tuple[str, ...]
    status: str
    created_at: datetime
    updated_at: datetime
    description: str = ""
    sub_type: str = "service"
    user_id: str = ""
    version: int = 0

    def values(self) -> list:
        return [list(v) if isinstance(v, tuple) else v for v in (getattr(self, c) for c in ALL_COLUMNS)]


def _row(values) -> ApiKeyRow:
    d = dict(zip(ALL_COLUMNS, values))
    d["scopes"] = tuple(d["scopes"])
    return ApiKeyRow(**d)


def insert(client: Client, *, key_hash: str, organisation_id: str, workspace_slug: str, scopes: list[str], name: str = "",
           description: str = "", sub_type: str = "service", user_id: str = "") -> ApiKeyRow:
    now = datetime.now(UTC)
    row = ApiKeyRow(str(uuid.uuid4()), key_hash, name, organisation_id, workspace_slug, tuple(scopes), "active", now, now,
                    description, sub_type, user_id, time.time_ns())
    client.insert("api_keys", [row.values()], column_names=ALL_COLUMNS)
    return row


# Versions are nanosecond clocks (below 2**63). A revocation is final: its version is above every
# version a change can get, so a change (a rotation, an update) that read the key before the
# revocation and writes after it cannot bring the key back.
FINAL_VERSION = 2**63


def write_version(client: Client, current: ApiKeyRow, **changes) -> ApiKeyRow:
    """Store a new version of ``current`` with ``changes``; it supersedes every earlier one."""
    version = max(time.time_ns(), current.version + 1)
    if changes.get("status") == "revoked":
        version += FINAL_VERSION
    row = dataclasses.replace(current, **changes, updated_at=datetime.now(UTC), version=version)
    client.insert("api_keys", [row.values()], column_names=ALL_COLUMNS)
    return row


def find_by_hash(client: Client, key_hash: str) -> ApiKeyRow | None:
    rows = client.query(
        f"SELECT {_SELECT} FROM api_keys FINAL WHERE key_hash = {{h:String}} LIMIT 1",
        parameters={"h": key_hash},
    ).result_rows
    return _row(rows[0]) if rows else None


def _tenant(organisation_id: str, workspace_slug: str | None) -> tuple[str, dict]:
    sql = "organisation_id = {org:String}"
    params = {"org": organisation_id}
    if workspace_slug is not None:
        sql += " AND workspace_slug = {ws:String}"
        params["ws"] = workspace_slug
    return sql, params


def get(client: Client, organisation_id: str, workspace_slug: str | None, key_id: str) -> ApiKeyRow | None:
    """The current version of a key of this tenant that was not deleted (revoked)."""
    where, params = _tenant(organisation_id, workspace_slug)
    rows = client.query(
        f"SELECT {_SELECT} FROM api_keys FINAL WHERE {where} AND id = {{id:String}} AND status != 'revoked' LIMIT 1",
        parameters={**params, "id": key_id},
    ).result_rows
    return _row(rows[0]) if rows else None


def list_keys(client: Client, organisation_id: str, workspace_slug: str | None, limit: int, offset: int) -> tuple[int, list[ApiKeyRow]]:
    """A page of the tenant's keys that were not deleted, newest first, and their total."""
    where, params = _tenant(organisation_id, workspace_slug)
    where += " AND status != 'revoked'"
    total = int(client.command(f"SELECT count() FROM api_keys FINAL WHERE {where}", parameters=params))
    rows = client.query(
        f"SELECT {_SELECT} FROM api_keys FINAL WHERE {where} ORDER BY created_at DESC, id LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}",
        parameters={**params, "limit": limit, "offset": offset},
    ).result_rows
    return total, [_row(r) for r in rows]


def count(client: Client) -> int:
    return int(client.command("SELECT count() FROM api_keys FINAL WHERE status = 'active'"))
