"""``/v1/analytics``: graphs, the cache summary and groups (docs/analytics.md).

Each handler: validated filters (``params``) → one or two aggregate queries in
ClickHouse (``warehouse.queries.analytics``) → Polars shaping (``metrics``).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request, Response

from analytics_api.metrics import graphs, groups
from analytics_api.params import AnalyticsQuery, analytics_query, invalid, parse_list
from warehouse.queries import analytics as q

router = APIRouter(prefix="/analytics", tags=["analytics"])

graph_query = analytics_query(bucketed=True)
window_query = analytics_query(bucketed=False)
org_window_query = analytics_query(bucketed=False, spans_organisation=lambda request: True)
group_by_query = analytics_query(bucketed=False, spans_organisation=lambda request: request.path_params.get("group_by") == "workspace")

# Public group_by names (the SDK's) → warehouse group key.
GROUP_BY = ("ai_service", "model", "status_code", "api_key", "config", "workspace", "provider", "prompt")
MAX_PAGE_SIZE = 1_000


def _json(body: dict) -> Response:
    """The body as JSON, written by orjson: FastAPI's own path (``jsonable_encoder``, then ``json.dumps``)
    took 0.7 ms of the all-columns group's call, orjson 0.005. The bodies hold only str, int, float,
    bool, None, lists and dicts with str keys (Polars' ``to_dicts`` of shaped frames)."""
    return Response(orjson.dumps(body), media_type="application/json")


def _graph_route(name: str, graph: graphs.Graph):
    def handler(request: Request, aq: AnalyticsQuery = Depends(graph_query)) -> Response:
        with request.app.state.warehouse.borrow() as client:
            if graph.feedback:
                table = q.feedback_series(client, aq.where, aq.buckets.granularity, aq.buckets.offset_seconds)
            else:
                table = q.series(client, aq.where, list(graph.measures), aq.buckets.granularity, aq.buckets.offset_seconds)
        return _json(graphs.graph_response(graph, aq.buckets, table))

    handler.__name__ = "graph_" + name.replace("/", "_").replace("-", "_")
    router.add_api_route(f"/graphs/{name}", handler, methods=["GET"], summary=f"{name} graph")


for _name, _graph in graphs.GRAPHS.items():
    _graph_route(_name, _graph)


@router.get("/graphs/errors/status-codes", summary="errors per status code")
def errors_status_codes(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    with request.app.state.warehouse.borrow() as client:
        table = q.totals(client, aq.where, list(graphs.STATUS_CODES_MEASURES))
    return _json(graphs.status_codes_response(table))


@router.get("/graphs/feedbacks/scores", summary="feedback per score")
def feedbacks_scores(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    with request.app.state.warehouse.borrow() as client:
        table = q.feedback_by(client, aq.where, "score")
    return _json(graphs.feedback_scores_response(table))


@router.get("/graphs/feedbacks/ai-models", summary="feedback per model")
def feedbacks_ai_models(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    with request.app.state.warehouse.borrow() as client:
        table = q.feedback_by(client, aq.where, "model")
    return _json(graphs.feedback_models_response(table))


@router.get("/summary/cache", summary="cache summary")
def summary_cache(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    with request.app.state.warehouse.borrow() as client:
        table = q.totals(client, aq.where, list(graphs.CACHE_SUMMARY_MEASURES))
    return _json(graphs.cache_summary_response(table))


# ---- groups -------------------------------------------------------------------

def _int_param(request: Request, name: str, default: int, high: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, "must be an integer ≥ 0", raw) from None
    if value < 0 or (high is not None and value > high):
        raise invalid(name, f"must be between 0 and {high}" if high is not None else "must be ≥ 0", raw)
    return value


def _page(request: Request, fields: list[str], key_name: str, default_order: str) -> groups.Page:
    order_by = request.query_params.get("order_by") or default_order
    if order_by not in fields and order_by != key_name:
        raise invalid("order_by", f"must be {key_name} or one of the returned fields ({', '.join(fields)})", order_by)
    direction = (request.query_params.get("order_by_type") or "desc").lower()
    if direction not in ("asc", "desc"):
        raise invalid("order_by_type", "must be asc or desc", direction)
    return groups.Page(
        order_by=order_by,
        descending=direction == "desc",
        current_page=_int_param(request, "current_page", 0),
        page_size=_int_param(request, "page_size", 20, MAX_PAGE_SIZE),
    )


def _include_total(request: Request) -> bool:
    raw = (request.query_params.get("include_total") or "false").strip().lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid("include_total", "must be true or false", raw)
    return raw in ("true", "1")


def _grouped(request: Request, aq: AnalyticsQuery, group: str, measures: list[str], metadata_key: str | None = None,
             feedback: bool = False, total: bool = True):
    """The groups' table, and their feedback columns as a second table when a single server reads
    them apart (``grouped_split``: at once on a second client when one is idle), else None."""
    pool = request.app.state.warehouse
    with pool.borrow() as client:
        if feedback and q.reads_feedback_copy(client):
            with pool.borrow_spare() as spare:
                return q.grouped_split(client, spare, aq.where, group, measures, metadata_key=metadata_key, total=total)
        return q.grouped(client, aq.where, group, measures, metadata_key=metadata_key, feedback=feedback, total=total), None


def _requests_and_cost(request: Request, aq: AnalyticsQuery, group: str, key_name: str) -> Response:
    """The spec's users and ai-models groups: requests and cost, as strings."""
    page = _page(request, ["requests", "cost"], key_name, "requests")
    with request.app.state.warehouse.borrow() as client:
        table = q.grouped(client, aq.where, group, ["requests", "cost"], total=False)
    return _json(groups.respond(table, key_name, groups.USERS_FIELDS, page, formats=groups.AS_STRINGS))


@router.get("/groups/users", summary="requests and cost per user")
def group_users(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    return _requests_and_cost(request, aq, "user", "user")


@router.get("/groups/ai-models", summary="requests and cost per model")
def group_ai_models(request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:
    return _requests_and_cost(request, aq, "model", "ai_model")


@router.get("/groups/metadata/{metadataKey:path}", summary="requests, cost, tokens and feedback per metadata value")
def group_metadata(metadataKey: str, request: Request, aq: AnalyticsQuery = Depends(window_query)) -> Response:  # noqa: N803 (spec name)
    if not metadataKey or len(metadataKey) > 256:
        raise invalid("metadataKey", "must be 1–256 characters", metadataKey[:300])
    fields = list(groups.METADATA_FIELDS)
    page = _page(request, fields, "metadata_value", "requests")
    table, feedback = _grouped(request, aq, "metadata", ["requests", "cost", "tokens", "last_seen"],
                               metadata_key=metadataKey, feedback=True, total=False)
    return _json(groups.respond(table, "metadata_value", groups.METADATA_FIELDS, page, feedback=feedback))


def _columns_group(request: Request, aq: AnalyticsQuery, group: str, key_name: str) -> Response:
    columns = list(parse_list(request, "columns")) or list(groups.DEFAULT_COLUMNS)
    unknown = [c for c in columns if c not in groups.COLUMNS]
    if unknown:
        raise invalid("columns", f"unknown column(s) {', '.join(unknown)}; valid: {', '.join(groups.COLUMNS)}", request.query_params.get("columns"))
    page = _page(request, columns, key_name, "requests" if "requests" in columns else columns[0])
    include_total = _include_total(request)
    measures = groups.measures_for(columns)
    wants_feedback = any(groups.COLUMNS[c].feedback for c in columns)
    table, feedback = _grouped(request, aq, group, measures, feedback=wants_feedback, total=include_total)
    fields = {c: groups.COLUMNS[c].expr for c in columns}
    return _json(groups.respond(table, key_name, fields, page, summary=include_total, feedback=feedback))


@router.get("/groups/workspaces", summary="the chosen columns per workspace")
def group_workspaces(request: Request, aq: AnalyticsQuery = Depends(org_window_query)) -> Response:
    return _columns_group(request, aq, "workspace", "workspace_slug")


@router.get("/groups/{group_by}", summary="the chosen columns per ai_service, model, status_code, api_key, config, workspace, provider or prompt")
def group_by(group_by: str, request: Request, aq: AnalyticsQuery = Depends(group_by_query)) -> Response:
    if group_by not in GROUP_BY:
        raise invalid("group_by", f"must be one of {', '.join(GROUP_BY)}", group_by)
    return _columns_group(request, aq, group_by, group_by)
