"""Shared fixtures: a real Kafka-protocol broker (Tansu) and a real ClickHouse engine (chdb).

One chdb engine path per process: the whole session shares one warehouse
directory. Tests stay independent by using their own organisation ids and their
own topics (``settings`` gives each test fresh topic names). Tests that need a
warehouse of their own (crash tests) run ingest in subprocesses.

``TOLLGATE_TEST_CLICKHOUSE_URL`` (``http://user:pass@host:8123``): every test that uses the
warehouse runs a second time against that ClickHouse server (parameter ``server`` of
``warehouse_dsn``), in a database of its own created for the session (``tollgate_test_<random>``,
dropped at the end), so runs sharing the server never collide; inside it, tests keep apart
by organisation and topics as on chdb. Unset, nothing is parametrized: the same tests, ids
and embedded warehouse as always. Tests that start their own `tollgate up` or ingest
processes keep their own embedded warehouse either way.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import uvicorn
from fastapi.testclient import TestClient
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from analytics_api.app import create_app
from analytics_api.auth import SCOPES, hash_key, new_key
from ingest.producer import ensure_topics, make_producer
from ingest.workers import IngestWorkers
from tollgate.broker import EmbeddedBroker, free_port
from tollgate.settings import Settings
from warehouse.client import connect
from warehouse.migrate import migrate
from warehouse.queries import api_keys


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tollgate")


TEST_SERVER = os.environ.get("TOLLGATE_TEST_CLICKHOUSE_URL", "").strip()


def with_database(url: str, database: str) -> str:
    """``url`` (``http(s)://user:pass@host:port[/db]``) with ``database`` as its database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture(scope="session", **({"params": ["embedded", "server"]} if TEST_SERVER else {}))
def warehouse_dsn(request) -> str | None:
    """None: the embedded warehouse in the session's data dir; else the test server's DSN, in a fresh database."""
    if getattr(request, "param", "embedded") == "embedded":
        return None
    database = f"tollgate_test_{uuid.uuid4().hex[:12]}"
    admin = connect(TEST_SERVER)
    admin.command(f"CREATE DATABASE {database}")
    request.addfinalizer(lambda: admin.command(f"DROP DATABASE IF EXISTS {database} SYNC"))
    return with_database(TEST_SERVER, database)


@pytest.fixture(scope="session")
def base_settings(data_dir, broker, warehouse_dsn) -> Settings:
    return Settings(
        clickhouse_dsn=warehouse_dsn,
        data_dir=data_dir,
        kafka_bootstrap=broker.bootstrap,
        retention_days=0,
        ingest_batch_size=2_000,
        ingest_batch_seconds=0.2,
        topic_partitions=3,
        auth_cache_seconds=0.0,
    )


@pytest.fixture(scope="session")
def warehouse(base_settings):
    client = connect(base_settings.warehouse_dsn)
    migrate(client, retention_days=0)
    return client


@pytest.fixture
def settings(base_settings, broker) -> Settings:
    """Fresh topics and consumer group per test, on the shared broker and warehouse."""
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(
        update=dict(
            topic_gateway_logs=f"t{suffix}.gateway-logs",
            topic_feedback=f"t{suffix}.feedback",
            topic_audit=f"t{suffix}.audit",
            topic_dead_letter=f"t{suffix}.dead-letter",
            ingest_consumer_group=f"g{suffix}",
        )
    )
    ensure_topics(broker.bootstrap, s.all_topics, s.topic_partitions)
    return s


@pytest.fixture
def org() -> str:
    return f"org-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def producer(broker):
    p = make_producer(broker.bootstrap)
    yield p
    p.close()


@pytest.fixture
def workers(settings, broker, warehouse):
    """Ingest consumers for this test's topics, running on threads."""
    pool = IngestWorkers(settings, broker.bootstrap)
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def api(settings, warehouse):
    app = create_app(settings, settings.kafka_bootstrap, pool_size=2)
    with TestClient(app) as client:
        yield client


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """``app`` under uvicorn on a free port (for clients that need real HTTP, like the SDK); yields the /v1 URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=20)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_url(settings, warehouse) -> Iterator[str]:
    with serve(create_app(settings, settings.kafka_bootstrap, pool_size=2)) as url:
        yield url


@pytest.fixture
def make_key(warehouse) -> Callable[..., str]:
    def _make(org: str, workspace: str = "", scopes: list[str] | None = None) -> str:
        key = new_key()
        api_keys.insert(warehouse, key_hash=hash_key(key), organisation_id=org, workspace_slug=workspace,
                        scopes=list(SCOPES) if scopes is None else scopes)
        return key

    return _make


@pytest.fixture
def empty_db(base_settings, warehouse):
    """A client whose current database is a fresh, empty one (not migrated), dropped afterwards."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    warehouse.command(f"CREATE DATABASE IF NOT EXISTS {name}")
    client = connect(base_settings.warehouse_dsn, database=name)
    assert client.command("SELECT currentDatabase()") == name
    yield client
    warehouse.command(f"DROP DATABASE IF EXISTS {name} SYNC")


def migrations_before(version: int, directory: Path) -> Path:
    """``directory`` filled with the migration files numbered below ``version``: what a release before
    that migration applied (upgrade tests migrate with it, then with every file)."""
    import shutil

    from warehouse.migrate import MIGRATIONS_DIR

    directory.mkdir()
    for f in MIGRATIONS_DIR.glob("*.sql"):
        if int(f.name[:4]) < version:
            shutil.copy(f, directory / f.name)
    return directory


def publish(producer, topic: str, events: list) -> dict[int, int]:
    """Send dicts (as JSON) or raw bytes, wait for every ack; return each partition's end offset.

    (The end offset comes from the acks: Tansu's ListOffsets answers the base offset
    of the last record batch, not the high watermark.)
    """
    futures = [producer.send(topic, ev if isinstance(ev, bytes) else orjson.dumps(ev)) for ev in events]
    producer.flush()
    ends: dict[int, int] = {}
    for f in futures:
        meta = f.get(timeout=30)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return ends


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Records of ``topic`` from the beginning, until ``expected`` arrived or the timeout."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             fetch_max_wait_ms=100)
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The offsets a consumer group committed on ``topic`` (-1 where none)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        return {tp.partition: committed[tp].offset if tp in committed else -1 for tp in parts}
    finally:
        admin.close()


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    return sum(max(o, 0) for o in committed_offsets(bootstrap, group, topic, partitions).values())


def wait_ingested(settings, *topics: str, timeout: float = 60.0) -> bool:
    """Until the ingest has committed every message of ``topics`` up to the topics' current end.

    A batch's offsets are committed only after everything that follows its insert (the
    per-trace feedback sums, the copies of requests with feedback: ingest/sink.py), so then
    every read sees the batch whole. Waiting for rows in a table instead can end between a
    batch's insert and those steps."""
    def caught_up() -> bool:
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        try:
            for topic in topics:
                parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
                ends = consumer.end_offsets(parts)
                committed = committed_offsets(settings.kafka_bootstrap, f"{settings.ingest_consumer_group}.{topic}",
                                              topic, settings.topic_partitions)
                if any(max(committed[tp.partition], 0) < ends[tp] for tp in parts):  # -1: none committed (an empty partition)
                    return False
            return True
        finally:
            consumer.close()

    return wait_until(caught_up, timeout=timeout, interval=0.2)


def count_generations(client, org: str) -> int:
    return int(client.command("SELECT count() FROM generations FINAL WHERE organisation_id = {o:String}", parameters={"o": org}))
