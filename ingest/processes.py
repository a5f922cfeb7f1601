"""Ingest worker processes: decoding on other cores than the warehouse engine.

Consuming and validating is Python work bound to one core by the GIL. Each worker
process runs one consumer per topic (:class:`ingest.workers.IngestWorkers`), so N
processes use N cores. With a ClickHouse server they insert directly; with the
embedded engine, which only this process may open, they send each batch here
(:mod:`ingest.sink`) and this process inserts it while they decode the next one.

Workers die with this process (PR_SET_PDEATHSIG), ignore SIGINT (the parent
decides the shutdown order) and drain on SIGTERM. A worker that dies is restarted;
its uncommitted batch is re-delivered and collapses in the tables.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from ingest.sink import DirectSink, RemoteSink, SinkServer
from warehouse.client import connect
from tollgate import logs, monitoring
from tollgate.broker import die_with_parent
from tollgate.settings import Settings

log = logging.getLogger(__name__)

def spool_dir(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "spool"


def quiet_gc() -> None:
    """Fewer cyclic-GC passes: a worker keeps tens of thousands of fetched records alive,
    and every young-generation pass that promotes them makes the next full pass walk
    them all. Decoding creates no reference cycles (the event structs are gc=False), so
    collections are rarer, and what exists at start-up is frozen out of them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def report_metrics(conn, stop: threading.Event, every: float = 1.0) -> threading.Thread:
    """In a worker process: send this process's metrics to the parent every ``every`` seconds."""

    def loop() -> None:
        try:
            while not stop.wait(every):
                conn.send(monitoring.snapshot())
        except (OSError, ValueError):  # the parent is gone
            pass

    thread = threading.Thread(target=loop, name="metrics-report", daemon=True)
    thread.start()
    return thread


def worker_main(settings_json: str, bootstrap: str, index: int, conn, log_level: int, metrics_conn=None) -> None:
    """Entry point of a worker process."""
    die_with_parent()  # not Linux: the worker notices a closed pipe on its next insert instead
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = Settings.model_validate_json(settings_json)
    logs.configure(log_level, settings.log_format, process=f"ingest-worker-{index}[{os.getpid()}]")
    done = threading.Event()
    if metrics_conn is not None:
        report_metrics(metrics_conn, done)
    from ingest.workers import IngestWorkers

    if conn is not None:
        remote = RemoteSink(conn, spool_dir(settings))
        make_sink = lambda: remote  # noqa: E731 - one pipe per process
    else:
        make_sink = lambda: DirectSink(settings.warehouse_dsn, settings.ingest_fault_file)  # noqa: E731
    workers = IngestWorkers(settings, bootstrap, workers=1, sink=make_sink)
    quiet_gc()
    workers.start()
    while not stop.wait(0.5):
        pass
    drained = workers.stop(settings.shutdown_grace_seconds)
    done.set()
    if metrics_conn is not None:
        try:
            metrics_conn.send(monitoring.snapshot())  # the last figures: this process ends now
        except OSError:
            pass
        metrics_conn.close()
    if not drained:
        log.error("ingest worker %d: not drained within the grace period of %gs; exiting, its uncommitted "
                  "events will be re-delivered", index, settings.shutdown_grace_seconds)
        logging.shutdown()
        os._exit(1)


class IngestProcesses:
    """N supervised worker processes, plus the sink servers when the warehouse is embedded."""

    def __init__(self, settings: Settings, bootstrap: str, processes: int = 1):
        self.settings = settings
        self.bootstrap = bootstrap
        self.count = processes
        self._ctx = multiprocessing.get_context("spawn")
        # children read the warehouse DSN resolved here, whatever their working directory
        self._settings_json = settings.model_copy(
            update={"clickhouse_dsn": settings.warehouse_dsn, "data_dir": settings.data_dir.resolve()}
        ).model_dump_json()
        self._procs: list = [None] * processes
        self._stop = threading.Event()
        self.restarts = 0
        self._monitor = threading.Thread(target=self._supervise, name="ingest-supervisor", daemon=True)
        self._started = threading.Event()
        self.metrics = monitoring.WorkerMetrics()
        self.drained = True  # False once a worker did not stop cleanly within the grace period
        self._serial = 0

    def _spawn(self, index: int):
        conn = None
        if self.settings.is_embedded_warehouse:
            spool_dir(self.settings).mkdir(parents=True, exist_ok=True)
            parent_end, conn = self._ctx.Pipe()
            SinkServer(self.settings.warehouse_dsn, parent_end, f"worker-{index}", self.settings.ingest_fault_file).start()
        metrics_in, metrics_out = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(self._settings_json, self.bootstrap, index, conn, logging.getLogger().level, metrics_out),
            name=f"tollgate-ingest-{index}",
            daemon=False,
        )
        proc.start()
        if conn is not None:
            conn.close()  # the child holds its end; EOF reaches the sink server when it exits
        metrics_out.close()
        self._serial += 1
        threading.Thread(target=self.metrics.receive, args=(self._serial, metrics_in), name=f"metrics-{index}",
                         daemon=True).start()
        return proc

    def _supervise(self) -> None:
        # Children are started from this long-lived thread: PDEATHSIG fires when the
        # *thread* that started a child exits.
        for i in range(self.count):
            self._procs[i] = self._spawn(i)
        self._started.set()
        delay = 0.5
        while not self._stop.wait(0.5):
            for i, proc in enumerate(self._procs):
                if proc.exitcode is not None and not self._stop.is_set():
                    log.error("ingest worker %d exited with %s; restarting in %.1fs", i, proc.exitcode, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
                    self.restarts += 1
                    self._procs[i] = self._spawn(i)
        self._terminate(self.settings.shutdown_grace_seconds)

    def _terminate(self, timeout: float) -> None:
        for proc in self._procs:
            if proc is not None and proc.exitcode is None:
                proc.terminate()  # SIGTERM: drain, insert, commit
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("ingest worker %s did not drain in %gs; killing it (its uncommitted events will be "
                          "re-delivered)", proc.name, timeout)
                proc.kill()
                proc.join(5)
            if proc.exitcode != 0:
                self.drained = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def start(self) -> None:
        if self.settings.is_embedded_warehouse:
            # Fail here, before any worker joins the consumer group, when another process holds the data dir:
            # a sink server's thread would fail alone, and its worker would take partitions it never stores.
            connect(self.settings.warehouse_dsn).close()
        monitoring.add_source(self.metrics.families)
        self._monitor.start()
        self._started.wait(60)

    def stop(self) -> bool:
        """SIGTERM the workers, wait for them to drain (insert, commit) within the grace period; False if one did not."""
        self._stop.set()
        self._monitor.join(self.settings.shutdown_grace_seconds + 10)
        return self.drained and not self._monitor.is_alive()
