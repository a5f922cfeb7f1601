"""Counter semantics in Polars, across all policies at once (docs/limits.md).

Inputs are small frames: the active policies, the usage per (policy, value key) that
ClickHouse summed, the resets, the last written counters and the alerts already
decided. Out come the counters to write, the alerts that became due and the
enforcement records. Nothing here talks to ClickHouse or Kafka, and "now" is an
argument: tests move it across period boundaries.

Times are epoch milliseconds (UTC) throughout.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from warehouse.queries.limits import split_value_key
from warehouse.queries.policies import PolicyRow

DAY_MS = 86_400_000
WINDOW_SECONDS = {"rpm": 60, "rph": 3_600, "rpd": 86_400}
USAGE, RATE = "usage_limits", "rate_limits"
EXHAUSTED, RATE_LIMITED, ACTIVE = "exhausted", "rate_limited", "active"
THRESHOLD = "threshold"

KEY = ["policy_id", "value_key"]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(ts: datetime) -> int:
    """Epoch milliseconds (sub-millisecond digits are truncated); a naive datetime is UTC."""
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    return (ts - _EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    ts = from_ms(ms)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def period(periodic_reset: str, now_ms: int) -> tuple[int | None, int | None]:
    """[start, end) of the current UTC calendar month or ISO week; (None, None) when cumulative."""
    now = from_ms(now_ms)
    if periodic_reset == "monthly":
        start = datetime(now.year, now.month, 1, tzinfo=UTC)
        end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    elif periodic_reset == "weekly":
        start = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=now.weekday())
        end = start + timedelta(days=7)
    else:
        return None, None
    return to_ms(start), to_ms(end)


def entity_id(policy_id: str, value_key: str) -> str:
    """A stable id of a value key within its policy (what `…/entities/{entityId}` takes)."""
    return str(uuid.uuid5(uuid.UUID(policy_id), value_key))


def alert_id(policy_id: str, value_key: str, alert_window_ms: int, kind: str) -> str:
    return str(uuid.uuid5(uuid.UUID(policy_id), f"alert|{kind}|{alert_window_ms}|{value_key}"))


# --------------------------------------------------------------------------- policies


POLICY_SCHEMA = {
    "policy_id": pl.String, "kind": pl.String, "organisation_id": pl.String, "workspace_slug": pl.String,
    "name": pl.String, "type": pl.String, "limit": pl.Float64, "alert_threshold": pl.Float64,
    "periodic_reset": pl.String, "unit": pl.String, "baseline_at": pl.Int64, "limits_at": pl.Int64,
}


def policy_frame(policies: list[PolicyRow], now_ms: int) -> pl.DataFrame:
    """One row per active policy with its counting window ``[window_start, window_end)`` at ``now_ms``.

    Usage limits: from the later of the period start and the policy's baseline (its creation,
    or the last change of ``periodic_reset``) to the period end (none when cumulative).
    Rate limits: the sliding window ``(now − W, now]``, i.e. ``[now − W + 1 ms, now + 1 ms)``, but not
    before the baseline either: a new rate limit does not block at once for the traffic before it existed.
    """
    df = pl.DataFrame(
        {
            "policy_id": [p.id for p in policies], "kind": [p.kind for p in policies],
            "organisation_id": [p.organisation_id for p in policies], "workspace_slug": [p.workspace_slug for p in policies],
            "name": [p.name for p in policies], "type": [p.type for p in policies],
            "limit": [p.credit_limit if p.kind == USAGE else p.value for p in policies],
            "alert_threshold": [p.alert_threshold if p.kind == USAGE else None for p in policies],
            "periodic_reset": [p.periodic_reset for p in policies], "unit": [p.unit for p in policies],
            "baseline_at": [to_ms(p.baseline_at) for p in policies], "limits_at": [to_ms(p.limits_at) for p in policies],
        },
        schema=POLICY_SCHEMA,
    )
    month, week = period("monthly", now_ms), period("weekly", now_ms)
    reset = pl.col("periodic_reset")
    period_start = pl.when(reset == "monthly").then(month[0]).when(reset == "weekly").then(week[0])
    period_end = pl.when(reset == "monthly").then(month[1]).when(reset == "weekly").then(week[1])
    width = pl.col("unit").replace_strict(
        {u: s * 1000 for u, s in WINDOW_SECONDS.items()}, default=None, return_dtype=pl.Int64)
    is_rate = pl.col("kind") == RATE
    return df.with_columns(
        window_start=pl.when(is_rate).then(pl.max_horizontal(now_ms - width + 1, pl.col("baseline_at")))
        .otherwise(pl.max_horizontal(period_start.otherwise(None).cast(pl.Int64), pl.col("baseline_at"))),
        window_end=pl.when(is_rate).then(pl.lit(now_ms + 1, pl.Int64)).otherwise(period_end.otherwise(None).cast(pl.Int64)),
    )


# --------------------------------------------------------------------------- evaluation

COUNTER_SCHEMA = {
    "policy_id": pl.String, "value_key": pl.String, "entity_id": pl.String, "window_start": pl.Int64,
    "window_end": pl.Int64, "current_usage": pl.Float64, "status": pl.String, "threshold_alert_sent": pl.Boolean,
    "exhausted_alert_sent": pl.Boolean,
}
ALERT_SCHEMA = {"policy_id": pl.String, "value_key": pl.String, "alert_window": pl.Int64, "kind": pl.String,
                "state": pl.String}
USAGE_SCHEMA = {"policy_id": pl.String, "value_key": pl.String, "usage": pl.Float64}
RESET_SCHEMA = {"policy_id": pl.String, "value_key": pl.String, "reset_at": pl.Int64}


def empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass
class Evaluation:
    """Every value key of every active policy, with its counter, status and alert state."""

    keys: pl.DataFrame  # KEY + entity_id, window_start, window_end, current_usage, status, limit, alert_window, …
    due_alerts: pl.DataFrame  # alerts to decide now: KEY + alert_window, kind, current_usage, …


def evaluate(policies: pl.DataFrame, usage: pl.DataFrame, resets: pl.DataFrame, known: pl.DataFrame,
             alerts: pl.DataFrame) -> Evaluation:
    """Statuses and due alerts of every value key of every policy in ``policies``.

    ``usage``: the usage of each value key in its current window (keys without usage are
    absent). ``known``: the last written counters (keys seen before keep a row, at 0
    when they have no usage in the current window). ``alerts``: alerts already decided.
    """
    keys = (
        usage.join(known.select(*KEY, known_entity_id="entity_id"), on=KEY, how="full", coalesce=True)
        .join(policies, on="policy_id", how="inner")  # only active policies
        .join(resets, on=KEY, how="left")
    )
    is_usage = pl.col("kind") == USAGE
    # a reset counts from its instant, if it happened inside the current window
    reset_in_window = pl.col("reset_at").is_not_null() & (pl.col("reset_at") > pl.col("window_start"))
    amount = pl.col("usage").fill_null(0.0)
    keys = keys.with_columns(
        # cents to 1e-9 (float sums of per-day totals differ from one sum in the last bits); counts are integers
        current_usage=pl.when(pl.col("type") == "cost").then(amount.round(9)).otherwise(amount.round(0)),
        window_start=pl.when(is_usage & reset_in_window).then(pl.col("reset_at")).otherwise(pl.col("window_start")),
    ).with_columns(
        alert_window=pl.when(is_usage).then(pl.max_horizontal("window_start", "limits_at")),
        status=pl.when(pl.col("current_usage") >= pl.col("limit"))
        .then(pl.when(is_usage).then(pl.lit(EXHAUSTED)).otherwise(pl.lit(RATE_LIMITED)))
        .otherwise(pl.lit(ACTIVE)),
    )
    keys = keys.join(_by_window(alerts, "threshold_decided", "exhausted_decided"), on=[*KEY, "alert_window"], how="left")
    threshold_due = (is_usage & pl.col("alert_threshold").is_not_null()
                     & (pl.col("current_usage") >= pl.col("alert_threshold")) & ~pl.col("threshold_decided").fill_null(False))
    exhausted_due = is_usage & (pl.col("status") == EXHAUSTED) & ~pl.col("exhausted_decided").fill_null(False)
    due = pl.concat([
        keys.filter(threshold_due).with_columns(kind=pl.lit(THRESHOLD), order=pl.lit(0)),
        keys.filter(exhausted_due).with_columns(kind=pl.lit(EXHAUSTED), order=pl.lit(1)),
    ]).sort("policy_id", "value_key", "order")
    # entity ids: kept for known keys, derived for new ones
    new = keys.filter(pl.col("known_entity_id").is_null()).select(KEY)
    new = new.with_columns(entity_id=pl.Series([entity_id(p, v) for p, v in new.iter_rows()], dtype=pl.String))
    keys = (keys.join(new, on=KEY, how="left")
            .with_columns(entity_id=pl.coalesce("known_entity_id", "entity_id"))
            .drop("known_entity_id", "threshold_decided", "exhausted_decided"))
    return Evaluation(keys=keys, due_alerts=due)


def _by_window(alerts: pl.DataFrame, threshold: str, exhausted: str) -> pl.DataFrame:
    """One row per (policy, value key, alert window): whether its threshold / exhausted alert is in ``alerts``."""
    return alerts.group_by(*KEY, "alert_window").agg(
        (pl.col("kind") == THRESHOLD).any().alias(threshold), (pl.col("kind") == EXHAUSTED).any().alias(exhausted))


def apply_flags(keys: pl.DataFrame, alerts: pl.DataFrame) -> pl.DataFrame:
    """``threshold_alert_sent`` / ``exhausted_alert_sent``: the key's alert of its current alert window was sent."""
    flags = ("threshold_alert_sent", "exhausted_alert_sent")
    sent = _by_window(alerts.filter(pl.col("state") == "sent"), *flags)
    return (keys.drop(*flags, strict=False).join(sent, on=[*KEY, "alert_window"], how="left")
            .with_columns(pl.col(f).fill_null(False) for f in flags))


def changed_counters(keys: pl.DataFrame, known: pl.DataFrame) -> pl.DataFrame:
    """The counters (``COUNTER_SCHEMA`` plus kind and organisation) whose usage, status, window or alert flags
    differ from the last written ones (for rate limits: usage or status)."""
    compared = [c for c in COUNTER_SCHEMA if c not in KEY]
    current = keys.select(*COUNTER_SCHEMA, "kind", "organisation_id")
    before = known.select(*KEY, *(pl.col(c).alias(f"{c}_before") for c in compared))
    joined = current.join(before, on=KEY, how="left")
    # a sliding window moves at every refresh: a rate-limit counter is written when its usage or status changes
    sliding = ("window_start", "window_end")
    differs = pl.any_horizontal(
        pl.col(c).ne_missing(pl.col(f"{c}_before")) & ((pl.col("kind") != RATE) | pl.lit(c not in sliding))
        for c in compared)
    return joined.filter(differs).select(*COUNTER_SCHEMA, "kind", "organisation_id")


# --------------------------------------------------------------------------- published payloads


def alert_payload(row: dict, now_ms: int) -> dict:
    """The JSON of an alert event on the alerts topic (docs/limits.md)."""
    return {
        "alert_id": alert_id(row["policy_id"], row["value_key"], row["alert_window"], row["kind"]),
        "kind": row["kind"],
        "policy_id": row["policy_id"],
        "policy_name": row["name"],
        "organisation_id": row["organisation_id"],
        "workspace_id": row["workspace_slug"] or None,
        "value_key": row["value_key"],
        "type": row["type"],
        "current_usage": usage_value(row["type"], row["current_usage"]),
        "credit_limit": usage_value(row["type"], row["limit"]),
        "alert_threshold": None if row["alert_threshold"] is None else usage_value(row["type"], row["alert_threshold"]),
        "periodic_reset": row["periodic_reset"] or None,
        "window_start": iso(row["window_start"]),
        "window_end": iso(row["window_end"]),
        "alert_window_start": iso(row["alert_window"]),
        "detected_at": iso(now_ms),
    }


def usage_value(type_: str, value: float) -> float | int:
    """Cost stays a number of cents; tokens and requests are integers."""
    return float(value) if type_ == "cost" else int(round(value))


def state_record(row: dict, policy: PolicyRow) -> dict:
    """The full enforcement record of an exhausted or rate-limited value key (docs/limits.md)."""
    record = {
        "policy_id": row["policy_id"],
        "policy_kind": row["kind"],
        "organisation_id": row["organisation_id"],
        "workspace_id": row["workspace_slug"] or None,
        "value_key": row["value_key"],
        "group": dict(split_value_key(row["value_key"])),
        "conditions": [{"key": k, "value": v} for k, v in policy.counted_conditions()],
        "status": row["status"],
        "type": row["type"],
        "current_usage": usage_value(row["type"], row["current_usage"]),
        "limit": usage_value(row["type"], row["limit"]),
        "window_start": iso(row["window_start"]),
        "window_end": iso(row["window_end"]),
    }
    if row["kind"] == RATE:
        record["unit"] = row["unit"]
        record["window_seconds"] = WINDOW_SECONDS[row["unit"]]
    else:
        record["periodic_reset"] = row["periodic_reset"] or None
    return record


def state_key(policy_id: str, value_key: str) -> str:
    """Kafka key of a state record: ``<policy id>:<value key>`` (the policy id has no colon)."""
    return f"{policy_id}:{value_key}"
