"""SIGTERM: every role finishes its batch, commits and exits within TOLLGATE_SHUTDOWN_GRACE_SECONDS; past the
grace it exits anyway (code 1, logged) and what it had not committed is re-delivered: nothing lost, nothing
counted twice. The roles are real `tollgate` processes, each with its own embedded warehouse."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import committed_total, wait_until
from ingest_procs import CLI, assert_exactly_once, ingest_env, make_stream, spawned_workers, stored_totals
from tollgate.broker import free_port


def start_ingest(env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"ingest:")  # started, signal handlers installed
    return proc


def prepare(settings, broker, tmp_path, grace: int, **extra: str):
    """A migrated warehouse of its own, the env of `tollgate ingest` with ``grace``, and its committed total."""
    env = {**ingest_env(settings, broker, tmp_path), "TOLLGATE_SHUTDOWN_GRACE_SECONDS": str(grace), **extra}
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    topic = settings.topic_gateway_logs
    group = f"{settings.ingest_consumer_group}.{topic}"
    return env, lambda: committed_total(broker.bootstrap, group, topic, settings.topic_partitions)


def finish_and_check(env: dict[str, str], progress, total: int, org: str, expected) -> None:
    """A restarted ingest reads the rest (and what was not committed) and stops cleanly: exact totals."""
    again = start_ingest(env)
    assert wait_until(lambda: progress() >= total, timeout=180, interval=0.3)
    again.send_signal(signal.SIGTERM)
    assert again.wait(45) == 0, again.stderr.read().decode()[-2000:]
    assert_exactly_once(stored_totals(env, org), expected)


def scraped_events(port: int, topic: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "tollgate_ingest_events_total" and s.labels.get("topic") == topic)


def test_sigterm_mid_stream_drains_commits_and_loses_nothing(settings, producer, broker, org, tmp_path):
    expected, total = make_stream(producer, settings, org, 60_000, resent=0)
    port = free_port()
    env, progress = prepare(settings, broker, tmp_path, 30, TOLLGATE_METRICS_PORT=str(port))
    topic = settings.topic_gateway_logs

    worker = start_ingest(env)
    assert wait_until(lambda: progress() > 0, timeout=60, interval=0.1)
    # the ingest role has no API: its metrics server counts what its worker process stored
    assert wait_until(lambda: scraped_events(port, topic) > 0, timeout=10)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30 + 15) == 0, worker.stderr.read().decode()[-2000:]
    committed = progress()
    assert 0 < committed < total, "the SIGTERM must land mid-stream; make the stream longer"
    # drained: every stored row is committed and every committed offset is stored
    assert stored_totals(env, org)["count"] == committed

    finish_and_check(env, progress, total, org, expected)


def test_past_the_grace_period_it_exits_anyway_and_nothing_is_lost(settings, producer, broker, org, tmp_path):
    """A worker that cannot drain (stopped with SIGSTOP mid-stream): the role exits with code 1 after the grace,
    saying so; a restart re-reads what was not committed."""
    expected, total = make_stream(producer, settings, org, 30_000, resent=300)
    env, progress = prepare(settings, broker, tmp_path, 4)

    owner = start_ingest(env)
    assert wait_until(lambda: progress() > 0, timeout=60, interval=0.1)
    [stuck] = spawned_workers(owner.pid)
    os.kill(stuck, signal.SIGSTOP)
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(4 + 20) == 1
    err = owner.stderr.read().decode()
    assert "grace period" in err, err[-2000:]
    assert wait_until(lambda: not os.path.exists(f"/proc/{stuck}"), timeout=10)  # the stuck worker died with it
    assert progress() < total, "the SIGTERM must land mid-stream"

    finish_and_check(env, progress, total, org, expected)


def test_api_and_scheduler_roles_stop_cleanly_on_sigterm(settings, broker, tmp_path):
    env, _ = prepare(settings, broker, tmp_path, 20, TOLLGATE_LIMITS_INTERVAL="0.5")
    port = free_port()
    api = subprocess.Popen([*CLI, "api", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert api.stdout.readline().startswith(b"API:")
    assert httpx.get(f"http://127.0.0.1:{port}/v1/ready", timeout=10).status_code == 200
    api.send_signal(signal.SIGTERM)
    assert api.wait(20 + 10) == 0, api.stderr.read().decode()[-2000:]

    scheduler = subprocess.Popen([*CLI, "scheduler"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_until(lambda: b"holds the lease" in scheduler.stdout.readline(), timeout=60)
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(20 + 10) == 0, scheduler.stderr.read().decode()[-2000:]
