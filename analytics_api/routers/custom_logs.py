"""POST /v1/logs: custom logs (one spec CustomLog or an array) into the gateway-log topic.

Each log is normalized into a gateway-log event (:mod:`ingest.normalize`), checked
with the decoder ingest uses (so an accepted log is never dead-lettered later), and
all of them are produced under one Kafka key (one partition) with acks=all before
the answer. The answer is ``{"status": "success", "message": …, "log_ids": […]}``,
ids in input order; Kafka unavailable is a 503 and nothing is accepted.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from analytics_api.auth import Principal, require
from ingest import normalize
from ingest.events import InvalidEvent, decode_gateway_log
from ingest.pricing import PricingTable
from tollgate.settings import Settings

router = APIRouter(tags=["Logs"])


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is {declared} bytes; the limit is {limit} (TOLLGATE_LOGS_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body exceeds the limit of {limit} bytes (TOLLGATE_LOGS_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def _events(body: bytes, settings: Settings, principal: Principal) -> tuple[list[str], list[bytes]]:
    """(log ids, encoded gateway-log events) for a request body; HTTPException for bad input."""
    try:
        logs = normalize.decode(body)
    except normalize.InvalidLog as exc:
        raise HTTPException(422, str(exc)) from None
    single = not body.lstrip().startswith(b"[")
    if not logs:
        raise HTTPException(422, "the array of logs is empty")
    if len(logs) > settings.logs_max_items:
        raise HTTPException(413, f"{len(logs)} logs in one request; the limit is {settings.logs_max_items} (TOLLGATE_LOGS_MAX_ITEMS)")
    pricing = PricingTable.load()
    created_at = datetime.now(UTC)
    workspace = principal.workspace_slug or settings.default_workspace
    ids: list[str] = []
    events: list[bytes] = []
    for i, log in enumerate(logs):
        where = "$" if single else f"$[{i}]"
        log_id = str(uuid.uuid4())
        try:
            event = normalize.to_gateway_log(
                log, log_id=log_id, created_at=created_at, organisation_id=principal.organisation_id,
                workspace_slug=workspace, api_key_id=principal.key_id, pricing=pricing, where=where,
            )
            value = msgspec.json.encode(event)
            if len(value) > settings.ingest_max_event_bytes:
                raise HTTPException(413, f"log `{where}` is {len(value)} bytes once normalized; the limit is "
                                         f"{settings.ingest_max_event_bytes} (TOLLGATE_INGEST_MAX_EVENT_BYTES)")
            decode_gateway_log(value)  # exactly what ingest will check
        except normalize.InvalidLog as exc:
            raise HTTPException(422, str(exc)) from None
        except InvalidEvent as exc:
            raise HTTPException(422, f"log `{where}` cannot be stored: {exc.reason}") from None
        ids.append(log_id)
        events.append(value)
    return ids, events


# A key verified within TOLLGATE_AUTH_CACHE_SECONDS is checked on the event loop (require()); the
# hop to a worker thread saved was about a fifth of a single-log request's cost (benchmarks/api_ingest.py).
logs_writer = require("logs.write")


@router.post("/logs", summary="Insert new logs")
async def create_logs(request: Request, principal: Principal = Depends(logs_writer)) -> Response:
    settings: Settings = request.app.state.settings
    body = await _read_body(request, settings.logs_max_body_bytes)

    def accept() -> list[str]:
        ids, events = _events(body, settings, principal)
        key = ids[0].encode()  # one key: the request's events share a partition, in order
        request.app.state.publisher.publish(settings.topic_gateway_logs, events, [key] * len(events))
        return ids

    ids = await run_in_threadpool(accept)
    answer = {"status": "success", "message": f"{len(ids)} log(s) accepted", "log_ids": ids}
    return Response(orjson.dumps(answer), media_type="application/json")
