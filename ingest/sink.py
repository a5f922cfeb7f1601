"""Where an ingest batch goes: straight into ClickHouse, or through the process that owns chdb.

A ClickHouse server takes inserts from any number of processes, so each consumer
uses a :class:`DirectSink`. The embedded engine (chdb) can be opened by one process
only; ingest worker processes then send their batches to that process over a pipe
(:class:`RemoteSink` → :class:`SinkServer`), which inserts them with its own client
and answers only after ClickHouse acknowledged. Either way the worker commits its
offsets only after that answer.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection
from typing import Protocol

from ingest.events import Codec
from warehouse.client import connect

log = logging.getLogger(__name__)

# ClickHouse reads the JSON objects and arrays of body columns as their own text.
# optimize_on_insert=0: collapsing duplicates inside a fresh part costs a quarter of
# the insert's CPU and buys nothing, since merges and FINAL collapse them anyway.
INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    "optimize_on_insert": 0,
    "input_format_json_read_objects_as_strings": 1,
    "input_format_json_read_arrays_as_strings": 1,
    "input_format_skip_unknown_fields": 0,
}


class Sink(Protocol):
    def __call__(self, codec: Codec, body: bytes) -> None: ...


class InsertFailed(RuntimeError):
    pass


def insert_rows(client, table: str, columns: list[str], body: bytes) -> None:
    """One INSERT … FORMAT JSONCompactEachRow; ClickHouse parses the batch."""
    client.raw_insert(table, column_names=columns, insert_block=body, fmt="JSONCompactEachRow", settings=INSERT_SETTINGS)


class DirectSink:
    def __init__(self, dsn: str):
        self.client = connect(dsn)

    def __call__(self, codec: Codec, body: bytes) -> None:
        insert_rows(self.client, codec.table, codec.columns, body)


class RemoteSink:
    """In a worker process: have the warehouse-owning process insert the batch."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()  # the consumers of one process share the pipe

    def __call__(self, codec: Codec, body: bytes) -> None:
        with self._lock:
            self.conn.send((codec.table, codec.columns))
            self.conn.send_bytes(body)
            status, detail = self.conn.recv()
        if status != "ok":
            raise InsertFailed(detail)


class SinkServer:
    """In the warehouse-owning process: insert what one worker process sends, and answer."""

    def __init__(self, dsn: str, conn: Connection, name: str):
        self.dsn = dsn
        self.conn = conn
        self.thread = threading.Thread(target=self._serve, name=f"sink-{name}", daemon=True)

    def start(self) -> "SinkServer":
        self.thread.start()
        return self

    def _serve(self) -> None:
        client = connect(self.dsn)
        while True:
            try:
                table, columns = self.conn.recv()
                body = self.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the worker process is gone
            try:
                insert_rows(client, table, columns, body)
                answer = ("ok", None)
            except Exception as exc:  # the worker retries with back-off
                log.warning("insert into %s for a worker failed: %s", table, exc)
                answer = ("error", str(exc))
            try:
                self.conn.send(answer)
            except (EOFError, OSError):
                return
