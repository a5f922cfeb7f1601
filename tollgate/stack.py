"""`tollgate up`: the whole embedded stack in one process, and the production roles.

One chdb data directory can be opened by one process only, so this process owns
the warehouse: migrations, the scheduler, the API and every insert run here. The
broker and the ingest worker processes (which decode and hand their batches to
this process) are its children.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from analytics_api.app import create_app
from analytics_api.auth import SCOPES, hash_key, new_key
from analytics_api.limits import job as limits
from exports.jobs import recover_interrupted
from ingest.producer import ensure_topics
from ingest.processes import IngestProcesses
from tollgate import monitoring
from tollgate.broker import EmbeddedBroker
from tollgate.settings import Settings
from warehouse.client import connect, redact
from warehouse.lease import Lease
from warehouse.migrate import migrate
from warehouse.settle import settle
from warehouse.queries import api_keys


def install_jobs(settings: Settings, bootstrap: str, scheduler) -> limits.LimitsJob:
    """The scheduled jobs, of `tollgate up` and of the `tollgate scheduler` holding the lease: settle
    (``TOLLGATE_SETTLE_INTERVAL_SECONDS``), the limits job (counters, alerts, the state feed: docs/limits.md)
    and the export schedules (rebuilt from ClickHouse; exports/schedules.py). Returns the limits job (close
    it after the scheduler's shutdown)."""
    from exports.schedules import ScheduleService

    monitoring.watch_misfires(scheduler)
    if settings.settle_interval_seconds:
        scheduler.add_job(settle, "interval", seconds=settings.settle_interval_seconds,
                          args=[connect(settings.warehouse_dsn)], kwargs={"max_days": settings.settle_max_days},
                          id="settle", max_instances=1, coalesce=True, next_run_time=datetime.now(UTC))
    job = limits.schedule(scheduler, settings, bootstrap)
    ScheduleService(settings).install(scheduler)
    return job


def say(message: str) -> None:
    print(message, flush=True)


log = logging.getLogger(__name__)

EXIT_GRACE_EXCEEDED = 1


class StopSignal:
    """SIGINT/SIGTERM set an event the main thread waits on, and start the grace period: a role that
    has not finished its shutdown (drain, insert, commit) ``grace`` seconds after the signal exits
    anyway, with code 1. Whatever it had not committed is re-delivered by Kafka later."""

    def __init__(self, grace: float | None = None) -> None:
        self.event = threading.Event()
        self.grace = grace
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for the drain
        if not self.event.is_set() and self.grace:
            log.info("%s: shutting down (grace period %gs)", signal.Signals(signum).name, self.grace)
            watchdog = threading.Timer(self.grace, self._expired)
            watchdog.daemon = True
            watchdog.start()
        self.event.set()

    def _expired(self) -> None:
        log.error("shutdown did not finish within the grace period of %gs (TOLLGATE_SHUTDOWN_GRACE_SECONDS); "
                  "exiting with code %d: uncommitted events will be re-delivered", self.grace, EXIT_GRACE_EXCEEDED)
        say("stopped: the grace period ran out")
        logging.shutdown()
        os._exit(EXIT_GRACE_EXCEEDED)

    def wait(self) -> None:
        while not self.event.wait(0.5):
            pass


def read_stack_file(settings: Settings) -> dict | None:
    try:
        info = json.loads(settings.stack_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None  # stale: that process is gone
    return info


def kafka_bootstrap(settings: Settings) -> str:
    """Kafka for producers run from a shell: the setting, else the running embedded stack's broker."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    info = read_stack_file(settings)
    if info and info.get("kafka_bootstrap"):
        return info["kafka_bootstrap"]
    raise SystemExit(
        "no Kafka to talk to: set TOLLGATE_KAFKA_BOOTSTRAP, or start the embedded stack with `tollgate up` "
        f"(looked for {settings.stack_file})"
    )


def ensure_admin_key(settings: Settings, client) -> str | None:
    """When no key is active (first start, or every key revoked or disabled), create an organisation
    admin key and return it: the operator, who holds the data dir, is never locked out."""
    if api_keys.count(client) > 0:
        return None
    key = new_key()
    api_keys.insert(
        client,
        key_hash=hash_key(key),
        organisation_id=settings.default_organisation,
        workspace_slug="",
        scopes=list(SCOPES),
        name="admin (created by tollgate up)",
    )
    return key


class ApiServer:
    """uvicorn on a thread, so the main thread owns signals and the shutdown order."""

    def __init__(self, app, host: str, port: int, grace: float = 30.0, lifespan: str = "off", log_level: str = "warning"):
        # our log lines (tollgate/logs.py) and our access log (analytics_api/observe.py), not uvicorn's
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan=lifespan, log_config=None,
                                access_log=False, timeout_graceful_shutdown=max(1, int(grace) - 5))
        self.server = uvicorn.Server(config)
        self.grace = grace
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise OSError(f"the API server could not listen on {config.host}:{config.port} (is the port free?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.grace)


def up(settings: Settings, host: str, port: int, ingest_workers: int | None = None) -> int:
    stop = StopSignal(settings.shutdown_grace_seconds)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    running = read_stack_file(settings)
    if running:
        say(f"tollgate is already running (pid {running['pid']}) at {running.get('api_url')}")
        return 1
    with ExitStack() as cleanup:
        broker = None
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = EmbeddedBroker(log_path=settings.data_dir / "broker.log").start()
            cleanup.callback(broker.stop)
            bootstrap = broker.bootstrap
            say(f"embedded Kafka broker (Tansu) on {bootstrap}")
        ensure_topics(bootstrap, settings.all_topics, settings.topic_partitions)
        ensure_topics(bootstrap, list(settings.limit_topics), settings.topic_partitions, configs=settings.limit_topics)

        client = connect(settings.warehouse_dsn)
        applied = migrate(client, settings.retention_days, audit_retention_days=settings.audit_retention_days,
                          cluster=settings.clickhouse_cluster)
        say(f"warehouse {settings.warehouse_dsn}: {len(applied)} migration(s) applied")

        monitoring.serve(settings.metrics_host, settings.metrics_port)  # besides the API's /metrics, if asked for
        workers = IngestProcesses(settings, bootstrap, ingest_workers or settings.ingest_workers)
        workers.start()
        cleanup.callback(workers.stop)  # runs before the broker stops: drain, insert, commit

        recover_interrupted(client, settings)  # this process runs every export: one left in_progress was cut short
        scheduler = BackgroundScheduler(timezone="UTC")
        limits_job = install_jobs(settings, bootstrap, scheduler)
        scheduler.start()
        cleanup.callback(scheduler.shutdown, wait=True)
        cleanup.callback(limits_job.close)  # waits for a refresh in flight

        api = ApiServer(create_app(settings, bootstrap), host, port, settings.shutdown_grace_seconds)
        api.start()
        cleanup.callback(api.stop)  # first to stop: no new requests while draining
        # once nothing can fail any more: a key created by a start that then failed would never be shown
        admin_key = ensure_admin_key(settings, client)

        api_url = f"http://{host}:{port}/v1"
        settings.stack_file.write_text(
            json.dumps({"pid": os.getpid(), "api_url": api_url, "kafka_bootstrap": bootstrap,
                        "embedded_broker": broker is not None})
        )
        cleanup.callback(settings.stack_file.unlink, missing_ok=True)
        if admin_key:
            say(f"created an organisation admin key for organisation '{settings.default_organisation}' (shown once):")
            say(f"  {admin_key}")
        say(f"API: {api_url}  (OpenAPI docs: http://{host}:{port}/docs)")
        say("tollgate is ready")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        say("stopping: draining ingest workers…")
    if not workers.drained:
        say("stopped, but an ingest worker did not drain within the grace period")
        return EXIT_GRACE_EXCEEDED
    say("stopped")
    return 0


def run_ingest(settings: Settings, workers: int | None = None) -> int:
    """Production role: consumers only, against a Kafka cluster and a ClickHouse server."""
    stop = StopSignal(settings.shutdown_grace_seconds)
    bootstrap = kafka_bootstrap(settings)
    ensure_topics(bootstrap, settings.all_topics, settings.topic_partitions)
    monitoring.serve(settings.metrics_host, settings.metrics_port)  # a busy port fails before any worker starts
    pool = IngestProcesses(settings, bootstrap, workers or settings.ingest_workers)
    pool.start()
    say(f"ingest: {pool.count} worker process(es) on {bootstrap} → {settings.warehouse_dsn}")
    stop.wait()
    if not pool.stop():
        log.error("ingest: a worker did not drain within the grace period; its uncommitted events will be re-delivered")
        return EXIT_GRACE_EXCEEDED
    return 0


def run_scheduler(settings: Settings) -> int:
    """Production role: the scheduled jobs (settle, the limits job, export schedules) against a ClickHouse
    server, run only while this process holds the scheduler lease (warehouse/lease.py), so starting two is
    safe: one runs the jobs, the other waits to take over. Each tenure starts the jobs afresh from
    ClickHouse; losing the lease stops them (a job in flight finishes) and goes back to waiting."""
    stop = StopSignal(settings.shutdown_grace_seconds)
    bootstrap = kafka_bootstrap(settings)
    ensure_topics(bootstrap, list(settings.limit_topics), settings.topic_partitions, configs=settings.limit_topics)
    monitoring.serve(settings.metrics_host, settings.metrics_port)
    lease = Lease(connect(settings.warehouse_dsn), ttl=settings.scheduler_lease_seconds)
    every = lease.ttl / 3
    say(f"scheduler {lease.holder}: {redact(settings.warehouse_dsn)}, waiting for the lease (ttl {lease.ttl:g} s)")
    while not stop.event.is_set():
        if not lease.acquire():
            stop.event.wait(every)
            continue
        say(f"scheduler {lease.holder}: holds the lease, running the scheduled jobs")
        scheduler = BackgroundScheduler(timezone="UTC")
        job = install_jobs(settings, bootstrap, scheduler)
        scheduler.start()
        # renew every ttl/3; after a failed renewal, wake up no later than the lease runs out
        while not stop.event.wait(min(every, lease.remaining())):
            if not (lease.acquire() or lease.held()):
                break
        scheduler.shutdown(wait=True)
        job.close()
        if stop.event.is_set():
            lease.release()
        else:
            say(f"scheduler {lease.holder}: lost the lease, jobs stopped; waiting to take it again")
    return 0


def run_api(settings: Settings, host: str, port: int) -> int:
    """Production role: the API only. SIGTERM: stop taking requests, finish those in flight, close."""
    stop = StopSignal(settings.shutdown_grace_seconds)
    api = ApiServer(create_app(settings, kafka_bootstrap(settings)), host, port, settings.shutdown_grace_seconds,
                    lifespan="on", log_level="info")
    api.start()
    say(f"API: http://{host}:{port}/v1")
    stop.wait()
    api.stop()
    return 0
