"""The OpenAPI document the app serves (/openapi.json): FastAPI's, plus what it cannot infer.

- **Errors.** Every ``/v1`` operation that takes an API key declares the error answers any
  such operation can give, with their body: 401 (no or a bad key), 403 (a missing scope or
  another workspace), 404, 422 (a parameter or body field, named in ``detail``) and 503 (the
  warehouse or Kafka unavailable); mutating operations also 409 and 413. An error body is
  ``{"detail": <message or FastAPI's list of {loc, msg, type}>}``.
- **Portkey's response bodies.** Where the bundled Portkey spec (spec/portkey-api-subset.yaml)
  describes the 200 answer of an operation Tollgate serves, the document uses that schema
  (``$ref``s resolved) instead of FastAPI's ``object``.

The schemathesis test (tests/test_fuzz.py) holds every answer to this document.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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


@lru_cache(maxsize=1)
def portkey_responses() -> dict[tuple[str, str], dict]:
    """(method, /v1 path) → the spec's schema of its 200 JSON body, refs resolved."""
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
            if schema:
                out[(method, "/v1" + path)] = resolve(schema)
    return out


def document(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    portkey = portkey_responses()
    for path, ops in doc["paths"].items():
        if path in UNAUTHENTICATED:
            continue
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            declared = {**ERRORS, **(MUTATING_ERRORS if method in MUTATING else {})}
            for code, description in declared.items():
                responses[code] = {"description": description, **error_ref}  # also replaces FastAPI's 422
            schema = portkey.get((method, path))
            ok = responses.get("200", {}).get("content", {}).get("application/json")
            if schema is not None and ok is not None:
                ok["schema"] = schema
    app.openapi_schema = doc
    return doc


def install(app: FastAPI) -> None:
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
