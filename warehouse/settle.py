"""Settle ended days of ``generations``: one merged part per day, so FINAL need not merge them.

Ingest is at-least-once, so the API reads ``generations`` with FINAL, which merges
rows by the sorting key at read time. ClickHouse skips that work for a partition
that is a single part of merge level > 0 (``do_not_merge_across_partitions_select_final``):
such a part was written by a merge, and a ReplacingMergeTree merge leaves no
duplicates. The table has a partition per UTC day (migration 0015); this job merges
(``OPTIMIZE … PARTITION … FINAL``) every day that ended at least ``grace`` ago and is
not yet a single merged part: new days, and old days that a late or redelivered event
touched again. Reads are exact before, during and after a settle; only their cost
changes. `tollgate up` runs it every ``TOLLGATE_SETTLE_INTERVAL_SECONDS``; `tollgate
settle` runs one pass (for a cron next to a ClickHouse server); `tollgate scheduler` runs it
while it holds the scheduler lease.

Each pass settles the days of ``feedback_generations`` (migration 0025) the same way, then
stores the daily totals per workspace of every ended day that is one part
(warehouse/queries/daily.py, migration 0024), which the workspace groups read instead of
the day's requests for as long as that part is the day's only one.

Cluster mode (docs/deploy.md): the parts are those of ``generations_local`` on every
replica (``clusterAllReplicas``); a day is settled when it is one merged part on each of
them, and the OPTIMIZE runs ``ON CLUSTER`` on the local tables.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from clickhouse_connect.driver.client import Client

from warehouse.cluster import Layout, layout
from warehouse.queries.daily import prune, roll_up
from warehouse.queries.feedback_generations import TABLE as FEEDBACK_GENERATIONS

log = logging.getLogger(__name__)

_DAY_ID = re.compile(r"^(\d{4})(\d{2})(\d{2})$")  # partition_id of a toDate() partition

def unsettled_days_sql(where: Layout) -> str:
    """Partitions of ``generations`` that are more than one part, or an unmerged one, on some replica."""
    return f"""
SELECT partition_id, max(parts) AS most_parts, max(rows) AS most_rows
FROM (
    SELECT hostName() AS host, partition_id, count() AS parts, sum(rows) AS rows, max(level) AS top_level
    FROM {where.parts}
    WHERE database = {{db:String}} AND table = {{t:String}} AND active
    GROUP BY host, partition_id
)
GROUP BY partition_id
HAVING most_parts > 1 OR min(top_level) = 0
ORDER BY partition_id DESC
"""


@dataclass(frozen=True)
class Day:
    partition_id: str
    day: date
    parts: int
    rows: int


def _last_ended(now: datetime | None, grace: timedelta) -> date:
    return ((now or datetime.now(UTC)) - grace).date() - timedelta(days=1)


def unsettled(client: Client, now: datetime | None = None, grace: timedelta = timedelta(hours=1),
              table: str = "generations") -> list[Day]:
    """Days that ended at least ``grace`` before ``now`` and are not one merged part, newest first."""
    last_ended = _last_ended(now, grace)
    where = layout(client)
    params = {"db": client.command("SELECT currentDatabase()"), "t": where.local(table)}
    days = []
    for partition_id, parts, rows in client.query(unsettled_days_sql(where), parameters=params).result_rows:
        match = _DAY_ID.match(partition_id)
        if not match:
            continue  # not a day partition (never expected; never formatted into SQL)
        day = date(*map(int, match.groups()))
        if day <= last_ended:
            days.append(Day(partition_id, day, int(parts), int(rows)))
    return days


def settle(client: Client, now: datetime | None = None, grace: timedelta = timedelta(hours=1),
           max_days: int | None = None) -> list[Day]:
    """Merge each unsettled ended day into one part (newest first, at most ``max_days``); return them.

    Then store the daily totals of each ended day that is one part without them
    (warehouse/queries/daily.py; not in cluster mode), at most ``max_days`` of them too."""
    done = []
    where = layout(client)
    for day in unsettled(client, now, grace)[:max_days]:
        # The partition id comes from system.parts and matched _DAY_ID: digits only.
        client.command(f"OPTIMIZE TABLE {where.local('generations')}{where.on_cluster} "
                       f"PARTITION ID '{day.partition_id}' FINAL")
        log.info("settled %s: %d parts, %d rows → 1 part", day.day, day.parts, day.rows)
        done.append(day)
    if not where.cluster:
        # The requests whose trace has feedback (0025; not kept in cluster mode): read with FINAL too.
        for day in unsettled(client, now, grace, table=FEEDBACK_GENERATIONS)[:max_days]:
            client.command(f"OPTIMIZE TABLE {FEEDBACK_GENERATIONS} PARTITION ID '{day.partition_id}' FINAL")
        roll_up(client, _last_ended(now, grace), max_days)
        prune(client, now or datetime.now(UTC))
    return done
