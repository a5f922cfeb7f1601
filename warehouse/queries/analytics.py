"""Analytics aggregates over ``generations`` (and ``feedback``), returned as Arrow.

Every query is assembled from allow-listed fragments: the measures below, the
group keys below, the bucket expressions of :func:`bucket_sql` and the compiled
WHERE of :mod:`warehouse.filters`. User values only ever arrive as bound
parameters.

Results carry one row per bucket (or group) plus, thanks to ``GROUPING SETS``,
one row for the whole selection with a NULL key: summaries of distinct counts and
percentiles are the true window values, computed in the same scan.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from warehouse.client import with_settings
from warehouse.filters import Where
from warehouse.queries.feedback_generations import TABLE as FEEDBACK_GENERATIONS, kept as keeps_feedback_generations
from warehouse.queries.final import FINAL_READ
from warehouse.queries.metadata import texts as metadata_texts

HITS = "('HIT', 'SEMANTIC HIT')"
SUCCEEDED = "response_status_code < 400"

# name → aggregate over generations. Ratios are finished in Polars from these.
MEASURES: dict[str, str] = {
    "requests": "count()",
    "cost": "sum(ifNull(cost, 0))",
    "tokens": "sum(total_units)",
    "prompt_tokens": "sum(req_units)",
    "completion_tokens": "sum(res_units)",
    "latency_sum": "sum(response_time)",
    "latency_q": "quantilesExact(0.5, 0.9, 0.99)(response_time)",
    "users": "uniqExactIf(user_hash, user_hash != 0)",  # distinct users by their 64-bit hash (0016)
    "user_requests": "countIf(user_hash != 0)",
    "errors": "countIf(response_status_code >= 400)",
    "error_codes": "sumMapIf([response_status_code], [toUInt64(1)], response_status_code >= 400)",
    "simple_hits": "countIf(cache_status = 'HIT')",
    "semantic_hits": "countIf(cache_status = 'SEMANTIC HIT')",
    # Both kinds at once, for the groups' cache columns: one aggregate instead of the two above
    # (−2 ms of the all-columns group's ~95).
    "cache_hits": f"countIf(cache_status IN {HITS})",
    "simple_savings": "sumIf(ifNull(cost, 0), cache_status = 'HIT')",
    "semantic_savings": "sumIf(ifNull(cost, 0), cache_status = 'SEMANTIC HIT')",
    "hit_latency_sum": f"sumIf(response_time, ifNull(cache_status, '') IN {HITS})",
    "miss_latency_sum": f"sumIf(response_time, ifNull(cache_status, '') NOT IN {HITS})",
    "retry_rescued": f"countIf(retry_success_count > 0 AND {SUCCEEDED})",
    "retry_attempts": f"sumMapIf([retry_success_count], [toUInt64(1)], retry_success_count > 0 AND {SUCCEEDED})",
    "fallback_rescued": f"countIf(mode = 'fallback' AND last_used_option_index > 0 AND {SUCCEEDED})",
    "last_seen": "max(created_at)",
}

# group_by name → key expression over generations.
GROUP_KEYS: dict[str, str] = {
    "ai_service": "ai_org",
    "model": "ai_model",
    "status_code": "response_status_code",
    "api_key": "api_key_id",
    "config": "config",
    "workspace": "workspace_slug",
    "provider": "virtual_key",
    "prompt": "prompt_slug",
    # The hash of the user (0016) and of the key's pair (0016, 0023): their texts are
    # looked up after grouping (metadata_values, 0023).
    "user": "user_hash",
    "metadata": "metadata_pairs[indexOf(metadata_key_hashes, cityHash64({group_metadata_key:String}))]",
}

GRANULARITIES = ("minute", "hour", "day", "week", "month")

FINAL_SETTINGS = {
    **FINAL_READ,
    "group_by_use_nulls": 1,
    # A measure named like a column (`cost`) must not capture that column in WHERE.
    "prefer_column_name_to_alias": 1,
    # toStartOfHour(DateTime64) is a DateTime64, toMonday(DateTime64) a Date32 (see bucket_sql).
    "enable_extended_results_for_datetime_functions": 1,
    # Decompressed column blocks are kept for the next reads (the server's uncompressed cache:
    # TOLLGATE_UNCOMPRESSED_CACHE_MB embedded, uncompressed_cache_size on a server; nothing
    # without it). A dashboard reads the same columns of the same window query after query,
    # and decompressing them was a third of each query. A read of more than 2,048 granules
    # bypasses it rather than evict the rest: ClickHouse counts this limit in granules of
    # 8,192 rows, but generations' granules hold ~2,200 rows (merges write 2,048-row blocks,
    # 0015), so that is ~4.5M requests, three times the benchmark's largest workspace month;
    # organisation-wide scans of all its workspaces are not cached.
    "use_uncompressed_cache": 1,
    "merge_tree_max_rows_to_use_cache": 2_048 * 8_192,
}


def read(client: Client, sql: str, params: dict) -> pa.Table:
    """Run an analytics query (with FINAL_SETTINGS, in its text: see with_settings)."""
    return client.query_arrow(with_settings(sql, FINAL_SETTINGS), parameters=params)


def _requests(client: Client, where: Where) -> str:
    """The table of the requests ``where`` selects: ``feedback_generations`` (0025) when they all have
    feedback (the weighted-feedback filter) and the warehouse keeps it, else ``generations``."""
    if where.only_traces_with_feedback and keeps_feedback_generations(client):
        return FEEDBACK_GENERATIONS
    return "generations"


def bucket_sql(column: str, granularity: str) -> str:
    """Bucket start, as epoch seconds of the wall clock at ``{tz_offset:Int32}``.

    Computed in DateTime64 and Date32 (``enable_extended_results_for_datetime_functions``
    in FINAL_SETTINGS): DateTime and Date would saturate outside 1970..2106 (2149 for
    dates), where stored requests (1970..2200) and their wall clocks (1969 west of UTC) lie."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    local = f"({column} + toIntervalSecond({{tz_offset:Int32}}))"
    start = {
        "minute": f"toStartOfMinute({local})",
        "hour": f"toStartOfHour({local})",
        "day": f"toStartOfDay({local})",
        "week": f"toDateTime64(toMonday({local}), 3, 'UTC')",
        "month": f"toDateTime64(toStartOfMonth({local}), 3, 'UTC')",
    }[granularity]
    return f"intDiv(toUnixTimestamp64Milli({start}), 1000)"


def _group_condition(group: str, condition: str, params: dict, metadata_key: str | None) -> tuple[str, str]:
    """Users and metadata groups only hold requests with a non-empty value (the user hash is 0
    without one; a metadata pair hash is 0 without the key, the hash of (key, '') with an
    empty value)."""
    if group == "metadata" and metadata_key == "_user":
        group = "user"
    if group == "user":
        condition += f" AND {GROUP_KEYS[group]} != 0"
    if group == "metadata":
        params["group_metadata_key"] = metadata_key
        condition += f" AND {GROUP_KEYS[group]} NOT IN (0, cityHash64({{group_metadata_key:String}}, ''))"
    return group, condition


def _select(measures: list[str]) -> str:
    return ", ".join(f"{MEASURES[m]} AS {m}" for m in measures)


def series(client: Client, where: Where, measures: list[str], granularity: str, tz_offset: int) -> pa.Table:
    """One row per non-empty bucket (``bucket`` = local epoch seconds) plus the total row (bucket NULL)."""
    sql = (
        f"SELECT {bucket_sql('created_at', granularity)} AS bucket, {_select(measures)} "
        f"FROM {_requests(client, where)} FINAL WHERE {where.sql} "
        "GROUP BY GROUPING SETS ((bucket), ())"
    )
    return read(client, sql, {**where.params, "tz_offset": tz_offset})


def totals(client: Client, where: Where, measures: list[str]) -> pa.Table:
    """One row: the measures over the whole selection."""
    sql = f"SELECT {_select(measures)} FROM {_requests(client, where)} FINAL WHERE {where.sql}"
    return read(client, sql, where.params)


def grouped(client: Client, where: Where, group: str, measures: list[str], metadata_key: str | None = None,
            feedback: bool = False, total: bool = True) -> pa.Table:
    """One row per group (``key``) plus, with ``total``, the row of the whole selection (key NULL).
    Users and metadata groups drop requests without a (non-empty) value; their rows also
    carry ``key_hash``, the hash the requests were grouped by (``key`` is its text).

    With ``feedback``, also ``requests_with_feedback`` and the feedback sums
    (FEEDBACK_MEASURES) of each group's distinct traces, in the same scan: see
    :func:`_with_feedback` (what a cluster reads; a single server reads :func:`grouped_split`)."""
    from warehouse.queries import daily  # (it builds on this module's measures)

    if daily.serves(where, group, measures, feedback):
        table = daily.grouped_by_workspace(client, where, measures, total)
        if table is not None:
            return table
    params = dict(where.params)
    group, condition = _group_condition(group, where.sql, params, metadata_key)
    if not feedback:
        sql = _groups(_requests(client, where), GROUP_KEYS[group], condition, total, measures)
    else:
        sql = _with_feedback(where, GROUP_KEYS[group], condition, total, measures)
    return read(client, _with_texts(sql, where, group, total), params)


def grouped_split(client: Client, spare: Client | None, where: Where, group: str, measures: list[str],
                  metadata_key: str | None = None, total: bool = True) -> tuple[pa.Table, pa.Table]:
    """:func:`grouped` with ``feedback``, on a warehouse that keeps ``feedback_generations`` (0025,
    :func:`reads_feedback_copy`): the groups without their feedback columns, and those columns
    per group (``key``; the hash for users and metadata groups) and total row, from the requests
    with feedback alone, as two queries, at once when ``spare`` (a second client) is given.
    ``metrics.groups.respond`` merges them by key.

    Two queries at once instead of one: on the 10M-row benchmark's all-columns group 87–91 ms
    against 105–109 (docs/analytics.md, "Requests with feedback"). The feedback columns no longer
    probe every request of the window for feedback, and the two queries share the two cores."""
    params = dict(where.params)
    group, condition = _group_condition(group, where.sql, params, metadata_key)
    key = GROUP_KEYS[group]
    main = _with_texts(_groups(_requests(client, where), key, condition, total, measures), where, group, total)
    feedback = _feedback_of_groups(where, key, condition, total)
    if spare is None:
        return read(client, main, params), read(client, feedback, params)
    pending = _SPARE.submit(read, spare, feedback, params)
    try:
        groups = read(client, main, params)
    finally:
        wait([pending])  # the spare client goes back to the pool only once its query is done
    return groups, pending.result()


def reads_feedback_copy(client: Client) -> bool:
    """Whether groups with feedback columns are read with :func:`grouped_split` (a single server)."""
    return keeps_feedback_generations(client)


# The second query of grouped_split runs here (the route's own thread runs the first).
_SPARE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="analytics-spare")

# Measures whose per-request state is large (every latency, every user): with a total row, their
# groups' states are merged into it rather than computed a second time over every request.
_HEAVY = {"latency_q", "users"}


def _groups(source: str, key: str, condition: str, total: bool, measures: list[str]) -> str:
    """One row per group of the selected requests, plus, with ``total``, the total row (key NULL)."""
    if not total:
        return f"SELECT {key} AS key, {_select(measures)} FROM {source} FINAL WHERE {condition} GROUP BY key"
    if _HEAVY.isdisjoint(measures):
        return f"SELECT {key} AS key, {_select(measures)} FROM {source} FINAL WHERE {condition} GROUP BY GROUPING SETS ((key), ())"
    return _total_from_groups(f"SELECT {key} AS key, {_group_states(measures)} FROM {source} FINAL WHERE {condition} GROUP BY key", measures)


def _with_texts(sql: str, where: Where, group: str, total: bool) -> str:
    """Users and metadata groups: the texts of their keys (metadata_values, 0023), ``key_hash`` kept."""
    if group not in ("user", "metadata"):
        return sql
    if total:
        raise ValueError(f"{group} groups have no total row")
    # LEFT: a hash without its text (never, as ingest stores the texts first) would show as an
    # empty value rather than vanish from the counts.
    texts = metadata_texts(where.one_workspace, user=group == "user")
    return f"SELECT v.value AS key, g.key AS key_hash, g.* EXCEPT (key) FROM ({sql}) AS g LEFT JOIN ({texts}) AS v ON v.hash = g.key"


# Feedback joins its trace's requests on the 64-bit hash of trace_id, materialized in
# both tables (`generations.trace_hash`, 0008; `feedback.trace_hash`, 0020): grouping
# and joining 8-byte integers instead of strings, and the generations side never reads
# trace_id. Two different trace ids of one workspace sharing a hash would be taken
# for one trace (about one chance in 10^19 per pair; docs/analytics.md).
#
# A trace is a trace id within a workspace: feedback counts for the requests of its trace
# in its own workspace. Feedback is read through `trace_feedback` (migration 0022): per
# (workspace, trace), the sums of its latest feedback versions, which the feedback ingest
# rewrites after every batch. A query of one workspace (every query but the
# organisation-wide groups) reads that workspace's rows only, a range of the table's
# sorting key, and names a trace by its hash alone; an organisation-wide one names it by
# (workspace, hash). Only traces that have feedback can join it: a cheap set lookup spares
# grouping every trace of the window. A trace that has a row has feedback (rows are never
# removed, like feedback), so membership needs no FINAL. Feedback trace ids are never
# empty (docs/events.md), so the set holds no request without a trace.


def _trace_columns(where: Where) -> dict[str, str]:
    """Name → expression of the columns that name a trace among the requests ``where`` selects.

    Organisation-wide the workspace is ``identity(workspace_slug)``: under ``GROUPING SETS`` a group
    key ``workspace_slug AS key`` must stay another expression, or its NULL row would vanish."""
    if where.one_workspace:
        return {"trace_hash": "trace_hash"}
    return {"tws": "identity(workspace_slug)", "trace_hash": "trace_hash"}


def _trace_feedback(where: Where, columns: str, final: bool = False) -> str:
    """A SELECT of ``trace_feedback`` rows of the selection's organisation (and workspace)."""
    workspace = " AND workspace_slug = {scope_ws:String}" if where.one_workspace else ""
    return (f"SELECT {columns} FROM trace_feedback{' FINAL' if final else ''} "
            f"WHERE organisation_id = {{scope_org:String}}{workspace}")


def _has_feedback(where: Where) -> str:
    """The test "this request's trace has feedback", for the requests ``where`` selects.

    Under the weighted-feedback filter every selected request passed it already (that
    filter's traces are a subset of these): building and probing the set again cost
    10–15 ms per query on the benchmark (metadata/_user 113 → 98 ms)."""
    if where.only_traces_with_feedback:
        return "1"
    columns = "trace_hash" if where.one_workspace else "workspace_slug, trace_hash"
    return f"({columns}) IN ({_trace_feedback(where, columns)})"


def _select_trace(where: Where) -> str:
    return ", ".join(f"{expr} AS {name}" if expr != name else name for name, expr in _trace_columns(where).items())


def _on_trace(where: Where) -> str:
    """The join condition of a ``trace_feedback`` row (``f``) and a trace (``t``)."""
    return " AND ".join(f"f.{name} = t.{name}" for name in _trace_columns(where))


# What a query may need of a trace's requests: when it started, and the model of its
# first request (requests that started at the same millisecond: the smallest model name).
# minArgMin: the min of ai_model over the rows of the least created_at, comparing strings
# only on ties (argMin over the tuple (created_at, ai_model) built and compared a tuple per
# row: 90 → 69 ms for the benchmark's traces; breaking ties by the smaller id read every
# matched row's id string).
TRACE_ATTRIBUTES = {
    "first_at": "min(created_at)",
    "model": "minArgMin(ai_model, created_at)",
}


def _traces(client: Client, where: Where, attributes: tuple[str, ...] = ()) -> str:
    """The traces (``trace_hash``, and ``tws``, the workspace, organisation-wide) of the selected
    generations that have feedback, with their number of requests and the asked
    ``attributes`` (names of TRACE_ATTRIBUTES): read from the requests with feedback alone
    (``feedback_generations``, 0025) where the warehouse keeps them, else by probing every
    selected request."""
    names = ", ".join(_trace_columns(where))
    extra = "".join(f", {TRACE_ATTRIBUTES[a]} AS {a}" for a in attributes)
    if keeps_feedback_generations(client):
        source = f"{FEEDBACK_GENERATIONS} FINAL WHERE {where.sql}"
    else:
        source = f"generations FINAL WHERE {where.sql} AND {_has_feedback(where)}"
    return f"SELECT {_select_trace(where)}{extra}, count() AS requests FROM {source} GROUP BY {names}"


# The feedback of each trace: its count, Σ value·weight, Σ weight and the count per score.
def _per_trace(where: Where) -> str:
    names = "trace_hash" if where.one_workspace else "workspace_slug AS tws, trace_hash"
    return _trace_feedback(where, f"{names}, feedbacks, weighted_sum, weight_sum, score_values, score_counts", final=True)


FEEDBACK_MEASURES = "sum(f.feedbacks) AS feedbacks, sum(f.weighted_sum) AS weighted_sum, sum(f.weight_sum) AS weight_sum"


def feedback_series(client: Client, where: Where, granularity: str, tz_offset: int) -> pa.Table:
    """Feedback per bucket of its trace's first request, plus the total row."""
    sql = (
        f"SELECT {bucket_sql('t.first_at', granularity)} AS bucket, {FEEDBACK_MEASURES} "
        f"FROM ({_per_trace(where)}) AS f INNER JOIN ({_traces(client, where, attributes=('first_at',))}) AS t ON {_on_trace(where)} "
        "GROUP BY GROUPING SETS ((bucket), ())"
    )
    return read(client, sql, {**where.params, "tz_offset": tz_offset})


def feedback_by(client: Client, where: Where, by: str) -> pa.Table:
    """Feedback counted per ``score`` (its value) or per ``model`` (of the trace's first request).

    Per score only ``feedbacks`` is meaningful (the trace's count of that score)."""
    traces = _traces(client, where, attributes=('model',) if by == 'model' else ())
    joined = f"FROM ({_per_trace(where)}) AS f INNER JOIN ({traces}) AS t ON {_on_trace(where)}"
    if by == "score":
        sql = (
            f"SELECT score AS key, sum(n) AS feedbacks FROM (SELECT f.score_values AS vals, f.score_counts AS counts {joined}) "
            "ARRAY JOIN vals AS score, counts AS n GROUP BY GROUPING SETS ((key), ())"
        )
    else:
        sql = f"SELECT t.model AS key, {FEEDBACK_MEASURES} {joined} GROUP BY GROUPING SETS ((key), ())"
    return read(client, sql, where.params)


# With a total row, the feedback scan groups by key only, and the total row is made from the
# group rows (GROUPING SETS over them, below): name → (the scan's aggregate, its merge over
# group rows). The exact percentiles are carried as their state (every value) and merged; the
# distinct users as each group's array of distinct user hashes, whose union is counted.
_TOTAL_FROM_GROUPS: dict[str, tuple[str, str]] = {
    "latency_q": ("quantilesExactState(0.5, 0.9, 0.99)(response_time)", "quantilesExactMerge(0.5, 0.9, 0.99)(latency_q)"),
    "users": ("arrayDistinct(groupArrayIf(user_hash, user_hash != 0))", "toUInt64(arrayUniq(arrayFlatten(groupArray(users))))"),
    "error_codes": (MEASURES["error_codes"], "sumMap(error_codes)"),
    "retry_attempts": (MEASURES["retry_attempts"], "sumMap(retry_attempts)"),
    "last_seen": (MEASURES["last_seen"], "max(last_seen)"),
}
# Every other measure is a count or a sum, merged by sum(). Checked here, at import, so that a
# new measure of another kind fails every test until it is given its merge above.
for _name, _expr in MEASURES.items():
    if _name not in _TOTAL_FROM_GROUPS:
        if not _expr.startswith(("count(", "countIf(", "sum(", "sumIf(")):
            raise ValueError(f"measure {_name} ({_expr}) needs its merge in _TOTAL_FROM_GROUPS")
        _TOTAL_FROM_GROUPS[_name] = (_expr, f"sum({_name})")


def _with_feedback(where: Where, key: str, condition: str, total: bool, measures: list[str]) -> str:
    """A scan of generations per group that also carries, per group, its requests whose
    trace has feedback and the set of those traces; then each group's traces join their
    feedback (``trace_feedback``), so a trace counts once per group, and once in the total
    row however many groups it spans.

    The groups are still one row per key, the traces an array appended to only for requests
    with feedback (docs/analytics.md has the figures against the alternatives).

    With ``total``, the scan groups by key only, and the total row comes from its group rows:
    sums of their counts and sums, the latest of their last_seen, the merge of their percentile
    states, the distinct users of the union of their distinct users, and the union of their
    traces. A second grouping set in the scan did all the per-request work of the
    aggregates a second time; distinct users per group are counted from an array of the
    group's user hashes (one hash set at a time) rather than 40 hash sets at once."""
    trace = _trace_value(where)
    fb = f"countIf(has_feedback) AS requests_with_feedback, groupArrayIf({trace}, has_feedback) AS traces"
    aggregates = _group_states(measures) if total else _select(measures)
    scan = (f"WITH {_has_feedback(where)} AS has_feedback SELECT {key} AS key, {aggregates}, {fb} "
            f"FROM generations FINAL WHERE {condition} GROUP BY key")
    if total:
        scan = _total_from_groups(scan, measures, _TRACES_FROM_GROUPS)
    carried = ", ".join(f"any(g.{m}) AS {m}" for m in [*measures, "requests_with_feedback"])
    # A group without traces keeps one row (LEFT ARRAY JOIN, t = 0 or ('', 0)), which joins no
    # feedback: feedback trace ids are never empty, so no trace_feedback row has hash 0.
    return (
        f"SELECT g.key AS key, {carried}, {FEEDBACK_MEASURES} FROM ({scan}) AS g "
        f"LEFT ARRAY JOIN arrayDistinct(g.traces) AS t LEFT JOIN ({_per_trace(where)}) AS f ON {_on_array_trace(where)} GROUP BY g.key"
    )


def _feedback_of_groups(where: Where, key: str, condition: str, total: bool) -> str:
    """Per group of the selected requests with feedback (``feedback_generations``, 0025), and with
    ``total`` for the total row (key NULL): ``requests_with_feedback`` and the feedback sums of the
    group's distinct traces (a trace counts once per group, and once in the total row)."""
    scan = (f"SELECT {key} AS key, count() AS requests_with_feedback, groupArray({_trace_value(where)}) AS traces "
            f"FROM {FEEDBACK_GENERATIONS} FINAL WHERE {condition} GROUP BY key")
    if total:
        scan = _total_from_groups(scan, [], _TRACES_FROM_GROUPS)
    return (
        f"SELECT g.key AS key, any(g.requests_with_feedback) AS requests_with_feedback, {FEEDBACK_MEASURES} FROM ({scan}) AS g "
        f"LEFT ARRAY JOIN arrayDistinct(g.traces) AS t LEFT JOIN ({_per_trace(where)}) AS f ON {_on_array_trace(where)} GROUP BY g.key"
    )


def _trace_value(where: Where) -> str:
    """A request's trace as the feedback join names it: its hash in one workspace, else (workspace, hash)."""
    return "trace_hash" if where.one_workspace else "(workspace_slug, trace_hash)"


def _on_array_trace(where: Where) -> str:
    """The join condition of a ``trace_feedback`` row (``f``) and a trace ``t`` of a group's trace array."""
    return "f.trace_hash = t" if where.one_workspace else "f.tws = t.1 AND f.trace_hash = t.2"


# The feedback columns' parts of a group row, merged into the total row.
_TRACES_FROM_GROUPS = "sum(requests_with_feedback) AS requests_with_feedback, arrayFlatten(groupArray(traces)) AS traces"


def _group_states(measures: list[str]) -> str:
    """The measures of a group as the total row merges them (_TOTAL_FROM_GROUPS)."""
    return ", ".join(f"{_TOTAL_FROM_GROUPS[m][0]} AS {m}" for m in measures)


def _total_from_groups(scan: str, measures: list[str], carried: str = "") -> str:
    """The group rows of ``scan`` (grouped by ``key``, measures as :func:`_group_states`) and the total
    row made from them (GROUPING SETS over the group rows)."""
    merged = ", ".join([*(f"{_TOTAL_FROM_GROUPS[m][1]} AS {m}" for m in measures), *([carried] if carried else [])])
    return f"SELECT key, {merged} FROM ({scan}) GROUP BY GROUPING SETS ((key), ())"
