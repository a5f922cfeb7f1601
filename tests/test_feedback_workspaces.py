"""Feedback per workspace (migration 0022) against the independent Polars reference
(tests/analytics_reference.py), on traces that SPAN workspaces: the same trace ids in
`default`, `team-a` and the empty workspace, each with its own feedback (and some feedback in
a workspace without requests). Every feedback endpoint in one-workspace mode (organisation
key, organisation key naming a workspace, workspace key) and organisation-wide mode
(groups/workspaces, groups/workspace without workspace_slug), with and without the
weighted-feedback filter and include_total.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from analytics_reference import Reference, feedback_frame, generations_frame, without_float_noise
from conftest import count_generations, migrations_before, publish, wait_ingested, wait_until
from factories import gateway_log, iso

T0 = datetime(2026, 5, 4, 9, tzinfo=UTC)
WINDOW = {"time_of_generation_min": "2026-05-04T00:00:00Z", "time_of_generation_max": "2026-05-04T23:59:59.999Z"}
WORKSPACES = ["default", "team-a", ""]


def generate(org: str, seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    logs: list[dict] = []
    for t in range(12):
        trace = f"tr-{t}"
        # every trace id in two or three workspaces, 1-3 requests in each
        for ws in rng.sample(WORKSPACES, rng.choice([2, 3])):
            for _ in range(rng.choice([1, 2, 3])):
                logs.append(gateway_log(org, rng=rng, workspace=ws, trace_id=trace,
                                        created_at=T0 + timedelta(minutes=rng.randrange(600)),
                                        ai_model=rng.choice(["gpt-4o", "gpt-4o-mini", "o1"]),
                                        **{"metadata.key": ["team", "_user"],
                                           "metadata.value": [rng.choice(["red", "blue"]), f"u{rng.randrange(4)}"]}))
    for _ in range(6):  # requests without a trace
        logs.append(gateway_log(org, rng=rng, workspace=rng.choice(WORKSPACES), trace_id="",
                                created_at=T0 + timedelta(minutes=rng.randrange(600))))
    feedback: list[dict] = []
    n = 0
    for t in range(14):  # tr-12, tr-13: nobody logged them
        for ws in WORKSPACES + ["ghost"]:
            if rng.random() < 0.45:
                continue
            for _ in range(rng.choice([1, 2])):
                ev = {"id": f"fb-{n}", "organisation_id": org, "created_at": iso(T0 + timedelta(seconds=n)),
                      "trace_id": f"tr-{t}", "value": rng.randint(-10, 10), "weight": rng.choice([0.25, 0.5, 1.0])}
                if ws or rng.random() < 0.5:  # the empty workspace: sometimes '' and sometimes absent
                    ev["workspace_slug"] = ws
                n += 1
                feedback.append(ev)
                if rng.random() < 0.3:
                    feedback.append({**ev, "value": rng.randint(-10, 10),
                                     "updated_at": iso(T0 + timedelta(hours=1, seconds=n))})
    return logs, feedback


@pytest.fixture
def loaded(settings, workers, warehouse, producer, org, make_key):
    logs, feedback = generate(org)
    publish(producer, settings.topic_gateway_logs, logs)
    assert wait_until(lambda: count_generations(warehouse, org) == len(logs), timeout=60)
    publish(producer, settings.topic_feedback, feedback)
    # every (workspace, trace)'s sums as its latest versions give them (an update may arrive in
    # another partition, hence another batch, after its trace already has a row)
    expected = _expected_per_workspace(warehouse, feedback, org)
    assert wait_until(lambda: _stored_per_workspace(warehouse, org) == expected, timeout=60)
    assert wait_ingested(settings, settings.topic_gateway_logs, settings.topic_feedback)
    ref = Reference(generations_frame(logs, org), feedback_frame(feedback, org))
    # the data spans workspaces: some trace has feedback in two workspaces that both have its requests
    spanning = ref.gens.filter(pl.col("has_fb")).group_by("trace").agg(n=pl.col("ws").n_unique()).filter(pl.col("n") > 1)
    assert spanning.height > 0
    return {"ref": ref, "org": make_key(org), "ws": make_key(org, "team-a")}


FEEDBACK_GRAPHS = ["graphs/feedbacks", "graphs/feedbacks/scores", "graphs/feedbacks/weighted", "graphs/feedbacks/ai-models"]
FB_COLUMNS = "requests,requests_with_feedback,avg_weighted_feedback"
GROUPS = [
    ("groups/workspaces", {"columns": FB_COLUMNS}),                               # one scan
    ("groups/workspaces", {"columns": FB_COLUMNS, "include_total": "true"}),      # two queries + total
    ("groups/workspace", {"columns": FB_COLUMNS + ",p50_latency"}),               # two queries
    ("groups/workspace", {"columns": FB_COLUMNS, "include_total": "true"}),
    ("groups/model", {"columns": FB_COLUMNS}),
    ("groups/model", {"columns": FB_COLUMNS, "include_total": "true"}),
    ("groups/metadata/team", {}),
    ("groups/metadata/_user", {}),
]
FILTERS = [{}, {"weighted_feedback_min": "0"}, {"weighted_feedback_max": "-1"}, {"weighted_feedback_min": "-3", "weighted_feedback_max": "4"}]
# (key, workspace_slug param, reference key_workspace)
MODES = [("org", None, None), ("org", "team-a", None), ("org", "default", None), ("ws", None, "team-a")]


def test_feedback_endpoints_match_the_reference_when_traces_span_workspaces(api, loaded):
    """Every filter, mode and route on one load of the data (the load is most of the time)."""
    ref = loaded["ref"]
    failures = []
    for flt in FILTERS:
        for key, slug, key_ws in MODES:
            for route, extra in [(r, {}) for r in FEEDBACK_GRAPHS] + GROUPS:
                params = {**WINDOW, **extra, **flt, **({"workspace_slug": slug} if slug else {})}
                r = api.get(f"/v1/analytics/{route}", params=params, headers={"x-portkey-api-key": loaded[key]})
                assert r.status_code == 200, (route, params, r.text)
                expected = ref.compute(route, params, key_workspace=key_ws)
                got = without_float_noise(r.json())
                if got != without_float_noise(expected):
                    failures.append(f"{flt} {key} ws={slug} {route} {extra}:\n  got      {got}\n  expected {without_float_noise(expected)}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- migration 0022 on an upgraded warehouse


@pytest.fixture
def old_db(empty_db, tmp_path):
    """A fresh database migrated up to 0021 (the release before 0022)."""
    from warehouse.migrate import migrate

    migrate(empty_db, directory=migrations_before(22, tmp_path / "before"))
    return empty_db


def _stored_per_workspace(client, org: str) -> dict:
    rows = client.query(
        "SELECT workspace_slug, trace_hash, feedbacks, weighted_sum, weight_sum, arraySort(arrayZip(score_values, score_counts)) "
        "FROM trace_feedback FINAL WHERE organisation_id = {o:String}", parameters={"o": org}).result_rows
    return {(ws, h): (n, round(vw, 9), round(w, 9), [tuple(p) for p in scores]) for ws, h, n, vw, w, scores in rows}


def _expected_per_workspace(client, feedback: list[dict], org: str) -> dict:
    latest = feedback_frame(feedback, org)
    hashes = dict(client.query("SELECT t, cityHash64(t) FROM (SELECT arrayJoin({t:Array(String)}) AS t)",
                               parameters={"t": sorted(set(latest["trace"]))}).result_rows)
    out = {}
    for (ws, trace), g in latest.group_by("ws", "trace"):
        scores = sorted(g.group_by("value").len().iter_rows())
        out[(ws, hashes[trace])] = (g.height, round(float((g["value"] * g["weight"]).sum()), 9),
                                    round(float(g["weight"].sum()), 9), [(v, n) for v, n in scores])
    return out


def test_migration_0022_backfills_per_workspace_and_a_rerun_changes_nothing(old_db, org):
    """Feedback stored by a release before 0022 (some without a workspace, the same trace ids in
    several workspaces, updates): 0022's backfill holds the sums of the latest versions per
    (workspace, trace); running its statements again (an interrupted migration run again) leaves
    the same sums."""
    import orjson

    from ingest.events import FEEDBACK
    from warehouse.migrate import MIGRATIONS_DIR, discover, migrate

    _, feedback = generate(org, seed=11)
    old_db.raw_insert("feedback", column_names=FEEDBACK.columns, fmt="JSONCompactEachRow",
                      insert_block=b"".join(FEEDBACK.encode(orjson.dumps(e)) + b"\n" for e in feedback))
    assert migrate(old_db, directory=MIGRATIONS_DIR)[0] == "0022_trace_feedback.sql"
    expected = _expected_per_workspace(old_db, feedback, org)
    assert len({ws for ws, _ in expected}) == 4  # default, team-a, '' and ghost
    assert _stored_per_workspace(old_db, org) == expected
    assert int(old_db.command("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                              "AND name = 'feedback_traces'")) == 0
    for statement in next(m for m in discover() if m.version == 22).statements():
        old_db.command(statement)
    assert _stored_per_workspace(old_db, org) == expected
