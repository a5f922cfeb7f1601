"""Settling ended days (warehouse/settle.py) changes how generations is stored, never what it says.

Events go through Kafka and the ingest workers; some are redelivered in a later batch
(so the duplicate sits in another part). The expected figures are computed in Polars
from the generated events, deduplicated by id. Before a settle, after it, after a late
event and a redelivery touch a settled day, and after settling again: the API's daily
request counts and costs equal those figures. Settled days are one merged part whose
physical row count is the distinct count (the duplicates are gone from storage); the
day that ended less than the grace period ago is left alone.
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from conftest import publish, wait_until
from factories import gateway_log
from warehouse.settle import settle, unsettled

DAYS = [datetime(2025, 3, d, tzinfo=UTC) for d in (10, 11, 12)]
NOW = datetime(2025, 3, 13, 0, 30, tzinfo=UTC)  # 03-12 ended 30 min ago: inside the 1 h grace
WINDOW = {"time_of_generation_min": "2025-03-10T00:00:00Z", "time_of_generation_max": "2025-03-12T23:59:59.999Z",
          "granularity": "day"}


def _events(org: str, rng: random.Random, n: int, day: datetime) -> list[dict]:
    return [gateway_log(org, created_at=day + timedelta(milliseconds=rng.randrange(86_400_000)), rng=rng) for _ in range(n)]


def _expected(events: list[dict]) -> dict[str, tuple[int, float]]:
    frame = pl.DataFrame(
        {"id": [e["_id"] for e in events], "day": [e["created_at"][:10] for e in events],
         "cost": [e["metrics"]["cost"] for e in events]}
    ).unique("id")
    out = frame.group_by("day").agg(pl.len().alias("n"), pl.col("cost").sum().alias("cost")).sort("day")
    # graphs/cost answers whole cents, rounded half away from zero (docs/analytics.md)
    whole = lambda c: int(Decimal(repr(c)).quantize(Decimal(1), ROUND_HALF_UP))  # noqa: E731
    return {r["day"]: (r["n"], whole(r["cost"])) for r in out.iter_rows(named=True)}


def _api_days(api, key: str) -> dict[str, tuple[int, float]]:
    headers = {"x-portkey-api-key": key}
    requests = api.get("/v1/analytics/graphs/requests", params=WINDOW, headers=headers)
    cost = api.get("/v1/analytics/graphs/cost", params=WINDOW, headers=headers)
    assert requests.status_code == 200 and cost.status_code == 200, (requests.text, cost.text)
    counts = {p["timestamp"][:10]: p["total"] for p in requests.json()["data_points"]}
    costs = {p["timestamp"][:10]: p["total"] for p in cost.json()["data_points"]}
    return {day: (counts[day], costs[day]) for day in counts if counts[day]}


def _storage(warehouse, org: str) -> dict[str, int]:
    """Physical rows per day for this organisation (no FINAL: duplicates count)."""
    rows = warehouse.query(
        "SELECT toString(toDate(created_at)), count() FROM generations WHERE organisation_id = {o:String} GROUP BY 1",
        parameters={"o": org},
    ).result_rows
    return dict(rows)


def _parts(warehouse, day: str) -> list[int]:
    """Merge levels of the active parts of one day's partition."""
    return [int(level) for (level,) in warehouse.query(
        "SELECT level FROM system.parts WHERE database = currentDatabase() AND table = 'generations' AND active "
        "AND partition_id = {p:String}", parameters={"p": day.replace("-", "")}).result_rows]


@pytest.mark.usefixtures("workers")
def test_settling_keeps_every_figure_and_removes_stored_duplicates(settings, producer, api, warehouse, org, make_key):
    rng = random.Random(7)
    key = make_key(org, "default")
    first = [e for day in DAYS for e in _events(org, rng, 40, day)]
    publish(producer, settings.topic_gateway_logs, first)
    assert wait_until(lambda: sum(_storage(warehouse, org).values()) == len(first))
    redelivered = rng.sample(first, 25)  # a crash before the commit: the same events again, in a later batch
    second = [e for day in DAYS for e in _events(org, rng, 15, day)]
    publish(producer, settings.topic_gateway_logs, redelivered + second)
    everything = first + redelivered + second
    assert wait_until(lambda: sum(_storage(warehouse, org).values()) == len(everything))

    expected = _expected(everything)
    assert sorted(expected) == ["2025-03-10", "2025-03-11", "2025-03-12"]
    assert _api_days(api, key) == expected  # exact before any settle: FINAL deduplicates at read time
    dup_days = {e["created_at"][:10] for e in redelivered}
    assert any(_storage(warehouse, org)[d] > expected[d][0] for d in dup_days)  # duplicates are stored

    pending = {d.day.isoformat() for d in unsettled(warehouse, now=NOW)}
    assert {"2025-03-10", "2025-03-11"} <= pending and "2025-03-12" not in pending
    settled = {d.day.isoformat() for d in settle(warehouse, now=NOW)}
    assert {"2025-03-10", "2025-03-11"} <= settled and "2025-03-12" not in settled
    for day in ("2025-03-10", "2025-03-11"):
        levels = _parts(warehouse, day)
        assert len(levels) == 1 and levels[0] > 0, levels  # one merged part: FINAL skips it
        assert _storage(warehouse, org)[day] == expected[day][0]  # the stored duplicates are gone
    assert len(_parts(warehouse, "2025-03-12")) > 1  # inside the grace period: untouched
    assert _api_days(api, key) == expected

    # A late event and another redelivery land on a settled day: exact at once, settled again later.
    late = _events(org, rng, 1, DAYS[0])
    again = [e for e in first if e["created_at"].startswith("2025-03-10")][:3]
    publish(producer, settings.topic_gateway_logs, late + again)
    everything += late + again
    expected = _expected(everything)
    assert wait_until(lambda: _storage(warehouse, org)["2025-03-10"] == expected["2025-03-10"][0] + len(again))
    assert len(_parts(warehouse, "2025-03-10")) == 2
    assert _api_days(api, key) == expected
    assert "2025-03-10" in {d.day.isoformat() for d in settle(warehouse, now=NOW)}
    assert len(_parts(warehouse, "2025-03-10")) == 1
    assert _storage(warehouse, org)["2025-03-10"] == expected["2025-03-10"][0]
    assert _api_days(api, key) == expected

