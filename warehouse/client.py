"""The only way Tollgate talks to ClickHouse: a clickhouse-connect client.

``chdb://PATH`` runs the ClickHouse engine in-process (embedded default), with chdb's
startup options after a ``?`` (``chdb://PATH?uncompressed_cache_size=536870912``: they
apply to the process's one engine, so the first connect of a process sets them);
``http(s)://user:pass@host:port/db`` reaches a server. Every component that needs
the warehouse calls :func:`connect` and gets its own client (its own chdb handle,
so calls from different threads do not serialize on one lock).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ProgrammingError

# Settings every session gets: UTC everywhere, and exact results for the
# aggregates analytics relies on.
SESSION_SETTINGS: dict[str, Any] = {
    "date_time_output_format": "iso",
    # generations has a partition per day (migration 0015): a batch of late or
    # backfilled events may span any number of days, and must never be refused for it.
    "max_partitions_per_insert_block": 0,
    # Cluster mode (warehouse/cluster.py; no effect without Distributed tables): an insert
    # into a Distributed table returns only once every shard stored its rows (ingest commits
    # Kafka offsets after that), and an IN or JOIN over another Distributed table runs its
    # subquery once, on the initiator, instead of being refused.
    "distributed_foreground_insert": 1,
    "distributed_product_mode": "global",
}


def utc_naive(ts: datetime) -> datetime:
    """``ts`` as naive UTC: what a bound ``{x:DateTime64(3, 'UTC')}`` parameter takes, as is."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def utc_aware(ts: datetime) -> datetime:
    """``ts`` (naive: UTC) as aware UTC: what ``client.insert()`` needs, since it reads a naive
    datetime as the process's LOCAL time (a laptop at +05:30 would store 12:00 UTC as 06:30)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def with_settings(sql: str, settings: Mapping[str, int | str]) -> str:
    """``sql`` (one SELECT, or a UNION of them) ending with a ``SETTINGS`` clause of ``settings``,
    which apply to the whole query, its subqueries included.

    Read queries carry their settings in the text rather than as per-call settings: the chdb
    backend applies per-call settings by reading them from system.settings, running a SET for
    each and another SET per setting to restore it, all around every query. That was 4 ms per
    analytics query (a ``SELECT 1`` with the 8 analytics settings: 4.8 → 0.8 ms). The names and
    values are Tollgate's own constants, never user input; anything else is refused."""
    clauses = []
    for name, value in settings.items():
        if not _SETTING_NAME.fullmatch(name) or not isinstance(value, int | str) or isinstance(value, bool):
            raise ValueError(f"not a setting: {name}={value!r}")
        if isinstance(value, str) and not _SETTING_NAME.fullmatch(value):
            raise ValueError(f"not a plain setting value: {name}={value!r}")
        clauses.append(f"{name} = {value if isinstance(value, int) else repr(value)}")
    return f"{sql} SETTINGS {', '.join(clauses)}" if clauses else sql


class WarehouseUnavailable(RuntimeError):
    """The warehouse cannot be opened (embedded dir locked by another process, server down)."""


def chdb_path(dsn: str) -> str:
    """``chdb:///abs/path`` or ``chdb://relative/path`` (``?options`` aside) → filesystem path."""
    rest = dsn[len("chdb://"):] if dsn.startswith("chdb://") else dsn[len("chdb:"):]
    rest = rest.split("?", 1)[0]
    return str(Path(rest).resolve())


def connect(dsn: str, database: str | None = None, **settings: Any) -> Client:
    """A client for ``dsn``; ``database`` overrides the DSN's (tests use one database each)."""
    merged = {**SESSION_SETTINGS, **settings}
    if dsn.startswith("chdb:"):
        path = chdb_path(dsn)
        os.makedirs(path, exist_ok=True)
        options = "?" + dsn.split("?", 1)[1] if "?" in dsn else ""
        try:
            return clickhouse_connect.get_client(interface="chdb", path=path + options, database=database, settings=merged)
        except ProgrammingError as exc:
            raise WarehouseUnavailable(
                f"cannot open the embedded warehouse at {path}: another process (a running `tollgate up`?) "
                f"holds it. Stop that process, or point TOLLGATE_CLICKHOUSE_DSN at a ClickHouse server. ({exc})"
            ) from exc
    try:
        return clickhouse_connect.get_client(dsn=dsn, database=database, settings=merged, autogenerate_session_id=False)
    except Exception as exc:  # connection refused, auth, DNS
        raise WarehouseUnavailable(f"cannot reach ClickHouse at {redact(dsn)}: {exc}") from exc


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"



class ClientPool:
    """A few clients shared by request handlers; each call borrows one.

    chdb serializes calls on one handle, and a clickhouse-connect client is not meant
    to run concurrent queries, so the pool size is the query concurrency.
    """

    def __init__(self, dsn: str, size: int = 4, **settings: Any):
        self._idle: queue.Queue[Client] = queue.Queue()
        for _ in range(size):
            self._idle.put(connect(dsn, **settings))

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Client]:
        client = self._idle.get()
        try:
            yield client
        finally:
            self._idle.put(client)

    @contextlib.contextmanager
    def borrow_spare(self) -> Iterator[Client | None]:
        """A second client for a query that can run beside the caller's own, if one is idle now;
        None (never a wait) otherwise: two requests each waiting for a second client could wait
        for each other."""
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            yield None
            return
        try:
            yield client
        finally:
            self._idle.put(client)
