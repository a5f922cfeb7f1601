"""Closed days: usage of past UTC days, computed once and reused by every refresh.

A usage-limits window can span a month (or, cumulative, much longer); scanning it all
every few seconds is too slow (≈6–9 s for a month of 10M generations). So a refresh
scans only the current day, and each *closed* day of a window is computed once per
(policy, day), stored in ClickHouse (``limit_day_usage``, indexed by ``limit_days``)
and summed per value key.

A closed day is computed again (a new version) when:

- **new data lands in it**: late events, redeliveries, a backfill. The job compares the
  active parts of ``generations`` with the ones its days were computed from. Block
  numbers only grow and are assigned when a part becomes visible, so a part that
  holds a block newer than every block seen before holds new data: the days between
  its ``min_time`` and ``max_time`` are recomputed. A part that only merges parts
  already seen (a merge, ``OPTIMIZE``, a deduplicating merge) changes nothing that
  ``FINAL`` would count. A part that disappears without a successor covering its blocks
  (a dropped partition) makes its days dirty too. A mutation gets a newer data
  version, so it counts as new data;
- **a cut inside it changes**: a policy's window start or a reset inside that day
  (its ``cuts_hash`` differs);
- nothing is known: the first run, a lost parts snapshot, or a rebuilt ``generations``
  (another table identity, e.g. a migration's ``EXCHANGE TABLES``): every day is recomputed.

Sums: the total of a policy's closed days per value key is kept in memory and
updated with the difference of the days that changed (ClickHouse sums the day rows
with signs: a new closed day is added, a recomputed one replaces its old version); a
policy whose window or resets changed, and every policy after a restart, is summed
again from its day rows.

Not seen: rows a TTL merge removes from inside a part (generations' retention), which
keeps the part's block range and data version; they stay counted until their day is
recomputed for another reason. (A TTL that drops whole parts, ``ttl_only_drop_parts``, is
seen: the part goes without a successor.) Only usage older than ``TOLLGATE_RETENTION_DAYS``
can be affected, so only cumulative policies older than that.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import orjson
import polars as pl

from analytics_api.limits.counters import DAY_MS, empty
from warehouse.queries import limits as q
from warehouse.queries.limits import Part, Reset, Slot

log = logging.getLogger(__name__)

SNAPSHOT = "generations_parts"
TOTALS_SCHEMA = {"policy_id": pl.String, "value_key": pl.String, "usage": pl.Float64, "n": pl.Int64}
DAYS_PER_QUERY = 4


@dataclass
class PartsWatch:
    """The active parts of ``generations`` that the stored closed days reflect."""

    parts: dict[str, Part] | None = None
    high: int = -1  # the newest block number (or data version) among them
    table: str = ""  # generations_identity() when they were listed

    def dirty(self, current: dict[str, Part], table: str = "") -> list[tuple[int, int]] | None:
        """Time ranges ``[lo_ms, hi_ms)`` whose data changed since; None: unknown (everything, also when the
        table was rebuilt: another identity, whose block numbers start again)."""
        if self.parts is None or table != self.table:
            return None
        ranges = []
        for name, p in current.items():
            # an insert (level 0), or a part holding a block or mutation newer than any seen
            if name not in self.parts and (p.level == 0 or max(p.max_block, p.data_version) > self.high):
                ranges.append((p.min_ms, p.max_ms))
        for name, p in self.parts.items():
            if name in current:
                continue
            if not any(c.partition == p.partition and c.min_block <= p.min_block and c.max_block >= p.max_block
                       for c in current.values()):
                ranges.append((p.min_ms, p.max_ms))
        return ranges

    def advance(self, current: dict[str, Part], table: str = "") -> bool:
        """Take ``current`` as seen; True when that changed anything."""
        newest = max((max(p.max_block, p.data_version) for p in current.values()), default=-1)
        high = newest if table != self.table else max(self.high, newest)
        changed = self.parts is None or set(self.parts) != set(current) or high != self.high or table != self.table
        self.parts, self.high, self.table = dict(current), high, table
        return changed

    def to_json(self) -> str:
        return orjson.dumps({"table": self.table, "high": self.high,
                             "parts": {n: list(p.__dict__.values()) for n, p in (self.parts or {}).items()}}).decode()

    @classmethod
    def from_json(cls, text: str) -> "PartsWatch":
        data = orjson.loads(text)
        return cls({n: Part(*v) for n, v in data["parts"].items()}, int(data["high"]), data.get("table", ""))


def _days_of(ranges: list[tuple[int, int]]) -> set[int]:
    days: set[int] = set()
    for lo, hi in ranges:
        days.update(range(lo // DAY_MS, (max(hi, lo + 1) - 1) // DAY_MS + 1))
    return days


def _closed_days(p: "PolicyDays", today: int) -> list[tuple[int, tuple[int, int, list[tuple[str, int]], int]]]:
    """The closed days of ``p``'s window before day ``today``: (day, (start, end, resets inside, cuts hash))."""
    out = []
    for d in range(p.window_start // DAY_MS, today):
        d0, d1 = d * DAY_MS, (d + 1) * DAY_MS
        start = max(p.window_start, d0)
        end = d1 if p.window_end is None else min(p.window_end, d1)
        if start >= end:
            continue
        inside = [(vk, at) for vk, at in p.resets if d0 <= at < d1]
        out.append((d, (start, end, inside, cuts_hash(start, end, inside))))
    return out


def cuts_hash(start: int, end: int, resets: list[tuple[str, int]]) -> int:
    text = orjson.dumps([start, end, sorted(resets)])
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass
class PolicyDays:
    """What one usage-limits policy needs of the closed days."""

    policy_id: str
    slot: Slot  # the policy's rule (start/end are replaced per day)
    window_start: int
    window_end: int | None
    resets: list[tuple[str, int]]  # (value key, instant) of resets inside the window


@dataclass
class Stats:
    days_computed: int = 0
    compute_seconds: float = 0.0
    sum_seconds: float = 0.0
    dirty_days: int | None = 0


@dataclass
class ClosedDays:
    client: object
    organisations: list[str] | None = None  # the job's scope (None: every organisation)
    index: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    watch: PartsWatch = field(default_factory=PartsWatch)
    totals: pl.DataFrame = field(default_factory=lambda: empty(TOTALS_SCHEMA))
    included: dict[str, tuple[tuple, dict[int, int]]] = field(default_factory=dict)
    today: int | None = None
    loaded: bool = False
    cleaner: Callable[[], object] | None = None  # makes a client for the cleanup thread (None: no cleanup)
    _plans: dict = field(default_factory=dict)
    _cleaning: threading.Thread | None = None

    @property
    def snapshot_name(self) -> str:
        """Each scope has its own parts snapshot: the days of its policies were computed against it."""
        if self.organisations is None:
            return SNAPSHOT
        digest = hashlib.blake2b(orjson.dumps(sorted(self.organisations)), digest_size=8).hexdigest()
        return f"{SNAPSHOT}:{digest}"

    def load(self) -> None:
        """Resume from ClickHouse: the day index and the parts snapshot (a restart keeps the stored days)."""
        self.index = q.load_day_index(self.client)
        text = q.get_job_state(self.client, self.snapshot_name)
        self.watch = PartsWatch.from_json(text) if text else PartsWatch()
        self.totals, self.included, self.today, self._plans = empty(TOTALS_SCHEMA), {}, None, {}
        self.loaded = True

    def refresh(self, policies: list[PolicyDays], now_ms: int) -> tuple[pl.DataFrame, Stats]:
        """Bring the closed days of ``policies`` up to date; their closed-day usage per value key."""
        if not self.loaded:
            self.load()
        stats = Stats()
        today = now_ms // DAY_MS
        table = q.generations_identity(self.client)
        listing = q.generation_parts(self.client)  # before any day is read: later parts are new next time
        dirty = self.watch.dirty(listing, table)
        stats.dirty_days = None if dirty is None else len(_days_of(dirty))
        dirty_days = None if dirty is None else _days_of(dirty)

        needed: dict[tuple[str, int], tuple[int, int, list[tuple[str, int]], int]] = {}
        plans: dict[tuple, list] = {}
        for p in policies:
            plan_key = (p.policy_id, p.window_start, p.window_end, today, tuple(p.resets))
            days = self._plans.get(plan_key)
            if days is None:
                days = _closed_days(p, today)
            plans[plan_key] = days
            for d, item in days:
                needed[(p.policy_id, d)] = item
        self._plans = plans
        todo = [k for k, v in needed.items()
                if dirty_days is None or k[1] in dirty_days or self.index.get(k, (0, None))[1] != v[3]]
        if todo:
            t0 = time.perf_counter()
            self._compute(todo, needed, {p.policy_id: p for p in policies}, now_ms)
            stats.days_computed = len(todo)
            stats.compute_seconds = time.perf_counter() - t0
        if self.watch.advance(listing, table):
            q.put_job_state(self.client, self.snapshot_name, self.watch.to_json(), time.time_ns())

        t0 = time.perf_counter()
        new_day = self.today != today
        self._sum(policies, needed)
        if new_day:  # once a day (and after a start): drop superseded versions and days no window needs
            self._cleanup([(p, d, self.index[(p, d)][0]) for p, d in needed])
            self.today = today
        stats.sum_seconds = time.perf_counter() - t0
        return self.totals, stats

    def _cleanup(self, keep: list[tuple[str, int, int]]) -> None:
        """Delete closed-day rows that no longer count, on a thread with a client of its own (a mutation over
        every stored day takes seconds). Safe alongside refreshes: ``keep`` holds every version the in-memory
        totals may still subtract, and rows written later are in parts the mutation does not touch."""
        if self.cleaner is None or (self._cleaning is not None and self._cleaning.is_alive()):
            return

        def run() -> None:
            try:
                q.delete_stale_days(self.cleaner(), keep, self.organisations)
            except Exception:
                log.exception("cleaning up closed days failed; the next day tries again")

        self._cleaning = threading.Thread(target=run, name="limits-cleanup", daemon=True)
        self._cleaning.start()

    def close(self, timeout: float = 30.0) -> None:
        if self._cleaning is not None:
            self._cleaning.join(timeout)

    def _compute(self, todo: list[tuple[str, int]], needed: dict, policies: dict[str, PolicyDays], now_ms: int) -> None:
        by_day: dict[int, list[str]] = defaultdict(list)
        for pid, d in todo:
            by_day[d].append(pid)
        days = sorted(by_day)
        for i in range(0, len(days), DAYS_PER_QUERY):
            slots, resets, pids, dnums, index_rows = [], [], [], [], []
            version = time.time_ns()
            for d in days[i:i + DAYS_PER_QUERY]:
                for pid in by_day[d]:
                    start, end, inside, h = needed[(pid, d)]
                    base = policies[pid].slot
                    slot_index = len(slots)
                    slots.append(Slot(base.organisation_id, base.conditions, base.group_by, base.measure, start, end))
                    resets += [Reset(slot_index, vk, at) for vk, at in inside]
                    pids.append(pid)
                    dnums.append(d)
                    index_rows.append((pid, d, version, h))
            q.insert_day_usage(self.client, slots, resets, pids, dnums, version)
            q.insert_day_index(self.client, index_rows, now_ms)  # after its rows: a crash in between leaves only garbage
            for pid, d, v, h in index_rows:
                self.index[(pid, d)] = (v, h)

    def _sum(self, policies: list[PolicyDays], needed: dict) -> None:
        desired: dict[str, dict[int, int]] = defaultdict(dict)
        for pid, d in needed:
            desired[pid][d] = self.index[(pid, d)][0]
        entries: list[tuple[str, int, int, int]] = []
        recompute: set[str] = set()
        reset_days: list[tuple[str, str, int]] = []
        included: dict[str, tuple[tuple, dict[int, int]]] = {}
        for p in policies:
            sig = (p.window_start, p.window_end, tuple(sorted(p.resets)))
            want = desired.get(p.policy_id, {})
            included[p.policy_id] = (sig, want)
            reset_days += [(p.policy_id, vk, at // DAY_MS) for vk, at in p.resets]
            before = self.included.get(p.policy_id)
            if before is None or before[0] != sig:
                recompute.add(p.policy_id)
                entries += [(p.policy_id, d, v, 1) for d, v in want.items()]
                continue
            had = before[1]
            for d, v in want.items():
                if had.get(d) != v:
                    entries.append((p.policy_id, d, v, 1))
                    if d in had:
                        entries.append((p.policy_id, d, had[d], -1))
            entries += [(p.policy_id, d, v, -1) for d, v in had.items() if d not in want]
        active = pl.DataFrame({"policy_id": list(included)}, schema={"policy_id": pl.String})
        kept = self.totals.join(active, on="policy_id", how="semi").filter(~pl.col("policy_id").is_in(list(recompute)))
        if entries:
            sums = pl.from_arrow(q.day_sums(self.client, entries, reset_days))
            assert isinstance(sums, pl.DataFrame)
            kept = (pl.concat([kept, sums.cast(TOTALS_SCHEMA)]).group_by("policy_id", "value_key")
                    .agg(pl.col("usage").sum(), pl.col("n").sum()))
        self.totals = kept.filter(pl.col("n") > 0)
        self.included = included
