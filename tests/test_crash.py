"""(c) An ingest process SIGKILLed mid-stream, several times, still stores every event exactly once.

The worker is a real `tollgate ingest` process with its own embedded warehouse (one
chdb directory per process), so the test reads that warehouse from a subprocess
after the last worker exited.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import polars as pl
from conftest import committed_total, wait_until
from ingest_procs import CLI, assert_exactly_once, ingest_env, make_stream, spawned_workers, stored_totals


def test_sigkilled_worker_counts_every_event_once(settings, producer, broker, org, tmp_path):
    """A 200k-event stream (2,000 of them sent twice), the `tollgate ingest` process SIGKILLed five times."""
    expected, total = make_stream(producer, settings, org, 200_000, resent=2_000)
    rng = random.Random(7)  # when to kill
    env = ingest_env(settings, broker, tmp_path, batch_size=5_000)
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
    starts a new one, which resumes from the committed offsets. Half the stream is produced
    after the kill, so the kill lands mid-stream however fast the first half was consumed."""
    env = ingest_env(settings, broker, tmp_path)
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    topic = settings.topic_gateway_logs
    group = f"{settings.ingest_consumer_group}.{topic}"
    progress = lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions)  # noqa: E731

    owner = subprocess.Popen([*CLI, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert owner.stdout.readline().startswith(b"ingest:")
    first, first_total = make_stream(producer, settings, org, 10_000, resent=100, seed=1)
    assert wait_until(lambda: progress() > 0, timeout=60)
    workers = spawned_workers(owner.pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    second, second_total = make_stream(producer, settings, org, 10_000, resent=100, seed=2)
    assert wait_until(lambda: progress() >= first_total + second_total, timeout=120, interval=0.3)
    assert spawned_workers(owner.pid) and spawned_workers(owner.pid) != workers  # a replacement runs
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(60) == 0, owner.stderr.read().decode()[-2000:]
    assert_exactly_once(stored_totals(env, org), pl.concat([first, second]))
