"""The requests whose trace has feedback (``feedback_generations``, migration 0025).

Analytics reads them instead of probing every request of a window for feedback
(docs/analytics.md, "Requests with feedback"). The invariant, which every read relies on:
every request of ``generations`` whose (organisation, workspace, trace hash) is in
``trace_feedback`` is in the table. Two writers keep it, each after its own insert was
acknowledged and before its offsets are committed:

- the feedback side, :func:`copy_traces`, which :func:`warehouse.queries.feedback.refresh_traces`
  calls after rewriting the per-trace sums of a batch's traces (every path that changes
  ``trace_feedback`` goes through it): the requests of those traces;
- the gateway-log side, :func:`copy_batch`, after a batch of requests is stored: the batch's
  requests whose trace has feedback (found between the batch's first and last ``created_at``,
  among its trace ids).

A request stored at g and looked for at g' > g, feedback stored at f and looked for at
f' > f: a side misses the other only if g' < f and f' < g, which cannot both hold. A copy
that fails fails its batch, which is inserted and copied again; the copies of a request
collapse under ``FINAL`` (the sorting key of ``generations``).

Single server only: in cluster mode a ``generations`` insert is no quorum write, so the
feedback side could miss a request that a lagging replica lacks, and nothing would copy it
later. There, nothing keeps the table and analytics probes ``generations`` (:func:`kept`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from warehouse.cluster import layout

TABLE = "feedback_generations"

# What analytics reads of a request (filters, group keys, measures): the columns of the table.
COLUMNS = (
    "id", "organisation_id", "workspace_slug", "created_at", "prompt_slug", "config", "ai_org", "ai_model",
    "req_units", "res_units", "total_units", "cost", "response_status_code", "response_time", "cache_status",
    "retry_success_count", "trace_id", "span_id", "mode", "virtual_key", "last_used_option_index",
    "metadata.key", "metadata.value", "api_key_id", "metadata_user", "user_hash", "trace_hash",
    "metadata_pairs", "metadata_key_hashes",
)
_COLUMNS = ", ".join(COLUMNS)
_COPY = f"INSERT INTO {TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM generations WHERE organisation_id IN {{orgs:Array(String)}}"
# The hashes of the trace ids of {trace_ids}.
_TRACE_HASHES = "(SELECT cityHash64(arrayJoin({trace_ids:Array(String)})))"
# The request's trace has feedback in its own workspace (a trace is a trace id within a workspace).
_IN_TRACE_FEEDBACK = (" AND (organisation_id, workspace_slug, trace_hash) IN (SELECT organisation_id, workspace_slug, trace_hash "
                      "FROM trace_feedback WHERE organisation_id IN {orgs:Array(String)}")
_HAS_FEEDBACK_ALL = _IN_TRACE_FEEDBACK + ")"
_HAS_FEEDBACK = _IN_TRACE_FEEDBACK + f" AND trace_hash IN {_TRACE_HASHES})"  # ... among those of {trace_ids}


def kept(client: Client) -> bool:
    """Whether this warehouse keeps the table, and analytics reads it: a single server, not a cluster."""
    return layout(client).cluster is None


def copy_traces(client: Client, traces: Iterable[tuple[str, str]] | None, orgs: Iterable[str] = (),
                settings: dict | None = None) -> None:
    """Copy the requests of these (organisation, trace id) pairs whose trace has feedback in the
    request's workspace (every request of ``orgs`` whose trace has feedback when ``traces`` is None).

    Reads the organisations' requests of those traces, wherever they are in time: on the 10M-row
    benchmark 60 ms for a batch of 10 traces, 560 ms for 1,000 (their requests are in most
    granules, each read whole), growing with the table (docs/ingest.md)."""
    if not kept(client):
        return
    if traces is None:
        params = {"orgs": sorted(set(orgs))}
        sql = _COPY + _HAS_FEEDBACK_ALL
    else:
        pairs = set(traces)
        if not pairs:
            return
        params = {"orgs": sorted({o for o, _ in pairs}), "trace_ids": sorted({t for _, t in pairs})}
        # The hash first (8 bytes per request), then the ids (their bloom index skips granules for a
        # few traces): 1,000 traces 840 → 560 ms on the benchmark, 10 traces 70 → 60 ms.
        sql = _COPY + f" AND trace_hash IN {_TRACE_HASHES} AND trace_id IN {{trace_ids:Array(String)}}" + _HAS_FEEDBACK
    client.command(sql, parameters=params, settings=settings)


def copy_batch(client: Client, orgs: Iterable[str], first_ms: int, last_ms: int, trace_ids: Iterable[str]) -> None:
    """Copy a stored batch's requests whose trace has feedback: the requests of ``orgs`` from
    ``first_ms`` to ``last_ms`` (epoch milliseconds, the batch's first and last ``created_at``)
    on those of ``trace_ids`` (the batch's non-empty ones) that have feedback. Requests of other
    batches that the range and ids also select are copied too, which is harmless: they belong
    in the table.

    Most batches have no trace with feedback yet (feedback follows its requests): a lookup of the
    batch's traces in ``trace_feedback`` (its sorting key) settles that, and nothing is read of
    ``generations`` then."""
    trace_ids = sorted(set(trace_ids))
    if not trace_ids or not kept(client):
        return
    params = {"orgs": sorted(set(orgs)), "trace_ids": trace_ids}
    with_feedback = client.query(
        "SELECT t FROM (SELECT arrayJoin({trace_ids:Array(String)}) AS t) WHERE cityHash64(t) IN "
        f"(SELECT trace_hash FROM trace_feedback WHERE organisation_id IN {{orgs:Array(String)}} AND trace_hash IN {_TRACE_HASHES})",
        parameters=params).result_rows
    if not with_feedback:
        return
    params["trace_ids"] = sorted(t for (t,) in with_feedback)
    # a millisecond wider on each side: nothing a conversion could round away is missed
    params["first"], params["last"] = _utc_naive_ms(first_ms - 1), _utc_naive_ms(last_ms + 1)
    sql = (_COPY + " AND created_at >= {first:DateTime64(3, 'UTC')} AND created_at <= {last:DateTime64(3, 'UTC')}"
           " AND trace_id IN {trace_ids:Array(String)}" + _HAS_FEEDBACK)
    client.command(sql, parameters=params)


def _utc_naive_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)
