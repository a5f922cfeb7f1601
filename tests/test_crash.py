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


def ingest_env(settings, broker, tmp_path) -> dict[str, str]:
    return {
        **os.environ,
        "TOLLGATE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'warehouse'}",
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


def stored_totals(env: dict[str, str], org: str) -> dict:
    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, env["TOLLGATE_CLICKHOUSE_DSN"], org], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def make_stream(producer, settings, org: str, n: int, resent: int) -> tuple[pl.DataFrame, int]:
    """n events, ``resent`` of them sent twice (a gateway retry): the expected totals and the offsets to reach."""
    rng = random.Random(2024)
    events = [gateway_log(org, rng=rng) for _ in range(n)]
    redelivered = rng.sample(events, resent)
    ends = publish(producer, settings.topic_gateway_logs, events + redelivered)
    assert sum(ends.values()) == n + resent
    expected = pl.DataFrame({"id": [e["_id"] for e in events], "cost": [e["metrics"]["cost"] for e in events],
                             "units": [e["metrics"]["total_units"] for e in events]})
    return expected, n + resent


def assert_exactly_once(stored: dict, expected: pl.DataFrame) -> None:
    assert stored["count"] == expected.height == stored["distinct"]
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6
    assert stored["units"] == expected["units"].sum()
    # the physical table may hold re-delivered copies until merges run; FINAL never shows them
    assert stored["physical"] >= stored["count"]


CLI = [sys.executable, "-m", "tollgate.cli"]


def spawned_workers(parent: int) -> list[int]:
    """Ingest worker processes of ``parent`` (multiprocessing spawn children, not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_sigkilled_worker_counts_every_event_once(settings, producer, broker, org, tmp_path):
    expected, total = make_stream(producer, settings, org, 40_000, resent=800)
    rng = random.Random(7)  # when to kill
    env = ingest_env(settings, broker, tmp_path)
    cli = CLI
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
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
    worker = subprocess.Popen([*cli, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert worker.stdout.readline().startswith(b"ingest:")  # started, signal handlers installed
    assert wait_until(lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions) >= total, timeout=180, interval=0.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.stderr.read().decode()[-2000:]

    stored = stored_totals(env, org)
    assert_exactly_once(stored, expected)
    print(f"kills at committed offsets {progress_at_kill}; physical rows {stored['physical']} for {stored['count']} events")


def test_killed_worker_process_is_replaced_and_nothing_is_lost(settings, producer, broker, org, tmp_path):
    """SIGKILL only the decoding worker process (not the warehouse owner): the supervisor
    starts a new one, which resumes from the committed offsets."""
    expected, total = make_stream(producer, settings, org, 20_000, resent=200)
    env = ingest_env(settings, broker, tmp_path)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    topic = settings.topic_gateway_logs
    group = f"{settings.ingest_consumer_group}.{topic}"
    progress = lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions)  # noqa: E731

    owner = subprocess.Popen([*CLI, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert owner.stdout.readline().startswith(b"ingest:")
    assert wait_until(lambda: progress() > 0, timeout=60)
    workers = spawned_workers(owner.pid)
    assert len(workers) == 1, workers
    killed_at = progress()
    os.kill(workers[0], signal.SIGKILL)
    assert wait_until(lambda: progress() >= total, timeout=120, interval=0.3)
    assert spawned_workers(owner.pid) and spawned_workers(owner.pid) != workers  # a replacement runs
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(60) == 0, owner.stderr.read().decode()[-2000:]
    assert killed_at < total, "the kill must land mid-stream"
    assert_exactly_once(stored_totals(env, org), expected)
