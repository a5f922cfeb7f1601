"""Tenant scoping: every query of event tables starts from one of these.

The organisation condition is not optional: a query that forgets it cannot be
built. A workspace key is confined to its workspace.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantScope:
    organisation_id: str
    workspace_slug: str | None = None

    def where(self, alias: str = "") -> tuple[str, dict[str, str]]:
        prefix = f"{alias}." if alias else ""
        sql = f"{prefix}organisation_id = {{scope_org:String}}"
        params = {"scope_org": self.organisation_id}
        if self.workspace_slug is not None:
            sql += f" AND {prefix}workspace_slug = {{scope_ws:String}}"
            params["scope_ws"] = self.workspace_slug
        return sql, params
