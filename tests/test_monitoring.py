"""Self-monitoring: /metrics (ingest through a real worker process, the API histogram, the scheduler's
misfires), request ids in the JSON log lines, liveness and readiness (with the broker stopped)."""

from __future__ import annotations

import io
import logging
import random
import threading
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from analytics_api.app import create_app
from conftest import committed_total, publish, wait_until
from factories import gateway_log
from ingest.processes import IngestProcesses
from ingest.producer import ensure_topics
from ingest.sink import DirectSink
from ingest.workers import IngestWorkers
from tollgate import logs, monitoring
from tollgate.broker import EmbeddedBroker


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition: (sample name, sorted labels) → value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_ingest_metrics_of_a_worker_process(settings, broker, producer, warehouse, org):
    """N good and B bad events through the real broker and a real ingest worker process: the metrics
    the owner process serves count them, and keep counting them after the worker stopped."""
    rng = random.Random(org)  # ids of its own: other tests look theirs up across organisations
    good = [gateway_log(org, rng=rng) for _ in range(3_000)]
    bad = [rng.randbytes(rng.randrange(1, 200)) for _ in range(37)]
    stream = good + bad
    rng.shuffle(stream)
    ends = publish(producer, settings.topic_gateway_logs, stream)
    topic = settings.topic_gateway_logs
    group = f"{settings.ingest_consumer_group}.{topic}"

    pool = IngestProcesses(settings, broker.bootstrap, processes=1)
    pool.start()
    try:
        assert wait_until(lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions) == len(stream),
                          timeout=120, interval=0.3)

        def settled() -> bool:  # the worker reports once a second; lag is measured once a second
            s = scrape(monitoring.exposition().decode())
            lags = [value(s, "tollgate_ingest_consumer_lag", topic=topic, partition=str(p)) for p in ends]
            return value(s, "tollgate_ingest_events_total", topic=topic) == len(good) and lags == [0.0] * len(ends)

        assert wait_until(settled, timeout=20)
        s = scrape(monitoring.exposition().decode())
        assert value(s, "tollgate_ingest_events_total", topic=topic) == len(good)
        assert value(s, "tollgate_ingest_dead_letters_total", topic=topic) == len(bad)
        batches = value(s, "tollgate_ingest_batch_size_count", topic=topic)
        assert batches >= 1 and value(s, "tollgate_ingest_batch_size_sum", topic=topic) == len(stream)
        assert value(s, "tollgate_ingest_insert_seconds_count", topic=topic) >= batches
        assert value(s, "tollgate_ingest_insert_errors_total", topic=topic) == 0
    finally:
        pool.stop()
        monitoring.remove_source(pool.metrics.families)
    # the worker process is gone: its counters stay, its gauges go
    s = scrape(b"".join([monitoring.prometheus_client.generate_latest(_registry_of(pool))]).decode())
    assert value(s, "tollgate_ingest_events_total", topic=topic) == len(good)
    assert value(s, "tollgate_ingest_dead_letters_total", topic=topic) == len(bad)
    assert not [k for k in s if k[0] == "tollgate_ingest_consumer_lag" and ("topic", topic) in k[1]]


def test_consumer_lag_grows_while_inserts_wait_and_drains_after(settings, broker, producer, warehouse, org):
    """Inserts held back (a warehouse that does not answer yet): each partition's lag is everything published
    to it; once inserts go through and offsets are committed, it is 0."""
    gate = threading.Event()

    def make_sink():
        real = DirectSink(settings.warehouse_dsn)

        def write(codec, rows, metadata_values, traces=None):
            gate.wait(60)
            real(codec, rows, metadata_values, traces)

        return write

    rng = random.Random(org)
    ends = publish(producer, settings.topic_gateway_logs, [gateway_log(org, rng=rng) for _ in range(500)])
    topic = settings.topic_gateway_logs
    pool = IngestWorkers(settings, broker.bootstrap, topics=[topic], sink=make_sink)
    pool.start()
    try:
        def lags() -> dict[int, float]:
            s = scrape(monitoring.exposition().decode())
            return {p: value(s, "tollgate_ingest_consumer_lag", topic=topic, partition=str(p)) for p in ends}

        assert wait_until(lambda: lags() == {p: float(n) for p, n in ends.items()}, timeout=30), (lags(), ends)
        gate.set()
        assert wait_until(lambda: lags() == {p: 0.0 for p in ends}, timeout=30), lags()
    finally:
        gate.set()
        pool.stop()


def _registry_of(pool):
    """A registry of just what ``pool``'s worker processes reported."""
    registry = monitoring.CollectorRegistry(auto_describe=False)

    class Workers:
        def collect(self):
            return monitoring.merge(pool.metrics.families())

    registry.register(Workers())  # type: ignore[arg-type]
    return registry


def test_api_latency_histogram_by_route_template_and_status(api, make_key, org):
    key = make_key(org)
    before = scrape(api.get("/metrics").text)
    for i in range(3):
        assert api.get(f"/v1/logs/no-such-log-{i}", headers={"x-portkey-api-key": key}).status_code == 404
    assert api.get("/v1/logs/x", headers={"x-portkey-api-key": "tg-wrong"}).status_code == 401
    for _ in range(2):
        assert api.get("/v1/health").status_code == 200
    assert api.get("/v1/no/such/route").status_code == 404
    r = api.get("/metrics")  # served without a key, outside /v1
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = scrape(r.text)

    def delta(route: str, status: str) -> float:
        labels = dict(method="GET", route=route, status=status)
        return (value(after, "tollgate_api_request_seconds_count", **labels)
                - value(before, "tollgate_api_request_seconds_count", **labels))

    assert delta("/v1/logs/{logId}", "404") == 3
    assert delta("/v1/logs/{logId}", "401") == 1
    assert delta("/v1/health", "200") == 2
    assert delta("<unmatched>", "404") == 1
    assert delta("/metrics", "200") == 1  # the first scrape
    # raw paths never become labels
    assert not [k for k in after if ("route", "/v1/logs/no-such-log-0") in k[1]]
    buckets = [v for (name, labels), v in after.items() if name == "tollgate_api_request_seconds_bucket"
               and dict(labels).get("route") == "/v1/logs/{logId}" and dict(labels).get("status") == "404"
               and dict(labels)["le"] == "+Inf"]
    assert buckets == [value(after, "tollgate_api_request_seconds_count", method="GET", route="/v1/logs/{logId}",
                             status="404")]


@pytest.fixture
def json_lines():
    """What the root logger writes, as the JSON formatter writes it, at INFO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [orjson.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_request_id_is_echoed_and_on_the_request_log_lines(api, json_lines):
    r = api.get("/v1/health", headers={"x-request-id": "req-42.a:b"})
    assert r.headers["x-request-id"] == "req-42.a:b"
    generated = api.get("/v1/health").headers["x-request-id"]
    assert len(generated) == 36 and generated != "req-42.a:b"  # a UUID
    unsafe = api.get("/v1/health", headers={"x-request-id": "evil\" id with spaces"}).headers["x-request-id"]
    assert unsafe != "evil\" id with spaces" and len(unsafe) == 36  # not sane: replaced

    access = [line for line in json_lines() if line["logger"] == "tollgate.access"]
    assert [line["request_id"] for line in access] == ["req-42.a:b", generated, unsafe]
    first = access[0]
    assert first["level"] == "INFO" and first["route"] == "/v1/health" and first["status"] == 200
    assert first["message"].startswith("GET /v1/health 200")
    assert datetime.fromisoformat(first["ts"].replace("Z", "+00:00")).tzinfo is not None
    # outside a request, no request id
    logging.getLogger("tollgate.test").warning("not in a request")
    assert "request_id" not in json_lines()[-1]


def test_text_log_format_carries_the_request_id():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    token = logs.request_id.set("abc")
    try:
        line = logs.formatter("text").format(record)
    finally:
        logs.request_id.reset(token)
    assert line.endswith("INFO x: hello there [request_id=abc]")


def test_liveness_and_readiness(api):
    assert api.get("/v1/health").json() == {"status": "ok"}
    r = api.get("/v1/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "clickhouse": "ok", "kafka": "ok"}


def test_readiness_fails_when_the_broker_stops(base_settings, warehouse):
    with EmbeddedBroker() as own:
        s = base_settings.model_copy(update={"kafka_bootstrap": own.bootstrap})
        ensure_topics(own.bootstrap, s.all_topics, s.topic_partitions)
        with TestClient(create_app(s, own.bootstrap, pool_size=1)) as client:
            assert client.get("/v1/ready").status_code == 200
            own.stop()
            r = client.get("/v1/ready")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "not ready" and body["clickhouse"] == "ok"
            assert body["kafka"].startswith("error:") and own.bootstrap in body["kafka"]
            assert client.get("/v1/health").status_code == 200  # still alive: only not ready


def test_scheduler_misfires_are_counted():
    scheduler = BackgroundScheduler(timezone="UTC")
    monitoring.watch_misfires(scheduler)
    before = value(scrape(monitoring.exposition().decode()), "tollgate_scheduler_misfires_total", job="export-schedule")
    ran = []
    scheduler.add_job(lambda: ran.append(1), "date", run_date=datetime.now(UTC) - timedelta(seconds=30),
                      id="export-schedule:0f3c", misfire_grace_time=1)
    scheduler.start()
    try:
        assert wait_until(lambda: value(scrape(monitoring.exposition().decode()), "tollgate_scheduler_misfires_total",
                                        job="export-schedule") == before + 1, timeout=10)
    finally:
        scheduler.shutdown(wait=True)
    assert ran == []  # it was missed, not run


def test_export_and_limits_job_metrics(api, make_key, org, warehouse, settings):
    """An on-demand export of K rows: one duration observation (success) and K rows; a limits refresh: one
    duration observation."""
    from analytics_api.limits.job import LimitsJob
    from ingest.events import GENERATIONS
    from ingest.sink import insert_rows

    key = make_key(org)
    rng = random.Random(org)
    now = datetime.now(UTC)
    events = [gateway_log(org, rng=rng, created_at=now - timedelta(minutes=rng.randrange(1, 600))) for _ in range(57)]
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(e)) for e in events])
    before = scrape(monitoring.exposition().decode())

    h = {"x-portkey-api-key": key}
    window = {"time_of_generation_min": (now - timedelta(days=1)).isoformat(), "time_of_generation_max": now.isoformat()}
    export_id = api.post("/v1/logs/exports", json={"filters": window, "requested_data": ["id", "cost"]}, headers=h).json()["id"]
    assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h).status_code == 200
    assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h).json()["status"] == "success")

    job = LimitsJob(settings, settings.kafka_bootstrap, organisations=[org])
    try:
        job.run()
    finally:
        job.close()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert wait_until(lambda: value(scrape(monitoring.exposition().decode()), "tollgate_export_rows_total",
                                    kind="on_demand") - value(before, "tollgate_export_rows_total", kind="on_demand") > 0,
                      timeout=10)
    after = scrape(monitoring.exposition().decode())
    assert grew("tollgate_export_rows_total", kind="on_demand") == len(events)
    assert grew("tollgate_export_duration_seconds_count", kind="on_demand", status="success") == 1
    assert grew("tollgate_limits_refresh_seconds_count", status="ok") == 1
