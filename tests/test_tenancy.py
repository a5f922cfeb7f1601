"""Tenant isolation and scopes across every route: a key without a route's scope is a 403 whatever the
method; an export or schedule of another organisation, or (workspace key) of another workspace, is a
404 on every route that names it, and is left as it was (real chdb, the local export destination)."""

from __future__ import annotations

import uuid

from analytics_api.auth import HEADER, SCOPES
from conftest import wait_until

WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-22T00:00:00Z"}
USAGE = {"name": "u", "conditions": [{"key": "api_key", "value": "k"}], "group_by": [{"key": "api_key"}],
         "type": "cost", "credit_limit": 100.0}
RATE = {"name": "r", "conditions": [{"key": "api_key", "value": "k"}], "group_by": [{"key": "api_key"}],
        "type": "requests", "unit": "rpm", "value": 10}
EXPORT = {"filters": WINDOW, "requested_data": ["id"], "description": "mine"}
SCHEDULE = {"cron": "0 * * * *", "window": "hour", "description": "mine"}


def h(key: str) -> dict:
    return {HEADER: key}


def _id() -> str:
    return str(uuid.uuid4())


# (method, path, scope, JSON body) of every route that takes a key
ROUTES = [
    ("GET", "/v1/analytics/graphs/requests", "analytics.read", None),
    ("GET", "/v1/analytics/groups/workspaces", "analytics.read", None),
    ("POST", "/v1/logs", "logs.write", {"request": {"url": "https://api.openai.com/v1/chat/completions"}, "response": {"status": 200}}),
    ("GET", f"/v1/logs/{_id()}", "logs.read", None),
    ("POST", "/v1/feedback", "feedback.write", {"trace_id": "t", "value": 1}),
    ("PUT", f"/v1/feedback/{_id()}", "feedback.write", {"value": 1}),
    ("POST", "/v1/logs/exports", "exports.write", EXPORT),
    ("GET", "/v1/logs/exports", "exports.read", None),
    ("GET", f"/v1/logs/exports/{_id()}", "exports.read", None),
    ("PUT", f"/v1/logs/exports/{_id()}", "exports.write", {"filters": WINDOW}),
    ("POST", f"/v1/logs/exports/{_id()}/start", "exports.write", None),
    ("POST", f"/v1/logs/exports/{_id()}/cancel", "exports.write", None),
    ("GET", f"/v1/logs/exports/{_id()}/download", "exports.read", None),
    ("POST", "/v1/logs/exports/schedules", "exports.write", SCHEDULE),
    ("GET", "/v1/logs/exports/schedules", "exports.read", None),
    ("GET", f"/v1/logs/exports/schedules/{_id()}", "exports.read", None),
    ("PUT", f"/v1/logs/exports/schedules/{_id()}", "exports.write", {"cron": "5 * * * *"}),
    ("POST", f"/v1/logs/exports/schedules/{_id()}/pause", "exports.write", None),
    ("POST", f"/v1/logs/exports/schedules/{_id()}/resume", "exports.write", None),
    ("DELETE", f"/v1/logs/exports/schedules/{_id()}", "exports.write", None),
    ("GET", f"/v1/logs/exports/schedules/{_id()}/runs", "exports.read", None),
    ("POST", f"/v1/logs/exports/schedules/{_id()}/backfill", "exports.write", {"start": "2026-11-20T00:00:00Z", "end": "2026-11-20T02:00:00Z"}),
    ("POST", "/v1/policies/usage-limits", "policies.write", USAGE),
    ("GET", "/v1/policies/usage-limits", "policies.read", None),
    ("GET", f"/v1/policies/usage-limits/{_id()}", "policies.read", None),
    ("PUT", f"/v1/policies/usage-limits/{_id()}", "policies.write", {"name": "x"}),
    ("DELETE", f"/v1/policies/usage-limits/{_id()}", "policies.write", None),
    ("GET", f"/v1/policies/usage-limits/{_id()}/entities", "policies.read", None),
    ("PUT", f"/v1/policies/usage-limits/{_id()}/entities/e/reset", "policies.write", None),
    ("POST", "/v1/policies/rate-limits", "policies.write", RATE),
    ("GET", "/v1/policies/rate-limits", "policies.read", None),
    ("GET", f"/v1/policies/rate-limits/{_id()}", "policies.read", None),
    ("PUT", f"/v1/policies/rate-limits/{_id()}", "policies.write", {"value": 5}),
    ("DELETE", f"/v1/policies/rate-limits/{_id()}", "policies.write", None),
    ("GET", f"/v1/policies/rate-limits/{_id()}/entities", "policies.read", None),
    ("POST", "/v1/api-keys/organisation/service", "api_keys.write", {"scopes": ["logs.read"]}),
    ("GET", "/v1/api-keys", "api_keys.read", None),
    ("GET", f"/v1/api-keys/{_id()}", "api_keys.read", None),
    ("PUT", f"/v1/api-keys/{_id()}", "api_keys.write", {"name": "x"}),
    ("DELETE", f"/v1/api-keys/{_id()}", "api_keys.write", None),
    ("POST", f"/v1/api-keys/{_id()}/rotate", "api_keys.write", None),
    ("GET", "/v1/audit-logs", "audit_logs.read", None),
]


def test_every_route_needs_its_scope(api, make_key, org):
    assert {scope for _, _, scope, _ in ROUTES} == set(SCOPES)
    keys = {scope: make_key(org, scopes=[s for s in SCOPES if s != scope]) for scope in SCOPES}
    params = {**WINDOW, "start_time": WINDOW["time_of_generation_min"], "end_time": WINDOW["time_of_generation_max"],
              "organisation_id": org}
    for method, path, scope, body in ROUTES:
        r = api.request(method, path, json=body, params=params if method == "GET" else None, headers=h(keys[scope]))
        assert r.status_code == 403 and scope in r.json()["detail"], (method, path, r.status_code, r.text)
        assert api.request(method, path, json=body, params=params if method == "GET" else None).status_code == 401


def test_exports_and_schedules_of_another_tenant_are_404_and_untouched(api, make_key, org):
    admin = make_key(org)
    made = []
    for workspace in ("ws-1", "ws-1"):
        r = api.post("/v1/logs/exports", json={**EXPORT, "workspace_id": workspace}, headers=h(admin))
        assert r.status_code == 200, r.text
        made.append(r.json()["id"])
    draft, done = made
    assert api.post(f"/v1/logs/exports/{done}/start", headers=h(admin)).status_code == 200
    assert wait_until(lambda: api.get(f"/v1/logs/exports/{done}", headers=h(admin)).json()["status"] == "success")
    r = api.post("/v1/logs/exports/schedules", json={**SCHEDULE, "workspace_id": "ws-1"}, headers=h(admin))
    assert r.status_code == 200, r.text
    schedule = r.json()["id"]

    def state() -> list:
        exports = [api.get(f"/v1/logs/exports/{e}", headers=h(admin)).json() for e in (draft, done)]
        got = api.get(f"/v1/logs/exports/schedules/{schedule}", headers=h(admin)).json()
        return [{k: x[k] for k in ("status", "description", "workspace_id", "filters", "last_updated_at")} for x in exports] + [
            {k: got[k] for k in ("status", "description", "workspace_id", "cron", "last_updated_at")}]

    before = state()
    assert [x["workspace_id"] for x in before] == ["ws-1"] * 3
    strangers = {"another organisation": make_key(f"{org}-b"), "another workspace": make_key(org, workspace="ws-2")}
    for who, key in strangers.items():
        for method, path, body in (
            ("GET", f"/v1/logs/exports/{draft}", None),
            ("PUT", f"/v1/logs/exports/{draft}", {"filters": WINDOW, "description": "theirs"}),
            ("POST", f"/v1/logs/exports/{draft}/start", None),
            ("POST", f"/v1/logs/exports/{draft}/cancel", None),
            ("GET", f"/v1/logs/exports/{done}", None),
            ("GET", f"/v1/logs/exports/{done}/download", None),
            ("POST", f"/v1/logs/exports/{done}/cancel", None),
            ("GET", f"/v1/logs/exports/schedules/{schedule}", None),
            ("PUT", f"/v1/logs/exports/schedules/{schedule}", {"cron": "5 * * * *", "description": "theirs"}),
            ("POST", f"/v1/logs/exports/schedules/{schedule}/pause", None),
            ("POST", f"/v1/logs/exports/schedules/{schedule}/resume", None),
            ("GET", f"/v1/logs/exports/schedules/{schedule}/runs", None),
            ("POST", f"/v1/logs/exports/schedules/{schedule}/backfill", {"start": "2026-11-20T00:00:00Z", "end": "2026-11-20T02:00:00Z"}),
            ("DELETE", f"/v1/logs/exports/schedules/{schedule}", None),
        ):
            r = api.request(method, path, json=body, headers=h(key))
            assert r.status_code == 404, (who, method, path, r.status_code, r.text)
        listed = {x["id"] for x in api.get("/v1/logs/exports", headers=h(key)).json()["data"]}
        listed |= {x["id"] for x in api.get("/v1/logs/exports/schedules", headers=h(key)).json()["data"]}
        assert not listed & {draft, done, schedule}, who
    assert api.get("/v1/logs/exports", params={"workspace_id": "ws-1"}, headers=h(strangers["another workspace"])).status_code == 403
    assert state() == before
    assert api.get(f"/v1/logs/exports/{done}/download", headers=h(make_key(org, workspace="ws-1"))).status_code == 200
