"""Spec filters → a parameterized WHERE clause over ``generations``.

The API parses and validates query parameters into :class:`Filters` (typed values
only); this module turns them into SQL text built solely from fixed fragments, with
every user value bound as a ``{name:Type}`` parameter. Nothing the user sends is
ever spliced into SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from warehouse.client import utc_naive
from warehouse.queries.scope import TenantScope

# (filter attribute, column) for the comma-list filters matched with IN.
LIST_FILTERS: tuple[tuple[str, str], ...] = (
    ("virtual_keys", "virtual_key"),
    ("configs", "config"),
    ("api_key_ids", "api_key_id"),
    ("prompt_slug", "prompt_slug"),
    ("trace_id", "trace_id"),
    ("span_id", "span_id"),
    ("cache_status", "cache_status"),
)

# (filter attribute prefix, column, ClickHouse type) for inclusive ranges.
RANGE_FILTERS: tuple[tuple[str, str, str], ...] = (
    ("total_units", "total_units", "UInt64"),
    ("prompt_token", "req_units", "UInt64"),
    ("completion_token", "res_units", "UInt64"),
    ("cost", "ifNull(cost, 0)", "Float64"),
)

# Up to this many provider/model pairs are tested as an OR of equalities, more as one
# tuple IN (a long OR costs more to analyse than it saves).
PAIRS_AS_OR = 32

# The request's user: metadata `_user` ('' when absent), materialized (0004).
USER_EXPR = "metadata_user"


@dataclass(frozen=True)
class Filters:
    """Validated analytics filters. ``start``/``end`` are timezone-aware."""

    start: datetime
    end: datetime
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    status_codes: tuple[int, ...] = ()
    ai_org_models: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    weighted_feedback: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class Where:
    sql: str
    params: dict[str, object]
    # True when the condition itself keeps only requests whose trace has feedback (the
    # weighted-feedback filter): queries then need not test it again.
    only_traces_with_feedback: bool = False
    # True when the condition is only the scope and the time window (t_start, t_end): what
    # the daily totals (warehouse/queries/daily.py) can answer.
    window_only: bool = False

    @property
    def one_workspace(self) -> bool:
        """Every selected request is of one workspace (the scope's ``{scope_ws}``)."""
        return "scope_ws" in self.params


def compile_where(f: Filters, scope: TenantScope) -> Where:
    """The WHERE condition (without the keyword) selecting the filtered generations."""
    sql, base = scope.where()
    parts = [sql, "created_at >= {t_start:DateTime64(3, 'UTC')}", "created_at <= {t_end:DateTime64(3, 'UTC')}"]
    t_start, t_end = ms_bounds(f.start, f.end)
    params: dict[str, object] = {**base, "t_start": t_start, "t_end": t_end}

    for name, column, ch_type in RANGE_FILTERS:
        low, high = f.ranges.get(name, (None, None))
        if low is not None:
            parts.append(f"{column} >= {{{name}_min:{ch_type}}}")
            params[f"{name}_min"] = low
        if high is not None:
            parts.append(f"{column} <= {{{name}_max:{ch_type}}}")
            params[f"{name}_max"] = high

    for name, column in LIST_FILTERS:
        values = f.lists.get(name)
        if values:
            parts.append(f"{column} IN {{{name}:Array(String)}}")
            params[name] = list(values)

    if f.status_codes:
        parts.append("response_status_code IN {status_codes:Array(UInt16)}")
        params["status_codes"] = list(f.status_codes)

    if f.ai_org_models:
        if len(f.ai_org_models) <= PAIRS_AS_OR:
            # Equality on each LowCardinality column compares dictionary positions: on the
            # 10M-row benchmark this OR took 45 → 32 ms where the tuple IN below needs
            # the rows' strings. Alone: single-column INs before it cost more than they
            # discard (1–32 pairs, 2026-11-27; reads under FINAL have no PREWHERE step).
            parts.append(" OR ".join(f"(ai_org = {{aom_o{i}:String}} AND ai_model = {{aom_m{i}:String}})"
                                     for i in range(len(f.ai_org_models))))
            for i, (org, model) in enumerate(f.ai_org_models):
                params[f"aom_o{i}"], params[f"aom_m{i}"] = org, model
        else:
            # The single-column INs discard most rows before the slower tuple test, which needs
            # the rows' strings (70 → 36 ms on the benchmark).
            parts.append("ai_model IN {aom_models:Array(String)}")
            parts.append("ai_org IN {aom_orgs:Array(String)}")
            parts.append("(ai_org, ai_model) IN arrayZip({aom_orgs:Array(String)}, {aom_models:Array(String)})")
            params["aom_orgs"] = [o for o, _ in f.ai_org_models]
            params["aom_models"] = [m for _, m in f.ai_org_models]

    for i, (key, value) in enumerate(f.metadata):
        params[f"mk{i}"], params[f"mv{i}"] = key, value
        if key == "_user" and value:
            parts.append(f"{USER_EXPR} = {{mv{i}:String}}")
        elif value:  # the pair's hash among the request's pair hashes (0016): no string arrays read
            parts.append(f"has(metadata_pairs, cityHash64({{mk{i}:String}}, {{mv{i}:String}}))")
        else:
            parts.append(f"has(metadata.key, {{mk{i}:String}}) AND metadata.value[indexOf(metadata.key, {{mk{i}:String}})] = ''")

    low, high = f.weighted_feedback
    if low is not None or high is not None:
        # The trace's weighted feedback from its per-trace sums (trace_feedback, 0022), as
        # in the feedback queries of warehouse/queries/analytics.py: a trace is a trace id
        # within a workspace, named by its hash alone within the scope's one workspace.
        # Weighted feedback over a total weight of 0 is 0, as everywhere (docs/analytics.md).
        average = "if(weight_sum > 0, weighted_sum / weight_sum, 0)"
        test = []
        if low is not None:
            test.append(f"{average} >= {{wf_min:Float64}}")
            params["wf_min"] = low
        if high is not None:
            test.append(f"{average} <= {{wf_max:Float64}}")
            params["wf_max"] = high
        if scope.workspace_slug is not None:
            trace, workspace = "trace_hash", " AND workspace_slug = {scope_ws:String}"
        else:
            trace, workspace = "workspace_slug, trace_hash", ""
        parts.append(
            f"({trace}) IN (SELECT {trace} FROM trace_feedback FINAL WHERE organisation_id = {{scope_org:String}}"
            f"{workspace} AND {' AND '.join(test)})"
        )
    return Where(" AND ".join(f"({p})" for p in parts), params, only_traces_with_feedback=low is not None or high is not None,
                 window_only=len(parts) == 3)


def ms_bounds(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """Inclusive bounds of an aware range as naive UTC parameters for a DateTime64(3) column.

    Stored times are whole milliseconds and such a parameter drops the digits past them: exact for
    the end (≤ …59.999400 ⇔ ≤ …59.999), but the start must round up (≥ …00.000400 ⇔ ≥ …00.001)."""
    start = start + timedelta(microseconds=-start.microsecond % 1000)
    return utc_naive(start), utc_naive(end)
