"""Wire formats → rows.

Each topic carries JSON values (documented in docs/events.md). A typed msgspec
decode validates an event in C (about 2 µs for a 1.5 KB gateway log, because the
request/response bodies are kept as raw JSON, never turned into Python objects);
the few rules a type cannot express are checked after it. Anything wrong raises
:class:`InvalidEvent` with a reason that names the field; the caller dead-letters it.

A codec turns a list of valid events into one Arrow table for one insert.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Callable, Iterator, Literal

import msgspec
import orjson

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MIN_TS = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TS = datetime(2200, 1, 1, tzinfo=UTC)
_UINT32_MAX = 4_294_967_295

NonNeg = Annotated[int, msgspec.Meta(ge=0, le=4_294_967_295)]
# A request's cost in cents: at most 10^12 ($10 billion), far beyond any real request, so that sums over
# millions of requests stay exact integers of cents in analytics (Int64) instead of overflowing.
Cost = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]
Status = Annotated[int, msgspec.Meta(ge=100, le=599)]
Units = Annotated[float, msgspec.Meta(ge=0, le=4_294_967_295)]


class InvalidEvent(ValueError):
    """An event that can never be stored; ``reason`` says why, naming the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- gateway logs


class AnalyticsMetrics(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    id: str | None = None  # the event's id only without `_id` and `id` (then held to 1–256 characters)
    organisation_id: str | None = None
    organisation_name: Short | None = None
    prompt_id: Short | None = None
    prompt_version_id: Short | None = None
    config_id: Short | None = None
    created_at: datetime | None = None
    is_success: bool | None = None
    ai_org: Short | None = None
    ai_model: Short | None = None
    req_units: Units | None = None
    res_units: Units | None = None
    total_units: Units | None = None
    cost: Cost | None = None
    cost_currency: Short | None = None
    request_url: str | None = None
    request_method: Short | None = None
    response_status_code: Status | None = None
    response_time: NonNeg | None = None
    is_proxy_call: bool | None = None
    cache_status: Short | None = None
    cache_type: Short | None = None
    stream_mode: Annotated[int, msgspec.Meta(ge=0, le=1)] | None = None
    retry_success_count: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    trace_id: Short | None = None
    span_id: Short | None = None
    span_name: Short | None = None
    parent_span_id: Short | None = None
    mode: Short | None = None
    virtual_key: Short | None = None
    source: Short | None = None
    runtime: Short | None = None
    runtime_version: Short | None = None
    sdk_version: Short | None = None
    config: Short | None = None
    internal_trace_id: Short | None = None
    last_used_option_index: Annotated[int, msgspec.Meta(ge=-1, le=2_147_483_647)] | None = None
    config_version_id: Short | None = None
    prompt_slug: Short | None = None
    workspace_slug: Short | None = None
    log_store_file_path_format: Short | None = None
    metadata_key: list[str | None] | None = msgspec.field(default=None, name="metadata.key")
    metadata_value: list[str | None] | None = msgspec.field(default=None, name="metadata.value")
    metadata: dict[str, str | None] | None = None
    api_key_id: Short | None = None
    request_parsing_time: NonNeg | None = None
    pre_processing_time: NonNeg | None = None
    cache_processing_time: NonNeg | None = None
    response_parsing_time: NonNeg | None = None
    gateway_processing_time: NonNeg | None = None
    upstream_response_time: NonNeg | None = None
    pricing_status: Short | None = None  # Tollgate's: how a custom log's cost came about (not in the spec)


_RAW_EMPTY = msgspec.Raw(b"")


class LogRequest(msgspec.Struct, gc=False):
    url: str
    method: Short = ""
    headers: msgspec.Raw = _RAW_EMPTY
    body: msgspec.Raw = _RAW_EMPTY
    portkeyHeaders: msgspec.Raw = _RAW_EMPTY


class LogResponse(msgspec.Struct, gc=False):
    status: Status
    responseTime: NonNeg | None = None
    lastUsedOptionJsonPath: Short = ""
    headers: msgspec.Raw = _RAW_EMPTY
    body: msgspec.Raw = _RAW_EMPTY


class GatewayLog(msgspec.Struct, gc=False):
    created_at: str  # parsed by _timestamp
    organisation_id: Id
    request: LogRequest
    response: LogResponse
    metrics: AnalyticsMetrics = msgspec.field(default_factory=AnalyticsMetrics)
    underscore_id: Id | None = msgspec.field(default=None, name="_id")
    id: Id | None = None
    finalUntransformedRequest: msgspec.Raw = _RAW_EMPTY
    originalResponse: msgspec.Raw = _RAW_EMPTY
    transformedRequest: msgspec.Raw = _RAW_EMPTY


def _utc(ts: datetime, field: str) -> datetime:
    try:
        utc = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before datetime.min in UTC
        raise InvalidEvent(f"`{field}` {ts.isoformat()} is outside 1970..2200") from None
    if not _MIN_TS <= utc < _MAX_TS:
        raise InvalidEvent(f"`{field}` {utc.isoformat()} is outside 1970..2200")
    return utc


def _require_utf8(value: bytes) -> None:
    """JSON text is UTF-8 (RFC 8259). msgspec raises UnicodeDecodeError for bad bytes inside
    strings, and keeps bad bytes inside raw request/response bodies, which would then be
    stored and served as invalid JSON; reject both here."""
    if value.isascii():  # the common case, checked without decoding
        return
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _decode(decoder: msgspec.json.Decoder, value: bytes, what: str) -> Any:
    """The typed event, or InvalidEvent naming what is wrong."""
    _require_utf8(value)
    try:
        return decoder.decode(value)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"invalid JSON: {exc}") from None
    except RecursionError:  # msgspec recurses into nested arrays and objects, raw bodies included
        raise InvalidEvent("invalid JSON: nested too deeply") from None


# Digits past the microsecond: msgspec would round them (…59.9999996 to the next second, possibly
# the next day), where the stored milliseconds are documented as truncated.
_DIGITS = frozenset("0123456789")
_PAST_MICROSECONDS = re.compile(r"(\.[0-9]{6})[0-9]+")  # ASCII digits only, as RFC 3339 (`\d` is any Unicode digit)


def _timestamp(text: str, field: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime in 1970..2200 (naive text is UTC)."""
    dot = text.find(".")
    if dot != -1 and text[dot + 7:dot + 8] in _DIGITS:
        text = _PAST_MICROSECONDS.sub(r"\1", text, count=1)
    try:
        ts = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        raise InvalidEvent(f"`{field}` must be an RFC 3339 timestamp, got {text[:64]!r}") from None
    return _utc(ts, field)


def _epoch_seconds(ts: datetime) -> float:
    """Seconds with exactly three decimals (ms precision): the shortest repr of a float
    below 2**53 / 1000 is that decimal, and ClickHouse parses the text, so it is exact."""
    return ((ts - _EPOCH) // _MS) / 1000


def _text(raw: msgspec.Raw) -> msgspec.Raw | str:
    """A raw JSON value for a String column holding JSON text.

    Objects and arrays are embedded as they are (ClickHouse reads them as their own
    text); other values go as a JSON string of their text; null and absent are "".
    """
    if not raw:
        return ""
    first = raw[:1] if isinstance(raw, bytes) else bytes(memoryview(raw)[:1])
    if first in (b"{", b"["):
        return raw
    text = bytes(raw).decode()
    return "" if text == "null" else text


def _check_object(raw: msgspec.Raw, field: str) -> None:
    if raw and bytes(memoryview(raw)[:1]) != b"{" and bytes(raw) != b"null":
        raise InvalidEvent(f"`{field}` must be a JSON object")


def _metadata(m: AnalyticsMetrics) -> tuple[list[str], list[str]]:
    if m.metadata is not None:
        if m.metadata_key is not None or m.metadata_value is not None:
            raise InvalidEvent("give metadata either as `metrics.metadata` or as `metrics.metadata.key`/`.value`, not both")
        return list(m.metadata.keys()), [v if v is not None else "" for v in m.metadata.values()]
    keys = m.metadata_key or []
    values = m.metadata_value or []
    if len(keys) != len(values):
        raise InvalidEvent(
            f"`metrics.metadata.key` has {len(keys)} items but `metrics.metadata.value` has {len(values)}"
        )
    if None in keys or "" in keys:
        raise InvalidEvent("`metrics.metadata.key` items must be non-empty strings")
    return keys, [v if v is not None else "" for v in values]  # type: ignore[misc]


_gateway_decoder = msgspec.json.Decoder(GatewayLog)


def decode_gateway_log(value: bytes) -> tuple:
    """Validate one gateway log event and return its generation row (GENERATION_COLUMNS order)."""
    ev = _decode(_gateway_decoder, value, "gateway log")
    m = ev.metrics
    log_id = ev.underscore_id or ev.id or m.id
    if not log_id:
        raise InvalidEvent("missing required field `_id`")
    if len(log_id) > 256:  # from `metrics.id`: `_id` and `id` are checked by their type
        raise InvalidEvent("`metrics.id` (the event's id) is longer than 256 characters")
    if m.organisation_id and m.organisation_id != ev.organisation_id:
        raise InvalidEvent("`metrics.organisation_id` differs from `organisation_id`")
    created = _timestamp(ev.created_at, "created_at")
    for name in ("headers", "portkeyHeaders"):  # the body is any JSON
        _check_object(getattr(ev.request, name), f"request.{name}")
    _check_object(ev.response.headers, "response.headers")
    status = m.response_status_code if m.response_status_code is not None else ev.response.status
    keys, values = _metadata(m)
    req_units = int(m.req_units or 0)
    res_units = int(m.res_units or 0)
    total_units = int(m.total_units) if m.total_units is not None else req_units + res_units
    if total_units > _UINT32_MAX:  # only possible when computed; the column is UInt32
        raise InvalidEvent(f"`metrics.total_units` (req_units + res_units = {total_units}) exceeds {_UINT32_MAX}")
    debug: msgspec.Raw | str = ""
    if ev.finalUntransformedRequest or ev.originalResponse or ev.transformedRequest:
        parts = {
            k: getattr(ev, k)
            for k in ("finalUntransformedRequest", "originalResponse", "transformedRequest")
            if bytes(getattr(ev, k)) not in (b"", b"null")
        }
        debug = msgspec.Raw(msgspec.json.encode(parts)) if parts else ""
    response_time = m.response_time if m.response_time is not None else (ev.response.responseTime or 0)
    return (
        log_id,
        ev.organisation_id,
        m.workspace_slug or "",
        _epoch_seconds(created),
        m.organisation_name or "",
        m.prompt_id or "",
        m.prompt_version_id or "",
        m.prompt_slug or "",
        m.config_id or "",
        m.config or "",
        m.config_version_id or "",
        m.is_success if m.is_success is not None else 200 <= status < 300,
        m.ai_org or "",
        m.ai_model or "",
        req_units,
        res_units,
        total_units,
        m.cost,
        m.cost_currency or "USD",
        m.request_url or ev.request.url,
        m.request_method or ev.request.method,
        status,
        response_time,
        bool(m.is_proxy_call),
        m.cache_status,
        m.cache_type,
        m.stream_mode,
        m.retry_success_count or 0,
        m.trace_id or "",
        m.span_id or "",
        m.span_name or "",
        m.parent_span_id or "",
        m.mode or "",
        m.virtual_key or "",
        m.source or "",
        m.runtime or "",
        m.runtime_version or "",
        m.sdk_version or "",
        m.internal_trace_id or "",
        m.last_used_option_index or 0,
        m.log_store_file_path_format or "",
        keys,
        values,
        m.api_key_id or "",
        m.request_parsing_time or 0,
        m.pre_processing_time or 0,
        m.cache_processing_time or 0,
        m.response_parsing_time or 0,
        m.gateway_processing_time or 0,
        m.upstream_response_time or 0,
        _text(ev.request.headers),
        _text(ev.request.body),
        _text(ev.request.portkeyHeaders),
        _text(ev.response.headers),
        _text(ev.response.body),
        ev.response.lastUsedOptionJsonPath,
        debug,
        m.pricing_status or "",
    )


GENERATION_COLUMNS = [
    "id", "organisation_id", "workspace_slug", "created_at", "organisation_name", "prompt_id", "prompt_version_id",
    "prompt_slug", "config_id", "config", "config_version_id", "is_success", "ai_org", "ai_model", "req_units",
    "res_units", "total_units", "cost", "cost_currency", "request_url", "request_method", "response_status_code",
    "response_time", "is_proxy_call", "cache_status", "cache_type", "stream_mode", "retry_success_count", "trace_id",
    "span_id", "span_name", "parent_span_id", "mode", "virtual_key", "source", "runtime", "runtime_version",
    "sdk_version", "internal_trace_id", "last_used_option_index", "log_store_file_path_format", "metadata.key",
    "metadata.value", "api_key_id", "request_parsing_time", "pre_processing_time", "cache_processing_time",
    "response_parsing_time", "gateway_processing_time", "upstream_response_time", "request_headers", "request_body",
    "request_portkey_headers", "response_headers", "response_body", "response_last_used_option_json_path",
    "debug_payloads", "pricing_status",
]


# --------------------------------------------------------------------------- feedback


class FeedbackEvent(msgspec.Struct):
    id: Id
    organisation_id: Id
    created_at: str  # parsed by _timestamp
    trace_id: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    value: Annotated[int, msgspec.Meta(ge=-10, le=10)]
    weight: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    metadata: dict[str, Any] | None = None
    workspace_slug: Short | None = None
    updated_at: str | None = None


_feedback_decoder = msgspec.json.Decoder(FeedbackEvent)


def json_text(v: Any) -> str:
    """A metadata value as text: a string as it is, anything else as its JSON text. One encoding for
    every path that stores or matches metadata (feedback, custom logs, the analytics and export
    filters), so that a value is stored and filtered as the same text (1e20 is `1e+20` everywhere)."""
    if isinstance(v, str):
        return v
    try:
        return orjson.dumps(v).decode()
    except TypeError:  # orjson rejects integers beyond 64 bits, which JSON (and msgspec) allow
        return msgspec.json.encode(v).decode()


def decode_feedback(value: bytes) -> tuple:
    ev = _decode(_feedback_decoder, value, "feedback")
    created = _timestamp(ev.created_at, "created_at")
    updated = _timestamp(ev.updated_at, "updated_at") if ev.updated_at is not None else created
    meta = ev.metadata or {}
    return (
        ev.id,
        ev.organisation_id,
        ev.workspace_slug or "",
        ev.trace_id,
        ev.value,
        float(ev.weight),
        list(meta.keys()),
        [json_text(v) for v in meta.values()],
        _epoch_seconds(created),
        _epoch_seconds(updated),
    )


FEEDBACK_COLUMNS = [
    "id", "organisation_id", "workspace_slug", "trace_id", "value", "weight", "metadata.key", "metadata.value",
    "created_at", "updated_at",
]


# --------------------------------------------------------------------------- audit records

_PHASE_VERSION = {"pending": 1, "final": 2}


class AuditEvent(msgspec.Struct):
    """One audit record (analytics_api/audit.py produces them; docs/events.md).

    Secrets are masked by the producer; ingest stores what it gets.
    """

    request_id: Id
    phase: Literal["pending", "final"]
    timestamp: str  # parsed by _timestamp
    method: Literal["POST", "PUT", "PATCH", "DELETE"]
    uri: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    organisation_id: Short = ""  # empty: the request had no valid key
    workspace_id: Short = ""
    query_params: msgspec.Raw = _RAW_EMPTY  # object
    request_headers: msgspec.Raw = _RAW_EMPTY  # object
    request_body: msgspec.Raw = _RAW_EMPTY  # any JSON
    user_id: Short = ""
    user_type: Literal["", "api_key", "user"] = ""
    response_status_code: Annotated[int, msgspec.Meta(ge=0, le=599)] = 0
    resource_type: Short = ""
    action: Short = ""
    client_ip: Short = ""
    country: Short = ""


_audit_decoder = msgspec.json.Decoder(AuditEvent)


def decode_audit(value: bytes) -> tuple:
    ev = _decode(_audit_decoder, value, "audit record")
    if ev.phase == "pending" and ev.response_status_code != 0:
        raise InvalidEvent("a `pending` audit record has `response_status_code` 0 (its outcome is not known yet)")
    if ev.phase == "final" and ev.response_status_code < 100:
        raise InvalidEvent("a `final` audit record needs `response_status_code` 100..599")
    _check_object(ev.query_params, "query_params")
    _check_object(ev.request_headers, "request_headers")
    return (
        ev.request_id,
        _PHASE_VERSION[ev.phase],
        _epoch_seconds(_timestamp(ev.timestamp, "timestamp")),
        ev.organisation_id,
        ev.workspace_id,
        ev.method,
        ev.uri,
        _text(ev.query_params),
        _text(ev.request_headers),
        _text(ev.request_body),
        ev.user_id,
        ev.user_type,
        ev.response_status_code,
        ev.resource_type,
        ev.action,
        ev.client_ip,
        ev.country,
    )


AUDIT_COLUMNS = [
    "request_id", "version", "timestamp", "organisation_id", "workspace_id", "method", "uri", "query_params",
    "request_headers", "request_body", "user_id", "user_type", "response_status_code", "resource_type", "action",
    "client_ip", "country",
]


# --------------------------------------------------------------------------- codecs

_row_encoder = msgspec.json.Encoder()


# (organisation_id, workspace_slug, key, value) → the latest created_at (epoch seconds) of a
# batch's requests that carry that metadata pair: what ``metadata_values`` (0023) stores.
MetadataValues = dict[tuple[str, str, str, str], float]


class BatchTraces:
    """Of a batch of gateway logs, what the copy of its requests whose trace has feedback needs
    (``feedback_generations``, 0025; ingest/sink.py): its organisations, its first and last
    ``created_at`` (epoch milliseconds) and its non-empty trace ids."""

    __slots__ = ("orgs", "first_ms", "last_ms", "trace_ids")

    def __init__(self) -> None:
        self.orgs: set[str] = set()
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self.trace_ids: set[str] = set()

    def add(self, org: str, created: float, trace_id: str) -> None:
        if not trace_id:  # a feedback's trace id is never empty: such a request never has feedback
            return
        ms = round(created * 1000)
        self.orgs.add(org)
        self.trace_ids.add(trace_id)
        self.first_ms = ms if self.first_ms is None else min(self.first_ms, ms)
        self.last_ms = ms if self.last_ms is None else max(self.last_ms, ms)


class Codec:
    """How one topic's events become rows of one table.

    ``encode`` validates an event and returns its row as one JSONCompactEachRow line
    (a JSON array in ``columns`` order). A batch is those lines, streamed to
    ClickHouse, which parses them itself, off the GIL. Encoding happens per event, so a
    value that cannot be encoded is an invalid event, never a failed batch.

    The codec of ``generations`` also collects, while encoding, the metadata pairs of its
    rows, which the sink stores before the rows, and their traces (:class:`BatchTraces`),
    whose requests with feedback the sink copies after them (ingest/sink.py).
    """

    def __init__(self, table: str, columns: list[str], decode: Callable[[bytes], tuple]):
        self.table = table
        self.columns = columns
        self.decode = decode
        self._pair_at = tuple(columns.index(c) for c in (
            "organisation_id", "workspace_slug", "metadata.key", "metadata.value", "created_at")) if table == "generations" else None
        self._trace_at = tuple(columns.index(c) for c in (
            "organisation_id", "created_at", "trace_id")) if table == "generations" else None

    @property
    def collects_metadata_values(self) -> bool:
        return self._pair_at is not None

    def encode(self, value: bytes, metadata_values: MetadataValues | None = None, traces: BatchTraces | None = None) -> bytes:
        """The event's row; its metadata pairs are added to ``metadata_values``, its trace to
        ``traces``, when given."""
        row = self.decode(value)
        try:
            line = _row_encoder.encode(row)
        except (UnicodeEncodeError, OverflowError, TypeError) as exc:
            raise InvalidEvent(f"cannot store the event: {exc}") from None
        if metadata_values is not None and self._pair_at is not None:
            self._add_pairs(metadata_values, row)
        if traces is not None and self._trace_at is not None:
            self._add_trace(traces, row)
        return line

    def _add_trace(self, traces: BatchTraces, row) -> None:
        org_at, created_at, trace_at = self._trace_at
        traces.add(row[org_at], row[created_at], row[trace_at])

    def traces_of(self, rows) -> BatchTraces:
        """The traces of encoded rows, for writers that did not collect them while encoding
        (parses every row whole; see :meth:`metadata_values_of`)."""
        traces = BatchTraces()
        if self._trace_at is not None:
            for row in rows:
                self._add_trace(traces, orjson.loads(row))
        return traces

    def _add_pairs(self, found: MetadataValues, row) -> None:
        org_at, ws_at, keys_at, values_at, created_at = self._pair_at
        keys = row[keys_at]
        if not keys:
            return
        org, ws, created = row[org_at], row[ws_at], row[created_at]
        for key, value in zip(keys, row[values_at]):
            pair = (org, ws, key, value)
            seen = found.get(pair)
            if seen is None or seen < created:
                found[pair] = created

    def metadata_values_of(self, rows: list[bytes]) -> MetadataValues:
        """The metadata pairs of encoded rows, for writers that did not collect them while
        encoding: parses every row (~2 µs each), each whole, since a raw JSON body is kept
        as sent and may span lines."""
        found: MetadataValues = {}
        if self._pair_at is None:
            return found
        for row in rows:
            self._add_pairs(found, orjson.loads(row))
        return found

    @staticmethod
    def chunks(rows: list[bytes], size: int = 2000) -> Iterator[bytes]:
        """The batch as newline-terminated chunks of ``size`` rows: streamed, never one big copy."""
        for start in range(0, len(rows), size):
            yield b"\n".join(rows[start:start + size]) + b"\n"


GENERATIONS = Codec("generations", GENERATION_COLUMNS, decode_gateway_log)
FEEDBACK = Codec("feedback", FEEDBACK_COLUMNS, decode_feedback)
AUDIT = Codec("audit_logs", AUDIT_COLUMNS, decode_audit)
