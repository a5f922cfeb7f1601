"""Point reads of feedback (PUT /v1/feedback/{id} reads the current version), and the
per-trace feedback sums that analytics read (``trace_feedback``, migration 0022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clickhouse_connect.driver.client import Client

from warehouse.queries.feedback_generations import copy_traces
from warehouse.queries.scope import TenantScope

COLUMNS = ["id", "organisation_id", "workspace_slug", "trace_id", "value", "weight", "metadata.key", "metadata.value",
           "created_at", "updated_at"]


def get_feedback(client: Client, scope: TenantScope, feedback_id: str) -> dict[str, Any] | None:
    """The latest version of a feedback id of this tenant (None when there is none)."""
    where, params = scope.where()
    result = client.query(
        f"SELECT {', '.join(f'`{c}`' for c in COLUMNS)} FROM feedback FINAL WHERE {where} AND id = {{id:String}} LIMIT 1",
        parameters={**params, "id": feedback_id},
    )
    if not result.result_rows:
        return None
    return dict(zip(COLUMNS, result.result_rows[0]))


# The aggregate of a trace's feedback, per workspace, as migration 0022 defines it (the
# migration's backfill computes the same columns). {ids} narrows the FINAL read by the sorting key (exact before
# FINAL: every version of an id has that id); {where} picks the traces after FINAL.
_TRACE_AGGREGATE = (
    "SELECT organisation_id, workspace_slug, trace_hash, count(), sum(value * weight), sum(weight), "
    "(sumMap([value], [toUInt64(1)]) AS scores).1, scores.2, sum(toUInt64(toUnixTimestamp64Milli(updated_at))) "
    "FROM (SELECT organisation_id, workspace_slug, trace_id, trace_hash, value, weight, updated_at FROM feedback FINAL "
    "WHERE organisation_id IN {orgs:Array(String)}{ids}) "
    "{where} GROUP BY organisation_id, workspace_slug, trace_hash"
)
# The ids that have a version on one of the traces (the bloom filter index on trace_id skips
# most of the table for a batch's few traces).
_IDS_ON_TRACES = (
    " AND id IN (SELECT id FROM feedback WHERE organisation_id IN {orgs:Array(String)} "
    "AND trace_id IN {trace_ids:Array(String)})"
)


def refresh_traces(client: Client, traces: Iterable[tuple[str, str]] | None = None, orgs: Iterable[str] = (),
                   settings: dict | None = None) -> None:
    """Rewrite ``trace_feedback`` for these (organisation, trace_id) pairs, in every workspace
    that has feedback on them (or for every trace of ``orgs`` when ``traces`` is None), from
    the latest feedback versions.

    The feedback ingest calls it after each acknowledged batch, before committing its offsets.
    It reads, with FINAL, only the ids that have a version on one of the traces, and keeps
    the traces after FINAL: the latest version of each such id counts for the trace it is on.
    (A version that moved a feedback to another trace, or to another workspace, would leave the
    former one counting it: rewritten without it, the former one's version, Σ updated_at of fewer
    feedback, is smaller than the one written before, which stays in force until the former
    one's own feedback adds up to more. The API's PUT keeps both, docs/events.md.)

    Then the requests of those traces are copied into ``feedback_generations`` (0025), whose
    invariant needs them there from the moment their trace has a row here.
    """
    if traces is None:
        sql, params = _TRACE_AGGREGATE.replace("{ids}", "").replace("{where}", ""), {"orgs": sorted(set(orgs))}
    else:
        pairs = set(traces)
        if not pairs:
            return
        sql = _TRACE_AGGREGATE.replace("{ids}", _IDS_ON_TRACES).replace("{where}", "WHERE trace_id IN {trace_ids:Array(String)}")
        params = {"orgs": sorted({o for o, _ in pairs}), "trace_ids": sorted({t for _, t in pairs})}
    client.command("INSERT INTO trace_feedback " + sql, parameters=params, settings=settings)
    copy_traces(client, None if traces is None else pairs, orgs=params["orgs"], settings=settings)
