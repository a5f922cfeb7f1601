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

import ctypes
import gc
import logging
import multiprocessing
import signal
import threading
import time
from pathlib import Path

from ingest.sink import DirectSink, RemoteSink, SinkServer
from tollgate.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the worker notices a closed pipe on its next insert instead
        pass


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


def worker_main(settings_json: str, bootstrap: str, index: int, conn, log_level: int) -> None:
    """Entry point of a worker process."""
    _die_with_parent()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker-{index}[%(process)d] %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = Settings.model_validate_json(settings_json)
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
    workers.stop()


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

    def _spawn(self, index: int):
        conn = None
        if self.settings.is_embedded_warehouse:
            spool_dir(self.settings).mkdir(parents=True, exist_ok=True)
            parent_end, conn = self._ctx.Pipe()
            SinkServer(self.settings.warehouse_dsn, parent_end, f"worker-{index}", self.settings.ingest_fault_file).start()
        proc = self._ctx.Process(
            target=worker_main,
            args=(self._settings_json, self.bootstrap, index, conn, logging.getLogger().level),
            name=f"tollgate-ingest-{index}",
            daemon=False,
        )
        proc.start()
        if conn is not None:
            conn.close()  # the child holds its end; EOF reaches the sink server when it exits
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
        self._terminate()

    def _terminate(self, timeout: float = 60.0) -> None:
        for proc in self._procs:
            if proc is not None and proc.exitcode is None:
                proc.terminate()  # SIGTERM: drain, insert, commit
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("ingest worker %s did not drain in %.0fs; killing it", proc.name, timeout)
                proc.kill()
                proc.join(5)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def start(self) -> None:
        self._monitor.start()
        self._started.wait(60)

    def stop(self) -> None:
        self._stop.set()
        self._monitor.join(90)
