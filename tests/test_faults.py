"""Scale-out and faults (issue 7): N consumers sharing a topic, a consumer that stalls or dies,
a partition that moves mid-batch, a warehouse outage, a broker outage, poison pills.

Everything is real: the Tansu broker, chdb, `tollgate up` / `tollgate ingest` subprocesses,
SIGSTOP and SIGKILL. Expected totals come from the generated events (Polars), never from
the code under test.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid

import httpx
import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, given, settings as hyp_settings, strategies as st
from kafka import KafkaConsumer

from analytics_api.app import create_app
from analytics_api.publish import Publisher
from conftest import committed_offsets, committed_total, publish, read_topic, serve, wait_until
from factories import gateway_log
from ingest.consumer import IngestConsumer
from ingest.dead_letter import DeadLetterQueue
from ingest.events import GENERATIONS
from ingest.producer import ensure_topics
from ingest.sink import DirectSink
from ingest.workers import IngestWorkers
from ingest_procs import (
    CLI, assert_exactly_once, current_assignment, final_stats, ingest_env, make_stream, spawned_workers, stored_totals,
)
from tollgate.broker import EmbeddedBroker, free_port

PARTITIONS = 6


@pytest.fixture
def settings6(settings, broker):
    """This test's topics and group, with the production partition count (6)."""
    suffix = uuid.uuid4().hex[:8]
    s = settings.model_copy(update=dict(
        topic_gateway_logs=f"s{suffix}.gateway-logs", topic_feedback=f"s{suffix}.feedback",
        topic_audit=f"s{suffix}.audit", topic_dead_letter=f"s{suffix}.dead-letter",
        ingest_consumer_group=f"g{suffix}", topic_partitions=PARTITIONS,
    ))
    ensure_topics(broker.bootstrap, s.all_topics, PARTITIONS)
    return s


def final_totals(client, org: str) -> dict:
    count, distinct, cost, units = client.query(
        "SELECT count(), uniqExact(id), sum(cost), sum(total_units) FROM generations FINAL WHERE organisation_id = {o:String}",
        parameters={"o": org}).result_rows[0]
    physical = client.command("SELECT count() FROM generations WHERE organisation_id = {o:String}", parameters={"o": org})
    return {"count": count, "distinct": distinct, "cost": cost, "units": units, "physical": int(physical)}


def expected_of(events: list[dict]) -> pl.DataFrame:
    return pl.DataFrame({"id": [e["_id"] for e in events], "cost": [e["metrics"]["cost"] for e in events],
                         "units": [e["metrics"]["total_units"] for e in events]}).unique("id")


# --------------------------------------------------------------------------- scale-out, stall, crash (embedded `up`)


def test_two_workers_share_the_partitions_survive_a_stall_and_a_kill(settings6, producer, broker, org, tmp_path):
    """`tollgate up --ingest-workers 2`: both worker processes get part of the 6 partitions. Under
    load one is SIGSTOPped past the session timeout (its partitions move to the other, which keeps
    committing), resumed, then the other one is SIGKILLed (the supervisor replaces it). Every
    event is stored exactly once."""
    s = settings6
    topic, group = s.topic_gateway_logs, f"{s.ingest_consumer_group}.{s.topic_gateway_logs}"
    env = {**ingest_env(s, broker, tmp_path, batch_size=2_000), "TOLLGATE_SETTLE_INTERVAL_SECONDS": "0",
           "TOLLGATE_RETENTION_DAYS": "0", "TOLLGATE_TOPIC_LIMIT_ALERTS": f"{topic}.alerts",
           "TOLLGATE_TOPIC_LIMITS_STATE": f"{topic}.limits"}
    progress = lambda: committed_total(broker.bootstrap, group, topic, PARTITIONS)  # noqa: E731
    expected, total = make_stream(producer, s, org, 30_000, resent=300, seed=1)
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log_file:
        up = subprocess.Popen([*CLI, "--log-level", "INFO", "up", "--ingest-workers", "2", "--port", str(free_port())],
                              env=env, stdout=subprocess.PIPE, stderr=log_file)
    logs = log_path.read_text
    try:
        assert wait_until(lambda: b"tollgate is ready" in up.stdout.readline(), timeout=90)
        workers = set(spawned_workers(up.pid))
        assert len(workers) == 2, workers

        # scale-out: both workers hold partitions of the topic, disjoint, together all six
        def split() -> bool:
            now = current_assignment(logs(), topic, workers)
            return len(now) == 2 and all(now.values()) and sorted(p for ps in now.values() for p in ps) == list(range(PARTITIONS))
        assert wait_until(split, timeout=60), current_assignment(logs(), topic)
        assert wait_until(lambda: progress() >= total, timeout=120), progress()

        # a stall under load: worker A stops (SIGSTOP) past the 6 s session timeout
        stalled, other = sorted(workers)
        more_a, n_a = make_stream(producer, s, org, 20_000, resent=200, seed=2)
        expected, total = pl.concat([expected, more_a]), total + n_a
        os.kill(stalled, signal.SIGSTOP)
        try:
            assert wait_until(lambda: current_assignment(logs(), topic, {other}).get(other) == set(range(PARTITIONS)),
                              timeout=40), current_assignment(logs(), topic)
            assert wait_until(lambda: progress() >= total, timeout=60), "the other worker did not take over"
        finally:
            os.kill(stalled, signal.SIGCONT)

        # the resumed worker rejoins: the other one gives part of the partitions back
        assert wait_until(lambda: 0 < len(current_assignment(logs(), topic, {other})[other]) < PARTITIONS, timeout=40)

        # a crash under load: the other worker is SIGKILLed while it consumes one half of a stream,
        # and replaced; the second half is produced after the kill (so the kill is mid-stream even
        # when a fast machine has consumed the whole first half by then)
        before = progress()  # read before producing: a fast worker may commit the whole half before make_stream returns
        more_b, n_b = make_stream(producer, s, org, 15_000, resent=150, seed=3)
        expected, total = pl.concat([expected, more_b]), total + n_b
        assert wait_until(lambda: progress() > before, timeout=30)
        os.kill(other, signal.SIGKILL)
        more_c, n_c = make_stream(producer, s, org, 15_000, resent=150, seed=4)
        expected, total = pl.concat([expected, more_c]), total + n_c
        assert wait_until(lambda: progress() >= total, timeout=120), progress()
        replacement = set(spawned_workers(up.pid)) - workers
        assert len(replacement) == 1, spawned_workers(up.pid)
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(90)
    assert code == 0, logs()[-3000:]

    stats = final_stats(logs(), topic)  # what each surviving consumer counted, logged at its clean stop
    assert set(stats) == {stalled, *replacement}, stats
    assert stats[stalled]["consumed"] > 0 and stats[stalled]["inserted"] > 0, stats
    assert_exactly_once(stored_totals(env, org), expected)


@pytest.mark.skipif(not os.environ.get("TOLLGATE_TEST_CLICKHOUSE_URL"),
                    reason="the multi-process form needs a ClickHouse server: set TOLLGATE_TEST_CLICKHOUSE_URL")
def test_separate_ingest_processes_share_the_topic_on_a_server(settings6, producer, broker, org, tmp_path):
    """Two `tollgate ingest` processes against a ClickHouse server, one SIGKILLed mid-stream."""
    from warehouse.client import connect

    s = settings6
    topic = s.topic_gateway_logs
    group = f"{s.ingest_consumer_group}.{topic}"
    dsn = os.environ["TOLLGATE_TEST_CLICKHOUSE_URL"]
    env = {**ingest_env(s, broker, tmp_path, batch_size=2_000), "TOLLGATE_CLICKHOUSE_DSN": dsn}
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    progress = lambda: committed_total(broker.bootstrap, group, topic, PARTITIONS)  # noqa: E731
    expected, total = make_stream(producer, s, org, 60_000, resent=600, seed=4)
    logs = [tmp_path / f"ingest-{i}.log" for i in range(2)]
    procs = []
    for path in logs:
        with open(path, "wb") as f:
            procs.append(subprocess.Popen([*CLI, "--log-level", "INFO", "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=f))
    try:
        both = lambda: all(any(current_assignment(p.read_text(), topic).values()) for p in logs)  # noqa: E731 - partitions in each
        assert wait_until(both, timeout=60), [current_assignment(p.read_text(), topic) for p in logs]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        assert wait_until(lambda: progress() >= total, timeout=180), progress()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
    assert_exactly_once(final_totals(connect(dsn), org), expected)


# --------------------------------------------------------------------------- a partition moves mid-batch


def test_partition_moved_mid_batch_is_reread_by_the_new_owner_and_counted_once(settings6, producer, broker, warehouse, org):
    """Consumer A inserts its first batch (two thirds of the events, from all six partitions) and
    stalls before it commits; its second batch waits behind it. Consumer B joins the group, takes
    half of the partitions and re-reads and re-inserts events A already stored. A abandons both
    batches: the first is never committed, the second is read again from the committed offsets
    (also on the partitions A keeps). Every event is stored once, every offset committed."""
    s = settings6
    rng = random.Random(11)
    events = [gateway_log(org, rng=rng) for _ in range(6_000)]
    ends = publish(producer, s.topic_gateway_logs, events)
    per_partition = sorted(ends.get(p, 0) for p in range(PARTITIONS))
    first = 4_000
    assert sum(per_partition[-3:]) < first  # so A's first batch holds events of whichever partitions B gets
    group = f"{s.ingest_consumer_group}.{s.topic_gateway_logs}"
    dlq = DeadLetterQueue(producer, s.topic_dead_letter)
    assert GENERATIONS.columns[0] == "id"
    ids = lambda rows: {orjson.loads(row)[0] for row in rows}  # noqa: E731 - the id of each encoded row
    a_first: set[str] = set()
    b_inserted: set[str] = set()
    stalled, release = threading.Event(), threading.Event()
    a_sink, b_sink = DirectSink(s.warehouse_dsn), DirectSink(s.warehouse_dsn)

    def insert_then_stall(codec, rows, metadata_values, traces=None):
        a_sink(codec, rows, metadata_values, traces)  # really inserted: ClickHouse acknowledged it
        if not a_first:
            a_first.update(ids(rows))
            stalled.set()
            release.wait(60)  # ...but the consumer hears of it only much later

    def insert_and_record(codec, rows, metadata_values, traces=None):
        b_sink(codec, rows, metadata_values, traces)
        b_inserted.update(ids(rows))

    def consumer(name: str, write, batch_size: int) -> IngestConsumer:
        return IngestConsumer(bootstrap=broker.bootstrap, topic=s.topic_gateway_logs, group_id=group, codec=GENERATIONS,
                              write=write, dead_letters=dlq, batch_size=batch_size, batch_seconds=3,
                              max_event_bytes=s.ingest_max_event_bytes, retry_max_seconds=1.0, name=name)

    a = consumer("A", insert_then_stall, batch_size=first)
    threads = [threading.Thread(target=a.run, daemon=True)]
    threads[0].start()
    b = None
    try:
        assert stalled.wait(60)
        assert len(a_first) == first
        assert wait_until(lambda: a.stats["consumed"] == len(events), timeout=30)  # the rest waits in A's second batch
        assert committed_total(broker.bootstrap, group, s.topic_gateway_logs, PARTITIONS) == 0
        b = consumer("B", insert_and_record, batch_size=500)
        threads.append(threading.Thread(target=b.run, daemon=True))
        threads[1].start()
        assert wait_until(lambda: b.stats["commits"] > 0, timeout=60), b.stats
        b_parts = {tp.partition for tp in b.consumer.assignment()}
        assert b_parts and len(b_parts) < PARTITIONS
        assert wait_until(lambda: b_inserted & a_first, timeout=30), "B did not re-insert what A had stored"
        release.set()  # A's insert "returns" now: it belongs to a generation before the rebalance
        assert wait_until(lambda: committed_offsets(broker.bootstrap, group, s.topic_gateway_logs, PARTITIONS)
                          == {p: ends.get(p, 0) for p in range(PARTITIONS)}, timeout=60), (
            committed_offsets(broker.bootstrap, group, s.topic_gateway_logs, PARTITIONS), ends, a.stats, b.stats)
    finally:
        release.set()
        for c in (a, b):
            if c is not None:
                c.stop()
        for t in threads:
            t.join(30)
    expected = expected_of(events)
    stored = final_totals(warehouse, org)
    assert stored["count"] == stored["distinct"] == expected.height
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6 and stored["units"] == expected["units"].sum()


# --------------------------------------------------------------------------- warehouse outage


class _Retries(logging.Handler):
    """Collects the insert retries the pipeline logs: (attempt, delay in seconds)."""

    PATTERN = re.compile(r"insert into generations failed \(attempt (\d+)\), retrying in ([\d.]+)s: .*outage injected")

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, float]] = []

    def emit(self, record):
        if m := self.PATTERN.search(record.getMessage()):
            self.seen.append((int(m.group(1)), float(m.group(2))))


def test_warehouse_outage_stops_commits_backs_off_and_drains(settings, producer, broker, warehouse, org, tmp_path):
    """Inserts fail while the fault file exists (TOLLGATE_INGEST_FAULT_FILE, checked at the client
    boundary): no offset is committed, retries back off with jitter, lag grows; when the file goes
    the lag drains to zero and every event is stored once."""
    fault = tmp_path / "warehouse-down"
    s = settings.model_copy(update={"ingest_fault_file": fault, "ingest_retry_max_seconds": 1.0})
    topic, group = s.topic_gateway_logs, f"{s.ingest_consumer_group}.{s.topic_gateway_logs}"
    committed = lambda: committed_total(broker.bootstrap, group, topic, s.topic_partitions)  # noqa: E731
    retries = _Retries()
    logging.getLogger("ingest.pipeline").addHandler(retries)
    pool = IngestWorkers(s, broker.bootstrap)
    pool.start()
    rng = random.Random(5)
    batches = [[gateway_log(org, rng=rng) for _ in range(2_000)] for _ in range(3)]
    try:
        produced = sum(publish(producer, topic, batches[0]).values())
        assert wait_until(lambda: committed() == produced, timeout=60)

        fault.touch()  # the warehouse is down
        lag = []
        for batch in batches[1:]:
            produced += len(batch)
            publish(producer, topic, batch)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                lag.append(produced - committed())
                time.sleep(0.25)
        assert committed() == len(batches[0]), "an offset was committed during the outage"
        assert lag == sorted(lag) and lag[-1] == produced - len(batches[0]), lag  # lag only grew
        attempts = [a for a, _ in retries.seen]
        assert max(attempts) >= 4, retries.seen
        delays = [d for _, d in retries.seen]
        assert all(d <= min(1.0, 0.1 * 2**a) + 0.01 for a, d in retries.seen), retries.seen  # exponential, capped
        assert len(set(delays)) > 1, retries.seen  # full jitter: not one fixed delay

        fault.unlink()  # back up
        drained = []
        assert wait_until(lambda: drained.append(produced - committed()) or drained[-1] == 0, timeout=60), drained
    finally:
        pool.stop()
        logging.getLogger("ingest.pipeline").removeHandler(retries)
    expected = expected_of([e for batch in batches for e in batch])
    stored = final_totals(warehouse, org)
    assert stored["count"] == stored["distinct"] == expected.height
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6 and stored["units"] == expected["units"].sum()


# --------------------------------------------------------------------------- broker outage


def ids_in_topic(bootstrap: str, topic: str, want: set[str], timeout: float = 30.0) -> set[str]:
    """Ids of the gateway logs in ``topic``, read from the beginning until ``want`` are all seen or the timeout."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             fetch_max_wait_ms=100)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while not want <= seen and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                seen.update(orjson.loads(r.value)["_id"] for r in batch)
    finally:
        consumer.close()
    return seen


def test_broker_outage_gives_503s_never_a_200_for_a_lost_event(settings, warehouse, org, make_key):
    """`POST /v1/logs` from four clients while the broker is stopped and a new one started on the
    same port: requests made while it is down are all 503; every 200 names events that are in
    Kafka (checked in the broker that answered); writes succeed again after the restart."""
    key = make_key(org, scopes=["logs.write"])
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    ensure_topics(broker.bootstrap, settings.all_topics, settings.topic_partitions)
    app = create_app(settings, broker.bootstrap, pool_size=1)
    app.state.publisher = Publisher(broker.bootstrap, timeout=2.0)
    results: list[tuple[float, float, int, list[str]]] = []  # (start, end, status, log ids)
    stop = threading.Event()
    rng = random.Random(3)

    def client(url: str) -> None:
        with httpx.Client(base_url=url, headers={"x-portkey-api-key": key}, timeout=30) as http:
            while not stop.is_set():
                body = [{"request": {"url": "https://api.openai.com/v1/chat/completions", "method": "POST",
                                     "body": {"model": "gpt-4o"}},
                         "response": {"status": 200, "body": {"usage": {"prompt_tokens": rng.randrange(1, 99),
                                                                        "completion_tokens": 1}}}}] * 3
                started = time.monotonic()
                r = http.post("/logs", json=body)
                ids = r.json().get("log_ids", []) if r.status_code == 200 else []
                results.append((started, time.monotonic(), r.status_code, ids))
                time.sleep(0.02)

    def ok_ids(since: float, until: float) -> set[str]:
        return {i for start, end, status, ids in results if status == 200 and start >= since and end <= until for i in ids}

    try:
        with serve(app) as url:
            threads = [threading.Thread(target=client, args=(url,), daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            assert wait_until(lambda: len(ok_ids(0, time.monotonic())) >= 60, timeout=30)
            before = ok_ids(0, time.monotonic())
            assert before <= ids_in_topic(broker.bootstrap, settings.topic_gateway_logs, before), \
                "a 200 for events that are not in Kafka"

            broker.stop()  # the outage
            down_at = time.monotonic()
            assert wait_until(lambda: sum(1 for start, _, st_, _ in results if start >= down_at) >= 8, timeout=60)
            restarting = time.monotonic()
            during = [st_ for start, end, st_, _ in results if start >= down_at and end <= restarting]
            assert during and set(during) == {503}, during
            assert not [r for r in results if r[0] >= down_at and r[0] < restarting and r[2] == 200]

            broker = EmbeddedBroker(port=port).start()  # a new, empty broker on the same address
            ensure_topics(broker.bootstrap, settings.all_topics, settings.topic_partitions)
            restarted = time.monotonic()
            assert wait_until(lambda: len(ok_ids(restarted, time.monotonic())) >= 30, timeout=60), "writes did not resume"
            stop.set()
            for t in threads:
                t.join(30)
            after = ok_ids(restarting, time.monotonic())
            assert after <= ids_in_topic(broker.bootstrap, settings.topic_gateway_logs, after), \
                "a 200 for events that are not in Kafka"
            assert {status for _, _, status, _ in results} <= {200, 503}, results
    finally:
        stop.set()
        app.state.publisher.close()
        broker.stop()


# --------------------------------------------------------------------------- poison pills


_I64 = (-(2**63), 2**63 - 1)  # what JSON encoders write
_finite = lambda **bounds: st.floats(allow_nan=False, allow_infinity=False, **bounds)  # noqa: E731 - NaN, ±inf dump as null
_WRONG_VALUES = st.one_of(st.text(max_size=20), st.lists(st.integers(*_I64), max_size=3), st.booleans())


@st.composite
def structured_but_wrong(draw, org: str) -> bytes:
    """A gateway log with one required field missing, or one typed field of a wrong type/range."""
    ev = gateway_log(org, rng=draw(st.randoms(use_true_random=False)))
    kind = draw(st.sampled_from(["drop", "cost", "tokens", "status", "created_at", "id"]))
    if kind == "drop":
        field = draw(st.sampled_from(["created_at", "organisation_id", "request", "response"]))
        del ev[field]
    elif kind == "cost":
        ev["metrics"]["cost"] = draw(_WRONG_VALUES | _finite(max_value=-1e-9) | st.just({"usd": 1}))
    elif kind == "tokens":
        # token counts are numbers in 0..2^32-1 (fractions are truncated, docs/events.md)
        ev["metrics"]["req_units"] = draw(_WRONG_VALUES | st.integers(_I64[0], -1) | _finite(max_value=-1e-9)
                                          | _finite(min_value=2.0**32))
    elif kind == "status":
        ev["response"]["status"] = draw(st.integers(_I64[0], 99) | st.integers(600, _I64[1]) | st.text(max_size=5))
    elif kind == "created_at":
        ev["created_at"] = draw(st.text(alphabet="abcxyz :-/", max_size=25) | st.integers(*_I64))
    else:
        ev["_id"], ev["metrics"]["id"] = (draw(st.integers(*_I64) | st.just("") | st.lists(st.text(), max_size=2)),) * 2
    return orjson.dumps(ev)


def _collect(strategy, n: int) -> list:
    """``n`` values drawn by hypothesis (generation only: the property is checked on all of them at once)."""
    drawn: list = []

    @hyp_settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value):
        drawn.append(value)

    draw()
    return drawn


@pytest.fixture
def poison_pills(org) -> tuple[list[bytes], list[bytes]]:
    """(1,000 random byte strings, 500 structured-but-wrong gateway logs), drawn before the
    producer and the workers start: their threads use the `random` module, which hypothesis
    takes for a strategy using it (HypothesisDeprecationWarning)."""
    junk = _collect(st.binary(max_size=400), 1_000)
    wrong = _collect(structured_but_wrong(org), 500)
    assert len(junk) == 1_000 and len(wrong) == 500
    return junk, wrong


def test_poison_pills_all_land_in_the_dead_letter_topic(poison_pills, settings, producer, broker, warehouse, workers, org):
    """1,000 random byte strings and 500 structured-but-wrong gateway logs, interleaved with 3,000
    good ones: every bad message is dead-lettered once with a reason, every good one stored once."""
    rng = random.Random(17)
    junk, wrong = poison_pills
    good = [gateway_log(org, rng=rng) for _ in range(3_000)]
    bad = junk + wrong
    mixed: list[bytes] = [orjson.dumps(e) for e in good] + bad
    rng.shuffle(mixed)
    topic = settings.topic_gateway_logs
    publish(producer, topic, mixed)

    dead = read_topic(broker.bootstrap, settings.topic_dead_letter, len(bad), timeout=90)
    assert len(dead) == len(bad)
    assert sorted(r.value or b"" for r in dead) == sorted(bad)  # each bad message, byte for byte, once
    reasons = [dict(r.headers)["tollgate.reason"].decode() for r in dead]
    assert all(reasons), "a dead letter without a reason"
    assert {dict(r.headers)["tollgate.source.topic"] for r in dead} == {topic.encode()}
    group = f"{settings.ingest_consumer_group}.{topic}"
    assert wait_until(lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions) == len(mixed), timeout=60)
    expected = expected_of(good)
    stored = final_totals(warehouse, org)
    assert stored["count"] == stored["distinct"] == expected.height
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6 and stored["units"] == expected["units"].sum()
