"""Analytics API edges: SQL injection, 422s naming the parameter, scopes, the
workspace rule, and the official portkey-ai SDK against a live server.

(Exact numbers for every endpoint are in test_analytics.py.)
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import orjson
import pytest

from analytics_api.auth import SCOPES, hash_key, new_key
from conftest import count_generations
from factories import gateway_log
from ingest.events import GENERATIONS
from ingest.sink import insert_rows
from warehouse.queries import api_keys

WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-22T00:00:00Z"}
GRAPHS = [
    "graphs/requests", "graphs/cost", "graphs/latency", "graphs/tokens", "graphs/users", "graphs/users/requests",
    "graphs/errors", "graphs/errors/rate", "graphs/errors/stacks", "graphs/errors/status-codes",
    "graphs/requests/rescued", "graphs/cache/hit-rate", "graphs/cache/latency", "graphs/feedbacks",
    "graphs/feedbacks/scores", "graphs/feedbacks/weighted", "graphs/feedbacks/ai-models", "summary/cache",
]
GROUPS = ["groups/users", "groups/ai-models", "groups/metadata/_user", "groups/workspaces", "groups/model", "groups/status_code"]

INJECTIONS = [
    "' OR 1=1 --",
    "x'; DROP TABLE generations; --",
    "\\' OR '1'='1",
    "1) OR (1=1",
    "{scope_org:String}",
    "') UNION ALL SELECT name FROM system.tables --",
    "`id`",
    "x\" OR \"\"=\"",
    "1; SELECT sleep(3)",
    "\x00",
]


@pytest.fixture(scope="module")
def loaded(warehouse):
    """40 requests in the default workspace and 10 in `other`, on 2026-11-20, for the whole module
    (its tests only read). Stored by ingest's own codec and insert, without the Kafka hop that
    test_analytics.py and the ingest tests cover: starting consumers cost ~3.5 s per test."""
    org = f"org-{uuid.uuid4().hex[:10]}"
    rng = random.Random(7)
    start = datetime(2026, 11, 20, 1, tzinfo=UTC)
    events = [gateway_log(org, rng=rng, created_at=start + timedelta(minutes=i), status=200 if i % 4 else 500) for i in range(40)]
    events += [gateway_log(org, workspace="other", rng=rng, created_at=start + timedelta(minutes=i)) for i in range(10)]
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(ev)) for ev in events])
    assert count_generations(warehouse, org) == 50
    key = new_key()
    api_keys.insert(warehouse, key_hash=hash_key(key), organisation_id=org, workspace_slug="", scopes=list(SCOPES))
    return {"org": org, "key": key, "events": events}


def get(api, key, path, **params):
    return api.get(f"/v1/analytics/{path}", params={**WINDOW, **params}, headers={"x-portkey-api-key": key})


def total_of(body) -> int:
    if "total" in body and body.get("object") == "list":
        return body["total"]
    summary = body["summary"]
    return next((v for k, v in summary.items() if k in ("total", "total_requests", "total_errors")), 0)


def test_baseline_is_not_empty(api, loaded):
    """The injection checks below compare against this: the data is there."""
    assert get(api, loaded["key"], "graphs/requests").json()["summary"]["total"] == 40
    assert get(api, loaded["key"], "graphs/requests", workspace_slug="other").json()["summary"]["total"] == 10
    assert get(api, loaded["key"], "groups/users").json()["total"] > 0


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_in_filters_gives_empty_results(api, loaded, warehouse, value):
    key, org = loaded["key"], loaded["org"]
    list_params = ["virtual_keys", "configs", "api_key_ids", "prompt_slug", "trace_id", "span_id", "cache_status", "workspace_slug"]
    for param in list_params:
        for path in ("graphs/requests", "groups/model"):
            r = get(api, key, path, **{param: value})
            assert r.status_code == 200, (param, r.text)
            assert total_of(r.json()) == 0, (param, path, r.json())
    for params in ({"metadata": f'{{"_user": "{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"}}'},
                   {"metadata": '{"' + value.replace("\\", "\\\\").replace('"', '\\"') + '": "prod"}'},
                   {"ai_org_model": f"openai__{value}"}, {"ai_org_model": f"{value}__gpt-4o"}):
        r = get(api, key, "graphs/requests", **params)
        assert r.status_code == 200 or r.status_code == 422, (params, r.text)
        if r.status_code == 200:
            assert r.json()["summary"]["total"] == 0, (params, r.json())
    # Path parameters and identifiers: empty result or a 4xx, never SQL.
    r = api.get(f"/v1/analytics/groups/metadata/{quote(value, safe='')}", params=WINDOW, headers={"x-portkey-api-key": key})
    assert r.status_code in (200, 404, 422), r.text
    if r.status_code == 200:
        assert r.json()["total"] == 0
    for path, params in (("groups/model", {"columns": value}), ("groups/model", {"order_by": value}),
                         ("groups/model", {"order_by_type": value}), ("graphs/requests", {"granularity": value}),
                         ("graphs/requests", {"status_code": value}), ("graphs/requests", {"cost_min": value}),
                         ("graphs/requests", {"time_of_generation_min": value}), ("groups/model", {"page_size": value}),
                         ("graphs/requests", {"weighted_feedback_min": value})):
        r = get(api, key, path, **params)
        assert r.status_code == 422, (path, params, r.text)
    r = api.get(f"/v1/analytics/groups/{quote(value, safe='')}", params=WINDOW, headers={"x-portkey-api-key": key})
    assert 400 <= r.status_code < 500
    # Nothing was dropped or changed.
    assert count_generations(warehouse, org) == 50


@pytest.mark.parametrize(
    "params, name",
    [
        ({"time_of_generation_min": "2026-11-20"}, "time_of_generation_min"),
        ({"time_of_generation_min": "2026-11-20T00:00:00"}, "time_of_generation_min"),
        ({"time_of_generation_min": "yesterday"}, "time_of_generation_min"),
        ({"time_of_generation_max": "2026-13-01T00:00:00Z"}, "time_of_generation_max"),
        ({"time_of_generation_min": "2026-11-23T00:00:00Z"}, "time_of_generation_min"),  # after max
        ({"time_of_generation_min": "2024-01-01T00:00:00Z"}, "time_of_generation_max"),  # window too long
        ({"cost_min": "5", "cost_max": "1"}, "cost_min"),
        ({"cost_min": "-1"}, "cost_min"),
        ({"total_units_min": "1.5"}, "total_units_min"),
        ({"prompt_token_min": "10", "prompt_token_max": "2"}, "prompt_token_min"),
        ({"completion_token_max": "abc"}, "completion_token_max"),
        ({"weighted_feedback_min": "11"}, "weighted_feedback_min"),
        ({"weighted_feedback_min": "2", "weighted_feedback_max": "-2"}, "weighted_feedback_min"),
        ({"metadata": "{not json"}, "metadata"),
        ({"metadata": "[1, 2]"}, "metadata"),
        ({"metadata": '{"a": {"b": 1}}'}, "metadata"),
        ({"status_code": "200,abc"}, "status_code"),
        ({"status_code": "999"}, "status_code"),
        ({"ai_org_model": "openai-gpt-4o"}, "ai_org_model"),
        ({"granularity": "fortnight"}, "granularity"),
        ({"granularity": "minute", "time_of_generation_min": "2026-10-01T00:00:00Z"}, "granularity"),  # > 2,000 buckets
        # outside ClickHouse's DateTime64 (found by tests/test_fuzz.py: a 500 from the warehouse before)
        ({"time_of_generation_min": "0999-01-01T00:00:00Z", "time_of_generation_max": "0999-01-02T00:00:00Z"},
         "time_of_generation_min"),
        ({"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2300-01-01T00:00:00+05:00"},
         "time_of_generation_max"),
    ],
)
def test_malformed_values_are_422_naming_the_parameter(api, make_key, org, params, name):
    r = get(api, make_key(org), "graphs/requests", **params)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(name in e["loc"] and name in e["msg"] for e in detail), detail


def test_a_window_before_1900_is_422_on_the_metadata_group(api, make_key, org):
    """Regression (tests/test_fuzz.py): the metadata group sent a year-999 bound to ClickHouse, which failed: a 500."""
    r = get(api, make_key(org), "groups/metadata/env", time_of_generation_min="0999-01-01T00:00:00Z",
            time_of_generation_max="0999-01-01T00:00:00Z")
    assert r.status_code == 422, r.text
    assert any("time_of_generation_min" in e["loc"] for e in r.json()["detail"])


@pytest.mark.parametrize("params, name", [
    ({"columns": "requests,bogus"}, "columns"), ({"order_by": "cost"}, "order_by"),
    ({"order_by_type": "sideways"}, "order_by_type"), ({"page_size": "5000"}, "page_size"),
    ({"current_page": "-1"}, "current_page"), ({"include_total": "maybe"}, "include_total"),
])
def test_malformed_group_parameters_are_422(api, make_key, org, params, name):
    r = get(api, make_key(org), "groups/model", columns=params.pop("columns", "requests,errors"), **params)
    assert r.status_code == 422, r.text
    assert any(name in e["loc"] for e in r.json()["detail"])


def test_missing_window_is_422(api, make_key, org):
    r = api.get("/v1/analytics/graphs/requests", headers={"x-portkey-api-key": make_key(org)})
    assert r.status_code == 422
    assert "time_of_generation_min" in r.text


def test_every_route_needs_the_analytics_scope(api, make_key, org):
    no_scope = make_key(org, scopes=["logs.read"])
    for path in GRAPHS + GROUPS:
        assert api.get(f"/v1/analytics/{path}", params=WINDOW).status_code == 401, path
        assert get(api, no_scope, path).status_code == 403, path


def test_workspace_rule(api, loaded, make_key):
    """Organisation key: default workspace, or the one asked for. Workspace key: its own,
    whatever it asks for. Another organisation sees nothing."""
    org = loaded["org"]
    ws_key = make_key(org, workspace="other")
    assert get(api, ws_key, "graphs/requests").json()["summary"]["total"] == 10
    assert get(api, ws_key, "graphs/requests", workspace_slug="default").json()["summary"]["total"] == 10
    workspaces = get(api, loaded["key"], "groups/workspaces").json()
    assert {r["workspace_slug"]: r["requests"] for r in workspaces["data"]} == {"default": 40, "other": 10}
    assert [r["workspace_slug"] for r in get(api, ws_key, "groups/workspaces").json()["data"]] == ["other"]
    stranger = make_key("org-stranger-" + org)
    assert get(api, stranger, "graphs/requests", workspace_slug="default").json()["summary"]["total"] == 0


def test_portkey_sdk_reads_analytics(live_url, loaded):
    from portkey_ai import Portkey

    client = Portkey(api_key=loaded["key"], base_url=live_url)
    window = dict(WINDOW)
    graph = client.analytics.graphs.requests(**window)
    assert graph.object == "analytics-graph"
    assert graph.summary["total"] == 40
    assert sum(p["total"] for p in graph.data_points) == 40
    errors = client.analytics.graphs.errors(**window, status_code="500")
    assert errors.summary["total"] == 10
    models = client.analytics.groups.group_by(group_by="model", columns="requests,cost", include_total=True,
                                              order_by="requests", order_by_type="desc", current_page=0, page_size=1, **window)
    assert models.total >= 1 and len(models.data) == 1
    assert models.summary["requests"] == 40
    users = client.analytics.groups.users(**window)
    assert sum(int(u["requests"]) for u in users.data) == 40 or users.total > len(users.data)
    summary = client.analytics.summary.cache(**window)
    assert summary.summary["total_requests"] == 40
    other = client.analytics.graphs.requests(**window, workspace_slug="other")
    assert other.summary["total"] == 10
