"""Edges of /v1/analytics found by review: bad input that was a 500 or silently wrong, numbers that
two endpoints rounded differently, buckets outside 1970..2106, and metadata keys with a slash.

Expected values are computed here from the events the tests produce (docs/analytics.md).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import orjson
import pytest

from conftest import count_generations
from factories import gateway_log
from ingest.events import FEEDBACK, GENERATIONS
from ingest.sink import insert_rows

WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-20T23:59:59.999Z"}
T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def get(api, key, path, **params):
    return api.get(f"/v1/analytics/{path}", params={**WINDOW, **params}, headers={"x-portkey-api-key": key})


def load(warehouse, org, events, feedback=()):
    """Stored by ingest's own codecs and insert (the feedback one rewrites the per-trace sums), without
    the Kafka hop that test_analytics.py and the ingest tests cover: starting consumers cost ~3.5 s a test."""
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(ev)) for ev in events])
    assert count_generations(warehouse, org) == len(events)
    if feedback:
        insert_rows(warehouse, FEEDBACK, [FEEDBACK.encode(orjson.dumps(fb)) for fb in feedback])


def assert_422_naming(r, name):
    assert r.status_code == 422, (r.status_code, r.text)
    assert any(name in e["loc"] and name in e["msg"] for e in r.json()["detail"]), r.json()


def half_away(x: Decimal, places: str = "1") -> Decimal:
    return x.quantize(Decimal(places), ROUND_HALF_UP)  # ROUND_HALF_UP is halves away from zero


@pytest.fixture
def three(warehouse, org, make_key):
    """Three requests at 10:00, 12:00 and 14:00 UTC costing 0.5, 0.5 and 0.00015 cents (users alice,
    alice, bob; models gpt-4o, gpt-4o, tiny); the first one's trace has one feedback of weight 0."""
    rng = random.Random(11)
    costs = ["0.5", "0.5", "0.00015"]
    events = [
        gateway_log(org, rng=rng, created_at=T0 + timedelta(hours=2 * i), cost=float(cost), trace_id=f"tr-{i}", ai_model=model,
                    **{"metadata.key": ["_user"], "metadata.value": [user]})
        for i, (cost, model, user) in enumerate(zip(costs, ["gpt-4o", "gpt-4o", "tiny"], ["alice", "alice", "bob"]))
    ]
    feedback = [{"id": "fb-zero", "organisation_id": org, "workspace_slug": "default", "created_at": "2026-11-20T10:05:00.000Z",
                 "trace_id": "tr-0", "value": 5, "weight": 0.0}]
    load(warehouse, org, events, feedback)
    return {"key": make_key(org), "costs": [Decimal(c) for c in costs]}


def test_malformed_numbers_are_422s_or_exact_not_500s(api, three):
    key = three["key"]
    # '²'.isdigit() is True, int('²') raises
    assert_422_naming(get(api, key, "graphs/requests", status_code="²00"), "status_code")
    # an integer bound beyond UInt64 keeps every request (it was bound as UInt64 and wrapped around)
    for bound in (str(2**64), str(10**20)):
        assert get(api, key, "graphs/requests", total_units_max=bound).json()["summary"]["total"] == 3
        assert get(api, key, "graphs/requests", prompt_token_min=bound).json()["summary"]["total"] == 0
    # min > max is a 422 also beyond 2**64 (the bounds are compared before they are capped)
    assert_422_naming(get(api, key, "graphs/requests", total_units_min=str(2**70), total_units_max=str(2**65)), "total_units_min")
    # paging far past the end is an empty page with the right total
    body = get(api, key, "groups/model", current_page=str(2**62)).json()
    assert body["data"] == [] and body["total"] == 2


def test_cost_points_and_summary_are_each_rounded_from_exact_sums(api, three):
    """docs/analytics.md: a cost data point is its bucket's exact cost rounded; the summary is the window's
    exact cost rounded, so it may differ from the sum of the rounded points (by at most half a cent per bucket)."""
    body = get(api, three["key"], "graphs/cost", granularity="hour").json()
    points = {p["timestamp"][:13]: p["total"] for p in body["data_points"] if p["total"]}
    assert points == {"2026-11-20T10": 1, "2026-11-20T12": 1}  # 0.5 and 0.5 round up; 0.00015 rounds to 0
    assert body["summary"]["total"] == int(half_away(sum(three["costs"]))) == 1
    assert abs(sum(p["total"] for p in body["data_points"]) - body["summary"]["total"]) <= len(body["data_points"]) / 2


def test_four_decimal_costs_agree_between_group_endpoints(api, three):
    """One request of 0.00015 cents: every group endpoint shows it as 0.0002 (halves away from zero, as the
    decimal reads), although 0.00015·10⁴ is 1.4999999999999998 in floating point."""
    key = three["key"]
    expected = {"alice": half_away(Decimal("1.0"), "0.0001"), "bob": half_away(Decimal("0.00015"), "0.0001")}
    users = {r["user"]: r["cost"] for r in get(api, key, "groups/users").json()["data"]}
    models_text = {r["ai_model"]: r["cost"] for r in get(api, key, "groups/ai-models").json()["data"]}
    models = {r["model"]: r["cost"] for r in get(api, key, "groups/model", columns="requests,cost").json()["data"]}
    assert users == {u: str(v) for u, v in expected.items()}
    assert models_text == {"gpt-4o": str(expected["alice"]), "tiny": str(expected["bob"])}
    assert models == {"gpt-4o": float(expected["alice"]), "tiny": float(expected["bob"])}


def test_a_trace_whose_feedback_weighs_nothing_has_weighted_feedback_0_in_the_filter_too(api, three):
    """Its weighted feedback shows as 0 (an average over nothing is 0); the weighted-feedback filter
    treats it the same way: inside [-10, 10] and [0, 0], outside [0.5, 10]."""
    key = three["key"]
    alice = next(r for r in get(api, key, "groups/metadata/_user").json()["data"] if r["metadata_value"] == "alice")
    assert alice["requests_with_feedback"] == 1 and alice["avg_weighted_feedback"] == 0
    total = lambda **f: get(api, key, "graphs/requests", **f).json()["summary"]["total"]
    assert total(weighted_feedback_min="-10", weighted_feedback_max="10") == 1
    assert total(weighted_feedback_min="0", weighted_feedback_max="0") == 1
    assert total(weighted_feedback_min="0.5") == 0


def test_repeated_metadata_filter_key_is_a_422(api, three):
    """Every pair of the metadata filter must match; a JSON object with a key twice would lose one pair."""
    r = get(api, three["key"], "graphs/requests", metadata='{"_user": "bob", "_user": "alice"}')
    assert_422_naming(r, "metadata")
    assert "_user" in r.json()["detail"][0]["msg"]
    assert get(api, three["key"], "graphs/requests", metadata='{"_user": "bob"}').json()["summary"]["total"] == 1


def test_metadata_key_with_a_slash_can_be_grouped(api, warehouse, org, make_key):
    rng = random.Random(102)
    load(warehouse, org, [
        gateway_log(org, rng=rng, created_at=T0, **{"metadata.key": ["team/name"], "metadata.value": ["core"]}),
        gateway_log(org, rng=rng, created_at=T0, **{"metadata.key": ["team/name"], "metadata.value": ["core"]}),
    ])
    key = make_key(org)
    for path in ("groups/metadata/team%2Fname", "groups/metadata/team/name"):
        r = get(api, key, path)
        assert r.status_code == 200, (path, r.text[:200])
        assert [(row["metadata_value"], row["requests"]) for row in r.json()["data"]] == [("core", 2)]


def test_costs_up_to_the_ingest_limit_are_served(api, warehouse, org, make_key):
    """The largest cost ingest accepts (10¹² cents, docs/events.md) sums and rounds without overflow."""
    rng = random.Random(9)
    load(warehouse, org, [gateway_log(org, rng=rng, created_at=T0, cost=1e12),
                                              gateway_log(org, rng=rng, created_at=T0, cost=0.5)])
    key = make_key(org)
    assert get(api, key, "graphs/cost").json()["summary"]["total"] == 10**12 + 1  # 1e12 + 0.5, half away from zero
    for path in ("groups/users", "groups/ai-models", "groups/model", "groups/metadata/_user"):
        assert get(api, key, path).status_code == 200, path


@pytest.mark.parametrize(("at", "window", "granularity", "label"), [
    # after 2106 (DateTime ends) and 2149 (Date ends)
    (datetime(2150, 1, 1, 10, 0, tzinfo=UTC), ("2150-01-01T00:00:00Z", "2150-01-01T23:59:59.999Z"), "hour", "2150-01-01T10:00:00.000+00:00"),
    (datetime(2150, 1, 1, 10, 0, tzinfo=UTC), ("2150-01-01T00:00:00Z", "2150-01-01T23:59:59.999Z"), "month", "2150-01-01T00:00:00.000+00:00"),
    (datetime(2199, 12, 31, 10, 0, tzinfo=UTC), ("2199-12-25T00:00:00Z", "2199-12-31T23:59:59.999Z"), "week", "2199-12-30T00:00:00.000+00:00"),
    # a wall clock before 1970, west of UTC
    (datetime(1970, 1, 1, 2, 0, tzinfo=UTC), ("1969-12-31T19:00:00-05:00", "1970-01-01T05:00:00-05:00"), "hour", "1969-12-31T21:00:00.000-05:00"),
    (datetime(1970, 1, 1, 2, 0, tzinfo=UTC), ("1969-12-31T00:00:00-05:00", "1970-01-01T05:00:00-05:00"), "day", "1969-12-31T00:00:00.000-05:00"),
], ids=["2150-hour", "2150-month", "2199-week", "1969-hour-west", "1969-day-west"])
def test_buckets_outside_1970_to_2106(api, warehouse, org, make_key, at, window, granularity, label):
    """Requests are stored from 1970 to 2200 and windows may start in 1900: a request's bucket is right there too."""
    load(warehouse, org, [gateway_log(org, rng=random.Random(3), created_at=at)])
    body = get(api, make_key(org), "graphs/requests", time_of_generation_min=window[0], time_of_generation_max=window[1],
               granularity=granularity).json()
    assert body["summary"]["total"] == 1
    assert {p["timestamp"]: p["total"] for p in body["data_points"] if p["total"]} == {label: 1}


def test_bounds_with_sub_millisecond_digits_select_exactly(api, warehouse, org, make_key):
    """Stored times are whole milliseconds; a bound with microseconds (Python's isoformat() writes them)
    keeps `min ≤ created_at ≤ max` exact: a request at …00.000 is before a min of …00.000400."""
    load(warehouse, org, [gateway_log(org, rng=random.Random(5), created_at=T0)])
    key = make_key(org)
    us = timedelta(microseconds=400)
    cases = [((T0 - us, T0 + us), 1), ((T0, T0), 1), ((T0 + us, T0 + timedelta(minutes=1)), 0), ((T0 - timedelta(minutes=1), T0 - us), 0)]
    for (lo, hi), expected in cases:
        window = {"time_of_generation_min": lo.isoformat(), "time_of_generation_max": hi.isoformat()}
        assert get(api, key, "graphs/requests", **window).json()["summary"]["total"] == expected, window
        r = api.post("/v1/logs/exports", json={"filters": window, "requested_data": ["id"]}, headers={"x-portkey-api-key": key})
        assert r.status_code == 200 and r.json()["total"] == expected, (window, r.text)


def test_decimals_rounds_halves_away_from_zero_and_never_gives_negative_zero():
    import math

    import polars as pl

    from analytics_api.metrics.groups import decimals

    values = [-0.002, -0.004999, 0.00015, -0.00015, 0.125, -0.125, 2.5e-05, 1234.5678]
    got = pl.DataFrame({"v": values}).select(decimals(pl.col("v"), 2)).to_series().to_list()
    expected = [float(half_away(Decimal(repr(v)), "0.01")) for v in values]
    assert got == expected and all(math.copysign(1.0, g) == 1.0 for g in got if g == 0), (got, expected)
