"""POST /v1/feedback and PUT /v1/feedback/{id}: feedback events to Kafka.

Both validate, build feedback events (docs/events.md) and produce them with
acks=all before answering; ingest workers store them in ``feedback``. An update
is the same id again with the new values, the original ``created_at`` and a later
``updated_at``: ReplacingMergeTree(updated_at) keeps it, so analytics see it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from analytics_api.auth import Principal, require
from analytics_api.validation import invalid, validate_body, validate_item
from warehouse.queries.feedback import get_feedback

router = APIRouter(tags=["Feedback"])

Value = Annotated[int, Field(strict=True, ge=-10, le=10, description="An integer between -10 and 10.")]
Weight = Annotated[float, Field(strict=True, ge=0, le=1, description="A number between 0 and 1.")]


class FeedbackRequest(BaseModel):
    trace_id: Annotated[str, Field(strict=True, min_length=1, max_length=1024)]
    value: Value
    weight: Weight = 1.0
    metadata: dict[str, Any] | None = None


class FeedbackUpdateRequest(BaseModel):
    value: Value
    weight: Weight | None = None  # omitted: keep the current weight
    metadata: dict[str, Any] | None = None  # omitted: keep the current metadata


class FeedbackResponse(BaseModel):
    status: str
    message: str
    feedback_ids: list[str]


def _body_schema(schema: dict) -> dict:
    """The documented request body (the handlers validate it themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_CREATE_SCHEMA = FeedbackRequest.model_json_schema()
_CREATE_BODY = _body_schema({"anyOf": [_CREATE_SCHEMA, {"type": "array", "items": _CREATE_SCHEMA}]})
_UPDATE_BODY = _body_schema(FeedbackUpdateRequest.model_json_schema())


def _iso(ts: datetime) -> str:
    ts = ts.astimezone(UTC) if ts.tzinfo else ts
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def _epoch_ms(ts: datetime) -> int:
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


_clock_lock = threading.Lock()
_last_update_ms = 0


def _later_than(stored: datetime) -> str:
    """A millisecond after both the stored version and any update this process made."""
    global _last_update_ms
    with _clock_lock:
        ms = max(time.time_ns() // 1_000_000, _epoch_ms(stored) + 1, _last_update_ms + 1)
        _last_update_ms = ms
    return _iso(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms))


class _Published:
    """The feedback events this process published lately, by (organisation, id): what an update builds
    on when ingest has not stored them yet (feedback is read back from ClickHouse, which is behind Kafka
    by the ingest lag). Without it, a second update right after a first would rebuild the omitted fields
    from the version before the first, undoing it, and an update right after the POST would be a 404.

    It keeps the events' JSON (as produced), the newest first, up to ``max_bytes`` in all: a bound on
    memory whatever the events hold (one may carry up to TOLLGATE_INGEST_MAX_EVENT_BYTES of metadata)."""

    def __init__(self, max_bytes: int = 16 << 20):
        self.max_bytes = max_bytes
        self._events: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, events: list[dict], values: list[bytes]) -> None:
        with self._lock:
            for event, value in zip(events, values):
                key = (event["organisation_id"], event["id"])
                self._bytes += len(value) - len(self._events.pop(key, b""))
                self._events[key] = value
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._events.popitem(last=False)[1])

    def get(self, principal: Principal, feedback_id: str) -> dict | None:
        with self._lock:
            value = self._events.get((principal.organisation_id, feedback_id))
        event = None if value is None else orjson.loads(value)
        if event is None or (principal.workspace_slug is not None and event.get("workspace_slug", "") != principal.workspace_slug):
            return None  # the tenant rule of get_feedback: a workspace key sees its own workspace only
        return event


_published = _Published()


def _version_ms(event: dict) -> int:
    return _epoch_ms(datetime.fromisoformat(event.get("updated_at") or event["created_at"]))


def _encode(events: list[dict], max_bytes: int, single: bool) -> list[bytes]:
    """The events as JSON, each within what ingest accepts (larger ones would be dead-lettered)."""
    values = []
    for i, event in enumerate(events):
        try:
            value = orjson.dumps(event)
        except TypeError as exc:  # integers beyond 64 bits
            raise invalid("metadata" if single else f"[{i}].metadata", f"cannot be stored ({exc})") from None
        if len(value) > max_bytes:
            what = "the feedback" if single else f"feedback [{i}]"
            raise HTTPException(413, f"{what} is {len(value)} bytes as an event; events larger than {max_bytes} bytes "
                                     "(TOLLGATE_INGEST_MAX_EVENT_BYTES) are not accepted")
        values.append(value)
    return values


@router.post("/feedback", response_model=FeedbackResponse, summary="Create new feedback (one FeedbackRequest or an array)",
             openapi_extra=_CREATE_BODY)
def create_feedback(
    request: Request,
    payload: Any = Body(..., description="A FeedbackRequest, or an array of them."),
    principal: Principal = Depends(require("feedback.write")),
) -> dict:
    settings = request.app.state.settings
    single = isinstance(payload, dict)
    if not single and not isinstance(payload, list):
        raise invalid("body", "must be a FeedbackRequest object or an array of them", kind="model_type")
    items = [payload] if single else payload
    if not items:
        raise invalid("body", "the array holds no feedback", kind="too_short")
    if len(items) > settings.feedback_max_items:
        raise HTTPException(413, f"{len(items)} feedback items in one request; at most {settings.feedback_max_items} (TOLLGATE_FEEDBACK_MAX_ITEMS)")
    errors: list[dict] = []
    parsed = [validate_item(FeedbackRequest, item, errors, None if single else i) for i, item in enumerate(items)]
    if errors:
        raise RequestValidationError(errors)
    created_at = _iso(datetime.now(UTC))
    events = []
    for fb in parsed:
        # The key's workspace, the default one for an organisation key (as custom logs):
        # feedback counts for the requests of its trace in that workspace.
        event = {"id": str(uuid.uuid4()), "organisation_id": principal.organisation_id,
                 "workspace_slug": principal.workspace_slug or settings.default_workspace, "created_at": created_at,
                 "trace_id": fb.trace_id, "value": fb.value, "weight": fb.weight}
        if fb.metadata is not None:
            event["metadata"] = fb.metadata
        events.append(event)
    values = _encode(events, settings.ingest_max_event_bytes, single)
    key = events[0]["id"].encode()  # one key: the request's events go to one partition, in one batch
    request.app.state.publisher.publish(settings.topic_feedback, values, [key] * len(values))
    _published.add(events, values)
    ids = [e["id"] for e in events]
    return {"status": "success", "message": f"{len(ids)} feedback saved", "feedback_ids": ids}


@router.put("/feedback/{id}", response_model=FeedbackResponse, summary="Update existing feedback", openapi_extra=_UPDATE_BODY)
def update_feedback(
    id: str,
    request: Request,
    payload: Any = Body(..., description="A FeedbackUpdateRequest."),
    principal: Principal = Depends(require("feedback.write")),
) -> dict:
    settings = request.app.state.settings
    if len(id) > 256:
        raise invalid("id", "longer than 256 characters", loc=("path", "id"), kind="string_too_long")
    update = validate_body(FeedbackUpdateRequest, payload)
    with request.app.state.warehouse.borrow() as client:
        row = get_feedback(client, principal.scope, id)
    current = None if row is None else {
        "id": row["id"], "organisation_id": row["organisation_id"], "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]), "trace_id": row["trace_id"], "weight": row["weight"],
        "metadata": dict(zip(row["metadata.key"], row["metadata.value"])), "workspace_slug": row["workspace_slug"],
    }
    published = _published.get(principal, id)
    if published is not None and (current is None or _version_ms(published) > _version_ms(current)):
        current = published  # this process's newer version, not ingested yet
    if current is None:
        raise HTTPException(404, f"feedback {id} not found")
    event = {
        "id": current["id"], "organisation_id": current["organisation_id"], "created_at": current["created_at"],
        "updated_at": _later_than(datetime.fromisoformat(current.get("updated_at") or current["created_at"])),
        "trace_id": current["trace_id"], "value": update.value,
        "weight": current.get("weight", 1.0) if update.weight is None else update.weight,
        "metadata": (current.get("metadata") or {}) if update.metadata is None else update.metadata,
    }
    if current.get("workspace_slug"):
        event["workspace_slug"] = current["workspace_slug"]
    values = _encode([event], settings.ingest_max_event_bytes, True)
    request.app.state.publisher.publish(settings.topic_feedback, values, [event["id"].encode()])
    _published.add([event], values)
    return {"status": "success", "message": "feedback updated", "feedback_ids": [event["id"]]}
