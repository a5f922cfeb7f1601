"""/v1/logs/exports/schedules: scheduled exports (a Tollgate extension; docs/exports.md).

Create, list, retrieve, update, pause, resume and delete schedules; their run
history; backfills. The API only writes ClickHouse: the scheduler (``tollgate up``)
picks every change up within ``TOLLGATE_EXPORT_SCHEDULE_SYNC_SECONDS``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request

from analytics_api.auth import Principal, require
from exports import jobs, schedules
from warehouse.queries import exports as q
from warehouse.queries.scope import TenantScope

router = APIRouter(prefix="/logs/exports/schedules", tags=["Logs Export schedules"])

FIELDS = frozenset({"cron", "timezone", "window", "filters", "requested_data", "format", "prefix", "description",
                    "workspace_id", "start_at"})
# Without bodies unless asked for, like on-demand exports.
DEFAULT_COLUMNS = [c for c in q.REQUESTED_DATA if c not in ("request", "response")]


def _object(payload: Any) -> dict:
    if not isinstance(payload, dict):
        raise jobs.invalid("body", "must be a JSON object")
    unknown = sorted(set(payload) - FIELDS)
    if unknown:
        raise jobs.invalid(unknown[0], f"unknown field; the fields are {', '.join(sorted(FIELDS))}")
    return payload


def _fields(body: dict, principal: Principal, settings, current: q.ScheduleRow | None) -> dict:
    """The schedule's columns from ``body`` (a create, or an update of ``current``), validated."""
    def pick(name, default):
        return body[name] if name in body and body[name] is not None else default

    tz_name = pick("timezone", current.timezone if current else "UTC")
    tz = schedules.parse_timezone(tz_name)
    if current is None and "cron" not in body:
        raise jobs.invalid("cron", "required")
    cron = pick("cron", current.cron if current else None)
    schedules.parse_cron(cron, tz)
    if current is None and "window" not in body:
        raise jobs.invalid("window", f"required: one of {', '.join(schedules.WINDOWS)}")
    window = schedules.parse_window(pick("window", current.window_kind if current else None))
    raw_filters = pick("filters", jobs.stored_filters(current.filters) if current else {})
    named = [("workspace_id", body.get("workspace_id")),
             ("filters.workspace_slug", raw_filters.get("workspace_slug") if isinstance(raw_filters, dict) else None)]
    workspace = jobs.resolve_workspace(principal, named, current.workspace_slug if current else settings.default_workspace)
    parsed = jobs.parse_filters(raw_filters, TenantScope(principal.organisation_id, workspace), windowless=True)
    columns = jobs.parse_columns(pick("requested_data", list(current.requested_data) if current else DEFAULT_COLUMNS))
    fmt = jobs.parse_format(pick("format", current.format if current else None), "parquet")
    description = pick("description", current.description if current else "")
    if not isinstance(description, str) or len(description) > 1024:
        raise jobs.invalid("description", "must be a string of at most 1024 characters")
    out = dict(workspace_slug=workspace, cron=cron, timezone=tz_name, window_kind=window,
               filters=parsed.text(), requested_data=tuple(columns), format=fmt,
               description=description)
    if "prefix" in body and body["prefix"] is not None:
        out["prefix"] = schedules.parse_prefix(body["prefix"])
    if "start_at" in body and body["start_at"] is not None:
        out["start_at"] = schedules.parse_time("start_at", body["start_at"])
    return out


def _load(request: Request, principal: Principal, schedule_id: str) -> q.ScheduleRow:
    with request.app.state.warehouse.borrow() as client:
        row = q.get_schedule(client, principal.scope, schedule_id[:256])
    if row is None:
        raise HTTPException(404, f"export schedule {schedule_id[:256]} not found")
    return row


def _check_prefix(client, organisation_id: str, prefix: str, schedule_id: str) -> None:
    if q.prefix_taken(client, organisation_id, prefix, schedule_id):
        raise HTTPException(409, f"prefix {prefix!r} is used by another schedule of this organisation: "
                                 "two schedules writing one place would replace each other's files")


@router.post("", summary="Create an export schedule (cron + time zone, window, filters, columns, format, prefix)")
def create_schedule(request: Request, payload: Any = Body(None),
                    principal: Principal = Depends(require("exports.write"))) -> dict:
    body = _object(payload)
    settings = request.app.state.settings
    fields = _fields(body, principal, settings, None)
    row = schedules.new_schedule(organisation_id=principal.organisation_id, created_by=principal.key_id,
                                 destination=settings.export_destination, status="active",
                                 prefix=fields.pop("prefix", ""), start_at=fields.pop("start_at", datetime.now(UTC)),
                                 **fields)
    if not row.prefix:
        row = replace(row, prefix=row.id)
    sid = row.id
    with request.app.state.warehouse.borrow() as client:
        _check_prefix(client, principal.organisation_id, row.prefix, sid)
        q.write_schedule(client, row)
    return schedules.schedule_item(row)


@router.get("", summary="List export schedules (newest first)")
def list_schedules(request: Request, workspace_id: str | None = Query(None, min_length=1, max_length=256),
                   page_size: int = Query(50, ge=1, le=100), current_page: int = Query(0, ge=0, le=2**31),
                   principal: Principal = Depends(require("exports.read"))) -> dict:
    workspace = principal.listed_workspace(workspace_id, "schedules")
    with request.app.state.warehouse.borrow() as client:
        total, rows = q.list_schedules(client, TenantScope(principal.organisation_id, workspace), page_size,
                                       current_page * page_size)
    return {"object": "list", "total": total, "data": [schedules.schedule_item(r) for r in rows]}


@router.get("/{scheduleId}", summary="Get an export schedule")
def get_schedule(scheduleId: str, request: Request, principal: Principal = Depends(require("exports.read"))) -> dict:
    return schedules.schedule_item(_load(request, principal, scheduleId))


@router.put("/{scheduleId}", summary="Update an export schedule (applies to the windows not run yet)")
def update_schedule(scheduleId: str, request: Request, payload: Any = Body(None),
                    principal: Principal = Depends(require("exports.write"))) -> dict:
    current = _load(request, principal, scheduleId)
    body = _object(payload)
    fields = _fields(body, principal, request.app.state.settings, current)
    row = replace(current, **fields, updated_at=datetime.now(UTC), version=schedules._version())
    with request.app.state.warehouse.borrow() as client:
        _check_prefix(client, principal.organisation_id, row.prefix, row.id)
        q.write_schedule(client, row)
    return schedules.schedule_item(row)


def _set_status(request: Request, principal: Principal, schedule_id: str, status: str) -> dict:
    current = _load(request, principal, schedule_id)
    row = replace(current, status=status, updated_at=datetime.now(UTC), version=schedules._version())
    with request.app.state.warehouse.borrow() as client:
        q.write_schedule(client, row)
    return schedules.schedule_item(row)


@router.post("/{scheduleId}/pause", summary="Pause an export schedule (no runs until resumed)")
def pause_schedule(scheduleId: str, request: Request, principal: Principal = Depends(require("exports.write"))) -> dict:
    return _set_status(request, principal, scheduleId, "paused")


@router.post("/{scheduleId}/resume", summary="Resume a paused schedule (windows missed meanwhile are caught up)")
def resume_schedule(scheduleId: str, request: Request, principal: Principal = Depends(require("exports.write"))) -> dict:
    return _set_status(request, principal, scheduleId, "active")


@router.delete("/{scheduleId}", summary="Delete an export schedule (files already written stay)")
def delete_schedule(scheduleId: str, request: Request, principal: Principal = Depends(require("exports.write"))) -> dict:
    item = _set_status(request, principal, scheduleId, "deleted")
    return {**item, "deleted": True}


@router.get("/{scheduleId}/runs", summary="Run history of a schedule: window, status, rows, files, error (newest first)")
def list_runs(scheduleId: str, request: Request, page_size: int = Query(50, ge=1, le=1000),
              current_page: int = Query(0, ge=0, le=2**31), principal: Principal = Depends(require("exports.read"))) -> dict:
    schedule = _load(request, principal, scheduleId)
    with request.app.state.warehouse.borrow() as client:
        total, runs = q.list_runs(client, schedule.organisation_id, schedule.id, page_size, current_page * page_size)
    return {"object": "list", "total": total, "data": [schedules.run_item(r) for r in runs]}


@router.post("/{scheduleId}/backfill", summary="Run the schedule's windows inside [start, end] (again): replaces their files")
def backfill(scheduleId: str, request: Request, payload: Any = Body(None),
             principal: Principal = Depends(require("exports.write"))) -> dict:
    schedule = _load(request, principal, scheduleId)
    if not isinstance(payload, dict):
        raise jobs.invalid("body", "must be a JSON object with start and end")
    unknown = sorted(set(payload) - {"start", "end"})
    if unknown:
        raise jobs.invalid(unknown[0], "unknown field; the fields are end, start")
    start = schedules.parse_time("start", payload.get("start"))
    end = schedules.parse_time("end", payload.get("end"))
    if start >= end:
        raise jobs.invalid("start", "must be before end")
    with request.app.state.warehouse.borrow() as client:
        runs = schedules.request_backfill(client, schedule, start, end, request.app.state.settings)
    return {"object": "list", "total": len(runs), "data": [schedules.run_item(r) for r in runs]}
