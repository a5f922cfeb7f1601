"""Analytics query parameters → validated :class:`~warehouse.filters.Filters` and buckets.

Every malformed value is a 422 in FastAPI's own error shape, whose ``loc`` and
message name the parameter. docs/analytics.md is the contract.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from analytics_api.auth import Principal, require
from ingest.events import json_text
from warehouse.filters import LIST_FILTERS, Filters, compile_where, Where
from warehouse.queries.analytics import GRANULARITIES
from warehouse.queries.scope import TenantScope

MAX_WINDOW = timedelta(days=366)
MAX_BUCKETS = 2_000
MAX_LIST_ITEMS = 1_000
# (upper bound of the window length, granularity): the first that fits wins.
AUTO_GRANULARITY = ((timedelta(hours=2), "minute"), (timedelta(days=2), "hour"), (timedelta(days=92), "day"))

UINT64_MAX = 2**64 - 1
RANGES = {  # parameter prefix → (integer?, lowest allowed, highest allowed)
    "total_units": (True, 0, None),
    "prompt_token": (True, 0, None),
    "completion_token": (True, 0, None),
    "cost": (False, 0, None),
}


def invalid(name: str, message: str, value: object = None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": f"{name}: {message}", "input": value}])


@dataclass(frozen=True)
class Buckets:
    """Time buckets: wall-clock starts at a fixed UTC offset."""

    granularity: str
    offset_seconds: int
    starts: list[datetime]  # naive wall-clock bucket starts, first to last

    def keys(self) -> list[int]:
        """Bucket starts as epoch seconds of the wall clock (what the SQL bucket returns)."""
        return [int((s - datetime(1970, 1, 1)).total_seconds()) for s in self.starts]

    def labels(self) -> list[str]:
        sign = "-" if self.offset_seconds < 0 else "+"
        hours, minutes = divmod(abs(self.offset_seconds) // 60, 60)
        suffix = f"{sign}{hours:02d}:{minutes:02d}"
        return [s.strftime("%Y-%m-%dT%H:%M:%S.000") + suffix for s in self.starts]


@dataclass(frozen=True)
class AnalyticsQuery:
    filters: Filters
    scope: TenantScope
    where: Where
    buckets: Buckets | None  # graphs only


def _first(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def parse_time(name: str, raw: str | None) -> datetime:
    if raw is None:
        raise invalid(name, "required (ISO 8601 with a UTC offset, e.g. 2026-11-20T00:00:00+05:30)")
    text = raw
    # An unencoded '+' in a URL arrives as a space: "…T00:00:00 05:30".
    if len(text) > 6 and text[-6] == " " and text[-3] == ":":
        text = text[:-6] + "+" + text[-5:]
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(name, "not an ISO 8601 date-time", raw) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise invalid(name, "needs a UTC offset (…Z or …+05:30)", raw)
    if value.utcoffset().total_seconds() % 60:
        raise invalid(name, "the UTC offset must be whole minutes", raw)
    if not in_warehouse_range(value):
        raise invalid(name, TIME_RANGE_MESSAGE, raw)
    return value


# ClickHouse's DateTime64 holds 1900-01-01 … 2299-12-31; a day's margin keeps time-zone bucket edges inside.
TIME_MIN = datetime(1900, 1, 2, tzinfo=UTC)
TIME_MAX = datetime(2299, 12, 30, tzinfo=UTC)
TIME_RANGE_MESSAGE = "must be between 1900-01-02 and 2299-12-30 (UTC)"


def in_warehouse_range(value: datetime) -> bool:
    """Whether an aware date-time can be a ClickHouse DateTime64 (compared without converting: a year-1
    date-time with a positive offset cannot even be converted to UTC)."""
    return TIME_MIN <= value <= TIME_MAX


def parse_number(name: str, raw: str, integer: bool, low: float | None, high: float | None) -> float:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise invalid(name, "must be an integer" if integer else "must be a number", raw) from None
    if not math.isfinite(value):
        raise invalid(name, "must be finite", raw)
    if low is not None and value < low:
        raise invalid(name, f"must be ≥ {low}", raw)
    if high is not None and value > high:
        raise invalid(name, f"must be ≤ {high}", raw)
    return value


def parse_range(request: Request, prefix: str, integer: bool, low: float | None, high: float | None,
                names: tuple[str, str] | None = None) -> tuple[float | None, float | None]:
    min_name, max_name = names or (f"{prefix}_min", f"{prefix}_max")
    bounds = []
    for name in (min_name, max_name):
        raw = _first(request, name)
        bounds.append(None if raw is None else parse_number(name, raw, integer, low, high))
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise invalid(min_name, f"must not exceed {max_name}", request.query_params.get(min_name))
    if integer:  # bound as UInt64, where a larger value would wrap around; every stored count is far below
        bounds = [None if b is None else min(b, UINT64_MAX) for b in bounds]
    return bounds[0], bounds[1]


def parse_list(request: Request, name: str) -> tuple[str, ...]:
    raw = request.query_params.get(name)
    if raw is None:
        return ()
    items = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    if len(items) > MAX_LIST_ITEMS:
        raise invalid(name, f"at most {MAX_LIST_ITEMS} items", raw[:200])
    return items


def parse_metadata(raw: str | None) -> tuple[tuple[str, str], ...]:
    if raw is None or not raw.strip():
        return ()
    try:
        value = msgspec.json.decode(raw)  # integers beyond 64 bits stay integers (orjson made them floats)
    except (msgspec.DecodeError, RecursionError):
        raise invalid("metadata", "not valid JSON (expected an object like {\"_user\": \"alice\"})", raw[:200]) from None
    if not isinstance(value, dict):
        raise invalid("metadata", "must be a JSON object of key/value pairs", raw[:200])
    repeated = _repeated_key(raw)
    if repeated is not None:  # a JSON parser keeps one of the values: the filter would silently lose a pair
        raise invalid("metadata", f"the key {repeated!r} appears more than once", raw[:200])
    pairs = []
    for key, item in value.items():
        if isinstance(item, (dict, list)) or item is None:
            raise invalid("metadata", f"the value of {key!r} must be a string, number or boolean", raw[:200])
        pairs.append((key, json_text(item)))
    return tuple(pairs)


def _repeated_key(raw: str) -> str | None:
    """A key that the top-level object of this (valid) JSON text has twice, if any."""
    seen: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        nonlocal seen
        seen = [k for k, _ in items]  # the top-level object is the last one the decoder closes
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # msgspec accepted it; nothing more to learn here
        return None
    return next((k for i, k in enumerate(seen) if k in seen[:i]), None)


def parse_filters(request: Request) -> Filters:
    start = parse_time("time_of_generation_min", _first(request, "time_of_generation_min"))
    end = parse_time("time_of_generation_max", _first(request, "time_of_generation_max"))
    if start > end:
        raise invalid("time_of_generation_min", "must not be after time_of_generation_max", request.query_params.get("time_of_generation_min"))
    if end - start > MAX_WINDOW:
        raise invalid("time_of_generation_max", f"the window may span at most {MAX_WINDOW.days} days", request.query_params.get("time_of_generation_max"))

    ranges = {prefix: parse_range(request, prefix, *spec) for prefix, spec in RANGES.items()}
    weighted = parse_range(request, "weighted_feedback", False, -10, 10)
    lists = {name: parse_list(request, name) for name, _ in LIST_FILTERS}

    status_codes = []
    for item in parse_list(request, "status_code"):
        if not (item.isascii() and item.isdigit()) or not 100 <= int(item) <= 599:  # '²'.isdigit() too
            raise invalid("status_code", f"{item!r} is not an HTTP status code (100–599)", request.query_params.get("status_code"))
        status_codes.append(int(item))

    models = []
    for item in parse_list(request, "ai_org_model"):
        provider, sep, model = item.partition("__")
        if not sep or not provider or not model:
            raise invalid("ai_org_model", f"{item!r} is not provider__model", request.query_params.get("ai_org_model"))
        models.append((provider, model))

    return Filters(
        start=start, end=end, ranges=ranges, lists=lists, status_codes=tuple(status_codes),
        ai_org_models=tuple(models), metadata=parse_metadata(request.query_params.get("metadata")),
        weighted_feedback=weighted,
    )


def floor_local(ts: datetime, granularity: str) -> datetime:
    if granularity == "minute":
        return ts.replace(second=0, microsecond=0)
    if granularity == "hour":
        return ts.replace(minute=0, second=0, microsecond=0)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_start(ts: datetime, granularity: str) -> datetime:
    step = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}
    if granularity in step:
        return ts + step[granularity]
    return ts.replace(year=ts.year + ts.month // 12, month=ts.month % 12 + 1)


def make_buckets(request: Request, filters: Filters) -> Buckets:
    raw = _first(request, "granularity")
    length = filters.end - filters.start
    if raw is None:
        granularity = next((g for limit, g in AUTO_GRANULARITY if length <= limit), "week")
    elif raw in GRANULARITIES:
        granularity = raw
    else:
        raise invalid("granularity", f"must be one of {', '.join(GRANULARITIES)}", raw)
    offset = filters.start.utcoffset()
    first = floor_local(filters.start.replace(tzinfo=None), granularity)
    last = filters.end.astimezone(filters.start.tzinfo).replace(tzinfo=None)
    starts = []
    cursor = first
    while cursor <= last:
        starts.append(cursor)
        if len(starts) > MAX_BUCKETS:
            raise invalid("granularity", f"{granularity} buckets over this window would be more than {MAX_BUCKETS}; choose a coarser granularity", raw)
        cursor = next_start(cursor, granularity)
    return Buckets(granularity, int(offset.total_seconds()), starts)


def resolve_scope(request: Request, principal: Principal, spans_organisation: bool = False) -> TenantScope:
    """The spec's rule: a workspace key sees its workspace whatever is sent; an
    organisation key sees ``workspace_slug`` or the default workspace."""
    if principal.workspace_slug is not None:
        return principal.scope
    slug = _first(request, "workspace_slug")
    if slug is None and spans_organisation:
        return TenantScope(principal.organisation_id)
    return TenantScope(principal.organisation_id, slug or request.app.state.settings.default_workspace)


def analytics_query(bucketed: bool, spans_organisation: Callable[[Request], bool] | None = None):
    """Dependency: the validated query. ``spans_organisation(request)`` says whether an
    organisation key without ``workspace_slug`` sees the whole organisation."""

    async def dependency(request: Request, principal: Principal = Depends(require("analytics.read"))) -> AnalyticsQuery:
        # Parsing and compiling the filters is pure CPU (well under a millisecond): on the event loop,
        # not worth a hop to a worker thread.
        filters = parse_filters(request)
        scope = resolve_scope(request, principal, bool(spans_organisation and spans_organisation(request)))
        buckets = make_buckets(request, filters) if bucketed else None
        return AnalyticsQuery(filters, scope, compile_where(filters, scope), buckets)

    return dependency
