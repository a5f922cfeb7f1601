"""An independent reference for docs/analytics.md, computed with Polars from the raw events.

It reads the gateway-log and feedback events exactly as they were produced to Kafka
(docs/events.md decides what is stored: id preference, UTC timestamps truncated to the
millisecond, defaults, the two metadata forms, re-delivered ids counted once, the latest
version of a feedback id) and answers every `/v1/analytics/...` route from them. It imports
nothing from the implementation (analytics_api, warehouse, ingest).

Exactness: Polars does the filtering and grouping; every division and every rounding is done
on exact values (``Fraction``), once, at the end, halves away from zero. The generated costs
(multiples of 1/1024 cent) and feedback weights (multiples of 1/8) are exact binary
fractions, so their float sums are exact too.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, Iterable

import polars as pl

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
SEP = "\x00"  # joins a metadata key and value into one searchable string

DEFAULT_COLUMNS = ["requests", "cost", "tokens", "avg_latency", "errors", "last_seen"]
GROUP_BY = {  # group_by -> generation column (see `generations_frame`)
    "ai_service": "ai_org",
    "model": "ai_model",
    "status_code": "status",
    "api_key": "api_key",
    "config": "config",
    "workspace": "ws",
    "provider": "vk",
    "prompt": "prompt",
}
UNITS = {"minute": "1m", "hour": "1h", "day": "1d", "week": "1w", "month": "1mo"}
Q50, Q90, Q99 = Fraction(1, 2), Fraction(9, 10), Fraction(99, 100)


# --------------------------------------------------------------------------- numbers


def round_int(x: Any) -> int:
    """Nearest integer, halves away from zero, of an exact value."""
    f = Fraction(x)
    n = math.floor(abs(f) + Fraction(1, 2))
    return n if f >= 0 else -n


def round_dec(x: Any, places: int) -> Decimal:
    return Decimal(round_int(Fraction(x) * 10**places)).scaleb(-places)


def ratio(num: Any, den: Any) -> Fraction:
    """An average or rate over nothing is 0."""
    return Fraction(num) / Fraction(den) if den else Fraction(0)


def quantile(sorted_values: list[int], q: Fraction) -> int:
    """The value at 0-based position floor(q*n); 0 for no values."""
    if not sorted_values:
        return 0
    return int(sorted_values[math.floor(q * len(sorted_values))])


# --------------------------------------------------------------------------- time


def parse_ts(text: str) -> datetime:
    ts = datetime.fromisoformat(text)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def to_ms(ts: datetime) -> int:
    """Milliseconds since the epoch, sub-millisecond digits truncated."""
    return (ts.astimezone(UTC) - EPOCH) // MS


def fmt_offset(offset: timedelta) -> str:
    minutes = offset // timedelta(minutes=1)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def fmt_utc_ms(ms: int) -> str:
    ts = EPOCH + ms * MS
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def truncate_local(local: datetime, unit: str) -> datetime:
    """Bucket start of a naive local time (the request's fixed offset already applied)."""
    if unit == "minute":
        return local.replace(second=0, microsecond=0)
    if unit == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    raise ValueError(unit)


def next_bucket(start: datetime, unit: str) -> datetime:
    if unit == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1),
                    "week": timedelta(weeks=1)}[unit]


class Window:
    """`time_of_generation_min/max` and the buckets they imply."""

    def __init__(self, params: dict[str, str]):
        lo, hi = parse_ts(params["time_of_generation_min"]), parse_ts(params["time_of_generation_max"])
        self.min_ms, self.max_ms = to_ms(lo), to_ms(hi)
        self.offset = lo.utcoffset()
        length = hi - lo
        self.unit = params.get("granularity") or (
            "minute" if length <= timedelta(hours=2)
            else "hour" if length <= timedelta(days=2)
            else "day" if length <= timedelta(days=92)
            else "week"
        )
        first = truncate_local(self.local(self.min_ms), self.unit)
        last = truncate_local(self.local(self.max_ms), self.unit)
        self.buckets: list[datetime] = []
        b = first
        while b <= last:
            self.buckets.append(b)
            b = next_bucket(b, self.unit)

    def local(self, ms: int) -> datetime:
        return (EPOCH + ms * MS + self.offset).replace(tzinfo=None)

    def label(self, bucket: datetime) -> str:
        return bucket.strftime("%Y-%m-%dT%H:%M:%S") + ".000" + fmt_offset(self.offset)


# --------------------------------------------------------------------------- events -> frames


def _event_id(ev: dict) -> str:
    return ev.get("_id") or ev.get("id") or ev.get("metrics", {}).get("id")


def generations_frame(events: Iterable[dict], org: str) -> pl.DataFrame:
    """One row per stored generation of ``org`` (a re-delivered id is one generation)."""
    rows: dict[str, dict] = {}
    for ev in events:
        if ev["organisation_id"] != org:
            continue
        log_id = _event_id(ev)
        m = ev.get("metrics", {})
        ms = to_ms(parse_ts(ev["created_at"]))
        if log_id in rows:
            assert rows[log_id]["ts"] == ms, "the generator re-sends ids only as exact re-deliveries"
            continue
        if "metadata" in m:
            meta = dict(m["metadata"])
        else:
            meta = dict(zip(m.get("metadata.key", []), m.get("metadata.value", [])))
        req, res = int(m.get("req_units") or 0), int(m.get("res_units") or 0)
        user = meta.get("_user") or None
        rows[log_id] = {
            "id": log_id,
            "ws": m.get("workspace_slug") or "",
            "ts": ms,
            "ai_org": m.get("ai_org") or "",
            "ai_model": m.get("ai_model") or "",
            "req": req,
            "res": res,
            "total": int(m["total_units"]) if m.get("total_units") is not None else req + res,
            "cost": m.get("cost"),
            "status": m.get("response_status_code") or ev["response"]["status"],
            "rt": m["response_time"] if m.get("response_time") is not None else ev["response"].get("responseTime") or 0,
            "cache": m.get("cache_status"),
            "retry": m.get("retry_success_count") or 0,
            "trace": m.get("trace_id") or "",
            "span": m.get("span_id") or "",
            "mode": m.get("mode") or "",
            "luoi": m.get("last_used_option_index") or 0,
            "vk": m.get("virtual_key") or "",
            "config": m.get("config") or "",
            "api_key": m.get("api_key_id") or "",
            "prompt": m.get("prompt_slug") or "",
            "meta_kv": [f"{k}{SEP}{v if v is not None else ''}" for k, v in meta.items()],
            "user": user,
        }
    schema = {
        "id": pl.String, "ws": pl.String, "ts": pl.Int64, "ai_org": pl.String, "ai_model": pl.String,
        "req": pl.Int64, "res": pl.Int64, "total": pl.Int64, "cost": pl.Float64, "status": pl.Int64, "rt": pl.Int64,
        "cache": pl.String, "retry": pl.Int64, "trace": pl.String, "span": pl.String, "mode": pl.String,
        "luoi": pl.Int64, "vk": pl.String, "config": pl.String, "api_key": pl.String, "prompt": pl.String,
        "meta_kv": pl.List(pl.String), "user": pl.String,
    }
    return pl.DataFrame(list(rows.values()), schema=schema, orient="row")


def without_float_noise(value: Any) -> Any:
    """Floats to 6 decimals: the values compared have at most 4, so this only hides binary noise
    (930.5146000000001), which test_analytics.py's `test_decimal_columns_are_exact_decimals` checks on its own."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: without_float_noise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_float_noise(v) for v in value]
    return value


def feedback_frame(events: Iterable[dict], org: str) -> pl.DataFrame:
    """The current version (latest `updated_at`) of every feedback id of ``org``."""
    latest: dict[str, tuple[int, dict]] = {}
    for ev in events:
        if ev["organisation_id"] != org:
            continue
        updated = to_ms(parse_ts(ev.get("updated_at") or ev["created_at"]))
        if ev["id"] not in latest or updated > latest[ev["id"]][0]:
            latest[ev["id"]] = (updated, ev)
    rows = [{"fid": fid, "ws": ev.get("workspace_slug") or "", "trace": ev["trace_id"], "value": int(ev["value"]),
             "weight": float(ev.get("weight", 1.0))}
            for fid, (_, ev) in latest.items()]
    schema = {"fid": pl.String, "ws": pl.String, "trace": pl.String, "value": pl.Int64, "weight": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _csv(params: dict, name: str) -> list[str] | None:
    if name not in params:
        return None
    return [item for item in str(params[name]).split(",") if item != ""]


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------- the reference


class Reference:
    def __init__(self, generations: pl.DataFrame, feedback: pl.DataFrame, default_workspace: str = "default"):
        self.feedback = feedback.with_columns(vw=pl.col("value") * pl.col("weight"))
        # A trace is a trace id within a workspace: feedback counts for its own workspace's requests.
        self.trace_fb = self.feedback.group_by("ws", "trace").agg(
            fb_n=pl.len(), sum_vw=pl.col("vw").sum(), sum_w=pl.col("weight").sum()
        )
        self.gens = (
            generations.join(self.trace_fb, on=["ws", "trace"], how="left")
            .with_columns(
                has_fb=(pl.col("trace") != "") & pl.col("fb_n").is_not_null(),
                wavg=pl.col("sum_vw") / pl.col("sum_w"),
                cost0=pl.col("cost").fill_null(0.0),
                err=pl.col("status") >= 400,
                simple_hit=pl.col("cache").fill_null("") == "HIT",
                semantic_hit=pl.col("cache").fill_null("") == "SEMANTIC HIT",
                created=pl.from_epoch("ts", time_unit="ms"),
            )
            .with_columns(hit=pl.col("simple_hit") | pl.col("semantic_hit"))
        )
        self.default_workspace = default_workspace

    # ------------------------------------------------------------------ selection

    def select(self, route: str, params: dict, key_workspace: str | None, window: Window) -> pl.DataFrame:
        g = self.gens.filter(pl.col("ts").is_between(window.min_ms, window.max_ms))
        if key_workspace:
            g = g.filter(pl.col("ws") == key_workspace)
        elif params.get("workspace_slug"):
            g = g.filter(pl.col("ws") == params["workspace_slug"])
        elif route not in ("groups/workspaces", "groups/workspace"):
            g = g.filter(pl.col("ws") == self.default_workspace)

        for lo, hi, col, conv in (
            ("total_units_min", "total_units_max", "total", int),
            ("prompt_token_min", "prompt_token_max", "req", int),
            ("completion_token_min", "completion_token_max", "res", int),
            ("cost_min", "cost_max", "cost0", float),
        ):
            if lo in params:
                g = g.filter(pl.col(col) >= conv(params[lo]))
            if hi in params:
                g = g.filter(pl.col(col) <= conv(params[hi]))
        if "weighted_feedback_min" in params or "weighted_feedback_max" in params:
            g = g.filter(pl.col("has_fb"))
            if "weighted_feedback_min" in params:
                g = g.filter(pl.col("wavg") >= float(params["weighted_feedback_min"]))
            if "weighted_feedback_max" in params:
                g = g.filter(pl.col("wavg") <= float(params["weighted_feedback_max"]))

        for name, col in (("virtual_keys", "vk"), ("configs", "config"), ("api_key_ids", "api_key"),
                          ("prompt_slug", "prompt"), ("trace_id", "trace"), ("span_id", "span"),
                          ("cache_status", "cache")):
            items = _csv(params, name)
            if items:
                g = g.filter(pl.col(col).is_in(items))
        codes = _csv(params, "status_code")
        if codes:
            g = g.filter(pl.col("status").is_in([int(c) for c in codes]))
        pairs = _csv(params, "ai_org_model")
        if pairs:
            cond = pl.lit(False)
            for item in pairs:
                provider, model = item.split("__", 1)
                cond = cond | ((pl.col("ai_org") == provider) & (pl.col("ai_model") == model))
            g = g.filter(cond)
        if "metadata" in params:
            for k, v in json.loads(params["metadata"]).items():
                g = g.filter(pl.col("meta_kv").list.contains(f"{k}{SEP}{_json_text(v)}"))

        local = (pl.col("created") + pl.duration(milliseconds=window.offset // MS)).dt.truncate(UNITS[window.unit])
        return g.with_columns(bucket=local)

    # ------------------------------------------------------------------ entry point

    def compute(self, route: str, params: dict, key_workspace: str | None = None) -> dict:
        window = Window(params)
        sel = self.select(route, params, key_workspace, window)
        if not sel.is_empty():
            assert set(sel["bucket"].unique().to_list()) <= set(window.buckets), "a request outside the buckets"
        if route.startswith("graphs/") or route == "summary/cache":
            return getattr(self, "_" + route.replace("/", "_").replace("-", "_"))(sel, window)
        if route == "groups/users":
            return self._groups_simple(sel.filter(pl.col("user").is_not_null()), "user", "user", params)
        if route == "groups/ai-models":
            return self._groups_simple(sel, "ai_model", "ai_model", params)
        if route.startswith("groups/metadata/"):
            return self._groups_metadata(sel, route.removeprefix("groups/metadata/"), params)
        if route == "groups/workspaces":
            return self._groups_columns(sel, "ws", "workspace_slug", params)
        group_by = route.removeprefix("groups/")
        return self._groups_columns(sel, GROUP_BY[group_by], group_by, params)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _per_bucket(sel: pl.DataFrame, **aggs: pl.Expr) -> dict[datetime, dict]:
        return {r["bucket"]: r for r in sel.group_by("bucket").agg(**aggs).to_dicts()}

    @staticmethod
    def _graph(window: Window, rows: dict[datetime, dict], point, summary: dict) -> dict:
        """``point(row or None)`` makes one data point's fields; a bucket without data gets ``point(None)``."""
        return {
            "object": "analytics-graph",
            "summary": summary,
            "data_points": [{"timestamp": window.label(b), **point(rows.get(b))} for b in window.buckets],
        }

    # ------------------------------------------------------------------ graphs

    def _graphs_requests(self, sel, window):
        rows = self._per_bucket(sel, n=pl.len())
        return self._graph(window, rows, lambda r: {"total": r["n"] if r else 0}, {"total": sel.height})

    def _graphs_cost(self, sel, window):
        rows = self._per_bucket(sel, n=pl.len(), cost=pl.col("cost0").sum())

        def point(r):
            return {"total": round_int(r["cost"]), "avg": round_int(ratio(r["cost"], r["n"]))} if r else {"total": 0, "avg": 0}

        total = sel["cost0"].sum()
        return self._graph(window, rows, point, {"total": round_int(total), "avg": round_int(ratio(total, sel.height))})

    def _graphs_latency(self, sel, window):
        rows = self._per_bucket(sel, n=pl.len(), s=pl.col("rt").sum(), rts=pl.col("rt").sort())

        def stats(n, s, rts):
            return {"avg": round_int(ratio(s, n)), "p50": quantile(rts, Q50), "p90": quantile(rts, Q90),
                    "p99": quantile(rts, Q99)}

        point = lambda r: stats(r["n"], r["s"], r["rts"]) if r else stats(0, 0, [])  # noqa: E731
        return self._graph(window, rows, point, stats(sel.height, sel["rt"].sum(), sorted(sel["rt"].to_list())))

    def _graphs_tokens(self, sel, window):
        rows = self._per_bucket(sel, n=pl.len(), t=pl.col("total").sum())
        point = lambda r: {"total": r["t"], "avg": round_int(ratio(r["t"], r["n"]))} if r else {"total": 0, "avg": 0}  # noqa: E731
        total = int(sel["total"].sum())
        return self._graph(window, rows, point, {"total": total, "avg": round_int(ratio(total, sel.height))})

    def _graphs_users(self, sel, window):
        with_user = sel.filter(pl.col("user").is_not_null())
        rows = self._per_bucket(with_user, u=pl.col("user").n_unique())
        return self._graph(window, rows, lambda r: {"total": r["u"] if r else 0}, {"total": with_user["user"].n_unique()})

    def _graphs_users_requests(self, sel, window):
        with_user = sel.filter(pl.col("user").is_not_null())
        rows = self._per_bucket(with_user, n=pl.len(), u=pl.col("user").n_unique())
        point = lambda r: {"avg": round_int(ratio(r["n"], r["u"])) if r else 0}  # noqa: E731
        n, u = with_user.height, with_user["user"].n_unique()
        return self._graph(window, rows, point, {"total": n, "unique": u, "avg": round_int(ratio(n, u))})

    def _graphs_errors(self, sel, window):
        rows = self._per_bucket(sel, e=pl.col("err").sum())
        return self._graph(window, rows, lambda r: {"total": r["e"] if r else 0}, {"total": int(sel["err"].sum())})

    def _graphs_errors_rate(self, sel, window):
        rows = self._per_bucket(sel, n=pl.len(), e=pl.col("err").sum())
        point = lambda r: {"rate": round_int(100 * ratio(r["e"], r["n"])) if r else 0}  # noqa: E731
        return self._graph(window, rows, point, {"rate": round_int(100 * ratio(sel["err"].sum(), sel.height))})

    def _graphs_errors_stacks(self, sel, window):
        errors = sel.filter(pl.col("err"))
        stacks: dict[datetime, list] = {}
        for r in errors.group_by("bucket", "status").agg(c=pl.len()).sort("bucket", "status").to_dicts():
            stacks.setdefault(r["bucket"], []).append({"response_status_code": r["status"], "count": r["c"]})
        rows = {b: {"stats": s} for b, s in stacks.items()}
        return self._graph(window, rows, lambda r: {"stats": r["stats"] if r else []}, {"total": errors.height})

    def _graphs_errors_status_codes(self, sel, window):
        counts = sel.filter(pl.col("err")).group_by("status").agg(c=pl.len()).to_dicts()
        counts.sort(key=lambda r: (-r["c"], r["status"]))
        return {
            "object": "analytics-graph",
            "summary": {"total_errors": sum(r["c"] for r in counts), "unique_error_codes": len(counts)},
            "data_points": [{"status_code": r["status"], "count": r["c"]} for r in counts],
        }

    def _graphs_requests_rescued(self, sel, window):
        ok = pl.col("status") < 400
        by_retry = sel.filter((pl.col("retry") > 0) & ok)
        by_fallback = sel.filter((pl.col("mode") == "fallback") & (pl.col("luoi") > 0) & ok)
        retry: dict[datetime, list] = {}
        for r in by_retry.group_by("bucket", "retry").agg(c=pl.len()).sort("bucket", "retry").to_dicts():
            retry.setdefault(r["bucket"], []).append({"retry_success_count": r["retry"], "count": r["c"]})
        fallback = {r["bucket"]: r["c"] for r in by_fallback.group_by("bucket").agg(c=pl.len()).to_dicts()}
        return {
            "object": "analytics-graph",
            "summary": {"retry": by_retry.height, "fallback": by_fallback.height},
            "data_points": [{"timestamp": window.label(b), "retry": retry.get(b, []), "fallback": fallback.get(b, 0)}
                            for b in window.buckets],
        }

    def _graphs_cache_hit_rate(self, sel, window):
        rows = self._per_bucket(
            sel, n=pl.len(), simple=pl.col("simple_hit").sum(), semantic=pl.col("semantic_hit").sum(),
            simple_cost=pl.col("cost0").filter(pl.col("simple_hit")).sum(),
            semantic_cost=pl.col("cost0").filter(pl.col("semantic_hit")).sum(),
        )
        points, cum_simple, cum_semantic = [], Fraction(0), Fraction(0)
        for b in window.buckets:
            r = rows.get(b)
            if r:
                cum_simple += Fraction(r["simple_cost"])
                cum_semantic += Fraction(r["semantic_cost"])
            points.append({
                "timestamp": window.label(b),
                "simple_hits": r["simple"] if r else 0,
                "semantic_hits": r["semantic"] if r else 0,
                "rate": round_int(100 * ratio(r["simple"] + r["semantic"], r["n"])) if r else 0,
                "cumulative_simple_cache_savings": round_int(cum_simple),
                "cumulative_semantic_cache_savings": round_int(cum_semantic),
            })
        hits = int(sel["hit"].sum())
        return {"object": "analytics-graph", "summary": {"total": hits, "rate": round_int(100 * ratio(hits, sel.height))},
                "data_points": points}

    def _graphs_cache_latency(self, sel, window):
        hits = sel.filter(pl.col("hit"))
        rows = self._per_bucket(hits, n=pl.len(), s=pl.col("rt").sum())
        point = lambda r: {"avg": round_int(ratio(r["s"], r["n"])) if r else 0}  # noqa: E731
        return self._graph(window, rows, point, {"avg": round_int(ratio(hits["rt"].sum(), hits.height))})

    def _summary_cache(self, sel, window):
        hits, misses = sel.filter(pl.col("hit")), sel.filter(~pl.col("hit"))
        mean_hit = ratio(hits["rt"].sum(), hits.height)
        mean_miss = ratio(misses["rt"].sum(), misses.height)
        speedup = 100 * (mean_miss - mean_hit) / mean_miss if hits.height and misses.height and mean_miss else 0
        return {"object": "analytics-summary", "summary": {
            "hits": hits.height, "avg_latency": round_int(mean_hit), "total_requests": sel.height,
            "cache_speedup": round_int(speedup)}}

    # ------------------------------------------------------------------ feedback graphs

    def _attributed_feedback(self, sel: pl.DataFrame) -> pl.DataFrame:
        """Each feedback of a selected trace once, with the bucket and model of the trace's first request."""
        first = (
            sel.filter(pl.col("trace") != "")
            .sort("ts", "ai_model")  # ties at the same millisecond: the smallest model name
            .group_by("ws", "trace", maintain_order=True)
            .agg(pl.col("bucket").first(), pl.col("ai_model").first())
        )
        return self.feedback.join(first, on=["ws", "trace"], how="inner")

    def _graphs_feedbacks(self, sel, window):
        fb = self._attributed_feedback(sel)
        rows = self._per_bucket(fb, n=pl.len())
        return self._graph(window, rows, lambda r: {"total": r["n"] if r else 0}, {"total": fb.height})

    def _graphs_feedbacks_scores(self, sel, window):
        fb = self._attributed_feedback(sel)
        counts = dict(fb.group_by("value").agg(c=pl.len()).iter_rows())
        return {"object": "analytics-graph", "summary": {"total": fb.height},
                "data_points": [{"score": v, "total": counts.get(v, 0)} for v in range(-10, 11)]}

    def _graphs_feedbacks_weighted(self, sel, window):
        fb = self._attributed_feedback(sel)
        rows = self._per_bucket(fb, vw=pl.col("vw").sum(), w=pl.col("weight").sum())
        point = lambda r: {"avg": round_int(ratio(r["vw"], r["w"])) if r else 0}  # noqa: E731
        return self._graph(window, rows, point, {"avg": round_int(ratio(fb["vw"].sum(), fb["weight"].sum()))})

    def _graphs_feedbacks_ai_models(self, sel, window):
        fb = self._attributed_feedback(sel)
        rows = fb.group_by("ai_model").agg(n=pl.len(), vw=pl.col("vw").sum(), w=pl.col("weight").sum()).to_dicts()
        rows.sort(key=lambda r: (-r["n"], r["ai_model"]))
        summary = {"total": fb.height, "avg_weighted_feedback": round_int(ratio(fb["vw"].sum(), fb["weight"].sum()))}
        return {"object": "analytics-graph", "summary": summary, "data_points": [
            {"ai_model": r["ai_model"], "total": r["n"], "avg_weighted_feedback": round_int(ratio(r["vw"], r["w"]))}
            for r in rows]}

    # ------------------------------------------------------------------ groups

    @staticmethod
    def _page(params: dict, rows: list[dict]) -> list[dict]:
        page, size = int(params.get("current_page", 0)), int(params.get("page_size", 20))
        return rows[page * size:(page + 1) * size]

    def _groups_simple(self, sel, col, name, params):
        groups = sel.group_by(col).agg(n=pl.len(), cost=pl.col("cost0").sum()).to_dicts()
        groups.sort(key=lambda r: (-r["n"], r[col]))
        data = [{"object": "analytics-group", name: r[col], "requests": str(r["n"]),
                 "cost": f"{round_dec(r['cost'], 4):.4f}"} for r in groups]
        return {"object": "list", "total": len(data), "data": self._page(params, data)}

    def _trace_feedback_sums(self, sel: pl.DataFrame, key: str) -> dict:
        """Per group: Σ(value·weight) and Σweight over the feedback of the group's distinct traces."""
        traces = sel.filter(pl.col("has_fb")).select(*dict.fromkeys([key, "ws", "trace"]), "sum_vw", "sum_w").unique()
        return {r[key]: (r["vw"], r["w"]) for r in traces.group_by(key).agg(
            vw=pl.col("sum_vw").sum(), w=pl.col("sum_w").sum()).to_dicts()}

    def _groups_metadata(self, sel, meta_key, params):
        prefix = meta_key + SEP
        carrying = (
            sel.explode("meta_kv")
            .filter(pl.col("meta_kv").str.starts_with(prefix))
            .with_columns(value=pl.col("meta_kv").str.slice(len(prefix)))
            .filter(pl.col("value") != "")  # an empty value counts as absent
        )
        fb = self._trace_feedback_sums(carrying, "value")
        groups = carrying.group_by("value").agg(
            n=pl.len(), cost=pl.col("cost0").sum(), tokens=pl.col("total").sum(),
            rwf=pl.col("has_fb").sum(), last=pl.col("ts").max(),
        ).to_dicts()
        groups.sort(key=lambda r: (-r["n"], r["value"]))
        data = [{
            "object": "analytics-group",
            "metadata_value": r["value"],
            "requests": r["n"],
            "cost": round_int(r["cost"]),
            "avg_tokens": round_int(ratio(r["tokens"], r["n"])),
            "avg_weighted_feedback": round_int(ratio(*fb.get(r["value"], (0, 0)))),
            "requests_with_feedback": r["rwf"],
            "last_seen": fmt_utc_ms(r["last"]),
        } for r in groups]
        return {"object": "list", "total": len(data), "data": self._page(params, data)}

    @staticmethod
    def _column_aggs() -> list[pl.Expr]:
        return [
            pl.len().alias("n"), pl.col("err").sum().alias("errors"), pl.col("hit").sum().alias("hits"),
            pl.col("user").drop_nulls().n_unique().alias("users"), pl.col("has_fb").sum().alias("rwf"),
            pl.col("total").sum().alias("tokens"), pl.col("req").sum().alias("req"), pl.col("res").sum().alias("res"),
            pl.col("rt").sum().alias("rt_sum"), pl.col("rt").sort().alias("rts"), pl.col("cost0").sum().alias("cost"),
            pl.col("ts").max().alias("last"),
        ]

    @staticmethod
    def _columns(r: dict, fb: tuple, columns: list[str]) -> dict:
        n = r["n"]
        value = {
            "requests": lambda: n,
            "errors": lambda: r["errors"],
            "cache_hits": lambda: r["hits"],
            "users": lambda: r["users"],
            "requests_with_feedback": lambda: r["rwf"],
            "tokens": lambda: r["tokens"],
            "prompt_tokens": lambda: r["req"],
            "completion_tokens": lambda: r["res"],
            "avg_tokens": lambda: round_int(ratio(r["tokens"], n)),
            "avg_latency": lambda: round_int(ratio(r["rt_sum"], n)),
            "p50_latency": lambda: quantile(r["rts"], Q50),
            "p90_latency": lambda: quantile(r["rts"], Q90),
            "p99_latency": lambda: quantile(r["rts"], Q99),
            "cost": lambda: float(round_dec(r["cost"], 4)),
            "avg_cost": lambda: float(round_dec(ratio(r["cost"], n), 4)),
            "error_rate": lambda: float(round_dec(100 * ratio(r["errors"], n), 2)),
            "cache_hit_rate": lambda: float(round_dec(100 * ratio(r["hits"], n), 2)),
            "avg_weighted_feedback": lambda: float(round_dec(ratio(*fb), 2)),
            "last_seen": lambda: fmt_utc_ms(r["last"]) if r["last"] is not None else None,
        }
        return {c: value[c]() for c in columns}

    def _groups_columns(self, sel, col, name, params):
        columns = _csv(params, "columns") or DEFAULT_COLUMNS
        order_by = params.get("order_by") or ("requests" if "requests" in columns else columns[0])
        descending = params.get("order_by_type", "desc") == "desc"
        fb = self._trace_feedback_sums(sel, col)
        groups = sel.group_by(col).agg(*self._column_aggs()).to_dicts()
        rows = [{"object": "analytics-group", name: r[col], **self._columns(r, fb.get(r[col], (0, 0)), columns)}
                for r in groups]
        rows.sort(key=lambda row: row[name])  # ties: key ascending (the sorts below are stable)
        if order_by == name:
            rows.sort(key=lambda row: row[name], reverse=descending)
        else:
            rows.sort(key=lambda row: row[order_by], reverse=descending)
        body = {"object": "list", "total": len(rows), "data": self._page(params, rows)}
        if str(params.get("include_total", "")).lower() == "true":
            everything = sel.with_columns(_all=pl.lit(1)).group_by("_all").agg(*self._column_aggs()).to_dicts()
            whole = everything[0] if everything else {
                "n": 0, "errors": 0, "hits": 0, "users": 0, "rwf": 0, "tokens": 0, "req": 0, "res": 0, "rt_sum": 0,
                "rts": [], "cost": 0.0, "last": None}
            traces = sel.filter(pl.col("has_fb")).select("ws", "trace", "sum_vw", "sum_w").unique()
            body["summary"] = self._columns(whole, (traces["sum_vw"].sum(), traces["sum_w"].sum()), columns)
        return body
