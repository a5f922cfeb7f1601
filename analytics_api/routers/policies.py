"""/v1/policies: usage-limits and rate-limits policies (spec paths; semantics in docs/limits.md).

Policies live in ``limit_policies``: every change is a new version of the row (the
audit middleware records the request too). The counters these routes show are the
limits job's (``limit_counters``), as of its last refresh.

Tenancy: a policy belongs to the key's organisation and, when created by a workspace
key or with ``workspace_id``, to one workspace (it then only counts that workspace's
requests). A workspace key sees and manages the policies of its workspace only; an
organisation key sees all of its organisation's. Anything else is a 404.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from analytics_api.auth import Principal, require
from analytics_api.limits.counters import WINDOW_SECONDS
from analytics_api.validation import invalid, validate_body
from warehouse.queries import limits as lq
from warehouse.queries import policies as pq
from warehouse.queries.limits import DIMENSIONS, METADATA_PREFIX, split_value_key, value_key
from warehouse.queries.policies import PolicyRow

router = APIRouter(prefix="/policies", tags=["Policies"])

USAGE, RATE = "usage_limits", "rate_limits"
OBJECT = {USAGE: "policy_usage_limits", RATE: "policy_rate_limits"}
MAX_CONDITIONS, MAX_GROUP_BY = 20, 5
MAX_AMOUNT = 1e15
METADATA_NAME = re.compile(r"^[^:|\\]{1,256}$")
KEYS_HELP = "one of api_key, organisation_id, workspace_id or metadata.<name>"

Name = Annotated[str, Field(strict=True, max_length=255)]
Amount = Annotated[float, Field(strict=True, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]


class ConditionIn(BaseModel):
    key: Annotated[str, Field(strict=True, min_length=1, max_length=300)]
    value: Annotated[str, Field(strict=True, min_length=1, max_length=1024)]


class GroupByIn(BaseModel):
    key: Annotated[str, Field(strict=True, min_length=1, max_length=300)]


class PolicyCreate(BaseModel):
    name: Name | None = None
    conditions: Annotated[list[ConditionIn], Field(min_length=1, max_length=MAX_CONDITIONS)]
    group_by: Annotated[list[GroupByIn], Field(min_length=1, max_length=MAX_GROUP_BY)]
    workspace_id: Annotated[str, Field(strict=True, min_length=1, max_length=256)] | None = None
    organisation_id: Annotated[str, Field(strict=True, min_length=1, max_length=256)] | None = None


class UsageCreate(PolicyCreate):
    type: Literal["cost", "tokens"]
    credit_limit: Amount
    alert_threshold: Amount | None = None
    periodic_reset: Literal["monthly", "weekly"] | None = None


class RateCreate(PolicyCreate):
    type: Literal["requests", "tokens"]
    unit: Literal["rpm", "rph", "rpd"]
    value: Amount


class UsageUpdate(BaseModel):
    name: Name | None = None
    credit_limit: Amount | None = None
    alert_threshold: Amount | None = None
    periodic_reset: Literal["monthly", "weekly"] | None = None
    reset_usage_for_value: Annotated[str, Field(strict=True, min_length=1, max_length=8192)] | None = None


class RateUpdate(BaseModel):
    name: Name | None = None
    unit: Literal["rpm", "rph", "rpd"] | None = None
    value: Amount | None = None


IMMUTABLE = ("conditions", "group_by", "type", "workspace_id", "organisation_id")


def bad(field: str, message: str):
    """A 422 naming a body field (``conditions.0.key``), in FastAPI's error shape."""
    loc = ("body", *(int(p) if p.isdigit() else p for p in field.split(".")))
    return invalid(field, message, loc=loc)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _now(request: Request) -> datetime:
    """The API's clock (tests replace it with ``app.state.limits_clock``), UTC, whole milliseconds."""
    now = getattr(request.app.state, "limits_clock", utc_now)()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# --------------------------------------------------------------------------- presentation


def _iso(ts: datetime) -> str:
    ts = ts.astimezone(UTC)
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def _amount(type_: str, value: float | None):
    if value is None:
        return None
    return float(value) if type_ == "cost" else int(value)


def public(row: PolicyRow) -> dict:
    out: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "conditions": [{"key": k, "value": v} for k, v in row.conditions],
        "group_by": [{"key": k} for k in row.group_by],
        "type": row.type,
    }
    if row.kind == USAGE:
        out.update(credit_limit=_amount(row.type, row.credit_limit), alert_threshold=_amount(row.type, row.alert_threshold),
                   periodic_reset=row.periodic_reset or None)
    else:
        out.update(unit=row.unit, value=_amount(row.type, row.value))
    out.update(status=row.status, workspace_id=row.workspace_slug or None, organisation_id=row.organisation_id,
               created_at=_iso(row.created_at), last_updated_at=_iso(row.updated_at), object=OBJECT[row.kind])
    return out


# --------------------------------------------------------------------------- validation


def _check_key(key: str, where: str) -> None:
    if key in DIMENSIONS:
        return
    if key.startswith(METADATA_PREFIX) and METADATA_NAME.fullmatch(key[len(METADATA_PREFIX):]):
        return
    if key.startswith(METADATA_PREFIX):
        raise bad(where, "a metadata key is 1 to 256 characters without `:`, `|` or `\\`")
    raise bad(where, f"unknown key `{key}`; {KEYS_HELP}")


def _check_shape(body: PolicyCreate, principal: Principal, workspace: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    seen: set[str] = set()
    conditions = []
    for i, cond in enumerate(body.conditions):
        _check_key(cond.key, f"conditions.{i}.key")
        if cond.key in seen:
            raise bad(f"conditions.{i}.key", f"`{cond.key}` is given twice (all conditions must hold)")
        seen.add(cond.key)
        if cond.key == "organisation_id" and cond.value != principal.organisation_id:
            raise bad(f"conditions.{i}.value", "must be this API key's organisation (a policy only counts its own organisation)")
        if cond.key == "workspace_id" and workspace and cond.value != workspace:
            raise bad(f"conditions.{i}.value", f"must be the policy's workspace `{workspace}` (it only counts that workspace)")
        conditions.append((cond.key, cond.value))
    group_by = []
    for i, g in enumerate(body.group_by):
        _check_key(g.key, f"group_by.{i}.key")
        if g.key in group_by:
            raise bad(f"group_by.{i}.key", f"`{g.key}` is given twice")
        group_by.append(g.key)
    return tuple(conditions), tuple(group_by)


def _whole(type_: str, field: str, value: float | None) -> None:
    if type_ != "cost" and value is not None and value != int(value):
        raise bad(field, f"must be a whole number of {type_}")


def _check_limits(type_: str, credit_limit: float, alert_threshold: float | None, sent: str) -> None:
    _whole(type_, "credit_limit", credit_limit)
    _whole(type_, "alert_threshold", alert_threshold)
    if alert_threshold is not None and alert_threshold >= credit_limit:
        raise bad(sent, f"alert_threshold ({_amount(type_, alert_threshold)}) must be below credit_limit ({_amount(type_, credit_limit)})")


def _workspace(principal: Principal, given: str | None) -> str:
    if principal.workspace_slug is not None:
        if given is not None and given != principal.workspace_slug:
            raise HTTPException(403, "a workspace key can only manage policies of its own workspace")
        return principal.workspace_slug
    return given or ""


def _check_org(principal: Principal, given: str | None) -> None:
    if given is not None and given != principal.organisation_id:
        raise HTTPException(403, "`organisation_id` is not the organisation of this API key")


def _policy_id(name: str, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise invalid(name, "must be a UUID", loc=("path", name)) from None


def _load(request: Request, principal: Principal, kind: str, policy_id: str, status: str | None = "active") -> PolicyRow:
    with request.app.state.warehouse.borrow() as client:
        row = pq.get(client, kind, principal.organisation_id, principal.workspace_slug, policy_id)
    if row is None or (status is not None and row.status != status):
        raise HTTPException(404, f"policy {policy_id} not found")
    return row


def _refuse_immutable(payload: Any) -> None:
    if isinstance(payload, dict):
        for name in IMMUTABLE:
            if name in payload:
                raise bad(name, "cannot be changed; create a new policy (and delete this one) instead")


def _created(request: Request, principal: Principal, kind: str, body: PolicyCreate, **fields) -> dict:
    _check_org(principal, body.organisation_id)
    workspace = _workspace(principal, body.workspace_id)
    conditions, group_by = _check_shape(body, principal, workspace)
    now = _now(request)
    row = PolicyRow(
        id=pq.new_id(), version=pq.next_version(), kind=kind, organisation_id=principal.organisation_id,
        workspace_slug=workspace, name=body.name, conditions=conditions, group_by=group_by, status="active",
        created_at=now, updated_at=now, baseline_at=now, limits_at=now, changed_by=principal.key_id, **fields)
    with request.app.state.warehouse.borrow() as client:
        pq.insert(client, row)
    return {"id": row.id, "object": OBJECT[kind]}


def _list(request: Request, principal: Principal, kind: str, workspace_id: str | None, status: str, page_size: int,
          current_page: int, **filters) -> dict:
    workspace = principal.listed_workspace(workspace_id, "policies")
    with request.app.state.warehouse.borrow() as client:
        total, rows = pq.list_policies(client, kind, principal.organisation_id, workspace, status=status,
                                       limit=page_size, offset=current_page * page_size, **filters)
    return {"object": "list", "total": total, "data": [public(r) for r in rows]}


# --------------------------------------------------------------------------- usage limits

Status = Literal["active", "archived"]


@router.post("/usage-limits", summary="Create Usage Limits Policy")
def create_usage_policy(request: Request, payload: Any = Body(...),
                        principal: Principal = Depends(require("policies.write"))) -> dict:
    body = validate_body(UsageCreate, payload)
    _check_limits(body.type, body.credit_limit, body.alert_threshold,
                  "alert_threshold" if body.alert_threshold is not None else "credit_limit")
    return _created(request, principal, USAGE, body, type=body.type, credit_limit=body.credit_limit,
                    alert_threshold=body.alert_threshold, periodic_reset=body.periodic_reset or "")


@router.get("/usage-limits", summary="List Usage Limits Policies")
def list_usage_policies(request: Request, workspace_id: str | None = Query(None, min_length=1, max_length=256),
                        status: Status = "active", type: Literal["cost", "tokens"] | None = None,
                        page_size: int = Query(50, ge=0, le=1000), current_page: int = Query(0, ge=0, le=2**31),
                        principal: Principal = Depends(require("policies.read"))) -> dict:
    return _list(request, principal, USAGE, workspace_id, status, page_size, current_page, type=type)


@router.get("/usage-limits/{policyUsageLimitsId}", summary="Get Usage Limits Policy")
def get_usage_policy(policyUsageLimitsId: str, request: Request, status: Status = "active", include_usage: bool = False,
                     principal: Principal = Depends(require("policies.read"))) -> dict:
    row = _load(request, principal, USAGE, _policy_id("policyUsageLimitsId", policyUsageLimitsId), status)
    out = public(row)
    if include_usage:
        with request.app.state.warehouse.borrow() as client:
            counters = lq.usage_map(client, row.id)
        out["value_key_usage_map"] = {
            r["value_key"]: {"current_usage": _amount(row.type, r["current_usage"]), "status": r["status"],
                             "is_threshold_alerts_sent": bool(r["threshold_alert_sent"]),
                             "is_exhausted_alerts_sent": bool(r["exhausted_alert_sent"])}
            for r in counters
        }
    return out


@router.put("/usage-limits/{policyUsageLimitsId}", summary="Update Usage Limits Policy")
def update_usage_policy(policyUsageLimitsId: str, request: Request, payload: Any = Body(...),
                        principal: Principal = Depends(require("policies.write"))) -> dict:
    policy_id = _policy_id("policyUsageLimitsId", policyUsageLimitsId)
    _refuse_immutable(payload)
    body = validate_body(UsageUpdate, payload)
    row = _load(request, principal, USAGE, policy_id)
    given = body.model_fields_set
    now = _now(request)
    changes: dict[str, Any] = {}
    if "name" in given:
        changes["name"] = body.name
    if "credit_limit" in given and body.credit_limit is None:
        raise bad("credit_limit", "must be a number, not null")
    credit_limit = body.credit_limit if "credit_limit" in given else row.credit_limit
    threshold = body.alert_threshold if "alert_threshold" in given else row.alert_threshold
    _check_limits(row.type, credit_limit, threshold, "credit_limit" if "credit_limit" in given else "alert_threshold")
    if (credit_limit, threshold) != (row.credit_limit, row.alert_threshold):
        changes.update(credit_limit=credit_limit, alert_threshold=threshold, limits_at=now)  # alerts re-arm
    if "periodic_reset" in given and (body.periodic_reset or "") != row.periodic_reset:
        changes.update(periodic_reset=body.periodic_reset or "", baseline_at=now)  # counting starts again, from zero
    reset_key = None
    if body.reset_usage_for_value is not None:
        reset_key = _value_key_for(row, body.reset_usage_for_value, "reset_usage_for_value")
    with request.app.state.warehouse.borrow() as client:
        if changes:
            pq.write_version(client, row, **changes, updated_at=now, changed_by=principal.key_id)
        if reset_key is not None:
            pq.insert_reset(client, row, reset_key, now, principal.key_id)
    return {}


@router.delete("/usage-limits/{policyUsageLimitsId}", summary="Delete Usage Limits Policy")
def delete_usage_policy(policyUsageLimitsId: str, request: Request,
                        principal: Principal = Depends(require("policies.write"))) -> dict:
    return _archive(request, principal, USAGE, _policy_id("policyUsageLimitsId", policyUsageLimitsId))


@router.get("/usage-limits/{policyUsageLimitsId}/entities", summary="List Usage Limits Policy Entities")
def list_usage_entities(policyUsageLimitsId: str, request: Request, status: Literal["active", "exhausted"] | None = None,
                        search: str | None = Query(None, max_length=1024), page_size: int = Query(50, ge=1, le=100),
                        current_page: int = Query(0, ge=0, le=2**31),
                        principal: Principal = Depends(require("policies.read"))) -> dict:
    row = _load(request, principal, USAGE, _policy_id("policyUsageLimitsId", policyUsageLimitsId))
    return _entities(request, row, status, search, page_size, current_page)


@router.put("/usage-limits/{policyUsageLimitsId}/entities/{entityId}/reset", summary="Reset Usage Limits Policy Entity")
def reset_usage_entity(policyUsageLimitsId: str, entityId: str, request: Request, payload: Any = Body(None),
                       principal: Principal = Depends(require("policies.write"))) -> dict:
    row = _load(request, principal, USAGE, _policy_id("policyUsageLimitsId", policyUsageLimitsId))
    with request.app.state.warehouse.borrow() as client:
        found = lq.find_entity(client, row.id, entityId)
        if found is None:
            raise HTTPException(404, f"entity {entityId} not found in policy {row.id}")
        pq.insert_reset(client, row, found, _now(request), principal.key_id)
    return {}


def _value_key_for(row: PolicyRow, text: str, field: str) -> str:
    """A value key of ``row`` from ``text``: the value key itself, or (one group_by key) just the value."""
    try:
        pairs = split_value_key(text)
        if [k for k, _ in pairs] == list(row.group_by) and all(v for _, v in pairs):
            return value_key(pairs)
    except ValueError:
        pass
    if len(row.group_by) == 1 and text:
        return value_key([(row.group_by[0], text)])
    example = value_key([(k, "…") for k in row.group_by])
    raise bad(field, f"must be a value key of this policy (`{example}`)")


def _archive(request: Request, principal: Principal, kind: str, policy_id: str) -> dict:
    row = _load(request, principal, kind, policy_id)
    now = _now(request)
    with request.app.state.warehouse.borrow() as client:
        pq.write_version(client, row, status="archived", updated_at=now, changed_by=principal.key_id)
    return {}


def _entities(request: Request, row: PolicyRow, status: str | None, search: str | None, page_size: int, current_page: int) -> dict:
    with request.app.state.warehouse.borrow() as client:
        total, rows = lq.entities(client, row.id, status=status, search=search or None, limit=page_size,
                                  offset=current_page * page_size, only_used=row.kind == RATE)
    data = []
    for r in rows:
        item = {"id": r["entity_id"], "value_key": r["value_key"], "current_usage": _amount(row.type, r["current_usage"]),
                "status": r["status"]}
        if row.kind == USAGE:
            item.update(is_threshold_alerts_sent=bool(r["threshold_alert_sent"]),
                        is_exhausted_alerts_sent=bool(r["exhausted_alert_sent"]), window_start=_iso(r["window_start"]),
                        window_end=_iso(r["window_end"]) if r["window_end"] is not None else None)
        else:
            item["window_seconds"] = WINDOW_SECONDS[row.unit]
        item["updated_at"] = _iso(r["updated_at"])
        data.append(item)
    return {"object": "list", "total": total, "data": data}


# --------------------------------------------------------------------------- rate limits


@router.post("/rate-limits", summary="Create Rate Limits Policy")
def create_rate_policy(request: Request, payload: Any = Body(...),
                       principal: Principal = Depends(require("policies.write"))) -> dict:
    body = validate_body(RateCreate, payload)
    _whole(body.type, "value", body.value)
    return _created(request, principal, RATE, body, type=body.type, unit=body.unit, value=body.value)


@router.get("/rate-limits", summary="List Rate Limits Policies")
def list_rate_policies(request: Request, workspace_id: str | None = Query(None, min_length=1, max_length=256),
                       status: Status = "active", type: Literal["requests", "tokens"] | None = None,
                       unit: Literal["rpm", "rph", "rpd"] | None = None,
                       page_size: int = Query(50, ge=0, le=1000), current_page: int = Query(0, ge=0, le=2**31),
                       principal: Principal = Depends(require("policies.read"))) -> dict:
    return _list(request, principal, RATE, workspace_id, status, page_size, current_page, type=type, unit=unit)


@router.get("/rate-limits/{rateLimitsPolicyId}", summary="Get Rate Limits Policy")
def get_rate_policy(rateLimitsPolicyId: str, request: Request, status: Status = "active",
                    principal: Principal = Depends(require("policies.read"))) -> dict:
    return public(_load(request, principal, RATE, _policy_id("rateLimitsPolicyId", rateLimitsPolicyId), status))


@router.put("/rate-limits/{rateLimitsPolicyId}", summary="Update Rate Limits Policy")
def update_rate_policy(rateLimitsPolicyId: str, request: Request, payload: Any = Body(...),
                       principal: Principal = Depends(require("policies.write"))) -> dict:
    policy_id = _policy_id("rateLimitsPolicyId", rateLimitsPolicyId)
    _refuse_immutable(payload)
    body = validate_body(RateUpdate, payload)
    for name in ("unit", "value"):
        if name in body.model_fields_set and getattr(body, name) is None:
            raise bad(name, "must not be null")
    row = _load(request, principal, RATE, policy_id)
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if "value" in changes:
        _whole(row.type, "value", changes["value"])
    changes = {k: v for k, v in changes.items() if getattr(row, k) != v}
    if changes:
        now = _now(request)
        with request.app.state.warehouse.borrow() as client:
            pq.write_version(client, row, **changes, updated_at=now, limits_at=now, changed_by=principal.key_id)
    return {}


@router.delete("/rate-limits/{rateLimitsPolicyId}", summary="Delete Rate Limits Policy")
def delete_rate_policy(rateLimitsPolicyId: str, request: Request,
                       principal: Principal = Depends(require("policies.write"))) -> dict:
    return _archive(request, principal, RATE, _policy_id("rateLimitsPolicyId", rateLimitsPolicyId))


@router.get("/rate-limits/{rateLimitsPolicyId}/entities",
            summary="List the current rates of a rate limits policy (Tollgate extension)")
def list_rate_entities(rateLimitsPolicyId: str, request: Request, status: Literal["active", "rate_limited"] | None = None,
                       search: str | None = Query(None, max_length=1024), page_size: int = Query(50, ge=1, le=100),
                       current_page: int = Query(0, ge=0, le=2**31),
                       principal: Principal = Depends(require("policies.read"))) -> dict:
    row = _load(request, principal, RATE, _policy_id("rateLimitsPolicyId", rateLimitsPolicyId))
    return _entities(request, row, status, search, page_size, current_page)

