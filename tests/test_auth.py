"""(d) Tenant isolation and 401/403/404, and `tollgate keys create`.

Organisations A and B each have stored logs (produced to Kafka, ingested by real
workers). A key only ever sees its own organisation (and, for a workspace key, its
own workspace): anything else is a 404 that reveals nothing of the other tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pytest
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from analytics_api.auth import HEADER, hash_key, new_key
from conftest import count_generations, wait_until
from factories import gateway_log
from ingest.producer import ensure_topics, make_producer
from ingest.workers import IngestWorkers
from warehouse.queries import api_keys

# --------------------------------------------------------------------------- stored logs of two organisations


@dataclass
class Tenants:
    org_a: str
    org_b: str
    a_ws1: dict
    a_ws2: dict
    b_ws1: dict


@pytest.fixture(scope="module")
def tenants(base_settings, broker, warehouse) -> Tenants:
    """Three logs, ingested once for the module: A/ws-1, A/ws-2 and B/ws-1 (same workspace name as A's)."""
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"t{suffix}.gateway-logs", topic_feedback=f"t{suffix}.feedback",
        topic_audit=f"t{suffix}.audit", topic_dead_letter=f"t{suffix}.dead-letter", ingest_consumer_group=f"g{suffix}",
    ))
    ensure_topics(broker.bootstrap, s.all_topics, s.topic_partitions)
    org_a, org_b = f"org-a-{suffix}", f"org-b-{suffix}"
    rng = random.Random(99)
    a_ws1 = gateway_log(org_a, workspace="ws-1", rng=rng)
    a_ws2 = gateway_log(org_a, workspace="ws-2", rng=rng)
    b_ws1 = gateway_log(org_b, workspace="ws-1", rng=rng, trace_id=f"trace-secret-{suffix}",
                        **{"metadata.key": ["_user"], "metadata.value": [f"b-secret-user-{suffix}"]})
    b_ws1["request"]["body"]["messages"][0]["content"] = f"b-secret-prompt-{suffix}"
    pool = IngestWorkers(s, broker.bootstrap)
    pool.start()
    producer = make_producer(broker.bootstrap)
    try:
        for ev in (a_ws1, a_ws2, b_ws1):
            producer.send(s.topic_gateway_logs, orjson.dumps(ev)).get(timeout=30)
        assert wait_until(lambda: count_generations(warehouse, org_a) == 2 and count_generations(warehouse, org_b) == 1,
                          timeout=60)
    finally:
        producer.close()
        pool.stop()
    return Tenants(org_a, org_b, a_ws1, a_ws2, b_ws1)


@pytest.fixture(scope="module")
def client(base_settings, broker, warehouse):
    with TestClient(create_app(base_settings, broker.bootstrap, pool_size=2)) as c:
        yield c


def get_log(client: TestClient, log_id: str, key: str | None):
    return client.get(f"/v1/logs/{log_id}", headers={HEADER: key} if key is not None else {})


def _b_secrets(t: Tenants) -> list[str]:
    m = t.b_ws1["metrics"]
    return [t.org_b, m["trace_id"], m["span_id"], m["metadata.value"][0], t.b_ws1["request"]["body"]["messages"][0]["content"],
            t.b_ws1["created_at"][:19]]


# --------------------------------------------------------------------------- 401


def test_no_key_is_401(client, tenants):
    r = get_log(client, tenants.a_ws1["_id"], None)
    assert r.status_code == 401
    assert HEADER in r.json()["detail"]


@pytest.mark.parametrize("key", ["garbage", new_key(), "tg-", " ", "x" * 5000], ids=["garbage", "unknown-tg-key", "prefix-only", "blank", "long"])
def test_unknown_key_is_401(client, tenants, key):
    r = get_log(client, tenants.a_ws1["_id"], key)
    assert r.status_code == 401, r.text
    assert tenants.org_a not in r.text


def test_revoked_key_is_401(client, tenants, make_key, warehouse):
    key = make_key(tenants.org_a)
    assert get_log(client, tenants.a_ws1["_id"], key).status_code == 200
    row = api_keys.find_by_hash(warehouse, hash_key(key))
    assert row is not None and row.status == "active"
    revoked = [row.id, row.key_hash, row.name, row.organisation_id, row.workspace_slug, list(row.scopes), "revoked",
               row.created_at, datetime.now(UTC), time.time_ns() + 1_000_000]
    warehouse.insert("api_keys", [revoked], column_names=api_keys.COLUMNS)
    assert api_keys.find_by_hash(warehouse, hash_key(key)).status == "revoked"
    r = get_log(client, tenants.a_ws1["_id"], key)
    assert r.status_code == 401, r.text  # auth_cache_seconds=0 in the test settings
    assert tenants.a_ws1["metrics"]["trace_id"] not in r.text


# --------------------------------------------------------------------------- 403


@pytest.mark.parametrize("scopes", [["analytics.read"], [], ["logs.write", "feedback.write"]], ids=["analytics-only", "none", "write-only"])
def test_key_without_logs_read_is_403(client, tenants, make_key, scopes):
    key = make_key(tenants.org_a, scopes=scopes)
    r = get_log(client, tenants.a_ws1["_id"], key)
    assert r.status_code == 403, r.text
    assert "logs.read" in r.json()["detail"]
    assert tenants.a_ws1["metrics"]["trace_id"] not in r.text


# --------------------------------------------------------------------------- 200 / 404 by tenant


def test_org_key_reads_its_own_logs(client, tenants, make_key):
    key = make_key(tenants.org_a, scopes=["logs.read"])
    for ev in (tenants.a_ws1, tenants.a_ws2):
        r = get_log(client, ev["_id"], key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["_id"] == ev["_id"] and body["organisation_id"] == tenants.org_a
        assert body["metrics"]["workspace_slug"] == ev["metrics"]["workspace_slug"]
        assert body["metrics"]["trace_id"] == ev["metrics"]["trace_id"]


def test_other_orgs_log_is_404_and_reveals_nothing(client, tenants, make_key):
    key_a = make_key(tenants.org_a)  # every scope
    r = get_log(client, tenants.b_ws1["_id"], key_a)
    assert r.status_code == 404, r.text
    for secret in _b_secrets(tenants):
        assert secret not in r.text, secret
    # indistinguishable from a log that does not exist at all
    missing = str(uuid.uuid4())
    r_missing = get_log(client, missing, key_a)
    assert r_missing.status_code == 404
    assert r.text.replace(tenants.b_ws1["_id"], "ID") == r_missing.text.replace(missing, "ID")
    # and B's own key does see it
    assert get_log(client, tenants.b_ws1["_id"], make_key(tenants.org_b)).status_code == 200


def test_b_cannot_read_a(client, tenants, make_key):
    key_b = make_key(tenants.org_b, workspace="ws-1")
    assert get_log(client, tenants.a_ws1["_id"], key_b).status_code == 404
    assert get_log(client, tenants.a_ws2["_id"], make_key(tenants.org_b)).status_code == 404


def test_workspace_key_is_confined_to_its_workspace(client, tenants, make_key):
    key = make_key(tenants.org_a, workspace="ws-1", scopes=["logs.read"])
    r = get_log(client, tenants.a_ws1["_id"], key)
    assert r.status_code == 200, r.text
    assert r.json()["metrics"]["workspace_slug"] == "ws-1"
    r2 = get_log(client, tenants.a_ws2["_id"], key)
    assert r2.status_code == 404, r2.text
    assert tenants.a_ws2["metrics"]["trace_id"] not in r2.text
    # the same workspace name in another organisation is another workspace
    r3 = get_log(client, tenants.b_ws1["_id"], key)
    assert r3.status_code == 404
    for secret in _b_secrets(tenants):
        assert secret not in r3.text, secret


def test_health_and_readiness_need_no_key(client):
    r = client.get("/v1/health")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok"}
    r = client.get("/v1/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "clickhouse": "ok", "kafka": "ok"}


# --------------------------------------------------------------------------- `tollgate keys create`

CLI = [sys.executable, "-m", "tollgate.cli"]

SHOW_KEY = """
import json, sys
from tollgate.settings import Settings
from warehouse.client import connect
from warehouse.queries import api_keys
key, digest = sys.argv[1], sys.argv[2]
c = connect(Settings().warehouse_dsn)
cols = ", ".join(api_keys.COLUMNS)
rows = c.query(f"SELECT {cols} FROM api_keys FINAL WHERE key_hash = {{h:String}}", parameters={"h": digest}).result_rows
everything = c.query("SELECT * FROM api_keys").result_rows
print(json.dumps({
    "rows": [dict(zip(api_keys.COLUMNS, [list(v) if isinstance(v, (list, tuple)) else str(v) for v in r])) for r in rows],
    "total": len(everything),
    "plaintext_stored": any(key in repr(r) for r in everything),
}))
"""

HOLD = """
import sys, time
from tollgate.settings import Settings
from warehouse.client import connect
c = connect(Settings().warehouse_dsn)
c.command("SELECT 1")
print("ready", flush=True)
time.sleep(120)
"""


def _env(data_dir) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_DATA_DIR"] = str(data_dir)
    return env


def _run(args: list[str], data_dir, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(data_dir), capture_output=True, text=True, timeout=timeout)


def test_cli_keys_create_stores_only_the_hash(tmp_path):
    done = _run([*CLI, "keys", "create", "--org", "o1", "--workspace", "w1", "--scopes", "logs.read,analytics.read"], tmp_path)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("tg-") and len(key) > 20 and " " not in key, done.stdout
    shown = _run([sys.executable, "-c", SHOW_KEY, key, hashlib.sha256(key.encode()).hexdigest()], tmp_path)
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout.strip().splitlines()[-1])
    assert len(facts["rows"]) == 1, facts
    (row,) = facts["rows"]
    assert row["organisation_id"] == "o1" and row["workspace_slug"] == "w1"
    assert sorted(row["scopes"]) == ["analytics.read", "logs.read"]
    assert row["status"] == "active"
    assert row["key_hash"] == hash_key(key)
    assert facts["total"] == 1
    assert facts["plaintext_stored"] is False


def test_cli_keys_create_rejects_unknown_scopes(tmp_path):
    done = _run([*CLI, "keys", "create", "--org", "o1", "--scopes", "logs.read,bogus"], tmp_path)
    assert done.returncode != 0
    assert "bogus" in done.stderr
    assert "Traceback" not in done.stderr
    assert "tg-" not in done.stdout


def test_cli_keys_create_while_another_process_holds_the_warehouse(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read() if holder.poll() is not None else ""
        done = _run([*CLI, "keys", "create", "--org", "o1"], tmp_path)
        assert done.returncode != 0, done.stdout
        assert "another process" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "tg-" not in done.stdout
    finally:
        holder.kill()
        holder.wait(10)
