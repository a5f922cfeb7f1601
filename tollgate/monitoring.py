"""Self-monitoring: the Prometheus metrics every role exposes (docs/operations.md).

Every metric is defined here, in the process-wide ``prometheus_client`` registry.
Ingest worker *processes* (ingest/processes.py) keep their own copies of the ingest
metrics and send a snapshot of them to the process that started them over a pipe
every second (and a last one when they stop); that process adds them to its own
(:class:`WorkerMetrics`). A worker that exits keeps counting: its last counters and
histograms are kept, its gauges (consumer lag of partitions it no longer holds)
are dropped. ``/metrics`` (the API) or the metrics server of ``TOLLGATE_METRICS_PORT``
(roles without an API) render :func:`exposition`.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()  # `_created` series cannot be added up across processes

# -- ingest (per topic; in worker processes) --------------------------------------------------
INGEST_EVENTS = Counter("tollgate_ingest_events", "Events stored: inserted into ClickHouse and acknowledged.",
                        ["topic"])
INGEST_DEAD_LETTERS = Counter("tollgate_ingest_dead_letters",
                              "Events rejected to the dead-letter topic (and acknowledged by Kafka).", ["topic"])
INGEST_BATCH_SIZE = Histogram("tollgate_ingest_batch_size", "Events per inserted batch (rows and dead letters).",
                              ["topic"], buckets=(1, 10, 100, 500, 1_000, 5_000, 10_000, 20_000, 40_000, 80_000))
INGEST_INSERT_SECONDS = Histogram("tollgate_ingest_insert_seconds",
                                  "Duration of one insert attempt of a batch, successful or not.", ["topic"],
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
INGEST_INSERT_ERRORS = Counter("tollgate_ingest_insert_errors",
                               "Failed insert attempts (each is retried with back-off).", ["topic"])
INGEST_CONSUMER_LAG = Gauge("tollgate_ingest_consumer_lag",
                            "Messages of a partition not committed yet: its high watermark (at the last fetch) "
                            "minus the offset this consumer last committed.", ["topic", "partition"])

# -- API ----------------------------------------------------------------------------------------
API_REQUEST_SECONDS = Histogram("tollgate_api_request_seconds",
                                "API request latency by route template (not the raw path) and status.",
                                ["method", "route", "status"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# -- jobs ---------------------------------------------------------------------------------------
EXPORT_SECONDS = Histogram("tollgate_export_duration_seconds",
                           "Duration of an export (on demand) or of a scheduled window, by outcome.",
                           ["kind", "status"], buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600))
EXPORT_ROWS = Counter("tollgate_export_rows", "Rows written by exports that succeeded.", ["kind"])
LIMITS_REFRESH_SECONDS = Histogram("tollgate_limits_refresh_seconds", "Duration of a limits refresh, by outcome.",
                                   ["status"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
SCHEDULER_MISFIRES = Counter("tollgate_scheduler_misfires",
                             "Scheduled runs APScheduler missed (EVENT_JOB_MISSED), by job.", ["job"])

AGGREGATED = ("counter", "histogram")  # kept from a worker that stopped; gauges are not

Families = list[tuple[str, str, str, list[tuple[str, dict, float]]]]  # (name, type, help, samples)


def snapshot(registry: CollectorRegistry = prometheus_client.REGISTRY, prefix: str = "tollgate_") -> Families:
    """This process's metrics named ``prefix…`` as plain data (what a worker sends)."""
    return snapshot_of(m for m in registry.collect() if m.name.startswith(prefix))


def merge(sources: Iterable[Families]) -> list[Metric]:
    """Add up samples with the same name and labels across processes."""
    families: dict[str, tuple[str, str, dict]] = {}
    for source in sources:
        for name, kind, doc, samples in source:
            _, _, values = families.setdefault(name, (kind, doc, {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + value
    out = []
    for name, (kind, doc, values) in families.items():
        metric = Metric(name, doc, kind)
        for (sample, labels), value in values.items():
            metric.add_sample(sample, dict(labels), value)
        out.append(metric)
    return out


class WorkerMetrics:
    """The latest snapshot of each live worker process, plus what stopped workers counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, Families] = {}
        self._retired: Families = []

    def receive(self, serial: int, conn) -> None:
        """Read snapshots from one worker's pipe until it closes (run on a thread)."""
        try:
            while True:
                data = conn.recv()
                with self._lock:
                    self._live[serial] = data
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            with self._lock:
                last = self._live.pop(serial, [])
                kept = [f for f in last if f[1] in AGGREGATED]
                self._retired = snapshot_of(merge([self._retired, kept]))

    def families(self) -> list[Families]:
        with self._lock:
            return [self._retired, *self._live.values()]


def snapshot_of(metrics: Iterable[Metric]) -> Families:
    return [(m.name, m.type, m.documentation, [(s.name, s.labels, s.value) for s in m.samples]) for m in metrics]


_sources: list[Callable[[], list[Families]]] = []


def add_source(source: Callable[[], list[Families]]) -> None:
    """Metrics of other processes to add to this process's (ingest worker processes)."""
    _sources.append(source)


def remove_source(source: Callable[[], list[Families]]) -> None:
    if source in _sources:
        _sources.remove(source)


class _Merged:
    def collect(self):
        own = snapshot(prometheus_client.REGISTRY, prefix="")
        return merge([own, *(f for source in list(_sources) for f in source())])


_EXPOSITION = CollectorRegistry(auto_describe=False)
_EXPOSITION.register(_Merged())  # type: ignore[arg-type]


def exposition() -> bytes:
    """The Prometheus text format of this process and the worker processes it runs."""
    return prometheus_client.generate_latest(_EXPOSITION)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def serve(host: str, port: int | None) -> None:
    """The metrics server of a role without an API (``TOLLGATE_METRICS_PORT``; unset: none)."""
    if port is None:
        return
    try:
        prometheus_client.start_http_server(port, addr=host, registry=_EXPOSITION)
    except OSError as exc:
        raise OSError(f"the metrics server could not listen on {host}:{port} (TOLLGATE_METRICS_PORT): {exc}") from exc
    log.info("metrics on http://%s:%d/metrics", host, port)


def watch_misfires(scheduler) -> None:
    """Count the scheduler's missed runs. Export schedule jobs count under one name (no ids in labels)."""
    from apscheduler.events import EVENT_JOB_MISSED

    def missed(event) -> None:
        job = event.job_id.split(":", 1)[0]  # "export-schedule:<id>" → "export-schedule"
        SCHEDULER_MISFIRES.labels(job).inc()
        log.warning("scheduler: job %s missed its run time %s", event.job_id, event.scheduled_run_time)

    scheduler.add_listener(missed, EVENT_JOB_MISSED)
