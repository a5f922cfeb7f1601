"""/v1/api-keys: organisation and workspace keys, managed as the portkey-ai SDK does.

A key's secret is in the create and rotate answers only; the table keeps its
SHA-256. Rules (docs/api.md): a caller only grants scopes it holds itself; a
workspace key manages keys of its own workspace only; keys of other tenants (and
deleted keys) are 404. Deleting revokes: the key stops authenticating within
``TOLLGATE_AUTH_CACHE_SECONDS``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from analytics_api.auth import Principal, hash_key, new_key, require, validate_scopes
from analytics_api.validation import invalid, validate_body
from warehouse.queries import api_keys
from warehouse.queries.api_keys import ApiKeyRow

router = APIRouter(prefix="/api-keys", tags=["API keys"])

KEY_TYPES = ("organisation", "workspace")
SUB_TYPES = ("service", "user")
# Portkey fields Tollgate does not enforce: refused rather than silently ignored.
UNSUPPORTED = ("rate_limits", "usage_limits", "defaults", "expires_at", "key_transition_period_ms")

Text = Annotated[str, Field(strict=True, max_length=1024)]
Slug = Annotated[str, Field(strict=True, min_length=1, max_length=256)]


class ApiKeyCreate(BaseModel):
    name: Annotated[str, Field(strict=True, max_length=256)] = ""
    description: Text = ""
    workspace_id: Slug | None = None
    user_id: Annotated[str, Field(strict=True, max_length=256)] = ""
    scopes: Annotated[list[str], Field(min_length=1)]


class ApiKeyUpdate(BaseModel):
    id: str | None = None  # the SDK repeats the path's id in the body
    name: Annotated[str, Field(strict=True, max_length=256)] | None = None
    description: Text | None = None
    scopes: Annotated[list[str], Field(min_length=1)] | None = None
    status: Literal["active", "disabled"] | None = None


def _iso(ts: datetime) -> str:
    ts = ts.astimezone(UTC) if ts.tzinfo else ts
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def public(row: ApiKeyRow) -> dict:
    """What the API shows of a key: never the key, never its hash."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "type": f"{'workspace' if row.workspace_slug else 'organisation'}-{row.sub_type}",
        "organisation_id": row.organisation_id,
        "workspace_id": row.workspace_slug or None,
        "user_id": row.user_id or None,
        "status": row.status,
        "scopes": list(row.scopes),
        "created_at": _iso(row.created_at),
        "last_updated_at": _iso(row.updated_at),
        "object": "api-key",
    }


def _refuse_unsupported(payload: Any) -> None:
    if isinstance(payload, dict):
        for name in UNSUPPORTED:
            if payload.get(name) not in (None, [], {}):
                raise invalid(name, "not supported by Tollgate (refused rather than ignored)")


def _grantable(scopes: list[str], principal: Principal) -> list[str]:
    try:
        scopes = validate_scopes(scopes)
    except ValueError as exc:
        raise invalid("scopes", str(exc), loc=("body", "scopes")) from None
    _require_held(scopes, principal, "grant")
    return scopes


def _require_held(scopes, principal: Principal, verb: str) -> None:
    """api_keys.write is not a way to more access: a caller only grants (or gets the secret of) scopes it holds."""
    missing = [s for s in scopes if s not in principal.scopes]
    if missing:
        raise HTTPException(403, f"this API key cannot {verb} scopes it does not hold: {', '.join(missing)}")


def _load(request: Request, principal: Principal, key_id: str) -> ApiKeyRow:
    with request.app.state.warehouse.borrow() as client:
        row = api_keys.get(client, principal.organisation_id, principal.workspace_slug, key_id)
    if row is None:
        raise HTTPException(404, f"API key {key_id} not found")
    return row


def _write(request: Request, row: ApiKeyRow, **changes) -> ApiKeyRow:
    with request.app.state.warehouse.borrow() as client:
        return api_keys.write_version(client, row, **changes)


# Declared before POST /{type}/{sub_type}, which would also match /{id}/rotate.
@router.post("/{id}/rotate", summary="Rotate an API key: a new secret under the same id; the old one stops working")
def rotate_key(id: str, request: Request, payload: Any = Body(None),
               principal: Principal = Depends(require("api_keys.write"))) -> dict:
    _refuse_unsupported(payload)
    row = _load(request, principal, id)
    _require_held(row.scopes, principal, "rotate a key (and get its secret) with")
    key = new_key()
    _write(request, row, key_hash=hash_key(key))
    return {"id": row.id, "key": key, "object": "api-key"}


@router.post("/{type}/{sub_type}", summary="Create an API key (type organisation|workspace, sub-type service|user)")
def create_key(type: str, sub_type: str, request: Request, payload: Any = Body(...),
               principal: Principal = Depends(require("api_keys.write"))) -> dict:
    if type not in KEY_TYPES:
        raise invalid("type", f"must be one of {', '.join(KEY_TYPES)}", loc=("path", "type"))
    if sub_type not in SUB_TYPES:
        raise invalid("sub_type", f"must be one of {', '.join(SUB_TYPES)}", loc=("path", "sub_type"))
    _refuse_unsupported(payload)
    body = validate_body(ApiKeyCreate, payload)
    if type == "organisation":
        if principal.workspace_slug is not None:
            raise HTTPException(403, "a workspace key cannot create organisation keys")
        if body.workspace_id is not None:
            raise invalid("workspace_id", "only for workspace keys (POST /v1/api-keys/workspace/{sub_type}); an organisation key spans every workspace")
        workspace = ""
    else:
        workspace = body.workspace_id or principal.workspace_slug
        if not workspace:
            raise invalid("workspace_id", "required for a workspace key")
        if principal.workspace_slug is not None and workspace != principal.workspace_slug:
            raise HTTPException(403, "a workspace key can only create keys of its own workspace")
    scopes = _grantable(body.scopes, principal)
    key = new_key()
    with request.app.state.warehouse.borrow() as client:
        row = api_keys.insert(client, key_hash=hash_key(key), organisation_id=principal.organisation_id, workspace_slug=workspace,
                              scopes=scopes, name=body.name, description=body.description, sub_type=sub_type, user_id=body.user_id)
    return {"id": row.id, "key": key, "object": "api-key"}


@router.get("", summary="List API keys (newest first; never the keys themselves)")
def list_keys(request: Request, page_size: int = Query(50, ge=1, le=100), current_page: int = Query(0, ge=0, le=2**31),
              workspace_id: str | None = Query(None, min_length=1, max_length=256),
              principal: Principal = Depends(require("api_keys.read"))) -> dict:
    workspace = principal.listed_workspace(workspace_id, "keys")
    with request.app.state.warehouse.borrow() as client:
        total, rows = api_keys.list_keys(client, principal.organisation_id, workspace, page_size, current_page * page_size)
    return {"object": "list", "total": total, "data": [public(r) for r in rows]}


@router.get("/{id}", summary="Get an API key (never the key itself)")
def get_key(id: str, request: Request, principal: Principal = Depends(require("api_keys.read"))) -> dict:
    return public(_load(request, principal, id))


@router.put("/{id}", summary="Update an API key's name, description, scopes or status (active|disabled)")
def update_key(id: str, request: Request, payload: Any = Body(...),
               principal: Principal = Depends(require("api_keys.write"))) -> dict:
    _refuse_unsupported(payload)
    body = validate_body(ApiKeyUpdate, payload)
    if body.id is not None and body.id != id:
        raise invalid("id", "differs from the id in the path")
    changes: dict[str, Any] = {k: v for k, v in body.model_dump(exclude={"id", "scopes"}).items() if v is not None}
    if body.scopes is not None:
        changes["scopes"] = tuple(_grantable(body.scopes, principal))
    row = _load(request, principal, id)
    if changes.get("status") == "active" and row.status != "active":
        # Re-enabling gives the secret's holder every scope of the key back: a grant like any other.
        _require_held(changes.get("scopes", row.scopes), principal, "re-enable a key with")
    return public(_write(request, row, **changes))


@router.delete("/{id}", summary="Delete (revoke) an API key")
def delete_key(id: str, request: Request, principal: Principal = Depends(require("api_keys.write"))) -> dict:
    row = _load(request, principal, id)
    return public(_write(request, row, status="revoked"))
