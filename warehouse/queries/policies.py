"""Limit policies and resets (``limit_policies``, ``limit_resets``): versioned control-plane rows.

Every change of a policy writes the whole row again with a larger ``version``; every
version is kept. The current policy is the highest version of its id. Reads are
scoped to the caller's tenant: its organisation and, for a workspace key, its
workspace (a policy of another tenant is never read, so it is a 404 like a missing one).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from warehouse.client import utc_aware

KINDS = ("usage_limits", "rate_limits")

COLUMNS = [
    "id", "version", "kind", "organisation_id", "workspace_slug", "name", "conditions", "group_by", "type",
    "credit_limit", "alert_threshold", "periodic_reset", "unit", "value", "status", "created_at", "updated_at",
    "baseline_at", "limits_at", "changed_by",
]
_SELECT = ", ".join(COLUMNS)
# the current version of every policy id (subquery text, filtered inside by `where`)
_LATEST = f"SELECT {_SELECT} FROM limit_policies WHERE {{where}} ORDER BY id, version DESC LIMIT 1 BY id"


@dataclass(frozen=True)
class PolicyRow:
    id: str
    version: int
    kind: str  # usage_limits | rate_limits
    organisation_id: str
    workspace_slug: str  # '' = every workspace of the organisation
    name: str | None
    conditions: tuple[tuple[str, str], ...]
    group_by: tuple[str, ...]
    type: str  # cost | tokens (usage limits); requests | tokens (rate limits)
    credit_limit: float = 0.0
    alert_threshold: float | None = None
    periodic_reset: str = ""  # monthly | weekly | '' (cumulative)
    unit: str = ""  # rpm | rph | rpd
    value: float = 0.0
    status: str = "active"
    created_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    updated_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    baseline_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)  # counting starts here
    limits_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)  # the limits in force since; alerts re-arm
    changed_by: str = ""

    def counted_conditions(self) -> tuple[tuple[str, str], ...]:
        """What a request must match to count: the conditions, and a workspace policy's own workspace
        (implicit: such a policy only counts its workspace). The enforcement records carry the same."""
        if self.workspace_slug and not any(k == "workspace_id" for k, _ in self.conditions):
            return (*self.conditions, ("workspace_id", self.workspace_slug))
        return self.conditions

    def values(self) -> list:
        out = []
        for c in COLUMNS:
            v = getattr(self, c)
            if c == "conditions":
                v = [tuple(p) for p in v]
            elif c == "group_by":
                v = list(v)
            elif isinstance(v, datetime):
                v = utc_aware(v)
            out.append(v)
        return out


def _row(values) -> PolicyRow:
    d = dict(zip(COLUMNS, values))
    d["conditions"] = tuple((c["key"], c["value"]) if isinstance(c, dict) else (c[0], c[1]) for c in d["conditions"])
    d["group_by"] = tuple(d["group_by"])
    for c in ("created_at", "updated_at", "baseline_at", "limits_at"):
        d[c] = utc_aware(d[c])
    return PolicyRow(**d)


def next_version(current: int = 0) -> int:
    return max(time.time_ns(), current + 1)


def insert(client: Client, row: PolicyRow) -> PolicyRow:
    client.insert("limit_policies", [row.values()], column_names=COLUMNS)
    return row


def new_id() -> str:
    return str(uuid.uuid4())


# Versions are nanosecond clocks (below 2**63). Archiving is final: its version is above every
# version a change can get, so a change that read the policy before the archive and writes after
# it cannot bring the policy back (the limits job would count it again).
FINAL_VERSION = 2**63


def write_version(client: Client, current: PolicyRow, **changes) -> PolicyRow:
    """Store ``current`` with ``changes`` as its next version."""
    version = next_version(current.version) + (FINAL_VERSION if changes.get("status") == "archived" else 0)
    row = dataclasses.replace(current, **changes, version=version)
    return insert(client, row)


def _tenant(kind: str, organisation_id: str, workspace_slug: str | None) -> tuple[str, dict]:
    where = "kind = {kind:String} AND organisation_id = {org:String}"
    params: dict = {"kind": kind, "org": organisation_id}
    if workspace_slug is not None:
        where += " AND workspace_slug = {ws:String}"
        params["ws"] = workspace_slug
    return where, params


def get(client: Client, kind: str, organisation_id: str, workspace_slug: str | None, policy_id: str) -> PolicyRow | None:
    """The current version of a policy of this tenant (any status), or None."""
    rows = client.query(
        f"SELECT {_SELECT} FROM limit_policies WHERE organisation_id = {{org:String}} AND id = {{id:String}} "
        "ORDER BY version DESC LIMIT 1",
        parameters={"org": organisation_id, "id": policy_id},
    ).result_rows
    if not rows:
        return None
    row = _row(rows[0])
    if row.kind != kind or (workspace_slug is not None and row.workspace_slug != workspace_slug):
        return None
    return row


def list_policies(client: Client, kind: str, organisation_id: str, workspace_slug: str | None, *, status: str,
                  type: str | None = None, unit: str | None = None, limit: int = 50, offset: int = 0) -> tuple[int, list[PolicyRow]]:
    """A page of the tenant's current policies with ``status`` (newest first) and their number."""
    where, params = _tenant(kind, organisation_id, workspace_slug)
    outer = ["status = {status:String}"]
    params["status"] = status
    if type is not None:
        outer.append("type = {type:String}")
        params["type"] = type
    if unit is not None:
        outer.append("unit = {unit:String}")
        params["unit"] = unit
    base = f"SELECT * FROM ({_LATEST.format(where=where)}) WHERE {' AND '.join(outer)}"
    total = int(client.command(f"SELECT count() FROM ({base})", parameters=params))
    rows = client.query(
        f"{base} ORDER BY created_at DESC, id LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}",
        parameters={**params, "limit": limit, "offset": offset},
    ).result_rows
    return total, [_row(r) for r in rows]


def active(client: Client, organisations: list[str] | None = None) -> list[PolicyRow]:
    """Every active policy (of ``organisations``, or of every organisation): what the limits job counts."""
    where = "1" if organisations is None else "organisation_id IN {orgs:Array(String)}"
    rows = client.query(
        f"SELECT * FROM ({_LATEST.format(where=where)}) WHERE status = 'active' ORDER BY organisation_id, id",
        parameters=None if organisations is None else {"orgs": organisations},
    ).result_rows
    return [_row(r) for r in rows]


def history(client: Client, organisation_id: str, policy_id: str) -> list[PolicyRow]:
    """Every stored version of a policy, oldest first."""
    rows = client.query(
        f"SELECT {_SELECT} FROM limit_policies WHERE organisation_id = {{org:String}} AND id = {{id:String}} ORDER BY version",
        parameters={"org": organisation_id, "id": policy_id},
    ).result_rows
    return [_row(r) for r in rows]


# --------------------------------------------------------------------------- resets


def insert_reset(client: Client, policy: PolicyRow, value_key: str, at: datetime, by: str) -> None:
    client.insert("limit_resets", [[policy.id, value_key, utc_aware(at), policy.organisation_id, by]],
                  column_names=["policy_id", "value_key", "reset_at", "organisation_id", "reset_by"])


def latest_resets(client: Client, policy_ids: list[str]) -> list[tuple[str, str, datetime]]:
    """(policy_id, value_key, reset_at) of the latest reset of every reset value key of these policies."""
    if not policy_ids:
        return []
    rows = client.query(
        "SELECT policy_id, value_key, max(reset_at) FROM limit_resets WHERE policy_id IN {ids:Array(String)} "
        "GROUP BY policy_id, value_key",
        parameters={"ids": policy_ids},
    ).result_rows
    return [(p, v, utc_aware(t)) for p, v, t in rows]
