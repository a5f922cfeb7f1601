"""The limits job: every ``TOLLGATE_LIMITS_INTERVAL`` seconds, on the APScheduler of `tollgate up`.

One refresh (:meth:`LimitsJob.run_once`):

1. **Query.** The active policies and resets (ClickHouse). The closed segments of every
   window (past days and hours: ``closed.ClosedSegments``; only segments whose data or
   cuts changed are recomputed) are brought up to date and their per-value-key sums
   taken; one aggregate query counts what they leave: the current hour of every
   usage-limits window and the partial hours at the edges of every sliding window
   (``warehouse.queries.limits``). Segments are computed for a time budget per refresh;
   a policy with segments left is held: not counted at this refresh, its counters, state
   records and alert decisions stay as they were.
2. **Evaluate** (Polars, ``counters``): usage per value key, statuses, the alerts that
   became due, the enforcement records.
3. **Persist, then publish.** Alerts: the decision is written to ``limit_alerts``
   (state ``pending``, with the alert topic's end offsets) *before* it is produced,
   and marked ``sent`` once Kafka acknowledged it. State records: written to
   ``limit_state`` (unpublished) before they are produced, marked published after.
   Counters: written to ``limit_counters`` when they changed.

Restart-safety (docs/limits.md, "Guarantees"): a decision that is in ClickHouse is
never taken again, so an alert is decided once per value key and alert window. A
``pending`` alert found at start-up (the process died between deciding and marking it
sent) is produced only if the alert topic, read from the offsets recorded with it,
does not hold its ``alert_id`` already: no alert is lost and none is produced twice,
as long as one job runs at a time. Unpublished state records are produced again
(harmless on a compacted topic). Everything else is recomputed from ClickHouse.

"now" comes from ``clock`` (tests move it across period boundaries).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Callable

import orjson
import polars as pl
from kafka.errors import KafkaError

from analytics_api.limits import counters as c
from analytics_api.limits.closed import ClosedSegments, PolicyWindow
from analytics_api.limits.feed import Feed
from tollgate import monitoring
from tollgate.settings import Settings
from warehouse.client import connect
from warehouse.queries import limits as q
from warehouse.queries import policies as pq
from warehouse.queries.limits import Reset, Slot
from warehouse.queries.policies import PolicyRow

log = logging.getLogger(__name__)

LIMITED = (c.EXHAUSTED, c.RATE_LIMITED)
STATE_SIG = {"policy_id": pl.String, "value_key": pl.String, "organisation_id": pl.String, "signature": pl.String}
SIGNATURE = ["status", "current_usage", "limit", "window_start", "window_end", "unit"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def policy_slot(p: PolicyRow, start_ms: int, end_ms: int | None) -> Slot:
    """A policy's counting rule. A workspace policy only counts its workspace (an implicit condition)."""
    return Slot(p.organisation_id, p.counted_conditions(), p.group_by, p.type, start_ms, end_ms)


@dataclass
class Report:
    """What one refresh did, and how long each step took (seconds)."""

    now: datetime
    policies: int = 0
    value_keys: int = 0
    closed_segments_computed: int = 0  # counted from generations
    closed_segments_left: int = 0  # over this refresh's budget: counted at the next ones
    policies_pending: int = 0  # not counted at this refresh (closed segments left): held as they were
    closed_days_derived: int = 0  # written as the sum of their hours
    dirty: bool = False
    alerts_decided: int = 0
    alerts_published: int = 0
    state_records: int = 0
    counters_written: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.timings.get("total", 0.0)


class LimitsJob:
    def __init__(self, settings: Settings, bootstrap: str | None, clock: Callable[[], datetime] = utc_now, client=None,
                 organisations: list[str] | None = None):
        """``organisations``: count only these organisations' policies (None: all). Jobs with disjoint
        scopes may run side by side; two jobs must never share an organisation."""
        self.settings = settings
        self.organisations = sorted(organisations) if organisations is not None else None
        self.client = client if client is not None else connect(settings.warehouse_dsn)
        self.feed = Feed(bootstrap, settings.topic_limit_alerts, settings.topic_limits_state)
        self.clock = clock
        self.closed = ClosedSegments(self.client, self.organisations, cleaner=lambda: connect(settings.warehouse_dsn))
        self.known = c.empty(c.COUNTER_SCHEMA)  # the last written counters
        self.alerts = c.empty(c.ALERT_SCHEMA)  # every decided alert: KEY, alert_window, kind, state
        self.pending: dict[tuple, dict] = {}  # undelivered alerts → their row (with "attempted")
        self.state_sig = pl.DataFrame(schema=STATE_SIG)
        self.unpublished: dict[tuple[str, str], dict] = {}  # state rows persisted but not acknowledged
        self.started = False
        self._closed = False
        self.last: Report | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- start-up

    def start(self) -> None:
        """Resume from ClickHouse: closed segments, counters, alert decisions, the state feed; finish interrupted publishing."""
        self.closed.load()
        known = pl.from_arrow(q.load_counters(self.client, self.organisations))
        assert isinstance(known, pl.DataFrame)
        self.known = known.select(list(c.COUNTER_SCHEMA)).cast(c.COUNTER_SCHEMA)  # type: ignore[arg-type]
        rows = q.load_alerts(self.client, self.organisations)
        self.alerts = pl.DataFrame([{k: r[k] for k in c.ALERT_SCHEMA} for r in rows], schema=c.ALERT_SCHEMA)
        self.pending = {(r["policy_id"], r["value_key"], r["alert_window"], r["kind"]): {**r, "attempted": True}
                        for r in rows if r["state"] != "sent"}
        state = q.load_state(self.client, self.organisations)
        live = [r for r in state if r["record"]]
        self.state_sig = pl.DataFrame([{k: r[k] for k in STATE_SIG} for r in live], schema=STATE_SIG)
        self.unpublished = {(r["policy_id"], r["value_key"]): r for r in state if not r["published"]}
        self.started = True
        if self.pending or self.unpublished:
            log.info("limits job: resuming %d undelivered alert(s) and %d state record(s)", len(self.pending), len(self.unpublished))
            try:
                self._deliver_alerts()
                self._deliver_state()
            except KafkaError as exc:
                log.warning("limits job: Kafka unavailable at start-up (%s); retrying at the next refresh", exc)

    # ----------------------------------------------------------------------------- one refresh

    def run(self) -> None:
        """The scheduler's entry point: a refresh that never raises. While policies wait for closed segments (after
        a cold start, say), it refreshes again at once as long as that fits in the interval."""
        until = time.monotonic() + self.settings.limits_interval
        while not self._closed:
            started, status = time.perf_counter(), "ok"
            try:
                report = self.run_once()
            except Exception:
                status = "error"
                log.exception("limits refresh failed; the next one starts over")
                return
            finally:
                monitoring.LIMITS_REFRESH_SECONDS.labels(status).observe(time.perf_counter() - started)
            if not report.policies_pending or time.monotonic() + report.seconds > until:
                return

    def run_once(self, now: datetime | None = None) -> Report:
        with self._lock:
            if self._closed:
                raise RuntimeError("the limits job is closed")
            t_start = time.perf_counter()
            if not self.started:
                self.start()
            now = now or self.clock()
            now_ms = c.to_ms(now)
            report = Report(now=now)
            t = _Timer(report)

            policies = pq.active(self.client, self.organisations)
            by_id = {p.id: p for p in policies}
            frame = c.policy_frame(policies, now_ms)
            usage_ids = [p.id for p in policies if p.kind == c.USAGE]
            windows = {r["policy_id"]: (r["window_start"], r["window_end"]) for r in
                       frame.select("policy_id", "window_start", "window_end").iter_rows(named=True)}
            resets: dict[str, list[tuple[str, int]]] = {}
            for pid, vk, at in pq.latest_resets(self.client, usage_ids):
                at_ms = c.to_ms(at)
                if at_ms > windows[pid][0]:  # a reset before the window start changes nothing
                    resets.setdefault(pid, []).append((vk, at_ms))
            t.lap("policies")

            closed, live_ranges, stats = self.closed.refresh(
                [PolicyWindow(p.id, p.kind, policy_slot(p, 0, None), *windows[p.id], resets.get(p.id, [])) for p in policies],
                now_ms)
            report.closed_segments_computed, report.dirty = stats.segments_computed, stats.dirty
            report.closed_segments_left, report.policies_pending = stats.segments_left, len(stats.pending)
            report.closed_days_derived = stats.days_derived
            report.timings["closed_compute"] = stats.compute_seconds
            report.timings["closed_sum"] = stats.sum_seconds
            t.lap("closed_segments")

            # a policy with closed segments left is not counted at this refresh: its counters, state records and
            # alert decisions stay as they were (docs/limits.md, "A refresh")
            pending = stats.pending
            if pending:
                frame = frame.filter(~pl.col("policy_id").is_in(list(pending)))
                closed = closed.filter(~pl.col("policy_id").is_in(list(pending)))
                live_ranges = {pid: r for pid, r in live_ranges.items() if pid not in pending}
            live = self._live(by_id, live_ranges, resets)
            t.lap("live_query")

            usage = (pl.concat([closed.select(c.KEY + ["usage"]), live])
                     .group_by(c.KEY).agg(pl.col("usage").sum()))
            reset_frame = pl.DataFrame([(pid, vk, at) for pid, rs in resets.items() for vk, at in rs],
                                       schema=c.RESET_SCHEMA, orient="row")
            ev = c.evaluate(frame, usage, reset_frame, self.known, self.alerts)
            report.policies, report.value_keys = len(policies), ev.keys.height
            t.lap("evaluate")

            report.alerts_decided = self._decide_alerts(ev.due_alerts, now_ms)
            t.lap("alerts_persist")
            try:
                report.alerts_published = self._deliver_alerts()
            except KafkaError as exc:
                log.warning("limits job: alerts not delivered yet (%s); retrying at the next refresh", exc)
            t.lap("alerts_publish")

            report.state_records = self._update_state(ev.keys, by_id, now_ms, pending)
            t.lap("state_persist")
            try:
                self._deliver_state()
            except KafkaError as exc:
                log.warning("limits job: state records not delivered yet (%s); retrying at the next refresh", exc)
            t.lap("state_publish")

            report.counters_written = self._write_counters(c.apply_flags(ev.keys, self.alerts), now_ms)
            # decisions of earlier alert windows can never match again (windows only move forward)
            current = ev.keys.filter(pl.col("alert_window").is_not_null()).select(*c.KEY, "alert_window")
            self.alerts = pl.concat([self.alerts.join(current, on=[*c.KEY, "alert_window"], how="semi"),
                                     self.alerts.filter(pl.col("policy_id").is_in(list(pending)))])
            t.lap("counters_write")
            report.timings["total"] = time.perf_counter() - t_start
            self.last = report
            return report

    def _live(self, by_id: dict[str, PolicyRow], live_ranges: dict[str, list[tuple[int, int | None]]],
              resets: dict) -> pl.DataFrame:
        """Usage of what the closed segments leave of every window: the current hour of a usage window, the
        partial hours at the edges of a sliding window."""
        slots: list[Slot] = []
        slot_policy: list[str] = []
        live_resets: list[Reset] = []
        for pid, ranges in live_ranges.items():
            for start, end in ranges:
                if end is not None and start >= end:
                    continue
                for vk, at in resets.get(pid, []):
                    if at > start:
                        live_resets.append(Reset(len(slots), vk, at))
                slots.append(policy_slot(by_id[pid], start, end))
                slot_policy.append(pid)
        table = pl.from_arrow(q.usage(self.client, slots, live_resets))
        assert isinstance(table, pl.DataFrame)
        ids = pl.Series("policy_id", slot_policy, dtype=pl.String)
        return table.select(policy_id=ids.gather(table["slot"]) if table.height else pl.Series([], dtype=pl.String),
                            value_key="value_key", usage=pl.col("usage").cast(pl.Float64))

    # ----------------------------------------------------------------------------- alerts

    def _decide_alerts(self, due: pl.DataFrame, now_ms: int) -> int:
        """Persist the decision of every due alert ('pending') before anything is produced."""
        if due.is_empty():
            return 0
        try:
            offsets = self.feed.end_offsets(self.settings.topic_limit_alerts)
        except KafkaError:
            offsets = {}  # unknown: a check after a failure reads the topic from its start
        version = time.time_ns()
        rows = []
        for r in due.iter_rows(named=True):
            payload = c.alert_payload(r, now_ms)
            rows.append({
                "policy_id": r["policy_id"], "value_key": r["value_key"], "alert_window": r["alert_window"],
                "kind": r["kind"], "alert_id": payload["alert_id"], "organisation_id": r["organisation_id"],
                "payload": orjson.dumps(payload).decode(), "state": "pending",
                "topic_offsets": orjson.dumps({str(k): v for k, v in offsets.items()}).decode(),
                "created_at": now_ms, "version": version,
            })
        q.write_alerts(self.client, rows)
        for r in rows:
            self.pending[(r["policy_id"], r["value_key"], r["alert_window"], r["kind"])] = {**r, "attempted": False}
        self.alerts = pl.concat([self.alerts, pl.DataFrame([{k: r[k] for k in c.ALERT_SCHEMA} for r in rows],
                                                           schema=c.ALERT_SCHEMA)])
        return len(rows)

    def _deliver_alerts(self) -> int:
        """Produce pending alerts, each exactly once; mark them sent."""
        if not self.pending:
            return 0
        pending = sorted(self.pending.values(), key=lambda r: (r["created_at"], r["policy_id"], r["value_key"], r["kind"] != c.THRESHOLD))
        suspect = [r for r in pending if r["attempted"]]
        already: set[str] = set()
        if suspect:  # an earlier attempt may have reached Kafka: look before producing again
            offsets: dict[int, int] = {}
            for r in suspect:
                recorded = {int(k): v for k, v in orjson.loads(r["topic_offsets"] or "{}").items()}
                if not recorded:
                    offsets = {}
                    break
                for part, off in recorded.items():
                    offsets[part] = min(offsets.get(part, off), off)
            already = self.feed.alert_ids_since(offsets)
        send = [r for r in pending if r["alert_id"] not in already]
        for r in pending:
            r["attempted"] = True
        self.feed.send(self.settings.topic_limit_alerts,
                       [(c.state_key(r["policy_id"], r["value_key"]).encode(), r["payload"].encode()) for r in send])
        version = time.time_ns()
        sent = [{**{k: v for k, v in r.items() if k != "attempted"}, "state": "sent", "version": version} for r in pending]
        q.write_alerts(self.client, sent)
        done = pl.DataFrame([{k: r[k] for k in c.ALERT_SCHEMA} for r in sent], schema=c.ALERT_SCHEMA)
        self.alerts = pl.concat([self.alerts.join(done, on=[*c.KEY, "alert_window", "kind"], how="anti"), done])
        self.pending.clear()
        return len(send)

    # ----------------------------------------------------------------------------- state feed

    def _update_state(self, keys: pl.DataFrame, by_id: dict[str, PolicyRow], now_ms: int, pending: set[str]) -> int:
        """Persist a record for every limited key whose state changed, and a tombstone for every key that cleared.
        The records of ``pending`` policies (not counted at this refresh) stay as they are."""
        limited = keys.filter(pl.col("status").is_in(LIMITED)).with_columns(
            signature=pl.concat_str([pl.col(s).cast(pl.String).fill_null("") for s in SIGNATURE], separator="|"))
        held = self.state_sig.filter(pl.col("policy_id").is_in(list(pending)))
        changed = limited.join(self.state_sig, on=[*c.KEY, "signature"], how="anti")
        cleared = self.state_sig.join(limited, on=c.KEY, how="anti").join(held, on=c.KEY, how="anti")
        if changed.is_empty() and cleared.is_empty():
            return 0
        version = time.time_ns()
        rows = []
        for r in changed.iter_rows(named=True):
            record = {**c.state_record(r, by_id[r["policy_id"]]), "updated_at": c.iso(now_ms)}
            rows.append({"policy_id": r["policy_id"], "value_key": r["value_key"], "organisation_id": r["organisation_id"],
                         "record": orjson.dumps(record).decode(),
                         "signature": r["signature"], "published": False, "updated_at": now_ms, "version": version})
        for pid, vk, org in cleared.select(*c.KEY, "organisation_id").iter_rows():
            rows.append({"policy_id": pid, "value_key": vk, "organisation_id": org, "record": "", "signature": "",
                         "published": False, "updated_at": now_ms, "version": version})
        q.write_state(self.client, rows)
        for r in rows:
            self.unpublished[(r["policy_id"], r["value_key"])] = r
        self.state_sig = pl.concat([limited.select(list(STATE_SIG)), held])
        return len(rows)

    def _deliver_state(self) -> int:
        if not self.unpublished:
            return 0
        rows = list(self.unpublished.values())
        self.feed.send(self.settings.topic_limits_state,
                       [(c.state_key(r["policy_id"], r["value_key"]).encode(), r["record"].encode() if r["record"] else None)
                        for r in rows])
        version = time.time_ns()
        q.write_state(self.client, [{**r, "published": True, "version": version} for r in rows])
        self.unpublished.clear()
        return len(rows)

    # ----------------------------------------------------------------------------- counters

    def _write_counters(self, keys: pl.DataFrame, now_ms: int) -> int:
        changed = c.changed_counters(keys, self.known)
        if changed.is_empty():
            return 0
        out = changed.with_columns(updated_at=pl.lit(now_ms, pl.Int64), version=pl.lit(time.time_ns(), pl.UInt64))
        q.write_counters(self.client, out.to_arrow())
        # quiet rate-limit keys leave memory once written at 0 (their row stays)
        quiet = changed.filter((pl.col("kind") == c.RATE) & (pl.col("current_usage") == 0)).select(c.KEY)
        kept = changed.join(quiet, on=c.KEY, how="anti").select(list(c.COUNTER_SCHEMA))
        self.known = pl.concat([self.known.join(changed.select(c.KEY), on=c.KEY, how="anti"), kept])
        return changed.height

    def close(self) -> None:
        """Stop: waits for a refresh in flight; later scheduled runs do nothing."""
        with self._lock:
            self._closed = True
            self.closed.close()
            self.feed.close()


class _Timer:
    def __init__(self, report: Report):
        self.report = report
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.report.timings[name] = now - self.t
        self.t = now


def schedule(scheduler, settings: Settings, bootstrap: str | None) -> LimitsJob:
    """Register the job on an APScheduler scheduler (one run at a time; missed runs coalesce)."""
    job = LimitsJob(settings, bootstrap)
    scheduler.add_job(job.run, "interval", seconds=settings.limits_interval, id="limits", max_instances=1,
                      coalesce=True, next_run_time=datetime.now(UTC))
    return job
