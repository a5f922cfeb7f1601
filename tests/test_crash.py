"""(c) An ingest worker SIGKILLed mid-stream, several times, still stores every event exactly once.

The worker is a real `tollgate ingest` process with its own embedded warehouse (one
chdb directory per process), so the test reads that warehouse from a subprocess
after the last worker exited.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from conftest import committed_total, publish, wait_until
from factories import gateway_log

COUNT_SCRIPT = """
import json, sys
from warehouse.client import connect
c = connect(sys.argv[1])
q = lambda sql: c.query(sql, parameters={"o": sys.argv[2]}).result_rows[0]
final = q("SELECT count(), uniqExact(id), sum(cost), sum(total_units) FROM generations FINAL WHERE organisation_id = {o:String}")
raw = q("SELECT count() FROM generations WHERE organisation_id = {o:String}")
print(json.dumps({"count": final[0], "distinct": final[1], "cost": final[2], "units": final[3], "physical": raw[0]}))
"""


def test_sigkilled_worker_counts_every_event_once(settings, producer, broker, org, tmp_path):
    rng = random.Random(2024)
    events = [gateway_log(org, rng=rng) for _ in range(40_000)]
    redelivered = rng.sample(events, 800)  # the gateway re-sent these: same event, twice
    ends = publish(producer, settings.topic_gateway_logs, events + redelivered)
    expected = pl.DataFrame({"id": [e["_id"] for e in events], "cost": [e["metrics"]["cost"] for e in events],
                             "units": [e["metrics"]["total_units"] for e in events]})

    dsn = f"chdb://{tmp_path / 'warehouse'}"
    env = {
        **os.environ,
        "TOLLGATE_CLICKHOUSE_DSN": dsn,
        "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "TOLLGATE_TOPIC_GATEWAY_LOGS": settings.topic_gateway_logs,
        "TOLLGATE_TOPIC_FEEDBACK": settings.topic_feedback,
        "TOLLGATE_TOPIC_AUDIT": settings.topic_audit,
        "TOLLGATE_TOPIC_DEAD_LETTER": settings.topic_dead_letter,
        "TOLLGATE_INGEST_CONSUMER_GROUP": settings.ingest_consumer_group,
        "TOLLGATE_INGEST_BATCH_SIZE": "1500",
        "TOLLGATE_INGEST_BATCH_SECONDS": "0.3",
        "TOLLGATE_DATA_DIR": str(tmp_path),
    }
    cli = [sys.executable, "-m", "tollgate.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    total = sum(ends.values())
    assert total == len(events) + len(redelivered)
    topic = settings.topic_gateway_logs
    group = f"{settings.ingest_consumer_group}.{topic}"

    kills = 0
    progress_at_kill = []
    while kills < 5:
        worker = subprocess.Popen([*cli, "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # let it commit something, then kill it at a random moment of a batch
        before = committed_total(broker.bootstrap, group, topic, settings.topic_partitions)
        wait_until(lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions) > before, timeout=60, interval=0.2)
        time.sleep(rng.uniform(0.05, 0.6))
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
        done = committed_total(broker.bootstrap, group, topic, settings.topic_partitions)
        progress_at_kill.append(done)
        if done >= total:
            break
    assert kills >= 3, f"the stream finished before the third kill ({progress_at_kill}); make it longer"
    assert progress_at_kill[0] < total, "the first kill must land mid-stream"

    # a last worker finishes the stream and stops gracefully
    worker = subprocess.Popen([*cli, "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_until(lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions) >= total, timeout=180, interval=0.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.stderr.read().decode()[-2000:]

    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, dsn, org], env=env, check=True, capture_output=True, text=True)
    stored = json.loads(out.stdout)
    assert stored["count"] == expected.height == stored["distinct"]
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6
    assert stored["units"] == expected["units"].sum()
    # the physical table may hold re-delivered copies until merges run; FINAL never shows them
    assert stored["physical"] >= stored["count"]
    print(f"kills at committed offsets {progress_at_kill}; physical rows {stored['physical']} for {stored['count']} events")
