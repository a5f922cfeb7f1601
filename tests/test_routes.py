"""Every /v1 route, found from the app's own OpenAPI document (so a new route cannot
be forgotten): no key → 401; a valid key without the route's scope → 403; the
route's scope is the one docs/api.md names."""

from __future__ import annotations

import re

import pytest

from analytics_api.auth import SCOPES

OPEN = {
    ("get", "/v1/health"),
    ("get", "/v1/ready"),  # readiness, for orchestrators (docs/operations.md)
    # A file of a local export, reached by the signed URL GET /v1/logs/exports/{id}/download hands out:
    # the URL's HMAC signature and expiry are the credential (tested in test_exports.py: 403 when
    # tampered with or expired), so a browser or curl can fetch it without the API key.
    ("get", "/v1/logs/exports/{exportId}/files/{name}"),
}

# The scope each route family needs (docs/api.md).
SCOPE_BY_PREFIX = [
    # before the /v1/logs entries, which they would otherwise match
    (("get", "/v1/logs/exports"), "exports.read"),
    (("post", "/v1/logs/exports"), "exports.write"),
    (("put", "/v1/logs/exports"), "exports.write"),
    (("delete", "/v1/logs/exports"), "exports.write"),
    (("get", "/v1/analytics/"), "analytics.read"),
    (("get", "/v1/logs/"), "logs.read"),
    (("post", "/v1/logs"), "logs.write"),
    (("post", "/v1/feedback"), "feedback.write"),
    (("put", "/v1/feedback/"), "feedback.write"),
    (("get", "/v1/audit-logs"), "audit_logs.read"),
    (("get", "/v1/api-keys"), "api_keys.read"),
    (("post", "/v1/api-keys"), "api_keys.write"),
    (("put", "/v1/api-keys"), "api_keys.write"),
    (("delete", "/v1/api-keys"), "api_keys.write"),
    (("get", "/v1/policies/"), "policies.read"),
    (("post", "/v1/policies/"), "policies.write"),
    (("put", "/v1/policies/"), "policies.write"),
    (("delete", "/v1/policies/"), "policies.write"),
]


def routes(api) -> list[tuple[str, str]]:
    paths = api.app.openapi()["paths"]
    found = [(m, p) for p, ops in paths.items() for m in ops if p.startswith("/v1")]
    return [r for r in found if r not in OPEN]


def scope_of(method: str, path: str) -> str:
    for (m, prefix), scope in SCOPE_BY_PREFIX:
        if m == method and (path == prefix.rstrip("/") or path.startswith(prefix)):
            return scope
    raise AssertionError(f"{method.upper()} {path} has no documented scope")


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def call(api, method: str, path: str, key: str | None):
    headers = {"x-portkey-api-key": key} if key else {}
    body = None if method in ("get", "delete") else {}
    return api.request(method.upper(), concrete(path), headers=headers, json=body)


def test_the_app_has_the_routes_of_every_router(api):
    found = {p for _, p in routes(api)}
    for expected in ("/v1/analytics/graphs/requests", "/v1/logs/{logId}", "/v1/logs", "/v1/feedback",
                     "/v1/feedback/{id}", "/v1/audit-logs", "/v1/api-keys", "/v1/logs/exports",
                     "/v1/logs/exports/{exportId}/download", "/v1/logs/exports/schedules/{scheduleId}/runs"):
        assert expected in found, expected


def test_every_route_needs_a_key_and_its_scope(api, make_key, org):
    everything_else: dict[str, str] = {}
    for method, path in routes(api):
        scope = scope_of(method, path)
        r = call(api, method, path, None)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        if scope not in everything_else:
            everything_else[scope] = make_key(org, scopes=[s for s in SCOPES if s != scope])
        r = call(api, method, path, everything_else[scope])
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert scope in r.json()["detail"]


@pytest.mark.parametrize("key", ["", "tg-" + "0" * 48, "not-a-key", "tg-' OR 1=1 --"])
def test_bad_keys_are_401(api, key):
    r = api.get("/v1/analytics/graphs/requests", headers={"x-portkey-api-key": key},
                params={"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-21T00:00:00Z"})
    assert r.status_code == 401
