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
