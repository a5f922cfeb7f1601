"""`tollgate up` as a newcomer runs it: one process, seed from a second shell, read back, stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tollgate.broker import free_port

CLI = [sys.executable, "-m", "tollgate.cli"]


class Stack:
    def __init__(self, data_dir, port: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        self.env = {**env, "TOLLGATE_DATA_DIR": str(data_dir), "TOLLGATE_RETENTION_DAYS": "0",
                    "TOLLGATE_INGEST_BATCH_SECONDS": "0.2"}
        self.proc = subprocess.Popen([*CLI, "up", "--port", str(port)], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "tollgate is ready" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 90) -> None:
        if not self.ready.wait(timeout):
            self.proc.kill()
            raise AssertionError(f"not ready: {self.lines} {self.proc.stderr.read()[-3000:]}")

    def admin_key(self) -> str | None:
        keys = [line.strip() for line in self.lines if line.strip().startswith("tg-")]
        return keys[0] if keys else None

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        time.sleep(0.1)
        return code


def test_up_seed_read_stop(tmp_path):
    port = free_port()
    stack = Stack(tmp_path, port)
    stack.wait_ready()
    key = stack.admin_key()
    assert key, stack.lines
    assert any(f"API: http://127.0.0.1:{port}/v1" in line for line in stack.lines)
    info = json.loads((tmp_path / "stack.json").read_text())
    assert info["pid"] == stack.proc.pid and info["embedded_broker"] is True

    seeded = subprocess.run([*CLI, "seed", "--events", "400", "--days", "1", "--seed", "3"], env=stack.env,
                            capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    log_id = seeded.stdout.split("last log id: ")[1].split()[0]

    with httpx.Client(base_url=stack.url, headers={"x-portkey-api-key": key}, timeout=10) as http:
        assert http.get("/v1/health").json() == {"status": "ok"}
        assert http.get("/v1/ready").json() == {"status": "ready", "clickhouse": "ok", "kafka": "ok"}
        deadline = time.monotonic() + 60
        while (r := http.get(f"/v1/logs/{log_id}")).status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["_id"] == log_id and body["organisation_id"] == "default-org"
        assert body["metrics"]["workspace_slug"] == "default"
        assert http.get("/docs").status_code == 200
        # /metrics (no key) adds up what the ingest worker processes stored: the 400 seeded gateway logs
        events = 'tollgate_ingest_events_total{topic="tollgate.gateway-logs"} 400.0'
        deadline = time.monotonic() + 30
        while events not in (metrics := httpx.get(f"{stack.url}/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert events in metrics, [line for line in metrics.splitlines() if "ingest_events" in line]
        assert "/v1/logs/{logId}" in http.get("/openapi.json").json()["paths"]

    # the embedded warehouse is held by the running stack: keys create says so, without a traceback
    busy = subprocess.run([*CLI, "keys", "create", "--org", "o"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert busy.returncode != 0 and "another process" in busy.stderr and "Traceback" not in busy.stderr

    assert stack.stop() == 0, stack.proc.stderr.read()[-3000:]
    assert stack.lines[-1] == "stopped"
    assert not (tmp_path / "stack.json").exists()

    # a restart keeps the data and the keys, and creates no second admin key
    again = Stack(tmp_path, port)
    again.wait_ready()
    assert again.admin_key() is None
    r = httpx.get(f"{again.url}/v1/logs/{log_id}", headers={"x-portkey-api-key": key})
    assert r.status_code == 200
    assert again.stop() == 0


def _run(*args, env=None, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env or os.environ, capture_output=True, text=True, timeout=timeout)


def test_bad_numbers_and_names_are_usage_errors_not_tracebacks(tmp_path):
    for args, named in [(["up", "--ingest-workers", "-1"], "--ingest-workers"), (["ingest", "--workers", "0"], "--workers"),
                        (["settle", "--max-days", "0"], "--max-days"), (["seed", "--events", "-5"], "--events"),
                        (["seed", "--days", "0"], "--days"), (["--log-level", "bogus", "migrate"], "--log-level")]:
        r = _run(*args, "--data-dir" if args[0] != "--log-level" else "--data-dir", str(tmp_path / "d"))
        assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])
    r = _run("keys", "create", "--org", " ", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "--org" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
    for data_dir in (tmp_path / "missing", tmp_path / "empty"):  # no warehouse: settle creates none
        (tmp_path / "empty").mkdir(exist_ok=True)
        r = _run("settle", "--data-dir", str(data_dir))
        assert r.returncode == 1 and "no embedded warehouse" in r.stderr, r.stderr[-500:]
        assert not (data_dir / "warehouse").exists()
    # a warehouse named by an explicit chdb DSN (not under the data dir) is settled
    env = {**os.environ, "TOLLGATE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'wh'}"}
    assert _run("migrate", env=env).returncode == 0
    r = _run("settle", env=env)
    assert r.returncode == 0 and r.stdout.startswith("settled 0 day(s)"), r.stderr[-500:]


def test_ingest_on_a_data_dir_another_process_holds_exits_with_an_error(tmp_path, broker):
    """The embedded engine opens a data dir in one process only: `tollgate ingest` beside a running stack must
    fail at once, not join the consumer group with workers whose inserts can never succeed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom warehouse.client import connect\n"
                               f"held = connect('chdb://{tmp_path / 'warehouse'}')\nheld.command('SELECT 1')\nprint('held', flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "TOLLGATE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'warehouse'}", "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap,
               "TOLLGATE_TOPIC_GATEWAY_LOGS": f"held-{free_port()}"}
        r = _run("ingest", env=env, timeout=60)
        assert r.returncode == 1 and "error: cannot open the embedded warehouse" in r.stderr, r.stderr[-800:]
        assert "Traceback" not in r.stderr, r.stderr[-800:]
        assert "ingest:" not in r.stdout  # no worker started
    finally:
        holder.kill()
        holder.wait()


def test_settle_uses_the_configured_most_days(settings, warehouse, monkeypatch, capsys):
    """`tollgate settle` is what `up` runs: without --max-days it merges at most TOLLGATE_SETTLE_MAX_DAYS days."""
    import argparse
    import random
    import uuid
    from datetime import UTC, datetime

    from factories import gateway_log
    from ingest.events import GENERATIONS
    from ingest.sink import insert_rows
    from tollgate.cli import cmd_settle

    org = f"org-{uuid.uuid4().hex[:8]}"
    rng = random.Random(101)
    for day in (3, 4, 5):
        for _ in range(2):  # two parts per day: unsettled
            insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(json.dumps(gateway_log(
                org, rng=rng, created_at=datetime(2025, 1, day, 12, tzinfo=UTC))).encode())])
    monkeypatch.setenv("TOLLGATE_SETTLE_MAX_DAYS", "1")
    monkeypatch.delenv("TOLLGATE_CLICKHOUSE_DSN", raising=False)
    assert cmd_settle(argparse.Namespace(data_dir=str(settings.data_dir), max_days=None)) == 0
    assert capsys.readouterr().out.startswith("settled 1 day(s)")


def test_a_busy_metrics_port_stops_ingest_at_once(tmp_path, broker):
    """The metrics port is bound before any worker starts: a busy one is an error line and exit 1, not a
    traceback followed by a process that hangs on its running workers."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "TOLLGATE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'warehouse'}", "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap,
               "TOLLGATE_METRICS_HOST": "127.0.0.1", "TOLLGATE_METRICS_PORT": str(busy.getsockname()[1])}
        r = _run("ingest", env=env, timeout=60)
    assert r.returncode == 1 and "error:" in r.stderr and "in use" in r.stderr and "Traceback" not in r.stderr, r.stderr[-800:]
    assert "ingest:" not in r.stdout


def test_a_killed_parent_takes_the_embedded_broker_with_it():
    """`tollgate up` SIGKILLed (an orchestrator, the grace timeout) must not leave its broker running."""
    parent = subprocess.Popen([sys.executable, "-c", "import time\nfrom tollgate.broker import EmbeddedBroker\n"
                               "b = EmbeddedBroker().start()\nprint(b.process.pid, flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())
    os.kill(broker_pid, 0)  # running
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(broker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(broker_pid, signal.SIGKILL)
    raise AssertionError("the broker outlived its killed parent")


def test_a_busy_port_is_an_error_line_and_up_keeps_no_unseen_admin_key(tmp_path, broker):
    """A busy API or metrics port: one `error:` line naming it, exit 1, no traceback. `tollgate up` creates its
    admin key only once it cannot fail any more: a key it never printed would leave the operator without one."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run("api", "--port", str(port), "--data-dir", str(tmp_path / "api"),
                 env={**os.environ, "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap})
        assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-800:]
        env = {**os.environ, "TOLLGATE_METRICS_HOST": "127.0.0.1", "TOLLGATE_METRICS_PORT": str(port)}
        r = _run("up", "--port", str(free_port()), "--data-dir", str(tmp_path / "up"), env=env)
        assert r.returncode == 1 and "TOLLGATE_METRICS_PORT" in r.stderr and "Traceback" not in r.stderr, r.stderr[-800:]
    keys = subprocess.run([sys.executable, "-c", "import sys\nfrom warehouse.client import connect\n"
                           "print(connect(sys.argv[1]).command('SELECT count() FROM api_keys'))",
                           f"chdb://{tmp_path / 'up' / 'warehouse'}"], capture_output=True, text=True, check=True)
    assert keys.stdout.strip() == "0"


def test_the_embedded_warehouse_opens_with_the_uncompressed_cache(base_settings, warehouse, tmp_path):
    """TOLLGATE_UNCOMPRESSED_CACHE_MB reaches chdb as a startup option of the DSN (the engine's default is 0,
    off), and the DSN's options never become part of the data dir's path."""
    from tollgate.settings import Settings
    from warehouse.client import chdb_path

    if not base_settings.is_embedded_warehouse:
        pytest.skip("a ClickHouse server has its own uncompressed_cache_size")
    size = warehouse.command("SELECT value FROM system.server_settings WHERE name = 'uncompressed_cache_size'")
    assert int(size) == base_settings.uncompressed_cache_mb * 2**20 > 0
    assert chdb_path(base_settings.warehouse_dsn) == str((base_settings.data_dir / "warehouse").resolve())
    assert Settings(data_dir=tmp_path, uncompressed_cache_mb=0).warehouse_dsn == f"chdb://{(tmp_path / 'warehouse').resolve()}"
    assert Settings(data_dir=tmp_path, uncompressed_cache_mb=64).warehouse_dsn.endswith(f"?uncompressed_cache_size={64 * 2**20}")
