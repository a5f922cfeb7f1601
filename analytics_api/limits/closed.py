"""Closed segments: usage of time that is over, computed once and reused by every refresh.

A usage-limits window can span a month (or, cumulative, much longer), and an ``rpd``
rate limit a day; scanning that every few seconds is too slow (≈6–9 s for a month of 10M
generations). So a window is cut into *segments*:

- usage limits: every UTC **day** of the window before today, then every **hour** of
  today before the current one (the first may start later, at the window start); until
  12:00 UTC yesterday's hours too. A day whose hours are stored is then written as their
  sum (``derive_days``): the totals do not change, so nothing is read for them, and the
  refresh that closes a day only counts its last hour;
- rate limits: every whole **hour** inside the sliding window that is over;

and each segment is counted once per policy, stored in ClickHouse
(``limit_segment_usage``, indexed by ``limit_segments``) and summed per value key. A refresh
scans only what is left: the current hour (usage limits) and the partial hours at the two
edges of a sliding window.

A segment is computed again (a new version) when:

- **new data lands in it**: late events, redeliveries, a backfill. The job compares the
  active parts of ``generations`` with the ones its segments were computed from. Block
  numbers only grow and are assigned when a part becomes visible, so a part that holds a
  block newer than every block seen before holds new data, and so does a new part of
  merge level 0 (only inserts write those; this also covers block numbers that started
  again after the table was emptied): the segments between its ``min_time`` and
  ``max_time`` are recomputed. A part that only merges parts already seen (a merge,
  ``OPTIMIZE``, a deduplicating merge, the settle job) changes nothing that ``FINAL``
  would count. A part that disappears without a successor covering its blocks (a
  dropped partition, a whole-part TTL drop) makes its segments dirty too. A mutation gets
  a newer data version, so it counts as new data;
- **a cut inside it changes**: a policy's window start or a reset inside it (its
  ``cuts_hash`` differs);
- nothing is known: the first run, a lost parts snapshot, or a rebuilt ``generations``
  (another table identity, e.g. a migration's ``EXCHANGE TABLES``): every segment is
  recomputed.

Budget: a refresh computes segments for ``BUDGET_S`` at most (one query at least), in queries of one day and one
shape of policies at most, a shape's policies together and oldest first. A policy with segments left is *pending*:
the job does not count it at that refresh (its counters, state records and alert decisions stay as they were) and
its totals here stay as they were too. A pending segment that has a stored version gets a newer index row marked
``STALE`` before the parts snapshot moves on, so it is computed later even though its new data is no longer "new"
(and after a restart). A cold start (every segment missing) is so spread over a series of refreshes.

Sums: the total of a policy's closed segments per value key is kept in memory and
updated with the difference of the segments that changed (ClickHouse sums the segment
rows with signs: a newly closed hour or day is added, a recomputed segment replaces its
old version, the hours of a day that closed give way to the day, the hour a sliding
window left is taken out); a usage policy whose window start or resets changed, and every
policy after a restart, is summed again from its segment rows.

Not seen: rows a TTL merge removes from inside a part (generations' retention), which
keeps the part's block range and data version; they stay counted until their segment is
recomputed for another reason. Only usage older than ``TOLLGATE_RETENTION_DAYS`` can be
affected, so only cumulative policies older than that.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import orjson
import polars as pl

from analytics_api.limits.counters import DAY_MS, RATE, empty
from warehouse.queries import limits as q
from warehouse.queries.limits import Part, Reset, Slot

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAYS_FROM_HOURS_AFTER_MS = 12 * HOUR_MS  # yesterday's hours give way to one day segment at 12:00 UTC
SNAPSHOT = "generations_parts"
TOTALS_SCHEMA = {"policy_id": pl.String, "value_key": pl.String, "usage": pl.Float64, "n": pl.Int64}
SPAN_PER_QUERY_MS = DAY_MS  # segments computed together: at most this much time per query…
SLOTS_PER_QUERY = 2_000  # …and this many (policy, segment) pairs (bounds the query's memory and duration)
BUDGET_S = 0.5  # a refresh computes segments for this long at most (always one query), the rest at the next ones
STALE = 0  # the cuts hash of a segment that must be computed again (a real one is a 64-bit digest)

Segment = tuple[int, int]  # [start_ms, end_ms)


def replica_of(p: Part) -> str:
    """Whose block numbers a part's are: '' on one server; in cluster mode its replica's host
    (``generation_parts`` names the partition ``host/partition_id``: each shard numbers its blocks)."""
    return p.partition.rpartition("/")[0]


def newest_blocks(parts: dict[str, Part]) -> dict[str, int]:
    """The newest block number (or data version) of each replica's parts."""
    high: dict[str, int] = {}
    for p in parts.values():
        r = replica_of(p)
        high[r] = max(high.get(r, -1), p.max_block, p.data_version)
    return high


@dataclass
class PartsWatch:
    """The active parts of ``generations`` that the stored segments reflect."""

    parts: dict[str, Part] | None = None
    high: dict[str, int] = field(default_factory=dict)  # per replica_of(): the newest block number (or data version)
    table: str = ""  # generations_identity() when they were listed

    def dirty(self, current: dict[str, Part], table: str = "") -> list[tuple[int, int]] | None:
        """Time ranges ``[lo_ms, hi_ms)`` whose data changed since; None: unknown (everything, also when the
        table was rebuilt: another identity, whose block numbers start again)."""
        if self.parts is None or table != self.table:
            return None
        ranges = []
        for name, p in current.items():
            # an insert (level 0), or a part holding a block or mutation newer than any seen
            if name not in self.parts and (p.level == 0 or max(p.max_block, p.data_version) > self.high.get(replica_of(p), -1)):
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
        newest = newest_blocks(current)
        high = newest if table != self.table else {
            r: max(self.high.get(r, -1), newest.get(r, -1)) for r in {*self.high, *newest}}
        changed = self.parts is None or set(self.parts) != set(current) or high != self.high or table != self.table
        self.parts, self.high, self.table = dict(current), high, table
        return changed

    def to_json(self) -> str:
        return orjson.dumps({"table": self.table, "high": self.high,
                             "parts": {n: list(p.__dict__.values()) for n, p in (self.parts or {}).items()}}).decode()

    @classmethod
    def from_json(cls, text: str) -> "PartsWatch":
        data = orjson.loads(text)
        high = data["high"]  # an int before cluster mode: the one server's
        high = {r: int(b) for r, b in high.items()} if isinstance(high, dict) else {"": int(high)}
        return cls({n: Part(*v) for n, v in data["parts"].items()}, high, data.get("table", ""))


class Dirty:
    """Dirty time ranges, merged; ``touches(start, end)`` in O(log n)."""

    def __init__(self, ranges: list[tuple[int, int]] | None):
        self.everything = ranges is None
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges or []):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.starts = [lo for lo, _ in merged]
        self.ends = [hi for _, hi in merged]

    def __bool__(self) -> bool:
        return self.everything or bool(self.starts)

    def touches(self, start: int, end: int) -> bool:
        if self.everything:
            return True
        i = bisect.bisect_left(self.starts, end)  # ranges starting before `end`
        return i > 0 and self.ends[i - 1] > start


@functools.lru_cache(maxsize=200_000)
def _plain_hash(start: int, end: int) -> int:
    """The cuts hash of a segment without resets (most are: shared by every policy over the same hour or day)."""
    return cuts_hash(start, end, [])


def cuts_hash(start: int, end: int, resets: list[tuple[str, int]]) -> int:
    text = orjson.dumps([start, end, sorted(resets)])
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass
class PolicyWindow:
    """A policy's counting window at this refresh."""

    policy_id: str
    kind: str
    slot: Slot  # the policy's rule (start/end are replaced per segment)
    window_start: int
    window_end: int | None
    resets: list[tuple[str, int]]  # (value key, instant) of resets inside the window


def closed_of(p: PolicyWindow, now_ms: int) -> list[Segment]:
    """The closed segments of ``p``'s window (a rate limit's depend only on its width and the hour)."""
    ws, we = p.window_start, p.window_end
    hour0 = now_ms // HOUR_MS * HOUR_MS
    if p.kind == RATE:  # whole hours inside the sliding window that are over
        first = -(-ws // HOUR_MS) * HOUR_MS
        last = min(hour0, (we // HOUR_MS) * HOUR_MS if we is not None else hour0)
        return [(h, h + HOUR_MS) for h in range(first, last, HOUR_MS)]
    closed: list[Segment] = []
    today0 = now_ms // DAY_MS * DAY_MS
    # hours for today, and for yesterday until noon: the day that just ended becomes one segment (written from
    # its hours, at no cost to the totals) half a day later, not in the refresh that also closes the day
    hours_from = today0 - DAY_MS if now_ms - today0 < DAYS_FROM_HOURS_AFTER_MS else today0
    for d in range(ws // DAY_MS, hours_from // DAY_MS):
        lo, hi = max(ws, d * DAY_MS), (d + 1) * DAY_MS if we is None else min(we, (d + 1) * DAY_MS)
        if lo < hi:
            closed.append((lo, hi))
    for h in range(max(ws, hours_from) // HOUR_MS, hour0 // HOUR_MS):
        lo, hi = max(ws, h * HOUR_MS), (h + 1) * HOUR_MS if we is None else min(we, (h + 1) * HOUR_MS)
        if lo < hi:
            closed.append((lo, hi))
    return closed


def live_of(p: PolicyWindow, closed: list[Segment], now_ms: int) -> list[tuple[int, int | None]]:
    """What the closed segments leave of ``p``'s window: the ranges to count live."""
    ws, we = p.window_start, p.window_end
    if p.kind == RATE:
        if not closed:
            return [(ws, we)]
        return ([(ws, closed[0][0])] if ws < closed[0][0] else []) + [(closed[-1][1], we)]
    start = max(ws, now_ms // HOUR_MS * HOUR_MS)
    return [(start, we)] if we is None or start < we else []


def split(p: PolicyWindow, now_ms: int) -> tuple[list[Segment], list[tuple[int, int | None]]]:
    """The closed segments of ``p``'s window, and the ranges left to count live (both ``[start, end)``)."""
    closed = closed_of(p, now_ms)
    return closed, live_of(p, closed, now_ms)


@dataclass
class Stats:
    segments_computed: int = 0
    segments_left: int = 0  # not computed yet: over this refresh's budget
    pending: set[str] = field(default_factory=set)  # policies with segments left (not counted at this refresh)
    days_derived: int = 0
    compute_seconds: float = 0.0
    sum_seconds: float = 0.0
    dirty: bool = False


@dataclass
class ClosedSegments:
    client: object
    organisations: list[str] | None = None  # the job's scope (None: every organisation)
    cleaner: Callable[[], object] | None = None  # makes a client for the cleanup thread (None: no cleanup)
    budget_s: float = BUDGET_S  # computing segments stops after this long (after one query at least)
    index: dict[tuple[str, int, int], tuple[int, int]] = field(default_factory=dict)
    watch: PartsWatch = field(default_factory=PartsWatch)
    totals: pl.DataFrame = field(default_factory=lambda: empty(TOTALS_SCHEMA))
    included: dict[str, tuple[tuple, dict[Segment, int]]] = field(default_factory=dict)
    today: int | None = None
    loaded: bool = False
    _plans: dict = field(default_factory=dict)
    _needed: dict | None = None  # the segments of the last refresh
    _derived: dict = field(default_factory=dict)  # days written from their hours in this refresh
    _cleaning: threading.Thread | None = None

    @property
    def snapshot_name(self) -> str:
        """Each scope has its own parts snapshot: the segments of its policies were computed against it."""
        if self.organisations is None:
            return SNAPSHOT
        digest = hashlib.blake2b(orjson.dumps(sorted(self.organisations)), digest_size=8).hexdigest()
        return f"{SNAPSHOT}:{digest}"

    def load(self) -> None:
        """Resume from ClickHouse: the segment index and the parts snapshot (a restart keeps the stored segments)."""
        self.index = q.load_segment_index(self.client)
        text = q.get_job_state(self.client, self.snapshot_name)
        self.watch = PartsWatch.from_json(text) if text else PartsWatch()
        self.totals, self.included, self.today, self._plans, self._needed = empty(TOTALS_SCHEMA), {}, None, {}, None
        self.loaded = True

    def refresh(self, policies: list[PolicyWindow], now_ms: int) -> tuple[pl.DataFrame, dict[str, list[Segment]], Stats]:
        """Bring the closed segments of ``policies`` up to date. Returns their usage per value key over the
        closed segments, and per policy the ranges still to count live."""
        if not self.loaded:
            self.load()
        try:
            return self._refresh(policies, now_ms)
        except BaseException:
            # The in-memory plans, totals and snapshot may be half updated (a failure after the plans moved on
            # made the next refresh of the hour take them for computed: the hour just closed went uncounted).
            # The next refresh resumes from what ClickHouse holds, as after a restart.
            self.loaded = False
            raise

    def _refresh(self, policies: list[PolicyWindow], now_ms: int) -> tuple[pl.DataFrame, dict[str, list[Segment]], Stats]:
        stats = Stats()
        table = q.generations_identity(self.client)
        listing = q.generation_parts(self.client)  # before any segment is read: later parts are new next time
        ranges = self.watch.dirty(listing, table)
        dirty = Dirty(ranges)
        stats.dirty = bool(dirty)

        plans: dict[tuple, list] = {}
        live: dict[str, list[tuple[int, int | None]]] = {}
        hour = now_ms // HOUR_MS
        for p in policies:
            # a rate limit's closed hours are those from its window's first whole hour to this one (closed_of),
            # the same at every refresh of the hour, also while a young policy's window is clipped by its baseline
            plan_key = ((p.policy_id, RATE, -(-p.window_start // HOUR_MS), hour) if p.kind == RATE
                        else (p.policy_id, p.window_start, p.window_end, hour, tuple(p.resets)))
            done = self._plans.get(plan_key)
            if done is None:
                done = [(seg, *self._cuts(p, seg)) for seg in closed_of(p, now_ms)]
            plans[plan_key] = done
            live[p.policy_id] = live_of(p, [seg for seg, _, _ in done], now_ms)
        hour0 = hour * HOUR_MS
        dirty_closed = bool(dirty) and dirty.touches(-1 << 62, hour0)  # closed segments all end by the current hour
        unchanged = not dirty_closed and plans.keys() == self._plans.keys() and self._needed is not None
        self._plans = plans
        if unchanged:  # the same segments as last time, no new data in them: nothing to compute or sum
            needed = self._needed
        else:
            needed = {(pid, a, b): (inside, h) for (pid, *_), done in plans.items() for (a, b), inside, h in done}
        todo = [] if unchanged else [k for k, (_, h) in needed.items()
                                     if self.index.get(k, (0, None))[1] != h or (dirty and dirty.touches(k[1], k[2]))]
        self._derived = {}
        left: list[tuple[str, int, int]] = []
        if todo:
            t0 = time.perf_counter()
            by_id = {p.policy_id: p for p in policies}
            todo = self._derive(todo, by_id, dirty, now_ms)
            left = self._compute(todo, needed, by_id, now_ms, deadline=t0 + self.budget_s)
            self._invalidate(left, now_ms)  # before the parts snapshot moves on: their new data is not counted yet
            stats.segments_computed, stats.segments_left = len(todo) - len(left), len(left)
            stats.pending = {pid for pid, _, _ in left}
            stats.days_derived = len(self._derived)
            stats.compute_seconds = time.perf_counter() - t0
        if self.watch.advance(listing, table):
            q.put_job_state(self.client, self.snapshot_name, self.watch.to_json(), time.time_ns())
        self._needed = None if left else needed  # segments left: the next refresh looks again

        t0 = time.perf_counter()
        if not unchanged:
            self._sum(policies, needed, stats.pending)
        today = now_ms // DAY_MS
        if self.today != today:  # once a day (and after a start): drop superseded versions, segments no window needs
            keep = {(p, a, b, self.index[(p, a, b)][0]) for p, a, b in needed if (p, a, b) in self.index}
            # and every version the in-memory totals hold (a pending policy's, until it is summed again)
            keep |= {(p, a, b, v) for p, (_, want) in self.included.items() for (a, b), v in want.items()}
            self._cleanup(sorted(keep), time.time_ns())
            self.today = today
        stats.sum_seconds = time.perf_counter() - t0
        return self.totals, live, stats

    @staticmethod
    def _cuts(p: PolicyWindow, seg: Segment) -> tuple[list[tuple[str, int]], int]:
        inside = [(vk, at) for vk, at in p.resets if seg[0] <= at < seg[1]]
        return inside, (cuts_hash(seg[0], seg[1], inside) if inside else _plain_hash(seg[0], seg[1]))

    def _cleanup(self, keep: list[tuple[str, int, int, int]], cutoff: int) -> None:
        """Delete segment rows that no longer count, on a thread with a client of its own (a delete over every
        stored segment takes seconds). Safe alongside refreshes: ``keep`` holds every version the in-memory totals
        may still subtract, and rows computed later have versions ≥ ``cutoff``, which the delete leaves alone."""
        if self.cleaner is None or (self._cleaning is not None and self._cleaning.is_alive()):
            return

        def run() -> None:
            try:
                q.delete_stale_segments(self.cleaner(), keep, cutoff, self.organisations)
            except Exception:
                log.exception("cleaning up closed segments failed; the next day tries again")

        self._cleaning = threading.Thread(target=run, name="limits-cleanup", daemon=True)
        self._cleaning.start()

    def close(self, timeout: float = 30.0) -> None:
        if self._cleaning is not None:
            self._cleaning.join(timeout)

    def _derive(self, todo: list[tuple[str, int, int]], policies: dict[str, PolicyWindow], dirty: Dirty,
                now_ms: int) -> list[tuple[str, int, int]]:
        """A usage day that just closed (not stored yet, no new data in it) is the sum of its hours, most of which
        are stored already: compute the missing hours (the last one, usually) and write the day from its hours.
        Returns what is left to compute. ``self._derived``: each derived day → its hours and their versions."""
        plan: list[tuple[tuple[str, int, int], list[Segment], list[tuple[str, int]]]] = []
        missing: list[tuple[str, int, int]] = []
        rest = []
        for key in todo:
            pid, a, b = key
            p = policies[pid]
            if p.kind == RATE or b - a <= HOUR_MS or key in self.index or (dirty and dirty.touches(a, b)):
                rest.append(key)
                continue
            hours = [(max(a, h), min(b, h + HOUR_MS)) for h in range(a // HOUR_MS * HOUR_MS, b, HOUR_MS)]
            inside = [(vk, at) for vk, at in p.resets if a <= at < b]
            stale = [h for h in hours if self.index.get((pid, *h), (0, None))[1] != self._cuts(p, h)[1]]
            if len(stale) > 2:  # not a day whose hours were counted as it went: count it whole
                rest.append(key)
                continue
            plan.append((key, hours, inside))
            missing += [(pid, *h) for h in stale]
        if not plan:
            return rest
        if missing:
            self._compute(missing, {k: self._cuts(policies[k[0]], (k[1], k[2])) for k in missing}, policies, now_ms)
        version = time.time_ns()
        q.derive_days(self.client, [k for k, _, _ in plan], [(k[0], vk, at) for k, _, inside in plan for vk, at in inside],
                      version)
        rows = []
        for (pid, a, b), hours, inside in plan:
            h = cuts_hash(a, b, inside)
            rows.append((pid, a, b, version, h))
            self.index[(pid, a, b)] = (version, h)
            self._derived[(pid, a, b)] = {hour: self.index[(pid, *hour)][0] for hour in hours}
        q.insert_segment_index(self.client, rows, now_ms)
        return rest

    def _compute(self, todo: list[tuple[str, int, int]], needed: dict, policies: dict[str, PolicyWindow], now_ms: int,
                 deadline: float | None = None) -> list[tuple[str, int, int]]:
        """Count ``todo`` in queries of bounded span and size; stop once ``deadline`` (perf_counter) passed, after
        one query at least. Returns the segments left. Policies of one shape (the keys they read) come together,
        oldest first: they are done at about the same time, and a refresh cut short leaves the fewest pending."""
        todo.sort(key=lambda k: (policies[k[0]].slot.keys, k[1], k[0]))
        batches: list[list[tuple[str, int, int]]] = []
        for k in todo:
            b = batches[-1] if batches else None
            if b is None or k[1] < b[0][1] or k[2] - b[0][1] > SPAN_PER_QUERY_MS or len(b) >= SLOTS_PER_QUERY:
                batches.append([k])
            else:
                b.append(k)
        for i, batch in enumerate(batches):
            if i and deadline is not None and time.perf_counter() >= deadline:
                return [k for b in batches[i:] for k in b]
            self._compute_batch(batch, needed, policies, now_ms)
        return []

    def _invalidate(self, left: list[tuple[str, int, int]], now_ms: int) -> None:
        """Segments left for a later refresh that have a stored version get a newer index row marked ``STALE``, so
        that they are computed even after the parts snapshot has moved past their new data (or after a restart).
        Their old rows stay: the in-memory totals of their policy still hold them."""
        version = time.time_ns()
        rows = [(pid, a, b, version, STALE) for pid, a, b in left if self.index.get((pid, a, b), (0, STALE))[1] != STALE]
        q.insert_segment_index(self.client, rows, now_ms)
        for pid, a, b, v, h in rows:
            self.index[(pid, a, b)] = (v, h)

    def _compute_batch(self, batch: list[tuple[str, int, int]], needed: dict, policies: dict[str, PolicyWindow],
                       now_ms: int) -> None:
        slots, resets, pids, index_rows = [], [], [], []
        version = time.time_ns()
        for pid, a, b in batch:
            inside, h = needed[(pid, a, b)]
            base = policies[pid].slot
            resets += [Reset(len(slots), vk, at) for vk, at in inside]
            slots.append(Slot(base.organisation_id, base.conditions, base.group_by, base.measure, a, b))
            pids.append(pid)
            index_rows.append((pid, a, b, version, h))
        q.insert_segment_usage(self.client, slots, resets, pids, version)
        q.insert_segment_index(self.client, index_rows, now_ms)  # after its rows: a crash in between leaves garbage only
        for pid, a, b, v, h in index_rows:
            self.index[(pid, a, b)] = (v, h)

    def _sum(self, policies: list[PolicyWindow], needed: dict, pending: set[str]) -> None:
        """Bring ``totals`` up to date for every policy but the ``pending`` ones (segments left), whose totals and
        segment versions stay as they were until they are summed again."""
        desired: dict[str, dict[Segment, int]] = defaultdict(dict)
        for pid, a, b in needed:
            if pid not in pending:
                desired[pid][(a, b)] = self.index[(pid, a, b)][0]
        entries: list[tuple[str, int, int, int, int]] = []
        recompute: set[str] = set()
        resets: list[tuple[str, str, int]] = []
        included: dict[str, tuple[tuple, dict[Segment, int]]] = {}
        for p in policies:
            if p.policy_id in pending:
                if p.policy_id in self.included:
                    included[p.policy_id] = self.included[p.policy_id]
                continue
            # a sliding window moves at every refresh: its hours come and go as differences
            sig = (RATE,) if p.kind == RATE else (p.window_start, p.window_end, tuple(sorted(p.resets)))
            want = desired.get(p.policy_id, {})
            included[p.policy_id] = (sig, want)
            resets += [(p.policy_id, vk, at) for vk, at in p.resets]
            before = self.included.get(p.policy_id)
            if before is None or before[0] != sig:
                recompute.add(p.policy_id)
                entries += [(p.policy_id, a, b, v, 1) for (a, b), v in want.items()]
                continue
            had = before[1]
            if want == had:
                continue
            counted: set[Segment] = set()  # hours a derived day stands for that are in the totals already
            for (a, b), v in want.items():
                if had.get((a, b)) == v:
                    continue
                hours = self._derived.get((p.policy_id, a, b))
                if hours is not None and (a, b) not in had:  # the day is the sum of its hours: add the new ones only
                    for (ha, hb), hv in hours.items():
                        if had.get((ha, hb)) == hv:
                            counted.add((ha, hb))
                        else:
                            entries.append((p.policy_id, ha, hb, hv, 1))
                            if (ha, hb) in had:
                                entries.append((p.policy_id, ha, hb, had[(ha, hb)], -1))
                                counted.add((ha, hb))
                    continue
                entries.append((p.policy_id, a, b, v, 1))
                if (a, b) in had:
                    entries.append((p.policy_id, a, b, had[(a, b)], -1))
            entries += [(p.policy_id, a, b, v, -1) for (a, b), v in had.items() if (a, b) not in want and (a, b) not in counted]
        active = pl.DataFrame({"policy_id": list(included)}, schema={"policy_id": pl.String})
        kept = self.totals.join(active, on="policy_id", how="semi").filter(~pl.col("policy_id").is_in(list(recompute)))
        if entries:
            sums = pl.from_arrow(q.segment_sums(self.client, entries, resets))
            assert isinstance(sums, pl.DataFrame)
            kept = (pl.concat([kept, sums.cast(TOTALS_SCHEMA)]).group_by("policy_id", "value_key")
                    .agg(pl.col("usage").sum(), pl.col("n").sum()))
        self.totals = kept.filter(pl.col("n") > 0)
        self.included = included
