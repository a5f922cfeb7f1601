"""Helpers of the tests that run ingest as real subprocesses (crash and fault tests): the
environment of a `tollgate ingest`/`up` with its own embedded warehouse, the stream to
produce with its independently computed totals, and reading the totals back."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import polars as pl

from conftest import publish
from factories import gateway_log

CLI = [sys.executable, "-m", "tollgate.cli"]

COUNT_SCRIPT = """
import json, sys
from warehouse.client import connect
c = connect(sys.argv[1])
q = lambda sql: c.query(sql, parameters={"o": sys.argv[2]}).result_rows[0]
final = q("SELECT count(), uniqExact(id), sum(cost), sum(total_units) FROM generations FINAL WHERE organisation_id = {o:String}")
raw = q("SELECT count() FROM generations WHERE organisation_id = {o:String}")
print(json.dumps({"count": final[0], "distinct": final[1], "cost": final[2], "units": final[3], "physical": raw[0]}))
"""


def ingest_env(settings, broker, tmp_path, batch_size: int = 1500) -> dict[str, str]:
    return {
        **os.environ,
        "TOLLGATE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'warehouse'}",
        "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "TOLLGATE_TOPIC_GATEWAY_LOGS": settings.topic_gateway_logs,
        "TOLLGATE_TOPIC_FEEDBACK": settings.topic_feedback,
        "TOLLGATE_TOPIC_AUDIT": settings.topic_audit,
        "TOLLGATE_TOPIC_DEAD_LETTER": settings.topic_dead_letter,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLGATE_INGEST_CONSUMER_GROUP": settings.ingest_consumer_group,
        "TOLLGATE_INGEST_BATCH_SIZE": str(batch_size),
        "TOLLGATE_INGEST_BATCH_SECONDS": "0.3",
        "TOLLGATE_DATA_DIR": str(tmp_path),
    }


def stored_totals(env: dict[str, str], org: str) -> dict:
    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, env["TOLLGATE_CLICKHOUSE_DSN"], org], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def make_stream(producer, settings, org: str, n: int, resent: int, seed: int = 2024) -> tuple[pl.DataFrame, int]:
    """n events, ``resent`` of them sent twice (a gateway retry): the expected totals and the offsets to reach."""
    rng = random.Random(seed)
    events = [gateway_log(org, rng=rng) for _ in range(n)]
    redelivered = rng.sample(events, resent)
    publish(producer, settings.topic_gateway_logs, events + redelivered)  # every one acknowledged
    expected = pl.DataFrame({"id": [e["_id"] for e in events], "cost": [e["metrics"]["cost"] for e in events],
                             "units": [e["metrics"]["total_units"] for e in events]})
    return expected, n + resent


def assert_exactly_once(stored: dict, expected: pl.DataFrame) -> None:
    assert stored["count"] == expected.height == stored["distinct"]
    assert abs(stored["cost"] - expected["cost"].sum()) < 1e-6
    assert stored["units"] == expected["units"].sum()
    # the physical table may hold re-delivered copies until merges run; FINAL never shows them
    assert stored["physical"] >= stored["count"]


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


_WORKER = re.compile(r"^ingest-worker-\d+\[(\d+)\]$")
_ASSIGNED = re.compile(r"^(\S+)-\d+: partitions assigned \[(.*)\]$")
_STOPPED = re.compile(r"^(\S+)-\d+: stopped after (\{.*\})$")


def consumer_lines(log_text: str, pattern: re.Pattern) -> list[tuple]:
    """(worker pid, *groups of ``pattern``) of each ingest.consumer line of a JSON log (docs/operations.md)
    whose message matches."""
    found = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        worker = _WORKER.match(str(record.get("process", "")))
        match = pattern.match(record.get("message", "")) if record.get("logger") == "ingest.consumer" else None
        if worker and match:
            found.append((int(worker.group(1)), *match.groups()))
    return found


def assignments(log_text: str, topic: str) -> list[tuple[int, set[int]]]:
    """(worker pid, partitions) of every assignment of ``topic`` an ingest log at INFO shows, in order."""
    found = []
    for pid, t, parts in consumer_lines(log_text, _ASSIGNED):
        if t == topic:
            found.append((pid, {int(p) for name, p in re.findall(r"\('([^']*)', (\d+)\)", parts) if name == topic}))
    return found


def current_assignment(log_text: str, topic: str, alive: set[int] | None = None) -> dict[int, set[int]]:
    """The latest assignment of each worker pid (of ``alive`` ones, when given)."""
    latest: dict[int, set[int]] = {}
    for pid, parts in assignments(log_text, topic):
        if alive is None or pid in alive:
            latest[pid] = parts
    return latest


def final_stats(log_text: str, topic: str) -> dict[int, dict]:
    """The counters each worker's consumer of ``topic`` logged when it stopped (by pid)."""
    import ast

    return {pid: ast.literal_eval(stats) for pid, t, stats in consumer_lines(log_text, _STOPPED) if t == topic}
