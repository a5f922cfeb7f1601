"""The ``api_keys`` control-plane table: versioned rows, read with FINAL."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

COLUMNS = ["id", "key_hash", "name", "organisation_id", "workspace_slug", "scopes", "status", "created_at", "updated_at", "version"]


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


def _row(values) -> ApiKeyRow:
    d = dict(zip(COLUMNS, values))
    d.pop("version")
    d["scopes"] = tuple(d["scopes"])
    return ApiKeyRow(**d)


def insert(client: Client, *, key_hash: str, organisation_id: str, workspace_slug: str, scopes: list[str], name: str = "") -> ApiKeyRow:
    now = datetime.now(UTC)
    row = [str(uuid.uuid4()), key_hash, name, organisation_id, workspace_slug, list(scopes), "active", now, now, time.time_ns()]
    client.insert("api_keys", [row], column_names=COLUMNS)
    return _row(row)


def find_by_hash(client: Client, key_hash: str) -> ApiKeyRow | None:
    rows = client.query(
        f"SELECT {', '.join(COLUMNS)} FROM api_keys FINAL WHERE key_hash = {{h:String}} LIMIT 1",
        parameters={"h": key_hash},
    ).result_rows
    return _row(rows[0]) if rows else None


def count(client: Client) -> int:
    return int(client.command("SELECT count() FROM api_keys FINAL WHERE status = 'active'"))
