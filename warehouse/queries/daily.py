"""Daily totals per workspace of settled days (migration 0024): written by the settle job
(:func:`roll_up`), read by the workspace groups (:func:`grouped_by_workspace`).

A day's totals are computed from the one part its partition of ``generations`` is, and
used only while that part is still the partition's only active part: any late event,
redelivery, merge or mutation makes another part, and the day is read from
``generations`` again until the next settle totals it anew. So results are the same with
and without the totals (docs/analytics.md, "Daily totals"); only their cost changes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from warehouse.client import utc_aware, utc_naive
from warehouse.cluster import layout
from warehouse.filters import Where
from warehouse.queries.analytics import FINAL_SETTINGS, MEASURES, read

log = logging.getLogger(__name__)

# The measures a day's totals keep, and how totals add up (sum unless named here).
DAILY_MEASURES = ("requests", "cost", "tokens", "prompt_tokens", "completion_tokens", "latency_sum", "errors",
                  "simple_hits", "semantic_hits", "last_seen")
_MERGE = {"last_seen": "max"}
# Measures the totals answer from their columns without keeping them.
_DERIVED = {"cache_hits": "simple_hits + semantic_hits"}

_DAY_ID = re.compile(r"^(\d{4})(\d{2})(\d{2})$")  # partition_id of a toDate() partition
_LAST_MS = time(23, 59, 59, 999_000)

# The partitions of generations that are one part, that part's identity, and whether its
# totals are stored (a row in generations_days_parts, written after them).
_SOLE_PARTS = """
SELECT partition_id, any(name) AS part, any(hash_of_all_files) AS part_hash,
       (part, part_hash) IN (SELECT part, part_hash FROM generations_days_parts) AS rolled
FROM system.parts
WHERE database = currentDatabase() AND table = 'generations' AND active
GROUP BY partition_id
HAVING count() = 1
"""


@dataclass(frozen=True)
class Part:
    day: date  # the partition's day
    name: str
    hash: str


def _sole_parts(client: Client) -> list[tuple[Part, bool]]:
    out = []
    for partition_id, name, part_hash, rolled in client.query(_SOLE_PARTS).result_rows:
        match = _DAY_ID.match(partition_id)
        if match:
            out.append((Part(date(*map(int, match.groups())), name, part_hash), bool(rolled)))
    return out


def roll_up(client: Client, last_day: date, max_days: int | None = None) -> list[Part]:
    """Store the totals of every partition up to ``last_day`` that is one part without stored
    totals (newest first, at most ``max_days``); return the parts totalled.

    Reads only that part (``_part``) with FINAL, and only its requests of the partition's own
    day. Should the part be merged away meanwhile, the read is of the part as it was and its
    totals are never used (the partition is another part by then)."""
    todo = sorted((p for p, rolled in _sole_parts(client) if not rolled and p.day <= last_day),
                  key=lambda p: p.day, reverse=True)[:max_days]
    columns = ", ".join(DAILY_MEASURES)
    measures = ", ".join(MEASURES[m] for m in DAILY_MEASURES)
    for part in todo:
        params = {"part": part.name, "part_hash": part.hash, "day": part.day}
        client.command(
            f"INSERT INTO generations_days (organisation_id, workspace_slug, day, part, part_hash, {columns}) "
            f"SELECT organisation_id, workspace_slug, {{day:Date}}, {{part:String}}, {{part_hash:String}}, {measures} "
            "FROM generations FINAL WHERE _part = {part:String} AND toDate32(created_at) = {day:Date} "
            "GROUP BY organisation_id, workspace_slug",
            parameters=params, settings={**FINAL_SETTINGS, "use_uncompressed_cache": 0})  # read once: not cached
        client.command("INSERT INTO generations_days_parts (day, part, part_hash) "
                       "VALUES ({day:Date}, {part:String}, {part_hash:String})", parameters=params)
        log.info("totals of %s stored (part %s)", part.day, part.name)
    return todo


# How long a part's totals stay after the part was first seen gone (retired), for the queries
# that chose them while it was active (a query reads them within milliseconds of choosing).
RETIRED_FOR = timedelta(minutes=1)

_GONE = """
SELECT day, part, part_hash, rolled_at, retired_at FROM generations_days_parts FINAL
WHERE (part, part_hash) NOT IN (SELECT name, hash_of_all_files FROM system.parts
                                WHERE database = currentDatabase() AND table = 'generations' AND active)
"""


def prune(client: Client, now: datetime) -> int:
    """Retire the totals of parts that are gone (``now``), and delete those retired for
    RETIRED_FOR already; return how many parts' totals were deleted."""
    now = utc_naive(now)
    gone = [(day, part, part_hash, rolled_at, utc_naive(retired_at))
            for day, part, part_hash, rolled_at, retired_at in client.query(_GONE).result_rows]
    epoch = datetime(1970, 1, 1)
    fresh = [(day, part, part_hash, utc_aware(rolled_at), utc_aware(now))
             for day, part, part_hash, rolled_at, retired_at in gone if retired_at <= epoch]
    if fresh:
        client.insert("generations_days_parts", fresh, column_names=["day", "part", "part_hash", "rolled_at", "retired_at"])
    old = [(part, part_hash) for _, part, part_hash, _, retired_at in gone if epoch < retired_at <= now - RETIRED_FOR]
    if old:
        params = {"parts": [p for p, _ in old], "hashes": [h for _, h in old]}
        for table in ("generations_days", "generations_days_parts"):  # the marker last: an interrupted prune is done again
            client.command(f"DELETE FROM {table} WHERE (part, part_hash) IN arrayZip({{parts:Array(String)}}, "
                           "{hashes:Array(String)})", parameters=params)
    return len(old)


def serves(where: Where, group: str, measures: list[str], feedback: bool) -> bool:
    """Whether :func:`grouped_by_workspace` can answer this group: workspaces, additive
    measures only, no filter but the scope and the window."""
    return group == "workspace" and not feedback and where.window_only and set(measures) <= {*DAILY_MEASURES, *_DERIVED}


def _whole_days(where: Where) -> tuple[date, date]:
    """The first and last UTC day that lie wholly inside the window (first > last: none)."""
    start, end = where.params["t_start"], where.params["t_end"]
    first = start.date() if start.time() == time(0) else start.date() + timedelta(days=1)
    last = end.date() if end.time() >= _LAST_MS else end.date() - timedelta(days=1)
    return first, last


def grouped_by_workspace(client: Client, where: Where, measures: list[str], total: bool) -> pa.Table | None:
    """The workspace group of :func:`warehouse.queries.analytics.grouped` (``measures`` served:
    see :func:`serves`), each whole UTC day of the window with stored totals read from them,
    the rest of the window from generations. None when no day of the window has totals, or when
    one of the days read from them was stored in again meanwhile."""
    if layout(client).cluster:
        return None  # the parts are the shards' (docs/deploy.md)
    first, last = _whole_days(where)
    days = sorted({p.day: p for p, rolled in _sole_parts(client) if rolled and first <= p.day <= last}.values(),
                  key=lambda p: p.day)
    if not days:
        return None
    params = dict(where.params)
    params["rolled_parts"] = [p.name for p in days]
    params["rolled_hashes"] = [p.hash for p in days]
    params["first_day"], params["last_day"] = days[0].day, days[-1].day
    # The rest of the window: the ranges between the totalled days.
    ranges, start = [], params["t_start"]
    for p in days:
        day_start = datetime.combine(p.day, time(0))
        if start < day_start:
            ranges.append((start, day_start - timedelta(milliseconds=1)))
        start = day_start + timedelta(days=1)
    if start <= params["t_end"]:
        ranges.append((start, params["t_end"]))
    rest = []
    for i, (low, high) in enumerate(ranges):
        params[f"rest_from{i}"], params[f"rest_to{i}"] = low, high
        rest.append(f"(created_at >= {{rest_from{i}:DateTime64(3, 'UTC')}} AND created_at <= {{rest_to{i}:DateTime64(3, 'UTC')}})")
    scope = "organisation_id = {scope_org:String}" + (" AND workspace_slug = {scope_ws:String}" if where.one_workspace else "")
    live = ", ".join(f"{MEASURES[m]} AS {m}" for m in measures)
    merged = ", ".join(f"{_MERGE.get(m, 'sum')}({m}) AS {m}" for m in measures)
    stored = ", ".join(f"{_DERIVED[m]} AS {m}" if m in _DERIVED else m for m in measures)
    totals = (f"SELECT workspace_slug AS key, {stored} FROM generations_days FINAL WHERE {scope} "
              "AND day >= {first_day:Date} AND day <= {last_day:Date} "
              "AND (part, part_hash) IN arrayZip({rolled_parts:Array(String)}, {rolled_hashes:Array(String)})")
    parts = [totals]
    if rest:
        parts.append(f"SELECT workspace_slug AS key, {live} FROM generations FINAL WHERE {where.sql} "
                     f"AND ({' OR '.join(rest)}) GROUP BY key")
    sets = "GROUPING SETS ((key), ())" if total else "key"
    sql = f"SELECT key, {merged} FROM ({' UNION ALL '.join(parts)}) GROUP BY {sets}"
    table = read(client, sql, params)
    # A late event stored in a totalled day between the look above and the read would be missing
    # (the read takes that day from its totals alone): they are used only if each such day is
    # still the same one part after the read, so it was when the read began (no part comes back).
    if not set(days) <= {p for p, rolled in _sole_parts(client) if rolled}:
        return None
    return table
