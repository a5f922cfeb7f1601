"""Scheduled exports: windows aligned to the cron, idempotent runs, catch-up (docs/exports.md).

A schedule has a cron expression and a time zone, a window kind (``hour``, ``day`` or
``week``), filters, columns, a format and a prefix. Each cron time F stands for one
window: the last whole period of that kind ending at or before F, on the schedule's
wall clock (an hour ending at F's hour; a day ending at F's midnight; a week ending
at F's Monday 00:00). With ``0 * * * *`` and ``hour``, the run at 10:00 exports
[09:00, 10:00).

A window's files go to ``schedules/<organisation>/<prefix>/dt=YYYY-MM-DD/hour=HH/``
(the window's start, UTC): ``part-00000.parquet``… and ``manifest.json``, written last.
A run of a window first removes the old manifest, writes its parts under the same
names (replacing them), removes any other file of the directory (parts of an earlier
run that had more), then writes the manifest. So however often a window runs (a
retry, a backfill, two triggers), its directory ends with exactly one copy of each
row; a directory with a manifest is complete.

ClickHouse is the source of truth. ``export_schedules`` holds the schedules;
``export_schedule_runs`` one row per (schedule, window) with its latest outcome. The
cursor of a schedule is the latest cron time it took up (or its ``start_at``): every
cron time after it and up to now is due, oldest first, so windows missed while the
process was down are caught up in order at the next start. At most
``TOLLGATE_EXPORT_CATCHUP_MAX_WINDOWS`` are caught up at once; older missed windows
are recorded as one ``skipped`` run that says which (backfill them on purpose).
Failed windows are retried at the next tick, up to ``TOLLGATE_EXPORT_RUN_MAX_ATTEMPTS``.
Backfills (``POST …/backfill``) are ``pending`` runs the scheduler picks up (cause
``rerun`` for a window the schedule already ran, ``backfill`` for one it has not: only
the former counts for the cursor, so a backfill ahead of the cursor never makes the
scheduler skip the windows before it).

:class:`ScheduleService` runs in the process that owns the scheduler (``tollgate
up``): it rebuilds the APScheduler jobs from ClickHouse at start and every
``TOLLGATE_EXPORT_SCHEDULE_SYNC_SECONDS``. Runs of one schedule never overlap in that
process (a lock per schedule).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from apscheduler.triggers.cron import CronTrigger

from analytics_api.params import TIME_RANGE_MESSAGE, in_warehouse_range
from exports.destinations import Destination, destination
from exports.jobs import invalid, iso, parse_filters, record_export, stored_filters
from exports.writers import MANIFEST, PartWriter, manifest, write_manifest
from tollgate.settings import Settings
from warehouse.client import ClientPool
from warehouse.queries import exports as q
from warehouse.queries.scope import TenantScope

log = logging.getLogger(__name__)

WINDOWS = ("hour", "day", "week")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
JOB_PREFIX = "export-schedule:"
SYNC_JOB = "export-schedules-sync"


# --------------------------------------------------------------------------- validation


def parse_timezone(raw: Any) -> ZoneInfo:
    if not isinstance(raw, str) or not raw:
        raise invalid("timezone", "must be an IANA time zone name, e.g. UTC or Europe/Berlin")
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise invalid("timezone", f"{raw!r} is not an IANA time zone name") from None


def parse_cron(raw: Any, tz: ZoneInfo) -> CronTrigger:
    if not isinstance(raw, str) or len(raw.split()) != 5:
        raise invalid("cron", "must be a 5-field cron expression (minute hour day month day-of-week), e.g. '0 * * * *'")
    try:
        return CronTrigger.from_crontab(raw, timezone=tz)
    except ValueError as exc:
        raise invalid("cron", f"{raw!r}: {exc}") from None


def parse_window(raw: Any) -> str:
    if raw not in WINDOWS:
        raise invalid("window", f"must be one of {', '.join(WINDOWS)}")
    return raw


def parse_prefix(raw: Any) -> str:
    if not isinstance(raw, str) or len(raw) > 512 or not PREFIX_RE.match(raw) or any(
            part in (".", "..") for part in raw.split("/")):
        raise invalid("prefix", "must be a relative path of letters, digits, '_', '.' and '-' segments joined by '/'")
    return raw


def parse_time(name: str, raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise invalid(name, "must be an ISO 8601 date-time with a UTC offset")
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid(name, "not an ISO 8601 date-time") from None
    if value.tzinfo is None:
        raise invalid(name, "needs a UTC offset (…Z or …+05:30)")
    if not in_warehouse_range(value):
        raise invalid(name, TIME_RANGE_MESSAGE)
    return value.astimezone(UTC)


# --------------------------------------------------------------------------- windows


def window_of(fire: datetime, kind: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the window a cron time ``fire`` stands for."""
    local = fire.astimezone(tz)
    if kind == "hour":
        end = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        return end - timedelta(hours=1), end
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if kind == "week":
        day -= timedelta(days=day.weekday())
        start = day - timedelta(days=7)
    else:
        start = day - timedelta(days=1)
    # wall-clock midnights of the zone (a DST day is 23 or 25 hours long)
    return start.replace(tzinfo=tz).astimezone(UTC), day.replace(tzinfo=tz).astimezone(UTC)


def fire_times(trigger: CronTrigger, after: datetime, until: datetime, limit: int) -> tuple[list[datetime], int]:
    """Cron times in (after, until], oldest first: the newest ``limit`` of them, and how many were left out."""
    found: list[datetime] = []
    skipped = 0
    cursor = after
    while True:
        nxt = trigger.get_next_fire_time(None, cursor + timedelta(microseconds=1))
        if nxt is None or nxt > until:
            break
        nxt = nxt.astimezone(UTC)
        found.append(nxt)
        if len(found) > limit:
            found.pop(0)
            skipped += 1
        cursor = nxt
    return found, skipped


def window_directory(schedule: q.ScheduleRow, start: datetime) -> str:
    return f"{schedule_root(schedule)}/dt={start:%Y-%m-%d}/hour={start:%H}"


def schedule_root(schedule: q.ScheduleRow) -> str:
    """``schedules/<organisation>/<prefix>``. The organisation id is percent-encoded (letters, digits,
    `_.-~` kept): one path segment per organisation, and two organisations never share one (mapping
    characters to `_` made `acme corp` and `acme_corp` one directory). `.` and `..` become `%2E` and
    `%2E%2E`, which no other id encodes to."""
    org = quote(schedule.organisation_id, safe="")
    org = {"": "%", ".": "%2E", "..": "%2E%2E"}.get(org, org)
    return f"schedules/{org}/{schedule.prefix}"


# --------------------------------------------------------------------------- one window


def export_window(client, dest: Destination, schedule: q.ScheduleRow, start: datetime, end: datetime,
                  settings: Settings) -> tuple[int, list[dict]]:
    """Write the window's files, replacing whatever a previous run left; (rows, files incl. the manifest)."""
    directory = window_directory(schedule, start)
    scope = TenantScope(schedule.organisation_id, schedule.workspace_slug)
    parsed = parse_filters(stored_filters(schedule.filters), scope, windowless=True)
    selection = replace(parsed.selection,
                        filters=replace(parsed.selection.filters, start=start, end=end - timedelta(milliseconds=1)))
    dest.delete([f"{directory}/{MANIFEST}"])  # the window is incomplete from now until its new manifest
    writer = PartWriter(dest, directory, schedule.format, settings.export_part_rows, settings.export_row_group_rows)
    try:
        for table in q.Stream(client, selection, list(schedule.requested_data), schedule.format):
            writer.write(table)
        files = writer.finish()
    except BaseException:
        writer.abort()
        dest.delete_prefix(directory)
        raise
    keep = {f"{directory}/{f.name}" for f in files} | {f"{directory}/{MANIFEST}"}
    dest.delete([p for p in dest.list(directory) if p not in keep])  # parts of an earlier, longer run
    body = manifest(fmt=schedule.format, columns=list(schedule.requested_data), files=files, schema=writer.schema,
                    filters=stored_filters(schedule.filters),
                    extra={"schedule_id": schedule.id, "organisation_id": schedule.organisation_id,
                           "workspace_slug": schedule.workspace_slug, "window_start": iso(start),
                           "window_end": iso(end), "destination": dest.location(directory)})
    listed = [f.as_dict() for f in files] + [write_manifest(dest, directory, body).as_dict()]
    return sum(f.rows for f in files), listed


def _version() -> int:
    return time.time_ns()


# --------------------------------------------------------------------------- the service


class ScheduleService:
    """Runs the schedules: APScheduler jobs rebuilt from ClickHouse, due windows in order."""

    def __init__(self, settings: Settings, pool: ClientPool | None = None):
        self.settings = settings
        self.pool = pool or ClientPool(settings.warehouse_dsn, size=2)
        self.scheduler = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._known: dict[str, int] = {}  # schedule id → version behind its APScheduler job
        # windows exported at once (each holds a few slices in memory), whatever the number of schedules
        self._slots = threading.BoundedSemaphore(settings.export_workers)

    # ------------------------------------------------------------------ APScheduler

    def install(self, scheduler) -> None:
        """Recover, then register the sync job (which adds one cron job per active schedule and
        runs each once right away: the catch-up)."""
        self.scheduler = scheduler
        with self.pool.borrow() as client:
            self.recover(client)
        self.sync()
        scheduler.add_job(self.sync, "interval", seconds=self.settings.export_schedule_sync_seconds, id=SYNC_JOB,
                          replace_existing=True, max_instances=1, coalesce=True)

    def sync(self) -> None:
        """Make the scheduler's jobs match the active schedules in ClickHouse."""
        try:
            with self.pool.borrow() as client:
                _, schedules = q.list_schedules(client, None)
        except Exception:
            log.exception("export schedules: could not read the schedules")
            return
        active = {s.id: s for s in schedules if s.status == "active"}
        for sid in list(self._known):
            if sid not in active:
                self._remove(sid)
        for sid, s in active.items():
            if self._known.get(sid) == s.version:
                continue
            trigger = CronTrigger.from_crontab(s.cron, timezone=ZoneInfo(s.timezone))
            self.scheduler.add_job(self.tick, trigger, args=[sid], id=JOB_PREFIX + sid, replace_existing=True,
                                   max_instances=1, coalesce=True, misfire_grace_time=None,
                                   next_run_time=datetime.now(UTC))  # runs now once: catch-up, then by cron
            self._known[sid] = s.version

    def _remove(self, sid: str) -> None:
        self._known.pop(sid, None)
        try:
            self.scheduler.remove_job(JOB_PREFIX + sid)
        except Exception:
            pass

    def tick(self, schedule_id: str) -> None:
        try:
            self.run_due(schedule_id)
        except Exception:
            log.exception("export schedule %s: the run failed", schedule_id)

    # ------------------------------------------------------------------ runs

    def recover(self, client) -> int:
        """Runs left 'running' by a process that died are failed (they are retried)."""
        stale = q.runs_in_status(client, "running")
        for run in stale:
            q.write_run(client, replace(run, status="failed", error="interrupted: the process running it stopped",
                                        finished_at=datetime.now(UTC), version=_version()))
        return len(stale)

    def _lock(self, schedule_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(schedule_id, threading.Lock())

    def run_due(self, schedule_id: str, now: datetime | None = None) -> list[q.RunRow]:
        """Run everything due for the schedule at ``now``, oldest window first: backfills asked for,
        failed windows to retry, then the cron times since the cursor. Returns the runs made."""
        now = now or datetime.now(UTC)
        with self._lock(schedule_id):
            with self.pool.borrow() as client:
                todo = self._due(client, schedule_id, now)
            if todo is None:
                return []
            schedule, todo = todo
            made = []
            for start in sorted(todo):
                fire, cause, attempts = todo[start]
                made.append(self._run_window(schedule, fire, cause, attempts + 1))
            return made

    def _due(self, client, schedule_id: str, now: datetime):
        """(schedule, {window start: (cron time, cause, attempts so far)}) of what is due, or None."""
        schedule = q.get_schedule(client, None, schedule_id)
        if schedule is None or schedule.status != "active":
            return None
        tz = ZoneInfo(schedule.timezone)
        trigger = CronTrigger.from_crontab(schedule.cron, timezone=tz)
        _, existing = q.list_runs(client, schedule.organisation_id, schedule.id, newest_first=False)
        todo: dict[datetime, tuple[datetime, str, int]] = {}  # window start → (fire, cause, attempts so far)
        for run in existing:
            if run.status == "pending":
                todo[run.window_start] = (run.fire_time, run.cause, run.attempts - 1)
            elif run.status == "failed" and run.attempts < self.settings.export_run_max_attempts:
                todo[run.window_start] = (run.fire_time, "retry", run.attempts)
        cursor = q.last_fire_time(client, schedule.organisation_id, schedule.id)
        cursor = max(cursor, schedule.start_at) if cursor else schedule.start_at
        fires, skipped = fire_times(trigger, cursor, now, self.settings.export_catchup_max_windows)
        if skipped:
            first = trigger.get_next_fire_time(None, cursor + timedelta(microseconds=1)).astimezone(UTC)
            w_start, w_end = window_of(first, schedule.window_kind, tz)
            last_start, _ = window_of(fires[0], schedule.window_kind, tz)
            q.write_run(client, q.RunRow(
                schedule.id, schedule.organisation_id, w_start, w_end, first, "skipped", "catch-up", 0, 0, "[]",
                f"{skipped} missed windows, from {iso(w_start)} up to {iso(last_start)}, were not exported: more "
                f"than TOLLGATE_EXPORT_CATCHUP_MAX_WINDOWS ({self.settings.export_catchup_max_windows}) were due; "
                "backfill them with POST /v1/logs/exports/schedules/{id}/backfill",
                datetime.now(UTC), datetime.now(UTC), _version()))
        for i, fire in enumerate(fires):
            start, _ = window_of(fire, schedule.window_kind, tz)
            if start not in todo:
                cause = "schedule" if i == len(fires) - 1 and now - fire < timedelta(minutes=5) else "catch-up"
                todo[start] = (fire, cause, 0)
        return schedule, todo

    def _run_window(self, schedule: q.ScheduleRow, fire: datetime, cause: str, attempts: int) -> q.RunRow:
        with self._slots:
            return self._run_window_now(schedule, fire, cause, attempts)

    def _write_run(self, row: q.RunRow) -> q.RunRow:
        with self.pool.borrow() as client:
            return q.write_run(client, row)

    def _run_window_now(self, schedule: q.ScheduleRow, fire: datetime, cause: str, attempts: int) -> q.RunRow:
        started = time.monotonic()
        start, end = window_of(fire, schedule.window_kind, ZoneInfo(schedule.timezone))
        run = self._write_run(q.RunRow(schedule.id, schedule.organisation_id, start, end, fire, "running", cause,
                                           attempts, 0, "[]", "", datetime.now(UTC), None, _version()))
        data = None
        try:
            data = q.data_client(self.settings.warehouse_dsn)
            dest = destination(self.settings, schedule.destination)
            rows, files = export_window(data, dest, schedule, start, end, self.settings)
            done = replace(run, status="success", row_count=rows, files=orjson.dumps(files).decode(),
                           finished_at=datetime.now(UTC), version=_version())
        except Exception as exc:
            log.exception("export schedule %s: window %s failed", schedule.id, iso(start))
            done = replace(run, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                           finished_at=datetime.now(UTC), version=_version())
        finally:
            if data is not None:
                data.close()
        record_export("scheduled", done.status, time.monotonic() - started, done.row_count)
        return self._write_run(done)

    def request_backfill(self, client, schedule: q.ScheduleRow, start: datetime, end: datetime,
                         now: datetime | None = None) -> list[q.RunRow]:
        return request_backfill(client, schedule, start, end, self.settings, now)


def request_backfill(client, schedule: q.ScheduleRow, start: datetime, end: datetime, settings: Settings,
                     now: datetime | None = None) -> list[q.RunRow]:
    """Pending runs for every window of the schedule inside [start, end] whose cron time has passed."""
    now = now or datetime.now(UTC)
    tz = ZoneInfo(schedule.timezone)
    trigger = CronTrigger.from_crontab(schedule.cron, timezone=tz)
    # a window ends at most one week after it starts, and its cron time is at or after its end
    fires, skipped = fire_times(trigger, start - timedelta(microseconds=1), min(end + timedelta(days=8), now),
                                settings.export_catchup_max_windows * 8)
    windows: dict[datetime, tuple[datetime, datetime]] = {}
    for fire in fires:
        w_start, w_end = window_of(fire, schedule.window_kind, tz)
        if w_start >= start and w_end <= end:
            windows.setdefault(w_start, (w_end, fire))
    if skipped or len(windows) > settings.export_catchup_max_windows:
        raise invalid("end", f"more than {settings.export_catchup_max_windows} windows "
                             "(TOLLGATE_EXPORT_CATCHUP_MAX_WINDOWS); ask for a shorter range")
    _, existing = q.list_runs(client, schedule.organisation_id, schedule.id)
    before = {r.window_start: r for r in existing}
    rows = []
    for w_start in sorted(windows):
        w_end, fire = windows[w_start]
        prior = before.get(w_start)
        # 'rerun': a window the schedule already took up (it still counts for the cursor);
        # 'backfill': one it has not (it does not move the cursor past windows still due)
        cause = "rerun" if prior is not None and prior.cause not in ("backfill",) else "backfill"
        rows.append(q.write_run(client, q.RunRow(
            schedule.id, schedule.organisation_id, w_start, w_end, fire, "pending", cause,
            (prior.attempts if prior else 0) + 1, 0, "[]", "", datetime.now(UTC), None, _version())))
    return rows


def new_schedule(**fields) -> q.ScheduleRow:
    now = datetime.now(UTC)
    return q.ScheduleRow(id=str(uuid.uuid4()), created_at=now, updated_at=now, version=_version(), **fields)


def run_item(run: q.RunRow) -> dict:
    return {
        "object": "export-schedule-run",
        "schedule_id": run.schedule_id,
        "window_start": iso(run.window_start),
        "window_end": iso(run.window_end),
        "fire_time": iso(run.fire_time),
        "status": run.status,
        "cause": run.cause,
        "attempts": run.attempts,
        "rows": run.row_count,
        "files": orjson.loads(run.files),
        "error": run.error or None,
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
    }


def schedule_item(s: q.ScheduleRow) -> dict:
    return {
        "object": "export-schedule",
        "id": s.id,
        "organisation_id": s.organisation_id,
        "workspace_id": s.workspace_slug,
        "description": s.description,
        "cron": s.cron,
        "timezone": s.timezone,
        "window": s.window_kind,
        "filters": stored_filters(s.filters),
        "requested_data": list(s.requested_data),
        "format": s.format,
        "destination": s.destination,
        "prefix": s.prefix,
        "location": schedule_root(s),
        "status": s.status,
        "start_at": iso(s.start_at),
        "created_by": s.created_by,
        "created_at": iso(s.created_at),
        "last_updated_at": iso(s.updated_at),
    }
