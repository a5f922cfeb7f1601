"""Every ClickHouse query of log exports (docs/exports.md).

Data: the selected generations are read with ``FINAL`` (a redelivered event is one
row, as in analytics) in ``(created_at, id)`` order, slice by slice. A slice is a
time range holding about a fixed number of bytes of the requested columns, found
from a histogram of the selection; each slice is one query streamed with
``query_arrow_stream``. So the exporting process holds one slice at a time, however
large the export (the embedded engine materializes a query's result before handing
it over, which is why slices exist at all; a ClickHouse server streams each slice
too). Slices partition the time range, and duplicates of a row share its
``created_at``, so no row is ever read twice.

Every value is a bound ``{name:Type}`` parameter. The filters come from
:func:`warehouse.filters.compile_where` (the analytics filters, exactly); the
selected columns come from the allow-list :data:`COLUMNS`.

Control plane: ``export_jobs``, ``export_schedules`` and ``export_schedule_runs``
(migrations 0009, 0010), versioned rows read with ``FINAL``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from warehouse.client import utc_aware, utc_naive
from warehouse.filters import Filters, Where, compile_where
from warehouse.queries.final import FINAL_READ
from warehouse.queries.scope import TenantScope

# --------------------------------------------------------------------------- columns

# The spec's LogExportsRequestedData, in its order.
REQUESTED_DATA: tuple[str, ...] = (
    "id", "trace_id", "created_at", "request", "response", "is_success", "ai_org", "ai_model", "req_units",
    "res_units", "total_units", "request_url", "cost", "cost_currency", "response_time", "response_status_code",
    "mode", "config", "prompt_slug", "metadata",
)
FORMATS: tuple[str, ...] = ("jsonl", "parquet", "csv")

_ISO = "concat(replaceOne(toString(created_at), ' ', 'T'), 'Z')"
_METADATA_MAP = "mapFromArrays(CAST(metadata.key, 'Array(String)'), metadata.value)"
# LogObject.request / .response (docs/api.md, GET /v1/logs/{id}) as JSON text. The
# stored headers and bodies are JSON text already (ingest wrote them), so they are
# spliced in as they are; absent ones are left out, as GET /v1/logs does.
_REQUEST_JSON = (
    "concat('{\"url\":', toJSONString(request_url), ',\"method\":', toJSONString(request_method), "
    "if(request_headers = '', '', concat(',\"headers\":', request_headers)), "
    "if(request_body = '', '', concat(',\"body\":', request_body)), "
    "',\"portkeyHeaders\":', if(request_portkey_headers = '', '{}', request_portkey_headers), '}')"
)
_RESPONSE_JSON = (
    "concat('{\"status\":', toString(response_status_code), "
    "if(response_headers = '', '', concat(',\"headers\":', response_headers)), "
    "if(response_body = '', '', concat(',\"body\":', response_body)), "
    "',\"responseTime\":', toString(response_time), "
    "',\"lastUsedOptionJsonPath\":', toJSONString(response_last_used_option_json_path), '}')"
)


@dataclass(frozen=True)
class Column:
    typed: str  # Parquet: the real type (timestamps, integers, floats, a map)
    text: str  # CSV: scalars as they are, nested values as JSON text
    json: str  # JSONL: the value's JSON text
    width: int  # rough Arrow bytes per row, to size the first slice


def _scalar(name: str, width: int, json: str | None = None) -> Column:
    return Column(name, name, json or f"toJSONString({name})", width)


COLUMNS: dict[str, Column] = {
    "id": _scalar("id", 44),
    "trace_id": _scalar("trace_id", 36),
    "created_at": Column("created_at", _ISO, f"concat('\"', {_ISO}, '\"')", 8),
    "request": Column(_REQUEST_JSON, _REQUEST_JSON, _REQUEST_JSON, 400),
    "response": Column(_RESPONSE_JSON, _RESPONSE_JSON, _RESPONSE_JSON, 600),
    "is_success": _scalar("is_success", 1, "if(is_success, 'true', 'false')"),
    "ai_org": _scalar("ai_org", 12),
    "ai_model": _scalar("ai_model", 24),
    "req_units": _scalar("req_units", 4, "toString(req_units)"),
    "res_units": _scalar("res_units", 4, "toString(res_units)"),
    "total_units": _scalar("total_units", 4, "toString(total_units)"),
    "request_url": _scalar("request_url", 50),
    "cost": _scalar("cost", 9, "if(isNull(cost), 'null', toJSONString(assumeNotNull(cost)))"),
    "cost_currency": _scalar("cost_currency", 8),
    "response_time": _scalar("response_time", 4, "toString(response_time)"),
    "response_status_code": _scalar("response_status_code", 2, "toString(response_status_code)"),
    "mode": _scalar("mode", 10),
    "config": _scalar("config", 10),
    "prompt_slug": _scalar("prompt_slug", 10),
    "metadata": Column(_METADATA_MAP, f"toJSONString({_METADATA_MAP})", f"toJSONString({_METADATA_MAP})", 80),
}
assert tuple(COLUMNS) == REQUESTED_DATA


def select_list(columns: list[str], fmt: str) -> str:
    """The SELECT list of ``columns`` (names from :data:`COLUMNS` only) for ``fmt``.

    JSONL rows are made by ClickHouse: one String column ``line``, a JSON object with
    the columns in the requested order, newline included. Other formats alias each
    column ``c<i>`` (an alias named like a column would shadow it in WHERE); the reader
    renames them to the requested names.
    """
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        raise ValueError(f"not exportable columns: {unknown}")
    if fmt == "parquet":
        return ", ".join(f"{COLUMNS[c].typed} AS c{i}" for i, c in enumerate(columns))
    if fmt == "csv":
        return ", ".join(f"{COLUMNS[c].text} AS c{i}" for i, c in enumerate(columns))
    if fmt == "jsonl":
        pieces = []
        for i, c in enumerate(columns):
            pieces.append(("'{" if i == 0 else "',") + f"\"{c}\":'")
            pieces.append(COLUMNS[c].json)
        pieces.append("'}\\n'")
        return f"concat({', '.join(pieces)}) AS line"
    raise ValueError(f"unknown format {fmt}")


def row_width(columns: list[str]) -> int:
    return sum(COLUMNS[c].width for c in columns) + 16


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Page:
    """``page_size`` rows from row ``current_page * page_size`` of the ordered selection."""

    offset: int
    limit: int


@dataclass(frozen=True)
class Selection:
    filters: Filters
    scope: TenantScope
    ai_models: tuple[str, ...] = ()  # the spec's `ai_model` filter (comma list), not an analytics one
    page: Page | None = None

    def where(self) -> Where:
        base = compile_where(self.filters, self.scope)
        if not self.ai_models:
            return base
        return Where(f"{base.sql} AND (ai_model IN {{x_ai_models:Array(String)}})",
                     {**base.params, "x_ai_models": list(self.ai_models)})


def _count(client: Client, where: Where) -> int:
    return int(client.command(f"SELECT count() FROM generations FINAL WHERE {where.sql}", parameters=where.params))


def _key_at(client: Client, where: Where, offset: int) -> tuple[datetime, str] | None:
    rows = client.query(
        f"SELECT created_at, id FROM generations FINAL WHERE {where.sql} ORDER BY created_at, id "
        "LIMIT 1 OFFSET {k_offset:UInt64}",
        parameters={**where.params, "k_offset": offset},
    ).result_rows
    return (rows[0][0], rows[0][1]) if rows else None


def count_rows(client: Client, sel: Selection) -> int:
    """How many rows the export holds (after deduplication and paging)."""
    n = _count(client, sel.where())
    if sel.page is None:
        return n
    return max(0, min(sel.page.limit, n - sel.page.offset))


def _paged_where(client: Client, sel: Selection) -> Where | None:
    """The selection's condition with the page's keyset bounds; None when the page is empty."""
    where = sel.where()
    if sel.page is None:
        return where
    first = _key_at(client, where, sel.page.offset)
    if first is None:
        return None
    last = _key_at(client, where, sel.page.offset + sel.page.limit - 1)
    sql = where.sql + " AND ((created_at, id) >= ({k0_ts:DateTime64(3, 'UTC')}, {k0_id:String}))"
    params = {**where.params, "k0_ts": utc_naive(first[0]), "k0_id": first[1]}
    if last is not None:
        sql += " AND ((created_at, id) <= ({k1_ts:DateTime64(3, 'UTC')}, {k1_id:String}))"
        params.update(k1_ts=utc_naive(last[0]), k1_id=last[1])
    return Where(sql, params)


# A slice holds about this many bytes of Arrow data (at least MIN_SLICE_ROWS rows).
SLICE_BYTES = 16 * 1024 * 1024
MIN_SLICE_ROWS = 1_000

# Histogram levels: bucket width in milliseconds, coarse to fine. A bucket over the
# slice budget is split at the next level; one second over it is read as one slice.
_LEVELS_MS = (3_600_000, 60_000, 1_000)


def _histogram(client: Client, where: Where, lo: datetime, hi: datetime, width_ms: int) -> list[tuple[datetime, int]]:
    """(bucket start, rows) of [lo, hi), without FINAL: an upper bound, which is all slicing needs."""
    rows = client.query(
        "SELECT toStartOfInterval(created_at, toIntervalMillisecond({h_width:UInt32})) AS b, count() "
        f"FROM generations WHERE {where.sql} AND created_at >= {{h_lo:DateTime64(3, 'UTC')}} "
        "AND created_at < {h_hi:DateTime64(3, 'UTC')} GROUP BY b ORDER BY b",
        parameters={**where.params, "h_width": width_ms, "h_lo": utc_naive(lo), "h_hi": utc_naive(hi)},
    ).result_rows
    return [(utc_aware(b), int(n)) for b, n in rows]


def _buckets(client: Client, where: Where, lo: datetime, hi: datetime, budget_rows, level: int = 0
             ) -> Iterator[tuple[datetime, datetime, int]]:
    """[start, end, rows) buckets covering the rows in [lo, hi), none (where possible) over the budget."""
    width = timedelta(milliseconds=_LEVELS_MS[level])
    for start, n in _histogram(client, where, lo, hi, _LEVELS_MS[level]):
        b_lo, b_hi = max(start, lo), min(start + width, hi)
        if n > budget_rows() and level + 1 < len(_LEVELS_MS):
            yield from _buckets(client, where, b_lo, b_hi, budget_rows, level + 1)
        else:
            yield b_lo, b_hi, n


@dataclass
class SliceStats:
    rows: int = 0
    bytes: int = 0
    slices: int = 0
    estimate: float = 0.0  # Arrow bytes per row

    def observe(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.bytes += table.nbytes
        self.slices += 1
        if self.rows:
            self.estimate = self.bytes / self.rows


@dataclass
class Stream:
    """The export's rows as Arrow tables, one slice after the other."""

    client: Client
    sel: Selection
    columns: list[str]
    fmt: str
    stats: SliceStats = field(default_factory=SliceStats)

    def budget_rows(self) -> int:
        per_row = self.stats.estimate or row_width(self.columns)
        return max(MIN_SLICE_ROWS, int(SLICE_BYTES / per_row))

    def slices(self) -> Iterator[tuple[datetime, datetime]]:
        """[lo, hi) time ranges, each about ``SLICE_BYTES`` of the columns (adapting as slices are read)."""
        where = _paged_where(self.client, self.sel)
        if where is None:
            return
        self._where = where
        lo, hi = self.sel.filters.start.astimezone(UTC), self.sel.filters.end.astimezone(UTC) + timedelta(milliseconds=1)
        cur_lo, cur_rows = None, 0
        for b_lo, b_hi, n in _buckets(self.client, where, lo, hi, self.budget_rows):
            if cur_lo is not None and cur_rows + n > self.budget_rows():
                yield cur_lo, b_lo
                cur_lo, cur_rows = None, 0
            if cur_lo is None:
                cur_lo = b_lo
            cur_rows += n
            last_hi = b_hi
        if cur_lo is not None:
            yield cur_lo, last_hi

    def read(self, lo: datetime, hi: datetime) -> pa.Table:
        """One slice, streamed from ClickHouse as Arrow batches (one table of them)."""
        sql = (
            f"SELECT {select_list(self.columns, self.fmt)} FROM generations FINAL WHERE {self._where.sql} "
            "AND created_at >= {s_lo:DateTime64(3, 'UTC')} AND created_at < {s_hi:DateTime64(3, 'UTC')} "
            "ORDER BY created_at, id"
        )
        params = {**self._where.params, "s_lo": utc_naive(lo), "s_hi": utc_naive(hi)}
        batches = []
        with self.client.query_arrow_stream(sql, parameters=params) as stream:
            for batch in stream:
                batches.extend(batch.to_batches() if isinstance(batch, pa.Table) else [batch])
        table = pa.Table.from_batches(batches) if batches else None
        if table is not None:
            if self.fmt != "jsonl":
                table = table.rename_columns(self.columns)
            if self.fmt == "csv":
                table = _plain(table)
            self.stats.observe(table)
        return table

    def __iter__(self) -> Iterator[pa.Table]:
        for lo, hi in self.slices():
            table = self.read(lo, hi)
            if table is not None and table.num_rows:
                yield table


# Session settings of a client that reads export data (measured on 1M rows: −45 % CPU):
# LowCardinality columns come as Arrow dictionaries (cheaper for ClickHouse to write, and
# what Parquet stores anyway); no LZ4 on the Arrow stream (ClickHouse's default: compressing
# bytes that only cross into this process costs more than it saves); the native Arrow writer.
# And FINAL read as analytics and usage limits read it (warehouse/queries/final.py).
DATA_CLIENT_SETTINGS = {
    "output_format_arrow_low_cardinality_as_dictionary": 1,
    "output_format_arrow_compression_method": "none",
    "output_format_arrow_use_native_writer": 1,
    **FINAL_READ,
}


def data_client(dsn: str) -> Client:
    """A client of its own for reading one export's rows, with :data:`DATA_CLIENT_SETTINGS`
    (those the server knows: an older ClickHouse server lacks the native writer)."""
    from warehouse.client import connect

    client = connect(dsn)
    known = {r[0] for r in client.query("SELECT name FROM system.settings WHERE name IN {n:Array(String)}",
                                        parameters={"n": list(DATA_CLIENT_SETTINGS)}).result_rows}
    for name, value in DATA_CLIENT_SETTINGS.items():
        if name in known:
            client.set_client_setting(name, value)
    return client


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary columns decoded (the CSV writer wants values)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table


# --------------------------------------------------------------------------- versions

RANK = {"draft": 0, "in_progress": 1, "success": 2, "failed": 2, "stopped": 2}
_TIME_BITS = 56
_US_MAX = (1 << 52) - 1


def job_version(status: str) -> int:
    """(rank << 56) | time: later states supersede earlier ones whatever the write order;
    among final states the first one written wins (its time part counts down)."""
    us = time.time_ns() // 1_000
    rank = RANK[status]
    part = (_US_MAX - us) if rank == 2 else us
    return (rank << _TIME_BITS) | part


# --------------------------------------------------------------------------- export_jobs

JOB_COLUMNS = [
    "id", "organisation_id", "workspace_slug", "created_by", "description", "filters", "requested_data", "format",
    "destination", "status", "total", "rows_written", "files", "error", "created_at", "updated_at", "started_at",
    "finished_at", "version",
]


@dataclass(frozen=True)
class JobRow:
    id: str
    organisation_id: str
    workspace_slug: str
    created_by: str
    description: str
    filters: str
    requested_data: tuple[str, ...]
    format: str
    destination: str
    status: str
    total: int
    rows_written: int
    files: str
    error: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: int

    def values(self) -> list:
        return [list(v) if isinstance(v, tuple) else v for v in (getattr(self, c) for c in JOB_COLUMNS)]


def _job(values) -> JobRow:
    d = dict(zip(JOB_COLUMNS, values))
    d["requested_data"] = tuple(d["requested_data"])
    for k in ("created_at", "updated_at", "started_at", "finished_at"):
        if d[k] is not None:
            d[k] = utc_aware(d[k])
    return JobRow(**d)


def write_job(client: Client, row: JobRow) -> JobRow:
    client.insert("export_jobs", [row.values()], column_names=JOB_COLUMNS)
    return row


def get_job(client: Client, scope: TenantScope, job_id: str) -> JobRow | None:
    where, params = scope.where()
    rows = client.query(
        f"SELECT {', '.join(JOB_COLUMNS)} FROM export_jobs FINAL WHERE {where} AND id = {{id:String}} LIMIT 1",
        parameters={**params, "id": job_id},
    ).result_rows
    return _job(rows[0]) if rows else None


def get_job_by_id(client: Client, job_id: str) -> JobRow | None:
    """For the runner and the signed download route (which has no API key)."""
    rows = client.query(
        f"SELECT {', '.join(JOB_COLUMNS)} FROM export_jobs FINAL WHERE id = {{id:String}} LIMIT 1",
        parameters={"id": job_id},
    ).result_rows
    return _job(rows[0]) if rows else None


def list_jobs(client: Client, organisation_id: str, workspace_slug: str | None, limit: int, offset: int
              ) -> tuple[int, list[JobRow]]:
    where, params = TenantScope(organisation_id, workspace_slug).where()
    total = int(client.command(f"SELECT count() FROM export_jobs FINAL WHERE {where}", parameters=params))
    rows = client.query(
        f"SELECT {', '.join(JOB_COLUMNS)} FROM export_jobs FINAL WHERE {where} ORDER BY created_at DESC, id "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        parameters={**params, "limit": limit, "offset": offset},
    ).result_rows
    return total, [_job(r) for r in rows]


def jobs_in_status(client: Client, status: str) -> list[JobRow]:
    rows = client.query(
        f"SELECT {', '.join(JOB_COLUMNS)} FROM export_jobs FINAL WHERE status = {{s:String}}", parameters={"s": status}
    ).result_rows
    return [_job(r) for r in rows]


# --------------------------------------------------------------------------- export_schedules

SCHEDULE_COLUMNS = [
    "id", "organisation_id", "workspace_slug", "created_by", "description", "cron", "timezone", "window_kind",
    "filters", "requested_data", "format", "destination", "prefix", "status", "start_at", "created_at", "updated_at",
    "version",
]


@dataclass(frozen=True)
class ScheduleRow:
    id: str
    organisation_id: str
    workspace_slug: str
    created_by: str
    description: str
    cron: str
    timezone: str
    window_kind: str
    filters: str
    requested_data: tuple[str, ...]
    format: str
    destination: str
    prefix: str
    status: str
    start_at: datetime
    created_at: datetime
    updated_at: datetime
    version: int

    def values(self) -> list:
        return [list(v) if isinstance(v, tuple) else v for v in (getattr(self, c) for c in SCHEDULE_COLUMNS)]


def _schedule(values) -> ScheduleRow:
    d = dict(zip(SCHEDULE_COLUMNS, values))
    d["requested_data"] = tuple(d["requested_data"])
    for k in ("start_at", "created_at", "updated_at"):
        d[k] = utc_aware(d[k])
    return ScheduleRow(**d)


def write_schedule(client: Client, row: ScheduleRow) -> ScheduleRow:
    client.insert("export_schedules", [row.values()], column_names=SCHEDULE_COLUMNS)
    return row


def get_schedule(client: Client, scope: TenantScope | None, schedule_id: str) -> ScheduleRow | None:
    """A schedule that was not deleted (``scope`` None: any tenant, for the scheduler)."""
    where, params = scope.where() if scope else ("1", {})
    rows = client.query(
        f"SELECT {', '.join(SCHEDULE_COLUMNS)} FROM export_schedules FINAL WHERE {where} AND id = {{id:String}} "
        "AND status != 'deleted' LIMIT 1",
        parameters={**params, "id": schedule_id},
    ).result_rows
    return _schedule(rows[0]) if rows else None


def list_schedules(client: Client, scope: TenantScope | None, limit: int = 1_000_000, offset: int = 0
                   ) -> tuple[int, list[ScheduleRow]]:
    where, params = scope.where() if scope else ("1", {})
    where += " AND status != 'deleted'"
    total = int(client.command(f"SELECT count() FROM export_schedules FINAL WHERE {where}", parameters=params))
    rows = client.query(
        f"SELECT {', '.join(SCHEDULE_COLUMNS)} FROM export_schedules FINAL WHERE {where} ORDER BY created_at DESC, id "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        parameters={**params, "limit": limit, "offset": offset},
    ).result_rows
    return total, [_schedule(r) for r in rows]


def prefix_taken(client: Client, organisation_id: str, prefix: str, other_than: str) -> bool:
    return int(client.command(
        "SELECT count() FROM export_schedules FINAL WHERE organisation_id = {o:String} AND prefix = {p:String} "
        "AND status != 'deleted' AND id != {id:String}",
        parameters={"o": organisation_id, "p": prefix, "id": other_than},
    )) > 0


# --------------------------------------------------------------------------- export_schedule_runs

RUN_COLUMNS = [
    "schedule_id", "organisation_id", "window_start", "window_end", "fire_time", "status", "cause", "attempts",
    "row_count", "files", "error", "started_at", "finished_at", "version",
]


@dataclass(frozen=True)
class RunRow:
    schedule_id: str
    organisation_id: str
    window_start: datetime
    window_end: datetime
    fire_time: datetime
    status: str
    cause: str
    attempts: int
    row_count: int
    files: str
    error: str
    started_at: datetime
    finished_at: datetime | None
    version: int

    def values(self) -> list:
        return [getattr(self, c) for c in RUN_COLUMNS]


def _run(values) -> RunRow:
    d = dict(zip(RUN_COLUMNS, values))
    for k in ("window_start", "window_end", "fire_time", "started_at", "finished_at"):
        if d[k] is not None:
            d[k] = utc_aware(d[k])
    return RunRow(**d)


def write_run(client: Client, row: RunRow) -> RunRow:
    client.insert("export_schedule_runs", [row.values()], column_names=RUN_COLUMNS)
    return row


def list_runs(client: Client, organisation_id: str, schedule_id: str, limit: int = 1_000_000, offset: int = 0,
              status: str | None = None, newest_first: bool = True) -> tuple[int, list[RunRow]]:
    where = "organisation_id = {o:String} AND schedule_id = {s:String}"
    params: dict[str, Any] = {"o": organisation_id, "s": schedule_id}
    if status is not None:
        where += " AND status = {st:String}"
        params["st"] = status
    total = int(client.command(f"SELECT count() FROM export_schedule_runs FINAL WHERE {where}", parameters=params))
    order = "DESC" if newest_first else "ASC"
    rows = client.query(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM export_schedule_runs FINAL WHERE {where} ORDER BY window_start {order} "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        parameters={**params, "limit": limit, "offset": offset},
    ).result_rows
    return total, [_run(r) for r in rows]


def last_fire_time(client: Client, organisation_id: str, schedule_id: str) -> datetime | None:
    """The latest cron time whose window was taken up (in any state), or None."""
    rows = client.query(
        "SELECT max(fire_time), count() FROM export_schedule_runs FINAL WHERE organisation_id = {o:String} "
        "AND schedule_id = {s:String} AND cause != 'backfill'",
        parameters={"o": organisation_id, "s": schedule_id},
    ).result_rows
    return utc_aware(rows[0][0]) if rows and rows[0][1] else None


def runs_in_status(client: Client, status: str) -> list[RunRow]:
    rows = client.query(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM export_schedule_runs FINAL WHERE status = {{st:String}}",
        parameters={"st": status},
    ).result_rows
    return [_run(r) for r in rows]
