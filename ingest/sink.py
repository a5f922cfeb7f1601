"""Where an ingest batch goes: straight into ClickHouse, or through the process that owns chdb.

A ClickHouse server takes inserts from any number of processes, so each consumer
uses a :class:`DirectSink`. The embedded engine (chdb) can be opened by one process
only; an ingest worker process then writes its batch to a spool file and asks that
process over a pipe to insert it (:class:`RemoteSink` → :class:`SinkServer`), which
runs ``INSERT … FROM INFILE`` and answers only after ClickHouse acknowledged.
Either way the worker commits its offsets only after that answer, and only after what
must follow the insert (:func:`after_insert`): for feedback, the per-trace sums of the
batch's traces rewritten, and their requests copied into ``feedback_generations``; for
gateway logs, the batch's requests whose trace has feedback copied there.
A batch of gateway logs first stores the texts of its metadata pairs (:func:`before_insert`).
(The spool file
is what clickhouse-connect's chdb backend does for every insert anyway; writing it
in the worker saves copying each batch through the pipe and the owner's memory.)
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import orjson
from clickhouse_connect.driver.binding import quote_identifier

from ingest.events import GENERATIONS, BatchTraces, Codec, MetadataValues
from warehouse.client import connect
from warehouse.cluster import CLUSTER_READ, CLUSTER_WRITE, layout
from warehouse.queries.feedback import refresh_traces
from warehouse.queries.feedback_generations import copy_batch
from warehouse.queries.metadata import store_metadata_values

log = logging.getLogger(__name__)

# ClickHouse reads the JSON objects and arrays of body columns as their own text.
# optimize_on_insert=0: collapsing duplicates inside a fresh part costs a quarter of
# the insert's CPU and buys nothing, since merges and FINAL collapse them anyway.
# input_format_parallel_parsing=0: a batch is tens of MB; parsing it on one thread
# costs less CPU and about 50 MB less memory, and the worker decodes meanwhile.
INSERT_SETTINGS = {
    "input_format_parallel_parsing": 0,
    "insert_deduplicate": 1,
    "optimize_on_insert": 0,
    "input_format_json_read_objects_as_strings": 1,
    "input_format_json_read_arrays_as_strings": 1,
    "input_format_skip_unknown_fields": 0,
}


class Sink(Protocol):
    def __call__(self, codec: Codec, rows: list[bytes], metadata_values: MetadataValues | None = None,
                 traces: BatchTraces | None = None) -> None: ...


class InsertFailed(RuntimeError):
    pass


def check_fault(fault_file: Path | None) -> None:
    """Fault injection at the client boundary (``TOLLGATE_INGEST_FAULT_FILE``): while that file
    exists every insert fails before it reaches ClickHouse, as when the server is down. Outage
    drills, the fault tests and benchmarks/scale.py use it; unset (the default) it costs nothing."""
    if fault_file is not None and fault_file.exists():
        raise InsertFailed(f"warehouse outage injected: {fault_file} exists")


def insert_rows(client, codec: Codec, rows: list[bytes], metadata_values: MetadataValues | None = None,
                traces: BatchTraces | None = None) -> None:
    """One INSERT … FORMAT JSONCompactEachRow, streamed; ClickHouse parses the batch.

    ``metadata_values`` and ``traces``: the rows' metadata pairs and traces as :meth:`Codec.encode`
    collected them; when None they are parsed out of the rows."""
    before_insert(client, codec, rows, metadata_values)
    client.raw_insert(codec.table, column_names=codec.columns, insert_block=codec.chunks(rows),
                      fmt="JSONCompactEachRow", settings={**INSERT_SETTINGS, **(CLUSTER_WRITE if _quorum(client, codec.table) else {})})
    if traces is None and codec.table == GENERATIONS.table:
        traces = codec.traces_of(rows)
    after_insert(client, codec.table, codec.columns, rows, traces)


def before_insert(client, codec: Codec, rows, metadata_values: MetadataValues | None) -> None:
    """What must be stored before a batch: for gateway logs, the texts of the rows' metadata
    pairs (``metadata_values``, migration 0023), so that every stored request's pair has
    its text when a metadata group reads it. A failure fails the batch before its rows
    are inserted; stored again on the retry, a pair keeps one row."""
    if not codec.collects_metadata_values:
        return
    if metadata_values is None:
        metadata_values = codec.metadata_values_of(rows)
    _store_texts(client, metadata_values)


def after_insert(client, table: str, columns: list[str], rows, traces: BatchTraces | None = None) -> None:
    """What must follow an acknowledged insert before its offsets may be committed: for
    feedback, rewriting the per-trace sums of the batch's traces (``trace_feedback``,
    migration 0022), which also copies their requests into ``feedback_generations`` (0025);
    for gateway logs, copying there the batch's requests whose trace has feedback (``traces``).
    A failure here fails the batch, which is inserted again (ClickHouse keeps one version)
    and rewritten or copied again."""
    if table == GENERATIONS.table:
        if traces is not None and traces.trace_ids:
            copy_batch(client, traces.orgs, traces.first_ms, traces.last_ms, traces.trace_ids)
        return
    if table != "feedback":
        return
    org, trace = columns.index("organisation_id"), columns.index("trace_id")
    pairs = set()
    for line in rows:
        for row in line.splitlines():  # a spool file's lines, or one row each
            if row.strip():
                values = orjson.loads(row)
                pairs.add((values[org], values[trace]))
    refresh_traces(client, pairs, settings=CLUSTER_READ if _quorum(client, table) else None)


def _store_texts(client, metadata_values: MetadataValues) -> None:
    """Cluster mode: on a majority of their shard's replicas before the batch is inserted, so that
    a replica that has the rows is unlikely to lack their texts (reads are not sequentially
    consistent: a lagging replica may still show a value empty, as it may lack rows)."""
    quorum = CLUSTER_WRITE if layout(client).cluster is not None else {}
    store_metadata_values(client, metadata_values, settings={**INSERT_SETTINGS, **quorum})


def _quorum(client, table: str) -> bool:
    """Cluster mode: the rewrite after a feedback insert must read a replica that has the batch,
    so the insert waits for a quorum and the rewrite reads every quorum write."""
    return table == "feedback" and layout(client).cluster is not None


_TABLES = {"generations", "feedback", "audit_logs"}
_SPOOL_NAME = re.compile(r"^[A-Za-z0-9_./-]+\.jsonl$")


def insert_file(client, table: str, columns: list[str], path: str) -> None:
    """INSERT … FROM INFILE for a spool file (embedded engine only: the file is local)."""
    if table not in _TABLES or not _SPOOL_NAME.match(path):
        raise InsertFailed(f"refusing to insert {path!r} into {table!r}")
    cols = ", ".join(quote_identifier(c) for c in columns)
    clause = ", ".join(f"{k} = {int(v)}" for k, v in INSERT_SETTINGS.items())
    client.command(f"INSERT INTO {table} ({cols}) FROM INFILE '{path}' SETTINGS {clause} FORMAT JSONCompactEachRow")


class DirectSink:
    def __init__(self, dsn: str, fault_file: Path | None = None):
        self.client = connect(dsn)
        self.fault_file = fault_file

    def __call__(self, codec: Codec, rows: list[bytes], metadata_values: MetadataValues | None = None,
                 traces: BatchTraces | None = None) -> None:
        check_fault(self.fault_file)
        insert_rows(self.client, codec, rows, metadata_values, traces)


class RemoteSink:
    """In a worker process: spool the batch to a file, have the warehouse owner insert it."""

    def __init__(self, conn: Connection, spool_dir: Path):
        self.conn = conn
        self.spool_dir = spool_dir
        self._lock = threading.Lock()  # the consumers of one process share the pipe
        self._count = itertools.count()

    def __call__(self, codec: Codec, rows: list[bytes], metadata_values: MetadataValues | None = None,
                 traces: BatchTraces | None = None) -> None:
        if metadata_values is None and codec.collects_metadata_values:
            metadata_values = codec.metadata_values_of(rows)  # here: the spool file cannot be split into rows
        if traces is None and codec.table == GENERATIONS.table:
            traces = codec.traces_of(rows)
        path = self.spool_dir / f"{os.getpid()}-{next(self._count)}.jsonl"
        try:
            with open(path, "wb") as spool:
                spool.writelines(codec.chunks(rows))
            with self._lock:
                self.conn.send((codec.table, codec.columns, str(path), metadata_values, traces))
                status, detail = self.conn.recv()
        finally:
            path.unlink(missing_ok=True)
        if status != "ok":
            raise InsertFailed(detail)


class SinkServer:
    """In the warehouse-owning process: insert what one worker process sends, and answer."""

    def __init__(self, dsn: str, conn: Connection, name: str, fault_file: Path | None = None):
        self.dsn = dsn
        self.conn = conn
        self.fault_file = fault_file
        self.thread = threading.Thread(target=self._serve, name=f"sink-{name}", daemon=True)

    def start(self) -> "SinkServer":
        self.thread.start()
        return self

    def _serve(self) -> None:
        client = connect(self.dsn)
        try:
            self._loop(client)
        finally:
            client.close()  # release the engine handle before the process tears chdb down

    def _loop(self, client) -> None:
        while True:
            try:
                table, columns, path, metadata_values, traces = self.conn.recv()
            except (EOFError, OSError):
                return  # the worker process is gone
            try:
                check_fault(self.fault_file)
                if table == GENERATIONS.table:  # the worker sends the batch's pairs (RemoteSink)
                    _store_texts(client, metadata_values)
                insert_file(client, table, columns, path)
                with open(path, "rb") as spooled:
                    after_insert(client, table, columns, spooled, traces)
                answer = ("ok", None)
            except Exception as exc:  # the worker retries with back-off
                log.warning("insert into %s for a worker failed: %s", table, exc)
                answer = ("error", str(exc))
            try:
                self.conn.send(answer)
            except (EOFError, OSError):
                return
