"""Daily totals (migration 0024, warehouse/queries/daily.py) never change an answer.

The workspace groups read the totals the settle job stores for each settled day instead of
its requests. Events go through Kafka and the ingest workers, with redeliveries; the
expected answers come from the independent Polars reference (tests/analytics_reference.py)
over the generated events. Before any totals exist, after a settle stored them, after a
late event and a redelivery touched a totalled day (its totals no longer match its part),
and after settling again: every workspace group, in every key mode, over windows of whole
UTC days, of partial days (+05:30, -08:00) and inside one day, equals the reference. A test
that tampers with the stored totals shows the API does read them where it should, and only
there. A request dated 2199 sits in the partition of 2020-07-26 (toDate() wraps around):
that day's totals leave it out, and it is counted in its own day.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from analytics_reference import Reference, feedback_frame, generations_frame, without_float_noise
from conftest import count_generations, publish, wait_until
from factories import gateway_log
from warehouse.settle import settle

DAYS = [datetime(2024, 2, d, tzinfo=UTC) for d in (5, 6, 7, 8)]
NOW = datetime(2024, 2, 9, 0, 30, tzinfo=UTC)  # 02-08 ended 30 minutes ago: inside the grace, not totalled
WRAPPED_DAY = datetime(2020, 7, 26, tzinfo=UTC)
FAR = datetime(2199, 12, 31, 12, tzinfo=UTC)  # toDate() of it is 2020-07-26
WORKSPACES = ["default", "team-a", "team-b", ""]

ADDITIVE = ("requests,cost,avg_cost,tokens,prompt_tokens,completion_tokens,avg_tokens,avg_latency,errors,"
            "error_rate,cache_hits,cache_hit_rate,last_seen")
WINDOWS = {
    "whole days": ("2024-02-05T00:00:00Z", "2024-02-08T23:59:59.999Z"),
    "+05:30": ("2024-02-05T00:00:00+05:30", "2024-02-08T23:59:59.999+05:30"),
    "-08:00, partial days": ("2024-02-05T09:15:00-08:00", "2024-02-07T17:00:00.001-08:00"),
    "inside one day": ("2024-02-06T01:00:00Z", "2024-02-06T22:00:00Z"),
    "the wrapped partition's day": ("2020-07-26T00:00:00Z", "2020-07-26T23:59:59.999Z"),
    "the far day": ("2199-12-31T00:00:00Z", "2199-12-31T23:59:59.999Z"),
}
QUERIES = [
    ("groups/workspaces", {}),
    ("groups/workspaces", {"columns": ADDITIVE, "include_total": "true"}),
    ("groups/workspace", {"columns": ADDITIVE, "include_total": "true", "order_by": "cost", "order_by_type": "asc"}),
    ("groups/workspace", {"columns": "requests,users,p50_latency", "include_total": "true"}),  # not from totals
]
# (key, workspace_slug param, the reference's key workspace)
MODES = [("org", None, None), ("org", "team-a", None), ("ws", None, "team-a")]


def _events(org: str, rng: random.Random, n: int, day: datetime) -> list[dict]:
    return [gateway_log(org, rng=rng, workspace=rng.choice(WORKSPACES),
                        created_at=day + timedelta(milliseconds=rng.randrange(86_400_000)),
                        status=rng.choice([200, 200, 200, 429, 500]),
                        cache_status=rng.choice(["MISS", "MISS", "HIT", "SEMANTIC HIT"]),
                        cost=round(rng.uniform(0, 3), 6))
            for _ in range(n)]


def _mismatches(api, keys: dict, events: list[dict], org: str) -> list[str]:
    ref = Reference(generations_frame(events, org), feedback_frame([], org))
    failures = []
    for window, (start, end) in WINDOWS.items():
        for route, extra in QUERIES:
            for key, slug, key_ws in MODES:
                params = {"time_of_generation_min": start, "time_of_generation_max": end, **extra,
                          **({"workspace_slug": slug} if slug else {})}
                r = api.get(f"/v1/analytics/{route}", params=params, headers={"x-portkey-api-key": keys[key]})
                assert r.status_code == 200, (window, route, params, r.text)
                got, expected = without_float_noise(r.json()), without_float_noise(ref.compute(route, params, key_ws))
                if got != expected:
                    failures.append(f"{window} {route} {extra} {key} ws={slug}:\n  got      {got}\n  expected {expected}")
    return failures


def _totals(warehouse, org: str) -> dict[str, int]:
    """Requests in the stored totals of ``org`` per day, of the parts that are still their partition's only one."""
    rows = warehouse.query(
        "SELECT toString(day), sum(requests) FROM generations_days FINAL WHERE organisation_id = {o:String} "
        "AND part IN (SELECT any(name) FROM system.parts WHERE database = currentDatabase() AND table = 'generations' "
        "AND active GROUP BY partition_id HAVING count() = 1) GROUP BY day", parameters={"o": org}).result_rows
    return dict(rows)


def _stored(warehouse, org: str, day: datetime) -> int:
    """Rows stored for ``org`` on ``day``, duplicates included (no FINAL)."""
    return int(warehouse.command(
        "SELECT count() FROM generations WHERE organisation_id = {o:String} AND toDate(created_at) = {d:Date}",
        parameters={"o": org, "d": day.date()}))


def _parts(warehouse, day: datetime) -> int:
    return int(warehouse.command(
        "SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'generations' AND active "
        "AND partition_id = {p:String}", parameters={"p": day.strftime("%Y%m%d")}))


@pytest.mark.usefixtures("workers")
def test_workspace_groups_are_the_same_with_and_without_daily_totals(settings, producer, api, warehouse, org, make_key):
    rng = random.Random(24)
    keys = {"org": make_key(org), "ws": make_key(org, "team-a")}
    other = f"{org}-other"  # another organisation on the same days: never in org's answers
    events = [e for day in DAYS for e in _events(org, rng, 30, day)]
    events += _events(org, rng, 8, WRAPPED_DAY) + [gateway_log(org, rng=rng, workspace="team-a", created_at=FAR)]
    noise = [e for day in DAYS for e in _events(other, rng, 10, day)]
    publish(producer, settings.topic_gateway_logs, events + noise)
    redelivered = rng.sample(events, 15)  # a crash before the commit: the same events again, in a later batch
    publish(producer, settings.topic_gateway_logs, redelivered)
    events += redelivered
    distinct = generations_frame(events, org).height
    assert wait_until(lambda: count_generations(warehouse, org) == distinct, timeout=60)

    # 1. No totals yet: everything is read from generations.
    assert _totals(warehouse, org) == {}
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)

    # 2. Settled: the ended days are totalled, 02-08 (inside the grace) is not; 2020-07-26's
    #    totals leave out the 2199 request that shares its partition.
    settle(warehouse, now=NOW)
    ours = [e for e in generations_frame(events, org).iter_rows(named=True)]
    per_day = {}
    for row in ours:
        day = datetime.fromtimestamp(row["ts"] / 1000, UTC).date().isoformat()
        per_day[day] = per_day.get(day, 0) + 1
    expected_totals = {d: n for d, n in per_day.items() if d in ("2024-02-05", "2024-02-06", "2024-02-07", "2020-07-26")}
    assert _totals(warehouse, org) == expected_totals
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)

    # 3. The API reads the totals: inflate 02-06's (a newer row of the same key wins in FINAL),
    #    and only the answers whose window holds the whole of 02-06 change, by exactly that.
    columns = ("organisation_id, workspace_slug, day, part, part_hash, requests, cost, tokens, prompt_tokens, "
               "completion_tokens, latency_sum, errors, simple_hits, semantic_hits, last_seen")
    kept = warehouse.query(f"SELECT {columns} FROM generations_days FINAL WHERE organisation_id = {{o:String}} "
                           "AND day = '2024-02-06'", parameters={"o": org}).result_rows
    assert kept
    # cache_hits is read from the totals' simple_hits + semantic_hits (daily._DERIVED): inflated too.
    names = columns.split(", ")
    inflate = {names.index("requests"), names.index("simple_hits")}
    warehouse.insert("generations_days", [tuple(v + 1000 if i in inflate else v for i, v in enumerate(r)) for r in kept],
                     column_names=names)

    def total(window: str, column: str) -> int:
        start, end = WINDOWS[window]
        r = api.get("/v1/analytics/groups/workspaces", params={
            "time_of_generation_min": start, "time_of_generation_max": end, "columns": column, "include_total": "true"},
            headers={"x-portkey-api-key": keys["org"]})
        return r.json()["summary"][column]

    ref = Reference(generations_frame(events, org), feedback_frame([], org))
    for window, inflated in (("whole days", 1000 * len(kept)), ("+05:30", 1000 * len(kept)), ("inside one day", 0)):
        start, end = WINDOWS[window]
        for column in ("requests", "cache_hits"):
            params = {"time_of_generation_min": start, "time_of_generation_max": end, "columns": column, "include_total": "true"}
            assert total(window, column) == ref.compute("groups/workspaces", params)["summary"][column] + inflated, (window, column)
    warehouse.insert("generations_days", kept, column_names=columns.split(", "))  # the true totals again
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)

    # 4. A late event and a redelivery land on a totalled day: its totals stop matching its
    #    partition (now two parts), and the answers are exact at once.
    late = _events(org, rng, 1, DAYS[0])
    again = [e for e in events if e["created_at"].startswith("2024-02-05")][:2]
    publish(producer, settings.topic_gateway_logs, late + again)
    events += late + again
    stored = _stored(warehouse, org, DAYS[0])  # one merged part: no duplicate left
    assert wait_until(lambda: _stored(warehouse, org, DAYS[0]) == stored + len(late) + len(again), timeout=60)
    assert _parts(warehouse, DAYS[0]) > 1
    assert "2024-02-05" not in _totals(warehouse, org)
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)

    # 5. Settled again: 02-05 is one new part with new totals.
    settle(warehouse, now=NOW)
    assert _parts(warehouse, DAYS[0]) == 1
    assert _totals(warehouse, org)["2024-02-05"] == expected_totals["2024-02-05"] + 1
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)

    # 6. The totals of 02-05's old part were retired by that settle, and are deleted by the first
    #    settle a minute later; the current part's stay.
    def parts_with_totals() -> int:
        return int(warehouse.command("SELECT uniqExact(part) FROM generations_days WHERE organisation_id = {o:String} "
                                     "AND day = '2024-02-05'", parameters={"o": org}))

    assert parts_with_totals() == 2
    settle(warehouse, now=NOW + timedelta(seconds=30))
    assert parts_with_totals() == 2
    settle(warehouse, now=NOW + timedelta(minutes=2))
    assert parts_with_totals() == 1
    assert _totals(warehouse, org)["2024-02-05"] == expected_totals["2024-02-05"] + 1
    assert not (failures := _mismatches(api, keys, events, org)), "\n".join(failures)


def test_totals_of_a_gone_part_stay_a_minute_whatever_the_local_time_zone(warehouse, monkeypatch):
    """prune() keeps a gone part's totals for RETIRED_FOR after it first saw the part gone, and
    deletes them after: the retirement time it stores is the ``now`` it was given, also when the
    process's local time zone is not UTC (east of UTC they went at the next pass; west, hours late)."""
    import time
    import uuid

    from warehouse.queries.daily import prune

    part, part_hash = f"gone_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    warehouse.command("INSERT INTO generations_days (organisation_id, workspace_slug, day, part, part_hash, requests) "
                      "VALUES ('org-gone', 'default', '2001-01-01', {p:String}, {h:String}, 1)",
                      parameters={"p": part, "h": part_hash})
    warehouse.command("INSERT INTO generations_days_parts (day, part, part_hash) VALUES ('2001-01-01', {p:String}, {h:String})",
                      parameters={"p": part, "h": part_hash})

    def state() -> tuple[int, list]:
        kept = int(warehouse.command("SELECT count() FROM generations_days WHERE part = {p:String}", parameters={"p": part}))
        retired = [r[0] for r in warehouse.query("SELECT toString(retired_at) FROM generations_days_parts FINAL "
                                                 "WHERE part = {p:String}", parameters={"p": part}).result_rows]
        return kept, retired

    now = datetime(2031, 3, 4, 12, 0, tzinfo=UTC)
    for zone in ("Asia/Kolkata", "America/Los_Angeles"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        try:
            prune(warehouse, now)  # the part is gone (never was a part of generations): retired now
            assert state() == (1, ["2031-03-04 12:00:00.000"]), zone
            prune(warehouse, now + timedelta(seconds=30))
            assert state() == (1, ["2031-03-04 12:00:00.000"]), zone
        finally:
            monkeypatch.undo()
            time.tzset()
        if zone == "Asia/Kolkata":  # the same part again, retired afresh for the next zone
            warehouse.command("DELETE FROM generations_days_parts WHERE part = {p:String}", parameters={"p": part})
            warehouse.command("INSERT INTO generations_days_parts (day, part, part_hash) VALUES ('2001-01-01', {p:String}, "
                              "{h:String})", parameters={"p": part, "h": part_hash})
    prune(warehouse, now + timedelta(minutes=1, seconds=1))
    assert state() == (0, [])


@pytest.mark.usefixtures("workers")
def test_a_late_event_between_the_look_at_the_parts_and_the_read_is_counted(settings, producer, api, warehouse, org,
                                                                            make_key, monkeypatch):
    """The query chooses the totalled days from system.parts, then reads: a late event stored on a
    totalled day in between (a new part in its partition) is in the answer, as it is in an
    answer read without totals at that moment."""
    from warehouse.queries import daily

    rng = random.Random(28)
    key = make_key(org)
    days = [datetime(2024, 3, d, tzinfo=UTC) for d in (11, 12)]
    events = [e for day in days for e in _events(org, rng, 10, day)]
    publish(producer, settings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events), timeout=60)
    settle(warehouse, now=datetime(2024, 3, 14, tzinfo=UTC))
    assert set(_totals(warehouse, org)) == {"2024-03-11", "2024-03-12"}

    late = _events(org, rng, 1, days[0])
    looked = daily._sole_parts

    def look_then_a_late_event(client):
        parts = looked(client)
        if late[0] not in events:
            publish(producer, settings.topic_gateway_logs, late)
            events.extend(late)
            assert wait_until(lambda: count_generations(warehouse, org) == len(events), timeout=60)
        return parts

    monkeypatch.setattr(daily, "_sole_parts", look_then_a_late_event)
    params = {"time_of_generation_min": "2024-03-11T00:00:00Z", "time_of_generation_max": "2024-03-12T23:59:59.999Z",
              "columns": ADDITIVE, "include_total": "true"}
    r = api.get("/v1/analytics/groups/workspaces", params=params, headers={"x-portkey-api-key": key})
    assert r.status_code == 200, r.text
    assert late[0] in events
    expected = Reference(generations_frame(events, org), feedback_frame([], org)).compute("groups/workspaces", params)
    assert without_float_noise(r.json()) == without_float_noise(expected)
