"""The audit trail: records for every mutating request, secrets masked, GET /v1/audit-logs.

Everything runs against the real parts: the API served by uvicorn on a port (so
the client address is a real peer), the Tansu broker, ingest workers and chdb.
Since routers for exports and policies do not exist yet, the app also gets a few
test-only mutating routes (``/v1/test-widgets``); the real feedback and API-key
routes are exercised when they are mounted.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from fastapi import Depends, Request
from kafka import KafkaConsumer
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from pydantic import BaseModel

from analytics_api.app import create_app
from analytics_api.audit import ROUTES, classify, client_ip, is_audited, masked_body
from analytics_api.auth import new_key, require
from conftest import publish, read_topic, wait_until
from factories import iso
from ingest.events import AUDIT, InvalidEvent, decode_audit
from ingest.producer import ensure_topics, make_producer
from ingest.workers import IngestWorkers
from tollgate.broker import EmbeddedBroker, free_port
from tollgate.stack import ApiServer
from warehouse.migrate import migrate

SPEC = Path(__file__).resolve().parents[1] / "spec" / "portkey-api-subset.yaml"
HEADER = "x-portkey-api-key"

# --------------------------------------------------------------------------- the stack under test


class Widget(BaseModel):
    name: str


@dataclass
class Handlers:
    """What the test-only routes saw: proof of whether a handler ran."""

    calls: list[str] = field(default_factory=list)
    pending_seen_in_kafka: dict[str, bool] = field(default_factory=dict)


def add_test_routes(app, handlers: Handlers, bootstrap: str, audit_topic: str, broker: EmbeddedBroker | None = None):
    @app.post("/v1/test-widgets")
    def create_widget(widget: Widget, principal=Depends(require("policies.write"))):
        handlers.calls.append(f"create {widget.name}")
        return {"id": str(uuid.uuid4()), "key": new_key(), "object": "widget"}  # a generated secret in the answer

    @app.get("/v1/test-widgets")
    def list_widgets(principal=Depends(require("policies.read"))):
        handlers.calls.append("list")
        return {"data": []}

    @app.delete("/v1/test-widgets/{widget_id}")
    def delete_widget(widget_id: str, principal=Depends(require("policies.write"))):
        handlers.calls.append(f"delete {widget_id}")
        return {"id": widget_id}

    @app.post("/v1/test-widgets/boom")
    def boom(principal=Depends(require("policies.write"))):
        handlers.calls.append("boom")
        raise RuntimeError("the handler failed")

    @app.post("/v1/test-widgets/check-then-stop-kafka")
    def check_then_stop(request: Request, principal=Depends(require("policies.write"))):
        """Looks for its own pending record in Kafka, then takes Kafka down before answering."""
        request_id = request.state.request_id
        found = has_record(request_id, "pending")
        handlers.pending_seen_in_kafka[request_id] = found(topic_values(bootstrap, audit_topic, found))
        handlers.calls.append("check-then-stop")
        broker.stop()
        return {"ok": True}


def topic_values(bootstrap: str, topic: str, until, timeout: float = 30.0) -> list[bytes]:
    """Values of ``topic`` from the beginning, read until ``until(values)`` holds (or the timeout)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             fetch_max_wait_ms=100)
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(values) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                values.extend(r.value for r in batch)
    finally:
        consumer.close()
    return values


def has_record(request_id: str, phase: str):
    return lambda values: any(
        (ev := orjson.loads(v))["request_id"] == request_id and ev["phase"] == phase for v in values
    )


def geoip_db(path: Path) -> Path:
    """A tiny MaxMind-format country database: 203.0.113.0/24 → DE, 198.51.100.0/24 → FR."""
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", ipv4_compatible=True)
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "FR"}})
    writer.to_db_file(str(path))
    return path


@dataclass
class Stack:
    settings: object
    http: httpx.Client
    app: object
    handlers: Handlers
    workers: IngestWorkers


def fresh_settings(base_settings, broker, **overrides):
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"t{suffix}.gateway-logs", topic_feedback=f"t{suffix}.feedback",
        topic_audit=f"t{suffix}.audit", topic_dead_letter=f"t{suffix}.dead-letter", ingest_consumer_group=f"g{suffix}",
        **overrides,
    ))
    ensure_topics(broker.bootstrap, s.all_topics, s.topic_partitions)
    return s


@pytest.fixture(scope="module")
def stack(base_settings, broker, warehouse, tmp_path_factory):
    s = fresh_settings(base_settings, broker, trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"],
                       geoip_db=geoip_db(tmp_path_factory.mktemp("geo") / "country.mmdb"))
    pool = IngestWorkers(s, broker.bootstrap)
    pool.start()
    handlers = Handlers()
    app = create_app(s, broker.bootstrap, pool_size=2)
    add_test_routes(app, handlers, broker.bootstrap, s.topic_audit)
    port = free_port()
    server = ApiServer(app, "127.0.0.1", port)
    server.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        yield Stack(s, http, app, handlers, pool)
    server.stop()
    app.state.publisher.close()
    pool.stop()


def final_rows(warehouse, request_ids) -> dict[str, dict]:
    """The FINAL audit rows of these requests, by request id."""
    result = warehouse.query("SELECT * FROM audit_logs FINAL WHERE request_id IN {ids:Array(String)}",
                             parameters={"ids": list(request_ids)})
    rows = [dict(zip(result.column_names, r)) for r in result.result_rows]
    return {r["request_id"]: r for r in rows}


def wait_for_final(warehouse, request_ids) -> dict[str, dict]:
    ids = set(request_ids)
    assert wait_until(lambda: {i for i, r in final_rows(warehouse, ids).items() if r["version"] == 2} == ids, timeout=60)
    return final_rows(warehouse, ids)


def key_id(warehouse, key: str) -> str:
    from analytics_api.auth import hash_key

    return warehouse.command("SELECT id FROM api_keys FINAL WHERE key_hash = {h:String}", parameters={"h": hash_key(key)})


def has_route(app, method: str, path: str) -> bool:
    return method.lower() in app.openapi()["paths"].get(path, {})


# --------------------------------------------------------------------------- which requests are audited


def test_the_route_table_names_every_mutating_endpoint_of_the_spec():
    spec = yaml.safe_load(SPEC.read_text())
    mutating = [(m.upper(), "/v1" + p) for p, ops in spec["paths"].items() for m in ops if m in ("post", "put", "delete")]
    assert len(mutating) >= 14
    for method, path in mutating:
        concrete = path.replace("{", "x").replace("}", "")
        if (method, path) == ("POST", "/v1/logs"):
            assert not is_audited(method, concrete)  # bulk data ingestion
            continue
        assert is_audited(method, concrete), path
        assert classify(method, concrete)[0] != "unknown", (method, path)
    assert classify("POST", "/v1/logs/exports/e-1/start") == ("log_export", "start")
    assert classify("POST", "/v1/logs/exports/e-1/cancel") == ("log_export", "cancel")
    assert classify("PUT", "/v1/policies/usage-limits/p/entities/e/reset") == ("usage_limits_policy", "reset")
    assert classify("POST", "/v1/api-keys/k-1/rotate") == ("api_key", "rotate")
    assert classify("POST", "/v1/api-keys/organisation/service") == ("api_key", "create")
    assert classify("PUT", "/v1/feedback/f-1/") == ("feedback", "update")
    assert classify("PATCH", "/v1/whatever") == ("unknown", "update")
    assert all(action for *_, action in ROUTES)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert not is_audited(method, "/v1/feedback")
    assert not is_audited("POST", "/v1/logs/") and is_audited("POST", "/v1/logs/exports")
    assert not is_audited("POST", "/docs") and not is_audited("POST", "/v1x")


def test_client_ip_believes_forwarded_for_only_from_trusted_proxies():
    import ipaddress

    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_ip("203.0.113.5", "1.2.3.4", trusted) == "203.0.113.5"  # untrusted peer: a forged header is ignored
    assert client_ip("10.0.0.1", "1.2.3.4, 5.6.7.8", trusted) == "5.6.7.8"  # rightmost untrusted hop
    assert client_ip("10.0.0.1", "1.2.3.4, 10.9.9.9", trusted) == "1.2.3.4"  # trusted hops are skipped
    assert client_ip("10.0.0.1", "10.0.0.7", trusted) == "10.0.0.7"  # all trusted: the farthest one
    assert client_ip("10.0.0.1", "not-an-ip, 10.2.2.2", trusted) == "10.2.2.2"  # a garbage hop ends the walk
    assert client_ip("10.0.0.1", None, trusted) == "10.0.0.1"
    assert client_ip("::1", "2001:db8::7", trusted) == "2001:db8::7"
    assert client_ip("1.2.3.4", "5.6.7.8", []) == "1.2.3.4"
    assert client_ip("testclient", "5.6.7.8", trusted) == "testclient"


def test_masked_body():
    key = new_key()
    body = {"name": "n", "API_KEY": "a", "nested": [{"refresh_token": 1, "note": f"use {key} please"}], key: "x"}
    assert masked_body(orjson.dumps(body)) == {
        "name": "n", "API_KEY": "[masked]", "nested": [{"refresh_token": "[masked]", "note": "use [masked] please"}],
        "[masked]": "x",  # a key used as a field name is removed too
    }
    assert masked_body(b"") is None
    assert masked_body(b"name=x&password=y") == "[17 bytes, not JSON: not recorded]"
    assert masked_body(b"[" * 5000 + b"]" * 5000).startswith("[10000 bytes")


# --------------------------------------------------------------------------- records for every mutation


def test_every_mutating_request_leaves_one_record_whatever_its_outcome(stack, warehouse, make_key, org):
    admin = make_key(org, scopes=["policies.write", "policies.read", "audit_logs.read"])
    ws_key = make_key(org, workspace="ws-1", scopes=["policies.write"])
    reader = make_key(org, scopes=["logs.read"])
    before = list(stack.handlers.calls)
    cases = [
        # label, method, path, key, json, expected status, handler ran
        ("created", "POST", "/v1/test-widgets?dry_run=false", admin, {"name": "w1"}, 200, True),
        ("by a workspace key", "POST", "/v1/test-widgets", ws_key, {"name": "w2"}, 200, True),
        ("invalid body", "POST", "/v1/test-widgets", admin, {"nom": "w"}, 422, False),
        ("lacks the scope", "POST", "/v1/test-widgets", reader, {"name": "w3"}, 403, False),
        ("no key", "POST", "/v1/test-widgets", None, {"name": "w4"}, 401, False),
        ("unknown key", "POST", "/v1/test-widgets", new_key(), {"name": "w5"}, 401, False),
        ("handler crashed", "POST", "/v1/test-widgets/boom", admin, None, 500, True),
        ("deleted", "DELETE", "/v1/test-widgets/w-9", admin, None, 200, True),
        ("no such route", "PUT", "/v1/no-such-thing/1", admin, {"a": 1}, 404, False),
    ]
    ids: dict[str, str] = {}
    for label, method, path, key, body, status, _ in cases:
        headers = {HEADER: key} if key else {}
        if status == 500:
            headers["connection"] = "close"  # uvicorn drops the connection after an unhandled error
        r = stack.http.request(method, path, json=body, headers=headers)
        assert r.status_code == status, (label, r.text)
        if status != 500:  # an unhandled error's answer comes from Starlette's outermost middleware, without the id
            ids[label] = r.headers["x-request-id"]
    crashed = "SELECT request_id FROM audit_logs WHERE organisation_id = {o:String} AND uri = '/v1/test-widgets/boom'"
    assert wait_until(lambda: warehouse.query(crashed, parameters={"o": org}).result_rows)
    ids["handler crashed"] = warehouse.query(crashed, parameters={"o": org}).result_rows[0][0]
    assert len(set(ids.values())) == len(cases)
    assert stack.handlers.calls[len(before):] == ["create w1", "create w2", "boom", "delete w-9"]

    # reads and bulk log ingestion are not audited: they have a request id (every request has), but no record
    r = stack.http.get("/v1/test-widgets", headers={HEADER: admin})
    assert r.status_code == 200
    unaudited = [r.headers["x-request-id"]]
    r = stack.http.post("/v1/logs", json={"not": "a log"}, headers={HEADER: admin})
    unaudited.append(r.headers["x-request-id"])

    rows = wait_for_final(warehouse, ids.values())
    assert not final_rows(warehouse, unaudited)
    admin_id, ws_id, reader_id = key_id(warehouse, admin), key_id(warehouse, ws_key), key_id(warehouse, reader)
    expected_user = {"by a workspace key": ws_id, "lacks the scope": reader_id, "no key": "", "unknown key": ""}
    resource = {"deleted": ("unknown", "delete"), "no such route": ("unknown", "update")}
    for label, method, path, key, body, status, _ in cases:
        row = rows[ids[label]]
        user = expected_user.get(label, admin_id)
        assert row["response_status_code"] == status, label
        assert row["method"] == method and row["uri"] == path.split("?")[0], label
        assert row["user_id"] == user and row["user_type"] == ("api_key" if user else ""), label
        assert row["organisation_id"] == (org if user else ""), label
        assert row["workspace_id"] == ("ws-1" if label == "by a workspace key" else ""), label
        assert (row["resource_type"], row["action"]) == resource.get(label, ("unknown", "create")), label
        assert row["request_body"] == (orjson.dumps(body).decode() if body else ""), label
        assert row["client_ip"] == "127.0.0.1" and row["country"] == "", label
        headers = orjson.loads(row["request_headers"])
        assert headers["host"].startswith("127.0.0.1:") and "user-agent" in headers
        if key:
            assert headers[HEADER] == "[masked]"
    assert orjson.loads(rows[ids["created"]]["query_params"]) == {"dry_run": "false"}
    assert orjson.loads(rows[ids["deleted"]]["query_params"]) == {}

    # exactly one record per request (FINAL); physically a pending and a final version
    raw = warehouse.query("SELECT request_id, version, response_status_code FROM audit_logs "
                          "WHERE request_id IN {ids:Array(String)}", parameters={"ids": list(ids.values())}).result_rows
    assert {(i, v) for i, v, _ in raw} == {(i, v) for i in ids.values() for v in (1, 2)}
    assert all(code == 0 for _, v, code in raw if v == 1)

    # the organisation's records through the API (requests without a valid key belong to no organisation)
    got = stack.http.get("/v1/audit-logs", headers={HEADER: admin}, params={
        "start_time": iso(datetime.now(UTC) - timedelta(hours=1)), "end_time": iso(datetime.now(UTC) + timedelta(hours=1)),
        "organisation_id": org})
    assert got.status_code == 200, got.text
    body = got.json()
    by_id = {r["request_id"]: r for r in body["records"]}
    assert body["total"] == len(by_id) == len(cases) - 2
    assert set(by_id) == {ids[label] for label, *_ in cases if label not in ("no key", "unknown key")}
    assert by_id[ids["lacks the scope"]]["response_status_code"] == 403
    assert by_id[ids["created"]]["request_body"] == '{"name":"w1"}'
    stamps = [r["timestamp"] for r in body["records"]]
    assert stamps == sorted(stamps, reverse=True)


def test_real_mutating_routes_are_audited(stack, warehouse, make_key, org):
    """Feedback and API-key routes, when mounted, with their resource types and actions."""
    admin = make_key(org)
    sent: list[tuple[str, str, int, tuple[str, str]]] = []  # request id, path, status, (resource, action)
    secrets = [admin]

    def send(method: str, path: str, body, expected: tuple[str, str]) -> httpx.Response:
        r = stack.http.request(method, path, json=body, headers={HEADER: admin})
        sent.append((r.headers["x-request-id"], f"{method} {path}", r.status_code, expected))
        if r.headers.get("content-type") == "application/json" and isinstance(r.json(), dict) and "key" in r.json():
            secrets.append(r.json()["key"])
        return r

    if has_route(stack.app, "POST", "/v1/feedback"):
        assert send("POST", "/v1/feedback", {"trace_id": "t-1", "value": 5}, ("feedback", "create")).status_code == 200
        assert send("POST", "/v1/feedback", {"trace_id": "t-1", "value": 99}, ("feedback", "create")).status_code == 422
    if has_route(stack.app, "POST", "/v1/api-keys/{type}/{sub_type}"):
        created = send("POST", "/v1/api-keys/organisation/service", {"name": "ci", "scopes": ["logs.read"]},
                       ("api_key", "create"))
        assert created.status_code == 200, created.text
        kid = created.json()["id"]
        assert send("POST", f"/v1/api-keys/{kid}/rotate", None, ("api_key", "rotate")).status_code == 200
        assert send("PUT", f"/v1/api-keys/{kid}", {"name": "renamed"}, ("api_key", "update")).status_code == 200
        assert send("DELETE", f"/v1/api-keys/{kid}", None, ("api_key", "delete")).status_code == 200
    if not sent:
        pytest.skip("no feedback or API-key routes mounted yet")
    rows = wait_for_final(warehouse, [rid for rid, *_ in sent])
    for rid, call, status, expected in sent:
        row = rows[rid]
        assert f"{row['method']} {row['uri']}" == call and row["response_status_code"] == status, call
        assert (row["resource_type"], row["action"]) == expected, call
    dump = orjson.dumps([list(r.values()) for r in rows.values()], default=str).decode()
    assert len(secrets) >= 3 or not has_route(stack.app, "POST", "/v1/api-keys/{type}/{sub_type}")
    for secret in secrets:
        assert secret not in dump


def test_secrets_never_reach_a_record(stack, warehouse, make_key, org):
    # Every physical row is read below, pending and final versions: a background merge must not collapse them first.
    warehouse.command("SYSTEM STOP MERGES audit_logs")
    try:
        _check_secrets_never_reach_a_record(stack, warehouse, make_key, org)
    finally:
        warehouse.command("SYSTEM START MERGES audit_logs")


def _check_secrets_never_reach_a_record(stack, warehouse, make_key, org):
    admin = make_key(org)
    other = new_key()  # someone else's key, pasted into a text field
    secrets = [admin, other, "sk-live-SECRET-1", "SECRET-2", "SECRET-3", "SECRET-4", "SECRET-5", "SECRET-6", "SECRET-7",
               "SECRET-8"]
    r = stack.http.post(
        "/v1/test-widgets", params={"api_key": "SECRET-7", "page": "2", "session_token": "SECRET-8"},
        headers={HEADER: admin, "Authorization": "Bearer sk-live-SECRET-1", "X-Custom-Token": "SECRET-2",
                 "Cookie": "session=SECRET-3"},
        json={"name": "w", "api_key": "SECRET-4", "nested": {"db_password": "SECRET-5", "items": [{"clientSecret": "SECRET-6"}]},
              "note": f"my colleague's key is {other}"},
    )
    assert r.status_code == 200, r.text
    generated = r.json()["key"]
    secrets.append(generated)
    failed = stack.http.post("/v1/test-widgets", headers={HEADER: other}, json={"name": "x"})  # unknown key: 401
    assert failed.status_code == 401
    ids = [r.headers["x-request-id"], failed.headers["x-request-id"]]
    rows = wait_for_final(warehouse, ids)

    # every physical row (pending and final versions), and every message of the audit topic
    raw = warehouse.query("SELECT * FROM audit_logs WHERE request_id IN {ids:Array(String)}", parameters={"ids": ids})
    assert len(raw.result_rows) == 4
    stored = "\n".join(orjson.dumps(list(row), default=str).decode() for row in raw.result_rows)
    topic = b"\n".join(topic_values(stack.settings.kafka_bootstrap, stack.settings.topic_audit,
                                    lambda values: has_record(ids[0], "final")(values) and has_record(ids[1], "final")(values)))
    for secret in secrets:
        assert secret not in stored, secret
        assert secret.encode() not in topic, secret

    row = rows[ids[0]]
    headers = orjson.loads(row["request_headers"])
    assert {headers[h] for h in (HEADER, "authorization", "x-custom-token", "cookie")} == {"[masked]"}
    assert orjson.loads(row["query_params"]) == {"api_key": "[masked]", "page": "2", "session_token": "[masked]"}
    assert orjson.loads(row["request_body"]) == {
        "name": "w", "api_key": "[masked]", "nested": {"db_password": "[masked]", "items": [{"clientSecret": "[masked]"}]},
        "note": "my colleague's key is [masked]",
    }


def test_client_ip_from_trusted_proxies_and_its_country(stack, warehouse, make_key, org):
    admin = make_key(org)
    cases = [  # X-Forwarded-For (the peer 127.0.0.1 is a trusted proxy, so is 10.0.0.0/8) → client, country
        ("198.51.100.9, 203.0.113.7", "203.0.113.7", "DE"),
        ("203.0.113.8, 10.1.2.3", "203.0.113.8", "DE"),
        ("198.51.100.20", "198.51.100.20", "FR"),
        ("192.0.2.1", "192.0.2.1", ""),  # not in the database
        (None, "127.0.0.1", ""),
    ]
    ids = []
    for forwarded, _, _ in cases:
        headers = {HEADER: admin, **({"X-Forwarded-For": forwarded} if forwarded else {})}
        r = stack.http.post("/v1/test-widgets", json={"name": "ip"}, headers=headers)
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    rows = wait_for_final(warehouse, ids)
    assert [(rows[i]["client_ip"], rows[i]["country"]) for i in ids] == [(ip, c) for _, ip, c in cases]


# --------------------------------------------------------------------------- Kafka down: 503, the handler never runs


def test_no_audit_record_no_mutation(base_settings, warehouse, make_key, org):
    """While Kafka cannot take the pending record the request is refused (503) before its handler runs.

    The handler of the first request finds its own pending record already in Kafka (so it
    was acknowledged before the handler ran), then stops the broker: its final record
    cannot be published, yet the answer goes out (the change was made; the pending
    record stands). The next mutating request is a 503 and its handler never runs.
    """
    own = EmbeddedBroker().start()
    try:
        s = fresh_settings(base_settings, own, publish_timeout_seconds=2)  # each refused request waits this long
        handlers = Handlers()
        app = create_app(s, own.bootstrap, pool_size=1)
        add_test_routes(app, handlers, own.bootstrap, s.topic_audit, broker=own)
        port = free_port()
        server = ApiServer(app, "127.0.0.1", port)
        server.start()
        admin = make_key(org)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers={HEADER: admin}) as http:
                r = http.post("/v1/test-widgets/check-then-stop-kafka")
                assert r.status_code == 200, r.text
                assert handlers.pending_seen_in_kafka == {r.headers["x-request-id"]: True}
                assert handlers.calls == ["check-then-stop"]

                refused = http.post("/v1/test-widgets", json={"name": "never"})
                assert refused.status_code == 503, refused.text
                assert "audit" in refused.json()["detail"]
                refused = http.delete("/v1/test-widgets/w-1")
                assert refused.status_code == 503
                assert handlers.calls == ["check-then-stop"]  # neither handler ran

                assert http.get("/v1/test-widgets").status_code == 200  # reads need no audit record
                assert handlers.calls == ["check-then-stop", "list"]
        finally:
            server.stop()
            producer = app.state.publisher._producer
            app.state.publisher.close()  # it cannot flush to the stopped broker: it drops, never raises
            # and its network thread ends (it used to reconnect to the gone broker until exit)
            assert wait_until(lambda: not producer._sender.is_alive(), timeout=10)
    finally:
        own.stop()


# --------------------------------------------------------------------------- GET /v1/audit-logs against a corpus


@dataclass
class Corpus:
    org: str
    other_org: str
    events: list[dict]  # every published event, duplicates included
    start: datetime


def make_corpus(rng: random.Random, org: str, other_org: str, n: int = 260) -> Corpus:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    events: list[dict] = []
    stamps = [start + timedelta(milliseconds=rng.randrange(3 * 86_400_000)) for _ in range(n // 2)]
    for i in range(n):
        ts = rng.choice(stamps) if i % 2 else start + timedelta(milliseconds=rng.randrange(3 * 86_400_000))  # shared stamps: ties
        method = rng.choice(["POST", "PUT", "DELETE"])
        user = rng.choice(["", "k-1", "k-2", "k-3"])
        base = {
            "request_id": f"req-{i:04d}-{rng.randrange(10**6)}",
            "timestamp": iso(ts),
            "method": method,
            "uri": rng.choice(["/v1/feedback", "/v1/api-keys/organisation/service", "/v1/logs/exports/e-1/start"]),
            "organisation_id": other_org if i % 13 == 0 else org,
            "workspace_id": rng.choice(["", "ws-1", "ws-2"]),
            "query_params": {"page": str(i)},
            "request_headers": {"content-type": "application/json"},
            "request_body": rng.choice([{"value": i}, "plain", None]),
            "user_id": user,
            "user_type": "api_key" if user else "",
            "resource_type": rng.choice(["feedback", "api_key", "log_export"]),
            "action": rng.choice(["create", "update", "delete", "start"]),
            "client_ip": rng.choice(["203.0.113.7", "198.51.100.1", "127.0.0.1"]),
            "country": rng.choice(["DE", "FR", ""]),
        }
        pending = {**base, "phase": "pending", "response_status_code": 0}
        final = {**base, "phase": "final", "response_status_code": rng.choice([200, 201, 401, 403, 422, 500])}
        if base["request_body"] is None:
            del pending["request_body"], final["request_body"]
        roll = rng.random()
        if roll < 0.1:
            events.append(pending)  # the final record never arrived
        elif roll < 0.2:
            events += [final, pending]  # out of order
        elif roll < 0.3:
            events += [pending, final, final, pending]  # re-deliveries
        else:
            events += [pending, final]
    rng.shuffle(events)
    return Corpus(org, other_org, events, start)


def expected_records(corpus: Corpus, org: str, start: datetime, end: datetime, workspace: str | None,
                     filters: dict) -> list[dict]:
    """What the API must answer, computed from the published events alone."""
    latest: dict[str, dict] = {}
    for ev in corpus.events:
        current = latest.get(ev["request_id"])
        if current is None or (ev["phase"] == "final" and current["phase"] == "pending"):
            latest[ev["request_id"]] = ev
    out = []
    for ev in latest.values():
        ts = datetime.fromisoformat(ev["timestamp"])
        if ev["organisation_id"] != org or not start <= ts <= end:
            continue
        if workspace is not None and ev["workspace_id"] != workspace:
            continue
        if all(ev[name] == value for name, value in filters.items()):
            out.append(ev)
    out.sort(key=lambda ev: (ev["timestamp"], ev["request_id"]), reverse=True)
    return out


def as_api_record(ev: dict) -> dict:
    body = ev.get("request_body")
    return {
        "timestamp": ev["timestamp"], "method": ev["method"], "uri": ev["uri"], "request_id": ev["request_id"],
        "request_body": "" if body is None else orjson.dumps(body).decode(),
        "query_params": orjson.dumps(ev["query_params"]).decode(),
        "request_headers": orjson.dumps(ev["request_headers"]).decode(),
        **{k: ev[k] for k in ("user_id", "user_type", "organisation_id", "workspace_id", "response_status_code",
                              "resource_type", "action", "client_ip", "country")},
    }


@pytest.fixture(scope="module")
def corpus(base_settings, broker, warehouse) -> Corpus:
    s = fresh_settings(base_settings, broker)
    suffix = uuid.uuid4().hex[:8]
    c = make_corpus(random.Random(4), f"org-audit-{suffix}", f"org-audit-other-{suffix}")
    pool = IngestWorkers(s, broker.bootstrap)
    pool.start()
    producer = make_producer(broker.bootstrap)
    try:
        publish(producer, s.topic_audit, c.events)
        distinct = len({ev["request_id"] for ev in c.events})
        assert wait_until(lambda: warehouse.command(
            "SELECT count() FROM audit_logs FINAL WHERE organisation_id IN {orgs:Array(String)}",
            parameters={"orgs": [c.org, c.other_org]}) == distinct, timeout=60)
    finally:
        producer.close()
        pool.stop()
    return c


@pytest.fixture(scope="module")
def reader(base_settings, broker, warehouse):
    from fastapi.testclient import TestClient

    with TestClient(create_app(base_settings, broker.bootstrap, pool_size=2)) as client:
        yield client


def test_audit_logs_filters_and_pages_match_the_published_events(corpus, reader, make_key):
    key = make_key(corpus.org, scopes=["audit_logs.read"])
    ws_key = make_key(corpus.org, workspace="ws-1", scopes=["audit_logs.read"])
    rng = random.Random(11)
    window = (corpus.start, corpus.start + timedelta(days=3))
    latest = expected_records(corpus, corpus.org, *window, None, {})
    assert 150 < len(latest) < 260 and any(ev["phase"] == "pending" for ev in latest)

    def check(filters: dict, start=window[0], end=window[1], workspace=None, api_key=key, page_size=100) -> int:
        want = expected_records(corpus, corpus.org, start, end, workspace, filters)
        pages = max(1, -(-len(want) // page_size)) if page_size else 1
        for page in range(pages + 1):  # one page past the end, which is empty
            params = {"start_time": iso(start), "end_time": iso(end), "organisation_id": corpus.org,
                      "page_size": page_size, "current_page": page, **filters}
            r = reader.get("/v1/audit-logs", params=params, headers={HEADER: api_key})
            assert r.status_code == 200, (params, r.text)
            body = r.json()
            assert body["total"] == len(want), params
            assert body["records"] == [as_api_record(ev) for ev in want[page * page_size:(page + 1) * page_size]], params
            assert body["object"] == "analytics-graph"
        return len(want)

    assert check({}) == len(latest)
    assert check({}, page_size=37) == len(latest)  # several pages, ties on timestamp broken by request_id
    assert check({}, page_size=0) == len(latest)
    assert check({}, workspace="ws-1", api_key=ws_key) > 0  # a workspace key sees its workspace only
    assert check({"workspace_id": "ws-2"}, workspace="ws-1", api_key=ws_key) == 0
    # each filter alone, with a value present in the corpus
    for name in ("method", "uri", "request_id", "user_id", "user_type", "workspace_id", "response_status_code",
                 "resource_type", "action", "client_ip", "country"):
        value = rng.choice([ev[name] for ev in latest if ev[name] != ""])
        assert check({name: value}) > 0, name
    assert check({"response_status_code": 0}) > 0  # requests whose outcome was never recorded
    assert check({"method": "DELETE", "country": "DE", "user_type": "api_key"}) > 0
    assert check({"uri": "/v1/none"}) == 0
    # time range bounds are inclusive, to the millisecond
    edge = latest[len(latest) // 2]
    ts = datetime.fromisoformat(edge["timestamp"])
    assert edge in expected_records(corpus, corpus.org, ts, ts, None, {})
    check({}, start=ts, end=ts)
    check({}, start=ts + timedelta(milliseconds=1), end=window[1])
    check({}, start=window[0], end=ts - timedelta(milliseconds=1))


def test_audit_logs_access_rules_and_bad_parameters(corpus, reader, make_key):
    key = make_key(corpus.org, scopes=["audit_logs.read"])
    other = make_key(corpus.other_org, scopes=["audit_logs.read"])
    no_scope = make_key(corpus.org, scopes=["logs.read", "api_keys.read"])
    good = {"start_time": iso(corpus.start), "end_time": iso(corpus.start + timedelta(days=3)), "organisation_id": corpus.org}

    def get(params, api_key=key):
        return reader.get("/v1/audit-logs", params=params, headers={HEADER: api_key} if api_key else {})

    assert get(good).status_code == 200
    assert get(good, api_key=None).status_code == 401
    assert get(good, api_key=new_key()).status_code == 401
    assert get(good, api_key=no_scope).status_code == 403
    assert get(good, api_key=other).status_code == 403  # another organisation's trail: refused, whether it exists or not
    assert get({**good, "organisation_id": "org-does-not-exist"}).status_code == 403
    mine = get({**good, "organisation_id": corpus.other_org}, api_key=other).json()
    assert mine["total"] == len(expected_records(corpus, corpus.other_org, corpus.start, corpus.start + timedelta(days=3), None, {}))
    assert {r["organisation_id"] for r in mine["records"]} == {corpus.other_org}

    for missing in ("start_time", "end_time", "organisation_id"):
        r = get({k: v for k, v in good.items() if k != missing})
        assert r.status_code == 422 and missing in r.text, missing
    for name, value in [("page_size", 101), ("page_size", -1), ("current_page", -1), ("current_page", "x"),
                        ("start_time", "yesterday"), ("end_time", "2026-11-20T10:00:00"), ("method", "GET"),
                        ("user_type", "robot"), ("response_status_code", 600), ("response_status_code", "2xx")]:
        r = get({**good, name: value})
        assert r.status_code == 422 and name in r.text, (name, value, r.text)
    r = get({**good, "start_time": good["end_time"], "end_time": good["start_time"]})
    assert r.status_code == 422 and "start_time" in r.text
    for hostile in ("' OR 1=1 --", "x') OR ('1'='1", "{org:String}", "\\'; DROP TABLE audit_logs; --"):
        r = get({**good, "uri": hostile, "country": hostile})
        assert r.status_code == 200 and r.json()["total"] == 0, hostile
    assert get(good).json()["total"] > 0


# --------------------------------------------------------------------------- ingest: codec, dead letters, table


def audit_event(**overrides) -> dict:
    ev = {"request_id": str(uuid.uuid4()), "phase": "final", "timestamp": "2026-11-20T10:00:00.000Z", "method": "POST",
          "uri": "/v1/feedback", "organisation_id": "org-x", "response_status_code": 200}
    ev.update(overrides)
    return {k: v for k, v in ev.items() if v is not None}


BAD_AUDIT = [
    (audit_event(request_id=None), "request_id"),
    (audit_event(phase="done"), "phase"),
    (audit_event(phase="pending"), "pending"),
    (audit_event(response_status_code=0), "response_status_code"),
    (audit_event(method="GET"), "method"),
    (audit_event(timestamp="yesterday"), "timestamp"),
    (audit_event(timestamp="1900-01-01T00:00:00Z"), "timestamp"),
    (audit_event(uri=""), "uri"),
    (audit_event(request_headers=["a"]), "request_headers"),
    (audit_event(query_params="a=b"), "query_params"),
    (audit_event(user_type="admin"), "user_type"),
]


def test_audit_codec_rejects_bad_records_naming_the_field():
    for ev, fragment in BAD_AUDIT:
        with pytest.raises(InvalidEvent) as exc:
            decode_audit(orjson.dumps(ev))
        assert fragment in exc.value.reason, (ev, exc.value.reason)
    with pytest.raises(InvalidEvent):
        decode_audit(b"{not json")
    line = orjson.loads(AUDIT.encode(orjson.dumps(audit_event(phase="pending", response_status_code=0, request_body=[1, 2]))))
    assert line[1] == 1 and line[9] == [1, 2] and line[12] == 0  # version 1; the body embedded as JSON text


def test_bad_audit_records_are_dead_lettered_and_good_ones_stored(settings, producer, workers, warehouse, org):
    good = [audit_event(organisation_id=org) for _ in range(3)]
    bad = [ev for ev, _ in BAD_AUDIT]
    publish(producer, settings.topic_audit, [good[0], *bad[:5], good[1], *bad[5:], good[2]])
    assert wait_until(lambda: warehouse.command("SELECT count() FROM audit_logs FINAL WHERE organisation_id = {o:String}",
                                                parameters={"o": org}) == 3)
    dead = read_topic(settings.kafka_bootstrap, settings.topic_dead_letter, expected=len(bad))
    assert sorted(m.value for m in dead) == sorted(orjson.dumps(ev) for ev in bad)


def test_migration_makes_an_append_only_replacing_table_with_a_retention_ttl(empty_db):
    db = empty_db
    migrate(db, audit_retention_days=90)
    ddl = db.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'audit_logs'")
    assert "ReplacingMergeTree(version)" in ddl and "ORDER BY (organisation_id, timestamp, request_id)" in ddl
    assert "toIntervalDay(90)" in ddl
    migrate(db, audit_retention_days=0)
    ddl = db.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'audit_logs'")
    assert " TTL " not in ddl


def test_a_second_key_header_does_not_take_a_change_out_of_the_organisations_trail(api, workers, warehouse, make_key, org):
    """The route authenticates with the first x-portkey-api-key header; the audit record must name that
    same key (it named the last one: a bogus second header left the change in no organisation's trail)."""
    admin = make_key(org)
    r = api.post("/v1/api-keys/organisation/service", json={"name": "hidden", "scopes": ["logs.read"]},
                 headers=[("x-portkey-api-key", admin), ("x-portkey-api-key", new_key())])
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    row = wait_for_final(warehouse, [rid])[rid]
    assert (row["organisation_id"], row["user_id"]) == (org, key_id(warehouse, admin))
    listed = api.get("/v1/audit-logs", headers={"x-portkey-api-key": admin}, params={
        "start_time": iso(datetime.now(UTC) - timedelta(hours=1)), "end_time": iso(datetime.now(UTC) + timedelta(hours=1)),
        "organisation_id": org, "request_id": rid})
    assert listed.status_code == 200 and listed.json()["total"] == 1, listed.text


def test_a_start_time_with_sub_millisecond_digits_selects_exactly(api, warehouse, make_key, org):
    """Both bounds are inclusive and records are whole milliseconds: a record at …00.000 is before a start_time
    of …00.000400 (the DateTime64(3) parameter truncated it, as it did for analytics)."""
    from ingest.sink import insert_rows

    t0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    record = {"request_id": f"r-{org}", "phase": "final", "timestamp": "2026-11-20T10:00:00.000Z", "method": "POST",
              "uri": "/v1/x", "organisation_id": org, "response_status_code": 200}
    insert_rows(warehouse, AUDIT, [AUDIT.encode(orjson.dumps(record))])
    key = make_key(org, scopes=["audit_logs.read"])
    us = timedelta(microseconds=400)
    for start, expected in ((t0 + us, 0), (t0, 1), (t0 - us, 1)):
        r = api.get("/v1/audit-logs", params={"start_time": start.isoformat(), "end_time": (t0 + timedelta(minutes=1)).isoformat(),
                                              "organisation_id": org}, headers={"x-portkey-api-key": key})
        assert r.status_code == 200 and r.json()["total"] == expected, (start, r.text)
