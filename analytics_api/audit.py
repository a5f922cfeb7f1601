"""The audit trail: one record per mutating API request (docs/api.md, "Audit trail").

Which requests: every POST, PUT, PATCH and DELETE under ``/v1``, whatever its
outcome (401, 403, 404, 422 and 5xx included), except ``POST /v1/logs``, which is
bulk data ingestion, not a change to the account.

The guarantee, a mutating request never succeeds without its audit record:

1. Before the handler runs, a ``pending`` record (no status yet) is published to
   the audit topic with acks=all. If Kafka does not take it, the answer is 503 and
   the handler never runs.
2. When the application starts its response, the ``final`` record (same
   ``request_id``, the status) is published before the status line is sent. If that
   publish fails, the response goes out anyway (the change is already made) and the
   pending record stays as evidence; in ``audit_logs`` it reads as status 0.

Secrets never enter a record: headers, query parameters and JSON fields whose name
contains key, secret, token, password, authorization, cookie or credential are
masked, and so is anything that looks like a Tollgate API key in any other string.
Response bodies (where generated keys are shown) are never recorded.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from analytics_api.auth import HEADER, Principal
from analytics_api.geoip import CountryLookup, country_lookup
from analytics_api.observe import REQUEST_ID_SCOPE_KEY
from tollgate.settings import Settings

log = logging.getLogger(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NOT_AUDITED = frozenset({("POST", "/v1/logs")})
METHOD_ACTION = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}

# (method, path under /v1 with {placeholders}, resource_type, action); the first match wins.
# A mutating path not listed here is still audited, as resource "unknown".
ROUTES: tuple[tuple[str, str, str, str], ...] = (
    ("POST", "/feedback", "feedback", "create"),
    ("PUT", "/feedback/{id}", "feedback", "update"),
    ("POST", "/api-keys/{id}/rotate", "api_key", "rotate"),
    ("POST", "/api-keys", "api_key", "create"),
    ("POST", "/api-keys/{type}/{sub_type}", "api_key", "create"),
    ("PUT", "/api-keys/{id}", "api_key", "update"),
    ("DELETE", "/api-keys/{id}", "api_key", "delete"),
    ("POST", "/logs/exports/schedules", "log_export_schedule", "create"),
    ("PUT", "/logs/exports/schedules/{id}", "log_export_schedule", "update"),
    ("DELETE", "/logs/exports/schedules/{id}", "log_export_schedule", "delete"),
    ("POST", "/logs/exports/schedules/{id}/pause", "log_export_schedule", "pause"),
    ("POST", "/logs/exports/schedules/{id}/resume", "log_export_schedule", "resume"),
    ("POST", "/logs/exports/schedules/{id}/backfill", "log_export_schedule", "backfill"),
    ("POST", "/logs/exports", "log_export", "create"),
    ("PUT", "/logs/exports/{id}", "log_export", "update"),
    ("POST", "/logs/exports/{id}/start", "log_export", "start"),
    ("POST", "/logs/exports/{id}/cancel", "log_export", "cancel"),
    ("POST", "/policies/usage-limits", "usage_limits_policy", "create"),
    ("PUT", "/policies/usage-limits/{id}", "usage_limits_policy", "update"),
    ("DELETE", "/policies/usage-limits/{id}", "usage_limits_policy", "delete"),
    ("PUT", "/policies/usage-limits/{id}/entities/{entity}/reset", "usage_limits_policy", "reset"),
    ("POST", "/policies/rate-limits", "rate_limits_policy", "create"),
    ("PUT", "/policies/rate-limits/{id}", "rate_limits_policy", "update"),
    ("DELETE", "/policies/rate-limits/{id}", "rate_limits_policy", "delete"),
)
_COMPILED = [
    (method, re.compile("/v1" + re.sub(r"\{\w+\}", "[^/]+", path)), resource, action)
    for method, path, resource, action in ROUTES
]


def classify(method: str, path: str) -> tuple[str, str]:
    """(resource_type, action) of a mutating request."""
    path = path.rstrip("/") or "/"
    for m, pattern, resource, action in _COMPILED:
        if m == method and pattern.fullmatch(path):
            return resource, action
    return "unknown", METHOD_ACTION[method]


def is_audited(method: str, path: str) -> bool:
    return (
        method in AUDITED_METHODS
        and (path == "/v1" or path.startswith("/v1/"))
        and (method, path.rstrip("/")) not in NOT_AUDITED
    )


# --------------------------------------------------------------------------- masking

SECRET_NAME = re.compile(r"key|secret|token|password|passwd|authorization|cookie|credential", re.IGNORECASE)
API_KEY_TEXT = re.compile(r"tg-[0-9a-fA-F]{48}")
MASK = "[masked]"
MAX_BODY = 64 * 1024  # larger bodies are recorded by size only
MAX_TEXT = 4096  # longest header value, query value or URI kept


def scrub(text: str, limit: int = MAX_TEXT) -> str:
    text = API_KEY_TEXT.sub(MASK, text)
    return text if len(text) <= limit else text[:limit] + "…[truncated]"


def mask(value):
    """A JSON value with secret-named fields masked and API keys removed from strings."""
    if isinstance(value, dict):
        return {scrub(k, MAX_BODY): MASK if SECRET_NAME.search(k) else mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, str):
        return scrub(value, MAX_BODY)
    return value


def _masked_pairs(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Name → value (repeated names joined by ", "), secret-named values masked."""
    out: dict[str, str] = {}
    for name, value in pairs:
        value = MASK if SECRET_NAME.search(name) else scrub(value)
        name = scrub(name)
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def masked_headers(scope: Scope) -> dict[str, str]:
    return _masked_pairs([(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]])


def masked_query(scope: Scope) -> dict[str, str]:
    return _masked_pairs(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))


def masked_body(body: bytes):
    """The request body as a JSON value for the record (None: no body)."""
    if not body:
        return None
    if len(body) > MAX_BODY:
        return f"[{len(body)} bytes, larger than {MAX_BODY}: not recorded]"
    try:
        return mask(orjson.loads(body))
    except (orjson.JSONDecodeError, RecursionError):
        return f"[{len(body)} bytes, not JSON: not recorded]"


# --------------------------------------------------------------------------- client address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str | None):
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str:
    """The client's address. X-Forwarded-For counts only when the peer is a trusted proxy:
    then the rightmost hop that is not a trusted proxy is the client (hops left of it
    could be forged by the client itself)."""
    addr = _ip(peer)
    if addr is None or not any(addr in net for net in trusted):
        return peer or ""
    for hop in reversed((forwarded_for or "").split(",")):
        hop_addr = _ip(hop)
        if hop_addr is None:
            break
        addr = hop_addr
        if not any(addr in net for net in trusted):
            break
    return str(addr)


# --------------------------------------------------------------------------- middleware


def _now_iso() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class AuditMiddleware:
    """Pure ASGI middleware; inside Starlette's error middleware, so it sees unhandled errors."""

    def __init__(self, app: ASGIApp, settings: Settings, countries: CountryLookup):
        self.app = app
        self.topic = settings.topic_audit
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in settings.trusted_proxies]
        self.countries = countries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_audited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        body, receive = await _buffer_body(receive)
        # The request's id (analytics_api/observe.py, which echoes it) when the server made it; a client's own
        # x-request-id is not unique enough to key an audit record, so that request's record gets its own.
        request_id, ours = scope.get(REQUEST_ID_SCOPE_KEY, (None, False))
        if not ours:
            request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        record = await run_in_threadpool(self._record, scope, body, request_id, state)
        try:
            await run_in_threadpool(self._publish, state, record)
        except HTTPException:
            response = JSONResponse(
                {"detail": "the audit trail (Kafka) is unavailable, so the request was not carried out; retry later"},
                status_code=503,
            )
            await response(scope, receive, send)
            return

        finished = False

        async def finish(status: int) -> None:
            nonlocal finished
            finished = True
            try:
                await run_in_threadpool(self._publish, state, {**record, "phase": "final", "response_status_code": status})
            except HTTPException:
                log.error("audit record of request %s has no final status (Kafka unavailable); its pending record stands",
                          request_id)

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start" and not finished:
                await finish(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            if not finished:
                await finish(500)
            raise

    def _record(self, scope: Scope, body: bytes, request_id: str, state) -> dict:
        headers = masked_headers(scope)
        # The first key header, as the routes' authentication reads it (Headers.get): with two, the
        # record must name the key that acted, not the other one.
        principal = _principal(state, Headers(scope=scope).get(HEADER))
        resource_type, action = classify(scope["method"], scope["path"])
        peer = (scope.get("client") or ("", 0))[0]
        ip = client_ip(peer, headers.get("x-forwarded-for"), self.trusted)
        return {
            "request_id": request_id,
            "phase": "pending",
            "timestamp": _now_iso(),
            "method": scope["method"],
            "uri": scrub(scope["path"]),
            "query_params": masked_query(scope),
            "request_headers": headers,
            "request_body": masked_body(body),
            "user_id": principal.key_id if principal else "",
            "user_type": "api_key" if principal else "",
            "organisation_id": principal.organisation_id if principal else "",
            "workspace_id": (principal.workspace_slug or "") if principal else "",
            "response_status_code": 0,
            "resource_type": resource_type,
            "action": action,
            "client_ip": ip,
            "country": self.countries.country(ip),
        }

    def _publish(self, state, record: dict) -> None:
        state.publisher.publish(self.topic, [orjson.dumps(record)], [record["request_id"].encode()])


def _principal(state, key: str | None) -> Principal | None:
    """Who sent the request, for the record (the route's own auth decides what it may do)."""
    if not key:
        return None
    try:
        return state.keys.verify(key)
    except Exception:  # warehouse trouble: the route answers it; the record names no one
        log.exception("could not verify the API key for the audit record")
        return None


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body; return it and a receive that replays it to the app."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app will see that too
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def install(app: FastAPI, settings: Settings) -> None:
    """Audit the app's mutating requests (the GeoIP database is opened now, so a bad path fails at start-up)."""
    app.add_middleware(AuditMiddleware, settings=settings, countries=country_lookup(settings.geoip_db))
