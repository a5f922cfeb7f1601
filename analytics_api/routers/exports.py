"""/v1/logs/exports: on-demand exports (docs/exports.md).

Create, list, retrieve, update (drafts only), start, cancel and download, as the
spec's paths; plus the signed file route of the local destination, which is
authenticated by its signature instead of an API key.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse

from analytics_api.auth import Principal, require
from exports import jobs, signing
from exports.destinations import LocalDestination, S3Destination, destination
from exports.writers import MANIFEST
from warehouse.queries import exports as q
from warehouse.queries.scope import TenantScope

router = APIRouter(prefix="/logs/exports", tags=["Logs Export"])

BODY_FIELDS = frozenset({"workspace_id", "filters", "requested_data", "format", "description"})


def _state(request: Request):
    return request.app.state


def _body(payload: Any, *, creating: bool) -> dict:
    if not isinstance(payload, dict):
        raise jobs.invalid("body", "must be a JSON object")
    unknown = sorted(set(payload) - BODY_FIELDS)
    if unknown:
        raise jobs.invalid(unknown[0], f"unknown field; the fields are {', '.join(sorted(BODY_FIELDS))}")
    if "filters" not in payload:
        raise jobs.invalid("filters", "required")
    if creating and "requested_data" not in payload:
        raise jobs.invalid("requested_data", "required")
    description = payload.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 1024):
        raise jobs.invalid("description", "must be a string of at most 1024 characters")
    return payload


def _load(request: Request, principal: Principal, export_id: str) -> q.JobRow:
    if len(export_id) > 256:
        raise HTTPException(404, f"export {export_id[:64]}… not found")
    with _state(request).warehouse.borrow() as client:
        job = q.get_job(client, principal.scope, export_id)
    if job is None:
        raise HTTPException(404, f"export {export_id} not found")
    return job


def _count(request: Request, selection: q.Selection) -> int:
    with _state(request).warehouse.borrow() as client:
        return q.count_rows(client, selection)


def _scoped_filters(body: dict, principal: Principal, default_workspace: str):
    """The export's workspace (from `workspace_id` or `filters.workspace_slug`) and its parsed filters."""
    filters = body.get("filters") or {}
    workspace = jobs.resolve_workspace(
        principal, [("workspace_id", body.get("workspace_id")),
                    ("filters.workspace_slug", filters.get("workspace_slug") if isinstance(filters, dict) else None)],
        default_workspace)
    return workspace, jobs.parse_filters(filters, TenantScope(principal.organisation_id, workspace))


@router.post("", summary="Create log export (a draft; `total` is the number of matching rows)")
def create_export(request: Request, payload: Any = Body(None),
                  principal: Principal = Depends(require("exports.write"))) -> dict:
    body = _body(payload, creating=True)
    settings = _state(request).settings
    workspace, parsed = _scoped_filters(body, principal, settings.default_workspace)
    columns = jobs.parse_columns(body["requested_data"])
    fmt = jobs.parse_format(body.get("format"), "jsonl")
    total = _count(request, parsed.selection)
    job = jobs.new_job(organisation_id=principal.organisation_id, workspace_slug=workspace, created_by=principal.key_id,
                       description=body.get("description") or "", filters=parsed.text(), requested_data=columns,
                       fmt=fmt, dest=settings.export_destination, total=total)
    with _state(request).warehouse.borrow() as client:
        q.write_job(client, job)
    return {"id": job.id, "total": total, "object": "export"}


@router.get("", summary="Get all logs exports (newest first; optionally of one workspace)")
def list_exports(request: Request, workspace_id: str | None = Query(None, min_length=1, max_length=256),
                 page_size: int = Query(50, ge=1, le=100), current_page: int = Query(0, ge=0, le=2**31),
                 principal: Principal = Depends(require("exports.read"))) -> dict:
    workspace = principal.listed_workspace(workspace_id, "exports")
    with _state(request).warehouse.borrow() as client:
        total, rows = q.list_jobs(client, principal.organisation_id, workspace, page_size, current_page * page_size)
    return {"object": "list", "total": total, "data": [jobs.item(r) for r in rows]}


@router.get("/{exportId}", summary="Get a specific logs export (status, progress: rows written out of total)")
def get_export(exportId: str, request: Request, principal: Principal = Depends(require("exports.read"))) -> dict:
    return jobs.item(_load(request, principal, exportId))


@router.put("/{exportId}", summary="Update a logs export (drafts only; 409 otherwise)")
def update_export(exportId: str, request: Request, payload: Any = Body(None),
                  principal: Principal = Depends(require("exports.write"))) -> dict:
    job = _load(request, principal, exportId)
    body = _body(payload, creating=False)
    if job.status != "draft":
        raise HTTPException(409, f"export {job.id} is {job.status}: only a draft can be updated")
    # A workspace left unnamed stays the export's own (the SDK's update sends none unless given).
    workspace, parsed = _scoped_filters(body, principal, job.workspace_slug)
    columns = jobs.parse_columns(body["requested_data"]) if "requested_data" in body else list(job.requested_data)
    fmt = jobs.parse_format(body.get("format"), job.format)
    total = _count(request, parsed.selection)
    changes = dict(workspace_slug=workspace, filters=parsed.text(),
                   requested_data=tuple(columns), format=fmt, total=total)
    if "description" in body:
        changes["description"] = body.get("description") or ""
    with _state(request).warehouse.borrow() as client:
        q.write_job(client, jobs.next_version(job, "draft", **changes))
        current = q.get_job_by_id(client, job.id)
    if current is None or current.status != "draft":  # started meanwhile: the start won
        raise HTTPException(409, f"export {job.id} is {current.status if current else 'gone'}: only a draft can be updated")
    return {"id": job.id, "total": total, "object": "export"}


# Two starts of one draft racing in this process (a double click, a client retry): one at a time, so the
# second reads the first one's `in_progress` and is a 409 (across API processes, the runner of each
# process runs an export once: ExportRunner.submit).
_starting = threading.Lock()


@router.post("/{exportId}/start", summary="Start log export (draft → in_progress; runs in the background)")
def start_export(exportId: str, request: Request, principal: Principal = Depends(require("exports.write"))) -> dict:
    with _starting:
        job = _load(request, principal, exportId)
        if job.status != "draft":
            raise HTTPException(409, f"export {job.id} is {job.status}: only a draft can be started")
        with _state(request).warehouse.borrow() as client:
            q.write_job(client, jobs.next_version(job, "in_progress", started_at=datetime.now(UTC), rows_written=0))
            current = q.get_job_by_id(client, job.id)
        if current is None or current.status != "in_progress" or current.started_at is None:
            raise HTTPException(409, f"export {job.id} is {current.status if current else 'gone'}: it was not started")
        if not _state(request).exports.submit(job.id):
            raise HTTPException(409, f"export {job.id} is running already")
    return {"message": f"export {job.id} started", "object": "export"}


@router.post("/{exportId}/cancel", summary="Cancel log export (→ stopped; partial files are removed)")
def cancel_export(exportId: str, request: Request, principal: Principal = Depends(require("exports.write"))) -> dict:
    job = _load(request, principal, exportId)
    if job.status not in ("draft", "in_progress"):
        raise HTTPException(409, f"export {job.id} is {job.status}: only a draft or a running export can be cancelled")
    with _state(request).warehouse.borrow() as client:
        q.write_job(client, jobs.next_version(job, "stopped", finished_at=datetime.now(UTC)))
        current = q.get_job_by_id(client, job.id)
    if current is None or current.status != "stopped":  # it finished first: that outcome stands
        raise HTTPException(409, f"export {job.id} is {current.status if current else 'gone'}: it finished before the cancel")
    cleaned = _state(request).exports.cancel(job.id)
    return {"message": f"export {job.id} stopped" + ("" if cleaned else "; its files are being removed"),
            "object": "export"}


def _file_url(request: Request, job: q.JobRow, name: str, ttl: int) -> tuple[str, int]:
    state = _state(request)
    if job.destination == "s3":
        dest = destination(state.settings, "s3")
        assert isinstance(dest, S3Destination)
        return dest.presign(f"{jobs.job_directory(job.id)}/{name}", ttl), int(datetime.now(UTC).timestamp()) + ttl
    expires, signature = signing.sign(state.export_secret, job.id, name, ttl)
    url = str(request.url_for("download_export_file", exportId=job.id, name=name))
    return f"{url}?expires={expires}&signature={signature}", expires


@router.get("/{exportId}/download", summary="Download log export (success only; signed URLs that expire)")
def download_export(exportId: str, request: Request, principal: Principal = Depends(require("exports.read"))) -> dict:
    job = _load(request, principal, exportId)
    if job.status != "success":
        raise HTTPException(409, f"export {job.id} is {job.status}: only a successful export can be downloaded")
    ttl = _state(request).settings.export_url_ttl_seconds
    files = orjson.loads(job.files)
    listed, expires = [], 0
    for f in files:
        url, expires = _file_url(request, job, f["name"], ttl)
        listed.append({**f, "signed_url": url})
    manifest_entry = next(f for f in listed if f["name"] == MANIFEST)
    parts = [f for f in listed if f["name"] != MANIFEST]
    return {
        "signed_url": parts[0]["signed_url"] if len(parts) == 1 else manifest_entry["signed_url"],
        "expires_at": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "manifest_url": manifest_entry["signed_url"],
        "files": parts,
    }


@router.get("/{exportId}/files/{name}", name="download_export_file",
            summary="A file of a local export, by signed URL (no API key: the signature is the credential)")
def download_export_file(exportId: str, name: str, request: Request, expires: str | None = None,
                         signature: str | None = None):
    state = _state(request)
    problem = signing.verify(state.export_secret, exportId, name, expires, signature)
    if problem:
        raise HTTPException(403, problem)
    dest = destination(state.settings, "local")
    assert isinstance(dest, LocalDestination)
    try:
        path = dest.path(f"{jobs.job_directory(exportId)}/{name}")
    except ValueError:
        raise HTTPException(404, "no such file") from None
    if not path.is_file():
        raise HTTPException(404, "no such file (the export was removed?)")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name)
