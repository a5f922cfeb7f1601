"""The OpenAPI document the app serves (/openapi.json): FastAPI's, plus what it cannot infer.

- **Errors.** Every ``/v1`` operation that takes an API key declares the error answers any
  such operation can give, with their body: 401 (no or a bad key), 403 (a missing scope or
  another workspace), 404, 422 (a parameter or body field, named in ``detail``) and 503 (the
  warehouse or Kafka unavailable); mutating operations also 409 and 413. An error body is
  ``{"detail": <message or FastAPI's list of {loc, msg, type}>}``.
  Operations that take a body also declare 400 (the body is not JSON at all).
- **Portkey's parameters and response bodies.** Where the bundled Portkey spec
  (spec/portkey-api-subset.yaml) describes the 200 answer of an operation Tollgate serves, the
  document uses that schema (``$ref``s resolved) instead of FastAPI's ``object``; and an operation
  that reads its query parameters itself (the analytics routes, which parse them in
  analytics_api/params.py) declares the spec's query parameters, one that reads its body itself
  (``POST /v1/logs``) the spec's request body. One deliberate difference:
  Tollgate's ``organisation_id`` and ``workspace_id`` are free strings (workspace slugs), not the
  UUIDs Portkey's schemas say, so their ``format: uuid`` is dropped; and ``workspace_id`` is null
  on organisation-wide resources (docs/limits.md), so it is declared nullable.
- **Tollgate's own analytics groups.** ``groups/workspaces`` and ``groups/{group_by}`` are not in the
  spec: they declare the window and filters of ``groups/users`` plus their columns and paging
  parameters (docs/analytics.md).

The schemathesis test (tests/test_fuzz.py) holds every answer to this document.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from analytics_api.metrics import groups
from analytics_api.routers.analytics import GROUP_BY, MAX_PAGE_SIZE

SPEC_PATH = Path(__file__).resolve().parents[1] / "spec" / "portkey-api-subset.yaml"
UNAUTHENTICATED = frozenset({"/v1/health", "/v1/ready", "/metrics"})
MUTATING = frozenset({"post", "put", "patch", "delete"})

ERROR = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"}, "type": {"type": "string"}}}},
            ]
        }
    },
}
ERRORS = {
    "401": "No API key, or not a valid one",
    "403": "The key lacks the scope, or names another workspace",
    "404": "Not found (or not visible to this key)",
    "422": "A parameter or body field is invalid; `detail` names it",
    "503": "The warehouse or the event log (Kafka) is unavailable; retry later",
}
MUTATING_ERRORS = {
    "409": "Conflicts with the resource's current state",
    "413": "The body is too large",
}


FREE_STRINGS = frozenset({"organisation_id", "workspace_id"})
NULLABLE = "workspace_id"  # null on organisation-wide policies and keys (docs/limits.md)


def relax(node: Any) -> Any:
    """``node`` without ``format`` on the properties that are free strings in Tollgate."""
    if isinstance(node, dict):
        out = {k: relax(v) for k, v in node.items()}
        for name, prop in (out.get("properties") or {}).items():
            if name in FREE_STRINGS and isinstance(prop, dict):
                prop.pop("format", None)
            if name == NULLABLE and prop.get("type") == "string":
                prop["type"] = ["string", "null"]
        return out
    if isinstance(node, list):
        return [relax(v) for v in node]
    return node


@lru_cache(maxsize=1)
def portkey_operations() -> dict[tuple[str, str], tuple[dict | None, list[dict], dict | None]]:
    """(method, /v1 path) → the spec's schema of its 200 JSON body, its query parameters and its request body,
    refs resolved."""
    if not SPEC_PATH.exists():  # an installed package without the repository's spec/: FastAPI's schemas only
        return {}
    spec = yaml.safe_load(SPEC_PATH.read_text())

    def resolve(node: Any, depth: int = 0) -> Any:
        if depth > 40:
            return {}
        if isinstance(node, dict):
            if "$ref" in node:
                target: Any = spec
                for part in node["$ref"].removeprefix("#/").split("/"):
                    target = target[part]
                return resolve(target, depth + 1)
            return {k: resolve(v, depth + 1) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, depth + 1) for v in node]
        return node

    out = {}
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            schema = (((op.get("responses") or {}).get("200") or {}).get("content") or {}).get("application/json", {}).get("schema")
            query = [p for p in resolve(op.get("parameters") or []) if p.get("in") == "query"]
            body = relax(resolve(op["requestBody"])) if op.get("requestBody") else None
            out[(method, "/v1" + path)] = (relax(resolve(schema)) if schema else None, query, body)
    return out


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


COLUMN_GROUPS = {"/v1/analytics/groups/workspaces", "/v1/analytics/groups/{group_by}"}
COLUMN_GROUP_PARAMETERS = [
    _query("columns", {"type": "string"}, "comma-separated, of: " + ", ".join(groups.COLUMNS)),
    _query("order_by", {"type": "string"}, "the group key or one of the columns"),
    _query("order_by_type", {"type": "string", "enum": ["asc", "desc"]}, "default desc"),
    _query("page_size", {"type": "integer", "minimum": 0, "maximum": MAX_PAGE_SIZE}, "default 20"),
    _query("current_page", {"type": "integer", "minimum": 0}, "default 0"),
    _query("include_total", {"type": "boolean"}, "add the totals of the whole selection"),
]


def _column_group(path: str, op: dict, portkey: dict) -> None:
    _, window, _ = portkey.get(("get", "/v1/analytics/groups/users"), (None, [], None))
    op["parameters"] = [*op.get("parameters", []), *window, *COLUMN_GROUP_PARAMETERS]
    for param in op["parameters"]:
        if param["in"] == "path" and param["name"] == "group_by":
            param["schema"] = {"type": "string", "enum": list(GROUP_BY)}


def document(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    portkey = portkey_operations()
    for path, ops in doc["paths"].items():
        if path in UNAUTHENTICATED:
            continue
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            schema, query, body = portkey.get((method, path), (None, [], None))
            if body is not None and "requestBody" not in op:  # a route that reads its body itself (POST /v1/logs)
                op["requestBody"] = body
            declared = {**ERRORS, **(MUTATING_ERRORS if method in MUTATING else {})}
            if "requestBody" in op:
                declared["400"] = "The body is not JSON"
            for code, description in declared.items():
                responses[code] = {"description": description, **error_ref}  # also replaces FastAPI's 422
            ok = responses.get("200", {}).get("content", {}).get("application/json")
            if schema is not None and ok is not None:
                ok["schema"] = schema
            if query and not any(p.get("in") == "query" for p in op.get("parameters", [])):
                op["parameters"] = [*op.get("parameters", []), *query]
            if path in COLUMN_GROUPS and method == "get":
                _column_group(path, op, portkey)
    app.openapi_schema = doc
    return doc


def install(app: FastAPI) -> None:
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
