"""On-demand export jobs: filters, the lifecycle, the runner, progress and cancel.

Lifecycle (docs/exports.md): ``draft`` → (start) ``in_progress`` → ``success`` or
``failed``; ``cancel`` makes a draft or a running export ``stopped``. Every change is
a new version of the ``export_jobs`` row; versions rank the states
(:func:`warehouse.queries.exports.job_version`), so a late write never moves an
export back, and among final states the first one recorded wins.

The runner works outside the request, on a thread pool of ``TOLLGATE_EXPORT_WORKERS``
threads in the API process. One export: count the rows, then read the selection
slice by slice (a prefetch thread queries the next slice while the current one is
written: one slice in the queue, one being written), write the parts and the
manifest through the destination, record progress (rows written out of total) at
most once a second, and finish. Cancel sets the job's event (and the ``stopped``
version, which a runner in another process sees at its next slice); the runner then
aborts the open part and deletes the parts it finished, and the cancel request waits
for that (up to 30 s) when the runner is in its own process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from fastapi.exceptions import RequestValidationError

from analytics_api import params as analytics_params
from exports.destinations import destination
from exports.writers import MANIFEST, PartWriter, manifest, write_manifest
from tollgate import monitoring
from tollgate.settings import Settings
from warehouse.client import ClientPool
from warehouse.queries import exports as q
from warehouse.queries.scope import TenantScope

log = logging.getLogger(__name__)

PAGE_SIZE_MAX = 50_000  # the spec's maximum of `page_size`
MAX_ROW_OFFSET = 2**63 - 1  # the last row a page may reach (offsets are bound as UInt64)
PROGRESS_SECONDS = 1.0
CANCEL_WAIT_SECONDS = 30.0

# The spec's GenerationsFilterSchema, plus the analytics filters it lacks (same meaning).
NUMBER_FILTERS = ("total_units_min", "total_units_max", "cost_min", "cost_max", "prompt_token_min", "prompt_token_max",
                  "completion_token_min", "completion_token_max", "weighted_feedback_min", "weighted_feedback_max")
LIST_FILTERS = ("status_code", "ai_org_model", "virtual_keys", "trace_id", "configs", "prompt_slug", "api_key_ids",
                "span_id", "cache_status", "ai_model")
TIME_FILTERS = ("time_of_generation_min", "time_of_generation_max")
PAGE_FILTERS = ("page_size", "current_page")
FILTER_FIELDS = frozenset((*TIME_FILTERS, *NUMBER_FILTERS, *LIST_FILTERS, *PAGE_FILTERS, "metadata", "workspace_slug"))


def invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *field.split(".")), "msg": f"{field}: {message}"}])


class _Params:
    """The JSON filters as the query parameters analytics parses (one parser, one meaning)."""

    def __init__(self, values: dict[str, str]):
        self.query_params = values


def _text(name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict,)):
        raise invalid(f"filters.{name}", "must be a string or a number")
    if isinstance(value, int):  # str(): orjson refuses integers beyond 64 bits, which analytics take as given
        return str(value)
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _list_text(name: str, value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_text(name, v) for v in value)
    return _text(name, value)


@dataclass(frozen=True)
class ParsedFilters:
    selection: q.Selection
    normalized: dict[str, Any]  # what the job stores and shows

    def text(self) -> str:
        """``normalized`` as the JSON text a job or schedule stores (msgspec: integers beyond 64 bits too)."""
        return msgspec.json.encode(self.normalized).decode()


def stored_filters(text: str) -> dict[str, Any]:
    """The filters a job or schedule stored (:meth:`ParsedFilters.text`), read back as they were given:
    msgspec keeps an integer beyond 64 bits an integer, where orjson would make it a float."""
    return msgspec.json.decode(text)


def parse_filters(raw: Any, scope: TenantScope, *, windowless: bool = False) -> ParsedFilters:
    """``filters`` of a request body → the analytics Filters (their validation, their 422s, named
    ``filters.<field>``). ``windowless``: a schedule's filters, whose time bounds each run sets."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid("filters", "must be an object (the spec's GenerationsFilterSchema)")
    unknown = sorted(set(raw) - FILTER_FIELDS)
    if unknown:
        raise invalid(f"filters.{unknown[0]}", f"unknown filter; the filters are {', '.join(sorted(FILTER_FIELDS))}")
    if windowless:
        for name in (*TIME_FILTERS, *PAGE_FILTERS):
            if raw.get(name) is not None:
                raise invalid(f"filters.{name}", "not for a schedule: each run exports its own window, whole")
    values: dict[str, str] = {}
    for name, value in raw.items():
        if value is None or name in PAGE_FILTERS:
            continue
        if name == "metadata":
            if isinstance(value, str):
                values[name] = value
            elif isinstance(value, dict):
                values[name] = msgspec.json.encode(value).decode()  # integers beyond 64 bits too
            else:
                raise invalid("filters.metadata", "must be an object of key/value pairs")
        elif name in LIST_FILTERS:
            values[name] = _list_text(name, value)
        else:
            values[name] = _text(name, value)
    if windowless:
        values.setdefault("time_of_generation_min", "2000-01-01T00:00:00Z")
        values.setdefault("time_of_generation_max", "2000-01-01T00:00:00Z")
    try:
        filters = analytics_params.parse_filters(_Params(values))  # type: ignore[arg-type]
    except RequestValidationError as exc:
        errors = []
        for e in exc.errors():
            name = str(e["loc"][-1])
            errors.append({**e, "loc": ("body", "filters", name), "msg": f"filters.{e['msg']}"})
        raise RequestValidationError(errors) from None
    ai_models = tuple(dict.fromkeys(x.strip() for x in values.get("ai_model", "").split(",") if x.strip()))

    page = None
    if raw.get("page_size") is not None or raw.get("current_page") is not None:
        size = raw.get("page_size", PAGE_SIZE_MAX)
        current = raw.get("current_page", 0)
        for name, value, low, high in (("page_size", size, 1, PAGE_SIZE_MAX), ("current_page", current, 0, None)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (isinstance(value, float) and not value.is_integer())):  # NaN and ±Infinity too
                raise invalid(f"filters.{name}", "must be an integer")
            if value < low or (high is not None and value > high):
                raise invalid(f"filters.{name}", f"must be between {low} and {high}" if high else f"must be ≥ {low}")
        if (int(current) + 1) * int(size) > MAX_ROW_OFFSET:  # ClickHouse's UInt64 OFFSET would wrap to another page
            raise invalid("filters.current_page", f"the page ends past row {MAX_ROW_OFFSET} (current_page × page_size "
                                                  "+ page_size); no selection has that many rows")
        page = q.Page(offset=int(current) * int(size), limit=int(size))
    normalized = {k: v for k, v in raw.items() if v is not None}
    if page is not None:
        normalized["page_size"], normalized["current_page"] = page.limit, page.offset // page.limit
    return ParsedFilters(q.Selection(filters, scope, ai_models, page), normalized)


def parse_columns(raw: Any, field: str = "requested_data") -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise invalid(field, f"must be a non-empty list of columns from {', '.join(q.REQUESTED_DATA)}")
    for item in raw:
        if not isinstance(item, str) or item not in q.COLUMNS:
            raise invalid(field, f"{item!r} is not an exportable column; the columns are {', '.join(q.REQUESTED_DATA)}")
    return list(dict.fromkeys(raw))


def parse_format(raw: Any, default: str) -> str:
    if raw is None:
        return default
    if raw not in q.FORMATS:
        raise invalid("format", f"must be one of {', '.join(q.FORMATS)}")
    return raw


def resolve_workspace(principal, requested: list[tuple[str, Any]], default_workspace: str) -> str:
    """The analytics rule: a workspace key exports its workspace; an organisation key the one it
    names (``workspace_id`` or ``filters.workspace_slug``, which must agree), else the default."""
    if principal.workspace_slug is not None:
        return principal.workspace_slug
    named = {(f, v) for f, v in requested if v not in (None, "")}
    for field, value in named:
        if not isinstance(value, str) or len(value) > 256:
            raise invalid(field, "must be a workspace slug (a string of at most 256 characters)")
    values = {v for _, v in named}
    if len(values) > 1:
        raise invalid("workspace_id", "differs from filters.workspace_slug; name one workspace")
    return values.pop() if values else default_workspace


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def job_selection(job: q.JobRow) -> q.Selection:
    return parse_filters(stored_filters(job.filters), TenantScope(job.organisation_id, job.workspace_slug)).selection


def job_directory(job_id: str) -> str:
    return f"exports/{job_id}"


def new_job(*, organisation_id: str, workspace_slug: str, created_by: str, description: str, filters: str,
            requested_data: list[str], fmt: str, dest: str, total: int) -> q.JobRow:
    now = datetime.now(UTC)
    return q.JobRow(str(uuid.uuid4()), organisation_id, workspace_slug, created_by, description,
                    filters, tuple(requested_data), fmt, dest, "draft", total, 0, "[]", "",
                    now, now, None, None, q.job_version("draft"))


def next_version(job: q.JobRow, status: str, **changes) -> q.JobRow:
    return replace(job, status=status, updated_at=datetime.now(UTC), version=q.job_version(status), **changes)


class Cancelled(Exception):
    pass


class ExportRunner:
    """Runs started exports on a thread pool; one per API process (``app.state.exports``)."""

    def __init__(self, settings: Settings, pool: ClientPool):
        self.settings = settings
        self.pool = pool
        self.executor = ThreadPoolExecutor(max_workers=settings.export_workers, thread_name_prefix="export")
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._done: dict[str, threading.Event] = {}
        self._closing = threading.Event()

    # ------------------------------------------------------------------ control

    def submit(self, job_id: str) -> bool:
        """Queue a run of a started export; False when this process runs (or queued) it already."""
        with self._lock:
            if job_id in self._cancel:
                return False
            self._cancel[job_id] = threading.Event()
            self._done[job_id] = threading.Event()
        self.executor.submit(self._run_safely, job_id)
        return True

    def cancel(self, job_id: str, wait: float = CANCEL_WAIT_SECONDS) -> bool:
        """Signal a running export of this process; True once its files are removed (or it was not here)."""
        with self._lock:
            event, done = self._cancel.get(job_id), self._done.get(job_id)
        if event is None:
            return True
        event.set()
        return done.wait(wait)

    def close(self) -> None:
        """Stop: running exports end as failed ("interrupted") and leave no files; so do the queued ones,
        which never ran (their futures are cancelled)."""
        self._closing.set()
        with self._lock:
            for event in self._cancel.values():
                event.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # what is left was submitted and never ran (a run removes its own entries)
            queued, self._cancel, self._done = list(self._cancel), {}, {}
        for job_id in queued:
            job = self._control(q.get_job_by_id, job_id)
            if job is not None and job.status == "in_progress":
                self._write(next_version(job, "failed", error="interrupted: the API process stopped before it ran",
                                         finished_at=datetime.now(UTC)))

    # ------------------------------------------------------------------ the run

    def _control(self, fn, *args):
        with self.pool.borrow() as client:
            return fn(client, *args)

    def _run_safely(self, job_id: str) -> None:
        started = time.monotonic()
        try:
            self.run(job_id)
            job = self._control(q.get_job_by_id, job_id)
            if job is not None and job.finished_at is not None:
                record_export("on_demand", job.status, time.monotonic() - started, job.rows_written)
        except Exception:
            log.exception("export %s: the runner failed", job_id)
        finally:
            with self._lock:
                self._cancel.pop(job_id, None)
                done = self._done.pop(job_id, None)
            if done is not None:
                done.set()

    def run(self, job_id: str) -> None:
        job = self._control(q.get_job_by_id, job_id)
        if job is None or job.status != "in_progress":
            return
        cancel = self._cancel.get(job_id) or threading.Event()
        directory = job_directory(job.id)
        try:  # a destination that cannot be set up, or no warehouse: the export fails, saying why
            dest = destination(self.settings, job.destination)
            data = q.data_client(self.settings.warehouse_dsn)
        except Exception as exc:
            log.exception("export %s could not start", job.id)
            self._write(next_version(job, "failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                                     finished_at=datetime.now(UTC)))
            return
        writer = PartWriter(dest, directory, job.format, self.settings.export_part_rows, self.settings.export_row_group_rows)
        try:
            selection = job_selection(job)
            stream = q.Stream(data, selection, list(job.requested_data), job.format)
            last_progress = last_check = time.monotonic()
            for table in prefetch(stream, cancel):
                self._check(job, cancel)
                writer.write(table)
                now = time.monotonic()
                if now - last_check >= 2 * PROGRESS_SECONDS:  # a cancel recorded by another API process
                    last_check = now
                    current = self._control(q.get_job_by_id, job.id)
                    if current is None or current.status != "in_progress":
                        raise Cancelled
                if now - last_progress >= PROGRESS_SECONDS:
                    last_progress = now
                    job = self._write(next_version(job, "in_progress", rows_written=writer.rows))
            self._check(job, cancel)
            files = writer.finish()
            body = manifest(fmt=job.format, columns=list(job.requested_data), files=files, schema=writer.schema,
                            filters=stored_filters(job.filters),
                            extra={"export_id": job.id, "organisation_id": job.organisation_id,
                                   "workspace_slug": job.workspace_slug, "destination": dest.location(directory)})
            listed = [f.as_dict() for f in files] + [write_manifest(dest, directory, body).as_dict()]
            self._write(next_version(job, "success", rows_written=writer.rows, total=writer.rows,
                                     files=orjson.dumps(listed).decode(), finished_at=datetime.now(UTC)))
            final = self._control(q.get_job_by_id, job.id)
            if final is None or final.status != "success":  # a cancel was recorded first: it wins
                dest.delete([f"{directory}/{f['name']}" for f in listed])
        except Cancelled:
            writer.abort()
            dest.delete_prefix(directory)
            if self._closing.is_set():
                self._write(next_version(job, "failed", error="interrupted: the API process stopped",
                                         finished_at=datetime.now(UTC)))
        except Exception as exc:
            log.exception("export %s failed", job.id)
            writer.abort()
            try:
                dest.delete_prefix(directory)
            finally:
                self._write(next_version(job, "failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                                         finished_at=datetime.now(UTC)))
        finally:
            data.close()

    def _check(self, job: q.JobRow, cancel: threading.Event) -> None:
        if cancel.is_set():
            raise Cancelled

    def _write(self, row: q.JobRow) -> q.JobRow:
        return self._control(q.write_job, row)


def record_export(kind: str, status: str, seconds: float, rows: int) -> None:
    monitoring.EXPORT_SECONDS.labels(kind, status).observe(seconds)
    if status == "success":
        monitoring.EXPORT_ROWS.labels(kind).inc(rows)


def prefetch(stream: q.Stream, cancel: threading.Event):
    """The stream's tables, read one slice ahead on another thread (ClickHouse works while the writer
    compresses); at most one slice waits in the queue."""
    slots: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    END = object()

    def produce() -> None:
        try:
            for table in stream:
                while not stop.is_set():
                    try:
                        slots.put(table, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or cancel.is_set():
                    return
            slots.put(END)
        except BaseException as exc:  # handed to the consumer
            slots.put(exc)

    thread = threading.Thread(target=produce, name="export-read", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = slots.get(timeout=0.2)
            except queue.Empty:
                if cancel.is_set():
                    raise Cancelled from None
                continue
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.1)


def recover_interrupted(client, settings: Settings) -> int:
    """At start of the process that runs exports: exports left in_progress by a process that died are
    failed (their files removed). Only for a process that owns every runner (``tollgate up``)."""
    count = 0
    for job in q.jobs_in_status(client, "in_progress"):
        try:
            destination(settings, job.destination).delete_prefix(job_directory(job.id))
        except Exception:
            log.exception("export %s: could not remove its partial files", job.id)
        q.write_job(client, next_version(job, "failed", error="interrupted: the process running it stopped",
                                         finished_at=datetime.now(UTC)))
        count += 1
    return count


def item(job: q.JobRow) -> dict[str, Any]:
    """The spec's ExportItem, plus Tollgate's fields (format, progress, files, error)."""
    files = orjson.loads(job.files)
    return {
        "id": job.id,
        "organisation_id": job.organisation_id,
        "filters": stored_filters(job.filters),
        "requested_data": list(job.requested_data),
        "status": job.status,
        "description": job.description,
        "created_at": iso(job.created_at),
        "last_updated_at": iso(job.updated_at),
        "created_by": job.created_by,
        "workspace_id": job.workspace_slug,
        "object": "export",
        "format": job.format,
        "destination": job.destination,
        "total": job.total,
        "total_records": job.total,  # the portkey-ai SDK's LogsExportRetrieveResponse field: the rows it holds
        "rows_written": job.rows_written,
        "progress": round(job.rows_written / job.total, 4) if job.total else (1.0 if job.status == "success" else 0.0),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": job.error or None,
        "files": [f for f in files if f["name"] != MANIFEST],
    }
