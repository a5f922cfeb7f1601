"""Parquet, JSONL and CSV writers fed by Arrow tables; part splitting; the manifest.

:class:`PartWriter` takes the export's slices (Arrow tables) in order and writes
``part-00000.<ext>``, ``part-00001.<ext>``, … of at most ``part_rows`` rows each,
every one through a destination :class:`~exports.destinations.Sink` (streamed,
atomic, hashed). :func:`write_manifest` then writes ``manifest.json`` (docs/exports.md
has its schema).

- Parquet: the columns' real types (timestamp[ms, UTC], unsigned integers, float64
  cents, map<string, string> metadata, bool), ZSTD, dictionary encoding for the
  low-cardinality columns, row groups of ``row_group_rows`` rows or about
  ``ROW_GROUP_BYTES`` of data, whichever is smaller (slices are buffered up to that).
- JSONL: ClickHouse already made each row's JSON line (warehouse/queries/exports.py);
  the writer copies the Arrow string buffer as it is.
- CSV: a header, then RFC 4180 rows (pyarrow's writer); nested values are JSON text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from exports.destinations import Destination, Sink

EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}
ROW_GROUP_BYTES = 64 * 1024 * 1024
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 1
DICTIONARY_COLUMNS = ("ai_org", "ai_model", "cost_currency", "mode", "config", "prompt_slug", "request_url", "metadata")
# Min/max statistics where a lake engine can prune with them (not on random ids, JSON or maps).
STATISTICS_COLUMNS = ("created_at", "is_success", "ai_org", "ai_model", "req_units", "res_units", "total_units", "cost",
                      "cost_currency", "response_time", "response_status_code", "mode", "config", "prompt_slug",
                      "request_url")
MANIFEST = "manifest.json"

# JSON value types of the JSONL columns (what the manifest's schema says for JSONL).
JSON_TYPES = {
    "id": "string", "trace_id": "string", "created_at": "string (ISO 8601 UTC, ms)", "request": "object",
    "response": "object", "is_success": "boolean", "ai_org": "string", "ai_model": "string",
    "req_units": "integer", "res_units": "integer", "total_units": "integer", "request_url": "string",
    "cost": "number or null (cents)", "cost_currency": "string", "response_time": "integer (ms)",
    "response_status_code": "integer", "mode": "string", "config": "string", "prompt_slug": "string",
    "metadata": "object of strings",
}


@dataclass
class FileInfo:
    name: str  # relative to the export's directory
    rows: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


class _Part:
    def __init__(self, sink: Sink):
        self.sink = sink
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self._write(table)

    def finish(self) -> None:
        self._finish()
        self.sink.commit()

    def abort(self) -> None:
        try:
            self._finish()
        except Exception:
            pass
        self.sink.abort()

    def _write(self, table: pa.Table) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


class ParquetPart(_Part):
    def __init__(self, sink: Sink, schema: pa.Schema, row_group_rows: int):
        super().__init__(sink)
        names = set(schema.names)
        # store_schema=False: no Arrow schema in the file, so every reader sees the Parquet types
        # (strings, not the dictionary arrays ClickHouse hands over for LowCardinality columns).
        self.writer = pq.ParquetWriter(
            sink, schema, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
            use_dictionary=[c for c in DICTIONARY_COLUMNS if c in names] or False,
            write_statistics=[c for c in STATISTICS_COLUMNS if c in names] or False, store_schema=False,
        )
        self.row_group_rows = row_group_rows
        self.target = row_group_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def _write(self, table: pa.Table) -> None:
        if table.num_rows:
            per_row = max(1.0, table.nbytes / table.num_rows)
            self.target = max(1_024, min(self.row_group_rows, int(ROW_GROUP_BYTES / per_row)))
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.target:
            merged = pa.concat_tables(self.pending)
            full = (merged.num_rows // self.target) * self.target
            self.writer.write_table(merged.slice(0, full), row_group_size=self.target)
            rest = merged.slice(full)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _finish(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.target)
        self.pending, self.pending_rows = [], 0
        self.writer.close()


class JsonlPart(_Part):
    def _write(self, table: pa.Table) -> None:
        for chunk in table.column(0).chunks:
            if chunk.null_count:
                raise ValueError("a JSONL line is null")
            _, offsets, data = chunk.buffers()
            large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
            offs = memoryview(offsets).cast("q" if large else "i")
            start, end = offs[chunk.offset], offs[chunk.offset + len(chunk)]
            if end > start:
                self.sink.write(memoryview(data)[start:end])


class CsvPart(_Part):
    def __init__(self, sink: Sink, schema: pa.Schema):
        super().__init__(sink)
        self.writer = pacsv.CSVWriter(sink, schema, write_options=pacsv.WriteOptions(include_header=True))

    def _write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def _finish(self) -> None:
        self.writer.close()


class PartWriter:
    """Writes the export's tables into parts of at most ``part_rows`` rows under ``directory``."""

    def __init__(self, dest: Destination, directory: str, fmt: str, part_rows: int, row_group_rows: int = 262_144):
        self.dest, self.directory, self.fmt = dest, directory.rstrip("/"), fmt
        self.part_rows, self.row_group_rows = part_rows, row_group_rows
        self.files: list[FileInfo] = []
        self.rows = 0
        self.schema: pa.Schema | None = None
        self._part: _Part | None = None

    def _name(self) -> str:
        return f"part-{len(self.files):05d}.{EXTENSIONS[self.fmt]}"

    def _open(self, schema: pa.Schema) -> _Part:
        sink = self.dest.open(f"{self.directory}/{self._name()}")
        if self.fmt == "parquet":
            return ParquetPart(sink, schema, self.row_group_rows)
        if self.fmt == "csv":
            return CsvPart(sink, schema)
        return JsonlPart(sink)

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        while table.num_rows:
            if self._part is None:
                self._part = self._open(self.schema)
            take = min(table.num_rows, self.part_rows - self._part.rows)
            self._part.write(table.slice(0, take))
            self.rows += take
            table = table.slice(take)
            if self._part.rows >= self.part_rows:
                self._close_part()

    def _close_part(self) -> None:
        part = self._part
        try:
            part.finish()  # S3: the last part upload and CompleteMultipartUpload
        except BaseException:
            self._part = None
            part.abort()  # a failed finish leaves no open multipart upload (nor a half-written file)
            raise
        self._part = None
        self.files.append(FileInfo(self._name(), part.rows, part.sink.size, part.sink.sha256))

    def finish(self) -> list[FileInfo]:
        if self._part is not None:
            self._close_part()
        return self.files

    def abort(self) -> None:
        """Leave nothing: the open part is aborted and the finished ones deleted."""
        if self._part is not None:
            self._part.abort()
            self._part = None
        self.dest.delete([f"{self.directory}/{f.name}" for f in self.files])
        self.files = []


def schema_description(fmt: str, columns: list[str], schema: pa.Schema | None) -> list[dict[str, str]]:
    if fmt == "jsonl":
        return [{"name": c, "type": JSON_TYPES[c]} for c in columns]
    if schema is None:
        return [{"name": c, "type": "unknown (no rows)"} for c in columns]
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def manifest(*, fmt: str, columns: list[str], files: list[FileInfo], schema: pa.Schema | None, filters: Any,
             extra: dict[str, Any]) -> dict:
    now = datetime.now(UTC)
    return {
        "manifest_version": 1,
        **extra,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "format": fmt,
        "compression": f"{PARQUET_COMPRESSION}({PARQUET_COMPRESSION_LEVEL})" if fmt == "parquet" else "none",
        "requested_data": columns,
        "filters": filters,
        "schema": schema_description(fmt, columns, schema),
        "rows": sum(f.rows for f in files),
        "files": [f.as_dict() for f in files],
    }


def write_manifest(dest: Destination, directory: str, body: dict) -> FileInfo:
    sink = dest.open(f"{directory.rstrip('/')}/{MANIFEST}")
    try:
        sink.write(json.dumps(body, indent=2).encode())
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return FileInfo(MANIFEST, 0, sink.size, sink.sha256)
