"""Every ``/analytics/graphs/…`` endpoint: which aggregates it needs, and how Polars
turns them into the spec's ``summary`` and ``data_points``.

A graph's expressions are applied twice: to the gap-filled bucket rows (data
points) and to the one-row window total (summary), so both follow one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from analytics_api.metrics.shape import fill_zeros, iround, map_entries, ratio, round_half_away, split_total
from analytics_api.params import Buckets

col = pl.col
HITS = col("simple_hits") + col("semantic_hits")


def quantile(i: int) -> pl.Expr:
    return col("latency_q").list.get(i, null_on_oob=True).fill_null(0).cast(pl.Int64)


@dataclass(frozen=True)
class Graph:
    measures: tuple[str, ...]  # warehouse.queries.analytics.MEASURES names
    point: dict[str, pl.Expr]
    summary: dict[str, pl.Expr]
    maps: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # data point field → (map column, key name, value name)
    feedback: bool = False  # aggregates come from feedback joined with generations


GRAPHS: dict[str, Graph] = {
    "requests": Graph(("requests",), {"total": col("requests")}, {"total": col("requests")}),
    "cost": Graph(
        ("requests", "cost"),
        point := {"total": iround(col("cost")), "avg": iround(ratio("cost", "requests"))},
        point,
    ),
    "latency": Graph(
        ("requests", "latency_sum", "latency_q"),
        point := {"avg": iround(ratio("latency_sum", "requests")), "p50": quantile(0), "p90": quantile(1), "p99": quantile(2)},
        point,
    ),
    "tokens": Graph(
        ("requests", "tokens"),
        point := {"total": col("tokens"), "avg": iround(ratio("tokens", "requests"))},
        point,
    ),
    "users": Graph(("users",), {"total": col("users")}, {"total": col("users")}),
    "users/requests": Graph(
        ("users", "user_requests"),
        {"avg": iround(ratio("user_requests", "users"))},
        {"total": col("user_requests"), "unique": col("users"), "avg": iround(ratio("user_requests", "users"))},
    ),
    "errors": Graph(("errors",), {"total": col("errors")}, {"total": col("errors")}),
    "errors/rate": Graph(
        ("requests", "errors"),
        point := {"rate": iround(ratio("errors", "requests", 100))},
        point,
    ),
    "errors/stacks": Graph(
        ("errors", "error_codes"), {}, {"total": col("errors")},
        maps={"stats": ("error_codes", "response_status_code", "count")},
    ),
    "requests/rescued": Graph(
        ("retry_rescued", "retry_attempts", "fallback_rescued"),
        {"fallback": col("fallback_rescued")},
        {"retry": col("retry_rescued"), "fallback": col("fallback_rescued")},
        maps={"retry": ("retry_attempts", "retry_success_count", "count")},
    ),
    "cache/hit-rate": Graph(
        ("requests", "simple_hits", "semantic_hits", "simple_savings", "semantic_savings"),
        {
            "simple_hits": col("simple_hits"),
            "semantic_hits": col("semantic_hits"),
            "rate": iround(ratio(HITS, col("requests"), 100)),
            "cumulative_simple_cache_savings": iround(col("simple_savings").cum_sum()),
            "cumulative_semantic_cache_savings": iround(col("semantic_savings").cum_sum()),
        },
        {"total": HITS, "rate": iround(ratio(HITS, col("requests"), 100))},
    ),
    "cache/latency": Graph(
        ("simple_hits", "semantic_hits", "hit_latency_sum"),
        point := {"avg": iround(ratio(col("hit_latency_sum"), HITS))},
        point,
    ),
    "feedbacks": Graph((), {"total": col("feedbacks")}, {"total": col("feedbacks")}, feedback=True),
    "feedbacks/weighted": Graph(
        (),
        point := {"avg": iround(ratio("weighted_sum", "weight_sum"))},
        point,
        feedback=True,
    ),
}

# Not time series: answered from the window total alone.
STATUS_CODES_MEASURES = ("errors", "error_codes")
CACHE_SUMMARY_MEASURES = ("requests", "simple_hits", "semantic_hits", "hit_latency_sum", "miss_latency_sum")


def graph_response(graph: Graph, buckets: Buckets, table: pa.Table) -> dict:
    rows, total = split_total(table, "bucket")
    frame = pl.DataFrame({"bucket": buckets.keys(), "timestamp": buckets.labels()}, schema={"bucket": pl.Int64, "timestamp": pl.String})
    filled = fill_zeros(frame.join(rows.with_columns(col("bucket").cast(pl.Int64)), on="bucket", how="left"))
    points = filled.select(col("timestamp"), *(e.alias(n) for n, e in graph.point.items())).to_dicts()
    for name, (column, key_name, value_name) in graph.maps.items():
        for point, value in zip(points, filled[column].to_list()):
            point[name] = map_entries(value, key_name, value_name)
    summary = total.select(*(e.alias(n) for n, e in graph.summary.items())).to_dicts()[0] if graph.summary else {}
    return {"object": "analytics-graph", "summary": summary, "data_points": points}


def status_codes_response(table: pa.Table) -> dict:
    total = pl.DataFrame(pl.from_arrow(table))
    entries = map_entries(total["error_codes"][0], "status_code", "count")
    entries.sort(key=lambda e: (-e["count"], e["status_code"]))
    return {
        "object": "analytics-graph",
        "summary": {"total_errors": int(total["errors"][0]), "unique_error_codes": len(entries)},
        "data_points": entries,
    }


def feedback_scores_response(table: pa.Table) -> dict:
    rows, total = split_total(table, "key")
    counts = dict(zip(rows["key"].to_list(), rows["feedbacks"].to_list()))
    return {
        "object": "analytics-graph",
        "summary": {"total": int(total["feedbacks"][0])},
        "data_points": [{"score": score, "total": int(counts.get(score, 0))} for score in range(-10, 11)],
    }


def feedback_models_response(table: pa.Table) -> dict:
    rows, total = split_total(table, "key")
    points = (
        rows.select(
            col("key").alias("ai_model"),
            col("feedbacks").cast(pl.Int64).alias("total"),
            iround(ratio("weighted_sum", "weight_sum")).alias("avg_weighted_feedback"),
        )
        .sort(["total", "ai_model"], descending=[True, False])
        .to_dicts()
    )
    summary = total.select(col("feedbacks").cast(pl.Int64).alias("total"), iround(ratio("weighted_sum", "weight_sum")).alias("avg_weighted_feedback"))
    return {"object": "analytics-graph", "summary": summary.to_dicts()[0], "data_points": points}


def cache_summary_response(table: pa.Table) -> dict:
    t = pl.DataFrame(pl.from_arrow(table)).row(0, named=True)
    hits = t["simple_hits"] + t["semantic_hits"]
    misses = t["requests"] - hits
    hit_latency = t["hit_latency_sum"] / hits if hits else 0.0
    miss_latency = t["miss_latency_sum"] / misses if misses else 0.0
    speedup = 100 * (miss_latency - hit_latency) / miss_latency if hits and miss_latency else 0.0
    summary = {"hits": hits, "avg_latency": round_half_away(hit_latency), "total_requests": t["requests"],
               "cache_speedup": round_half_away(speedup)}
    return {"object": "analytics-summary", "summary": summary}
