"""`trace_feedback` (migration 0022): the per-trace feedback sums analytics read stay exactly
those of the latest feedback versions, whatever the ingest sees: new feedback, updates, updates
redelivered out of order, redelivered batches, and two rewrites of one trace written in the
wrong order. Expectations are computed in Polars from the events the test sent.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import polars as pl

from conftest import publish, wait_ingested, wait_until
from factories import gateway_log, iso
from ingest.events import FEEDBACK, GENERATIONS
from ingest.sink import insert_rows
from warehouse.filters import Filters, compile_where
from warehouse.queries.analytics import FINAL_SETTINGS
from warehouse.queries.feedback import refresh_traces
from warehouse.queries.scope import TenantScope

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def feedback_event(org: str, trace: str, value: int, weight: float, at: datetime, fid: str | None = None,
                   updated: datetime | None = None, workspace: str = "default") -> dict:
    event = {"id": fid or str(uuid.uuid4()), "organisation_id": org, "workspace_slug": workspace, "trace_id": trace,
             "value": value, "weight": weight, "created_at": iso(at)}
    if updated is not None:
        event["updated_at"] = iso(updated)
    return event


def latest_versions(events: list[dict]) -> pl.DataFrame:
    """The latest version of each feedback id (greatest updated_at, which defaults to created_at)."""
    frame = pl.DataFrame([{**e, "updated_at": e.get("updated_at", e["created_at"])} for e in events])
    return frame.sort("updated_at").group_by("id").last()


def expected_sums(events: list[dict]) -> pl.DataFrame:
    """Per trace: the latest versions of its feedback, summed."""
    return (latest_versions(events).group_by("trace_id")
            .agg(pl.len().alias("feedbacks"), (pl.col("value") * pl.col("weight")).sum().alias("weighted_sum"),
                 pl.col("weight").sum().alias("weight_sum"))
            .sort("trace_id"))


def stored_sums(client, org: str, traces: list[str]) -> pl.DataFrame:
    """trace_feedback FINAL, keyed back to trace ids (their hash computed by ClickHouse, as on insert)."""
    rows = client.query(
        "SELECT t.trace_id, f.feedbacks, f.weighted_sum, f.weight_sum, f.score_values, f.score_counts "
        "FROM (SELECT * FROM trace_feedback FINAL WHERE organisation_id = {org:String}) AS f "
        "INNER JOIN (SELECT arrayJoin({traces:Array(String)}) AS trace_id, cityHash64(trace_id) AS h) AS t ON f.trace_hash = t.h "
        "ORDER BY t.trace_id", parameters={"org": org, "traces": traces}).result_rows
    return pl.DataFrame(rows, schema=["trace_id", "feedbacks", "weighted_sum", "weight_sum", "score_values", "score_counts"],
                        orient="row")


def assert_matches(stored: pl.DataFrame, events: list[dict]) -> None:
    expected = expected_sums(events)
    assert stored["trace_id"].to_list() == expected["trace_id"].to_list()
    assert stored["feedbacks"].to_list() == expected["feedbacks"].to_list()
    for name in ("weighted_sum", "weight_sum"):
        assert [round(v, 9) for v in stored[name]] == [round(v, 9) for v in expected[name]], name
    # the score counts add up to the trace's feedback, one entry per distinct score
    assert [sum(c) for c in stored["score_counts"]] == stored["feedbacks"].to_list()


def test_ingest_keeps_per_trace_sums_exact_through_updates_and_redeliveries(settings, producer, workers, warehouse, org):
    rng = random.Random(21)
    traces = [f"trace-{i}" for i in range(40)]
    first = [feedback_event(org, rng.choice(traces), rng.randint(-10, 10), rng.choice([0.0, 0.25, 1.0]),
                            T0 + timedelta(seconds=i)) for i in range(300)]
    publish(producer, settings.topic_feedback, first)
    # updates of a third of them (later updated_at), one of each pair redelivered late and
    # out of order (its older version sent again after the newer one), and a redelivered slice
    updates = [{**e, "value": rng.randint(-10, 10), "weight": rng.choice([0.5, 1.0]),
                "updated_at": iso(T0 + timedelta(hours=1, seconds=i))} for i, e in enumerate(first[::3])]
    more = [feedback_event(org, rng.choice(traces), rng.randint(-10, 10), 1.0, T0 + timedelta(hours=2, seconds=i))
            for i in range(60)]
    publish(producer, settings.topic_feedback, updates + more + first[:50] + updates[:10])
    events = first + updates + more

    expected = [round(v, 9) for v in expected_sums(events)["weighted_sum"]]
    assert wait_until(lambda: [round(v, 9) for v in stored_sums(warehouse, org, traces)["weighted_sum"]] == expected, timeout=60)
    assert_matches(stored_sums(warehouse, org, traces), events)
    # the score counts are the latest values' counts
    by_score = latest_versions(events).group_by("value").len().sort("value")
    stored = warehouse.query(
        "SELECT score, sum(n) FROM (SELECT * FROM trace_feedback FINAL WHERE organisation_id = {org:String}) "
        "ARRAY JOIN score_values AS score, score_counts AS n GROUP BY score ORDER BY score", parameters={"org": org}).result_rows
    assert stored == list(zip(by_score["value"].to_list(), by_score["len"].to_list()))


def test_a_stale_rewrite_written_last_loses(warehouse, org):
    """Two ingest workers rewrite one trace; the one that read less writes last. The higher
    version (more of the trace's feedback seen) wins, so the trace's sums and the
    weighted-feedback filter see the update."""
    trace = f"trace-{uuid.uuid4().hex[:8]}"
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(gateway_log(org, created_at=T0, trace_id=trace)))])

    good = feedback_event(org, trace, 8, 1.0, T0)
    insert_rows(warehouse, FEEDBACK, [FEEDBACK.encode(orjson.dumps(good))])
    stale = warehouse.query("SELECT * FROM trace_feedback FINAL WHERE organisation_id = {org:String}",
                            parameters={"org": org})
    assert [r[3] for r in stale.result_rows] == [1]  # one feedback, weighted 8

    bad = {**good, "value": -6, "updated_at": iso(T0 + timedelta(minutes=5))}
    insert_rows(warehouse, FEEDBACK, [FEEDBACK.encode(orjson.dumps(bad))])
    warehouse.insert("trace_feedback", stale.result_rows, column_names=list(stale.column_names))  # written last

    assert_matches(stored_sums(warehouse, org, [trace]), [good, bad])
    where = compile_where(Filters(start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1), weighted_feedback=(3, None)),
                          TenantScope(org, None))
    count = warehouse.command(f"SELECT count() FROM generations FINAL WHERE {where.sql}", parameters=where.params,
                              settings=FINAL_SETTINGS)
    assert int(count) == 0  # the stale version (8 ≥ 3) is not seen; the latest (−6) fails the filter
    where = compile_where(Filters(start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1), weighted_feedback=(None, -5)),
                          TenantScope(org, None))
    assert int(warehouse.command(f"SELECT count() FROM generations FINAL WHERE {where.sql}", parameters=where.params,
                                 settings=FINAL_SETTINGS)) == 1


def test_refresh_of_every_trace_matches_feedback_written_without_it(warehouse, org):
    """Feedback inserted around the ingest (as the migration finds it, or the benchmark loads
    it): one refresh of the organisation's traces makes the sums exact."""
    rng = random.Random(5)
    events = [feedback_event(org, f"t-{rng.randrange(25)}", rng.randint(-10, 10), rng.random(), T0 + timedelta(seconds=i))
              for i in range(200)]
    events += [{**e, "value": 10, "updated_at": iso(T0 + timedelta(days=1))} for e in events[:20]]
    warehouse.raw_insert("feedback", column_names=FEEDBACK.columns,
                         insert_block=b"".join(FEEDBACK.encode(orjson.dumps(e)) + b"\n" for e in events),
                         fmt="JSONCompactEachRow")
    traces = sorted({e["trace_id"] for e in events})
    assert stored_sums(warehouse, org, traces).height == 0
    refresh_traces(warehouse, None, orgs=[org])
    assert_matches(stored_sums(warehouse, org, traces), events)


def test_feedback_counts_for_the_requests_of_its_trace_in_its_own_workspace(settings, producer, workers, warehouse, api,
                                                                             make_key, org):
    """Two workspaces (teams) reuse the trace id `shared`: each one's feedback counts for its own
    requests only, in graphs, groups (one workspace and organisation-wide) and the weighted-feedback
    filter. Feedback without a workspace counts for requests without one. Feedback sent with an
    organisation key belongs to the default workspace, like its custom logs (docs/analytics.md)."""
    logs = [gateway_log(org, workspace=ws, created_at=T0 + timedelta(minutes=i), trace_id=trace)
            for i, (ws, trace) in enumerate([("ws-a", "shared"), ("ws-a", "shared"), ("ws-b", "shared"), ("ws-b", "only-b"),
                                             ("default", "shared")])]
    publish(producer, settings.topic_gateway_logs, logs)
    feedback = [feedback_event(org, "shared", 8, 1.0, T0, workspace="ws-a"),
                feedback_event(org, "shared", -4, 1.0, T0, workspace="ws-b"),
                feedback_event(org, "shared", -1, 0.5, T0, workspace="ws-b"),
                feedback_event(org, "shared", 10, 1.0, T0, workspace="")]  # no workspace: no request without one here
    publish(producer, settings.topic_feedback, feedback)
    key = make_key(org)
    headers = {"x-portkey-api-key": key}
    r = api.post("/v1/feedback", json={"trace_id": "shared", "value": 6, "weight": 0.5}, headers=headers)
    assert r.status_code == 200, r.text
    assert wait_until(lambda: warehouse.query(  # 4 (workspace, trace) rows summing all 5 feedbacks
        "SELECT count(), sum(feedbacks) FROM trace_feedback FINAL WHERE organisation_id = {o:String}",
        parameters={"o": org}).result_rows == [(4, 5)], timeout=60)
    assert wait_until(lambda: int(warehouse.command(
        "SELECT count() FROM generations FINAL WHERE organisation_id = {o:String}", parameters={"o": org})) == 5)
    assert wait_ingested(settings, settings.topic_gateway_logs, settings.topic_feedback)
    assert warehouse.query("SELECT workspace_slug FROM feedback FINAL WHERE id = {id:String}",
                           parameters={"id": r.json()["feedback_ids"][0]}).result_rows == [("default",)]

    window = {"time_of_generation_min": iso(T0 - timedelta(hours=1)), "time_of_generation_max": iso(T0 + timedelta(hours=1))}
    columns = {"columns": "requests,requests_with_feedback,avg_weighted_feedback", "order_by": "workspace", "order_by_type": "asc"}

    def get(path, **params):
        r = api.get(f"/v1/analytics/{path}", params={**window, **params}, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    # per workspace: (requests, requests with feedback, weighted feedback, feedback count)
    expected = {"ws-a": (2, 2, 8.0, 1), "ws-b": (2, 1, -3.0, 2), "default": (1, 1, 6.0, 1)}  # ws-b: (-4·1 − 1·0.5) / 1.5
    for ws, (requests, with_feedback, weighted, count) in expected.items():
        row, = get("groups/workspace", workspace_slug=ws, **columns)["data"]
        assert (row["requests"], row["requests_with_feedback"], row["avg_weighted_feedback"]) == (requests, with_feedback, weighted), ws
        assert get("graphs/feedbacks", workspace_slug=ws)["summary"]["total"] == count, ws
    everywhere = get("groups/workspace", **columns)["data"]  # an organisation key without workspace_slug: every workspace
    assert {row["workspace"]: (row["requests"], row["requests_with_feedback"], row["avg_weighted_feedback"])
            for row in everywhere} == {ws: e[:3] for ws, e in expected.items()}
    positive = get("groups/workspace", weighted_feedback_min="0", **columns)["data"]
    assert {row["workspace"]: row["requests"] for row in positive} == {"ws-a": 2, "default": 1}
    assert get("graphs/requests", workspace_slug="ws-b", weighted_feedback_max="-1")["summary"]["total"] == 1


def test_a_version_moved_to_another_workspace_as_documented(warehouse, org):
    """Every version of a feedback id keeps its workspace (the API's PUT does; docs/events.md). A version
    sent under another workspace (the wire allows it) is counted in the new workspace at once, and the
    former (workspace, trace) keeps counting it as the docs say: its rewrite leaves the moved feedback out
    but has a smaller version (Σ updated_at of fewer feedback), so the sums written before stay in force
    until the trace's own feedback there adds up to a larger Σ updated_at."""
    def sums():
        return {ws: (n, vw) for ws, n, vw in warehouse.query(
            "SELECT workspace_slug, feedbacks, weighted_sum FROM trace_feedback FINAL WHERE organisation_id = {o:String}",
            parameters={"o": org}).result_rows}

    def send(events):
        insert_rows(warehouse, FEEDBACK, [FEEDBACK.encode(orjson.dumps(e)) for e in events])

    f1, f2, f3 = (feedback_event(org, "moved", v, 1.0, T0 + timedelta(seconds=i), workspace="ws-a")
                  for i, v in enumerate([10, 5, 0]))
    send([f1, f2, f3])
    assert sums() == {"ws-a": (3, 15.0)}
    # f1 and f2 move to ws-b: the same trace id, so this batch rewrites ws-a too (to f3 alone) ...
    send([{**f, "workspace_slug": "ws-b", "updated_at": iso(T0 + timedelta(hours=1, seconds=i))} for i, f in enumerate([f1, f2])])
    assert sums() == {"ws-a": (3, 15.0), "ws-b": (2, 15.0)}  # ... but ws-a still counts them
    # one new feedback in ws-a: Σ updated_at of (f3, f4) is still below that of (f1, f2, f3)
    send([feedback_event(org, "moved", -2, 1.0, T0 + timedelta(hours=2), workspace="ws-a")])
    assert sums() == {"ws-a": (3, 15.0), "ws-b": (2, 15.0)}
    # a second one: (f3, f4, f5) outweighs it, and ws-a is exact again
    send([feedback_event(org, "moved", -4, 1.0, T0 + timedelta(hours=3), workspace="ws-a")])
    assert sums() == {"ws-a": (3, -6.0), "ws-b": (2, 15.0)}
