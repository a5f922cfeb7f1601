"""POST /v1/feedback and PUT /v1/feedback/{id} through HTTP, with real ingest workers.

Expectations are computed here from the inputs (what the stored row and the
weighted-feedback graph must be), never read back from the code under test.
Absence ("nothing was stored") is checked after a sentinel feedback sent later
on the same topic has been stored.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from fastapi.testclient import TestClient

from analytics_api.app import create_app
from analytics_api.auth import HEADER
from conftest import count_generations, publish, read_topic, wait_ingested, wait_until
from tollgate.broker import free_port
from factories import gateway_log

WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-22T00:00:00Z"}


def post(api, key, body, **kwargs):
    return api.post("/v1/feedback", json=body, headers={HEADER: key} if key else {}, **kwargs)


def put(api, key, feedback_id, body):
    return api.put(f"/v1/feedback/{feedback_id}", json=body, headers={HEADER: key} if key else {})


def stored(warehouse, org) -> dict[str, dict]:
    """The current version of every feedback of ``org``, by id."""
    result = warehouse.query(
        "SELECT id, workspace_slug, trace_id, value, weight, metadata.key, metadata.value, created_at, updated_at "
        "FROM feedback FINAL WHERE organisation_id = {o:String}",
        parameters={"o": org},
    )
    rows = {}
    for fid, ws, trace, value, weight, keys, values, created, updated in result.result_rows:
        rows[fid] = {"workspace_slug": ws, "trace_id": trace, "value": value, "weight": weight,
                     "metadata": dict(zip(keys, values)), "created_at": _utc(created), "updated_at": _utc(updated)}
    return rows


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _ms(ts: datetime) -> datetime:
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def sentinel(api, key, warehouse, org) -> str:
    """Send one valid feedback and wait until it is stored; events sent before it were ingested by then."""
    trace = f"sentinel-{uuid.uuid4().hex}"
    r = post(api, key, {"trace_id": trace, "value": 0})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: any(row["trace_id"] == trace for row in stored(warehouse, org).values()))
    return trace


def half_away(x: float) -> int:
    """The graph's integer rounding (docs/analytics.md), computed independently."""
    return int(Decimal(repr(x)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def weighted(api, key, settings) -> dict:
    """The weighted-feedback graph, once the ingest has committed all feedback sent (its sums and
    copies are done then: conftest.wait_ingested)."""
    assert wait_ingested(settings, settings.topic_feedback)
    r = api.get("/v1/analytics/graphs/feedbacks/weighted", params=WINDOW, headers={HEADER: key})
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- create


def test_single_and_array_are_produced_and_stored_in_input_order(settings, workers, api, warehouse, make_key, org):
    key = make_key(org, scopes=["feedback.write"])
    before = _ms(datetime.now(UTC))
    single = {"trace_id": "trace-single", "value": 7, "metadata": {"_user": "alice", "n": 3, "tags": ["a"]}}
    r = post(api, key, single)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success" and isinstance(body["message"], str)
    (single_id,) = body["feedback_ids"]
    array = [
        {"trace_id": "trace-a", "value": -10, "weight": 0},
        {"trace_id": "trace-b", "value": 10, "weight": 0.25, "metadata": {}},
        {"trace_id": "trace-c", "value": 0, "weight": 1},
    ]
    r = post(api, key, array)
    assert r.status_code == 200, r.text
    ids = r.json()["feedback_ids"]
    after = datetime.now(UTC)
    assert len(ids) == 3 and len(set(ids + [single_id])) == 4
    assert all(str(uuid.UUID(i)) == i for i in ids + [single_id])

    assert wait_until(lambda: len(stored(warehouse, org)) == 4)
    rows = stored(warehouse, org)
    expected = {single_id: ("trace-single", 7, 1.0, {"_user": "alice", "n": "3", "tags": json.dumps(["a"], separators=(",", ":"))})}
    for fid, item in zip(ids, array):
        expected[fid] = (item["trace_id"], item["value"], float(item["weight"]), {})
    for fid, (trace, value, weight, metadata) in expected.items():
        row = rows[fid]
        assert (row["trace_id"], row["value"], row["weight"], row["metadata"]) == (trace, value, weight, metadata), fid
        assert row["workspace_slug"] == "default"  # an organisation key's: the default workspace, as for custom logs
        assert before <= row["created_at"] <= after and row["updated_at"] == row["created_at"]

    # the wire format of docs/events.md, and one Kafka key (so one partition) per request
    records = read_topic(settings.kafka_bootstrap, settings.topic_feedback, 4)
    by_id = {json.loads(rec.value)["id"]: rec for rec in records}
    event = json.loads(by_id[single_id].value)
    assert event["organisation_id"] == org and event["trace_id"] == "trace-single" and event["value"] == 7
    assert event["created_at"].endswith("Z") and event["workspace_slug"] == "default"
    assert len({by_id[i].key for i in ids}) == 1 and len({by_id[i].partition for i in ids}) == 1


def test_workspace_key_feedback_carries_its_workspace(settings, workers, api, warehouse, make_key, org):
    key = make_key(org, workspace="ws-7", scopes=["feedback.write"])
    r = post(api, key, {"trace_id": "t-ws", "value": 2, "weight": 0.5})
    assert r.status_code == 200, r.text
    (fid,) = r.json()["feedback_ids"]
    assert wait_until(lambda: fid in stored(warehouse, org))
    assert stored(warehouse, org)[fid]["workspace_slug"] == "ws-7"


# --------------------------------------------------------------------------- validation


BAD_BODIES = [
    ({"value": 1}, "trace_id"),
    ({"trace_id": "", "value": 1}, "trace_id"),
    ({"trace_id": 12, "value": 1}, "trace_id"),
    ({"trace_id": "t"}, "value"),
    ({"trace_id": "t", "value": 11}, "value"),
    ({"trace_id": "t", "value": -11}, "value"),
    ({"trace_id": "t", "value": 1.5}, "value"),
    ({"trace_id": "t", "value": "3"}, "value"),
    ({"trace_id": "t", "value": True}, "value"),
    ({"trace_id": "t", "value": 1, "weight": 1.5}, "weight"),
    ({"trace_id": "t", "value": 1, "weight": -0.1}, "weight"),
    ({"trace_id": "t", "value": 1, "weight": "1"}, "weight"),
    ({"trace_id": "t", "value": 1, "metadata": "x"}, "metadata"),
    ({"trace_id": "t", "value": 1, "metadata": [1]}, "metadata"),
    ([{"trace_id": "t", "value": 1}, {"trace_id": "t", "value": 20}], "[1].value"),
    ([{"trace_id": "t", "value": 1}, 5], "[1]"),
    ([{"trace_id": "t", "value": 1}, {"trace_id": "t", "value": 1, "metadata": {"n": 2**70}}], "[1].metadata"),
    (42, "body"),
    ([], "body"),
]


def test_invalid_feedback_is_422_naming_the_field_and_nothing_is_stored(settings, workers, api, warehouse, make_key, org):
    key = make_key(org, scopes=["feedback.write"])
    for body, field in BAD_BODIES:
        r = post(api, key, body)
        assert r.status_code == 422, (body, r.text)
        messages = [e["msg"] for e in r.json()["detail"]]
        assert any(m.startswith(f"{field}:") for m in messages), (body, messages)
    r = api.post("/v1/feedback", content=b'{"trace_id": "t", "value": ', headers={HEADER: key, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    # an update needs `value`, and the same rules apply to it
    for body, field in [({"weight": 0.5}, "value"), ({"value": 11}, "value"), ({"value": 1, "weight": 2}, "weight"),
                        ({"value": 1, "metadata": 3}, "metadata"), ([{"value": 1}], "body")]:
        r = put(api, key, str(uuid.uuid4()), body)
        assert r.status_code == 422, (body, r.text)
        assert any(e["msg"].startswith(f"{field}:") for e in r.json()["detail"]), (body, r.text)
    trace = sentinel(api, key, warehouse, org)
    assert [row["trace_id"] for row in stored(warehouse, org).values()] == [trace]


def test_too_many_items_or_too_large_events_are_413(settings, workers, warehouse, make_key, org):
    small = settings.model_copy(update={"feedback_max_items": 3, "ingest_max_event_bytes": 2048})
    key = make_key(org, scopes=["feedback.write"])
    with TestClient(create_app(small, small.kafka_bootstrap, pool_size=1)) as api:
        r = post(api, key, [{"trace_id": f"t{i}", "value": 1} for i in range(4)])
        assert r.status_code == 413, r.text
        assert "3" in r.json()["detail"] and "TOLLGATE_FEEDBACK_MAX_ITEMS" in r.json()["detail"]
        r = post(api, key, [{"trace_id": "t0", "value": 1}, {"trace_id": "big", "value": 1, "metadata": {"note": "x" * 3000}}])
        assert r.status_code == 413, r.text
        assert "[1]" in r.json()["detail"] and "2048" in r.json()["detail"]
        r = post(api, key, [{"trace_id": f"ok{i}", "value": i} for i in range(3)])
        assert r.status_code == 200, r.text
        ids = r.json()["feedback_ids"]
        assert wait_until(lambda: len(stored(warehouse, org)) == 3)
    rows = stored(warehouse, org)
    assert sorted(rows) == sorted(ids)
    assert [rows[i]["trace_id"] for i in ids] == ["ok0", "ok1", "ok2"]


# --------------------------------------------------------------------------- update


def test_update_supersedes_in_analytics_and_in_the_row(settings, workers, api, warehouse, producer, make_key, org):
    key = make_key(org, scopes=["feedback.write", "analytics.read"])
    start = datetime(2026, 11, 20, 9, tzinfo=UTC)
    logs = [gateway_log(org, created_at=start + timedelta(minutes=i), trace_id=f"trace-{org}-{i}") for i in range(2)]
    publish(producer, settings.topic_gateway_logs, logs)
    assert wait_until(lambda: count_generations(warehouse, org) == 2)
    trace_a, trace_b = (log["metrics"]["trace_id"] for log in logs)

    r = post(api, key, [{"trace_id": trace_a, "value": 5, "metadata": {"_user": "bob"}},
                        {"trace_id": trace_b, "value": -2, "weight": 0.5}])
    assert r.status_code == 200, r.text
    id_a, id_b = r.json()["feedback_ids"]
    assert wait_until(lambda: len(stored(warehouse, org)) == 2)
    original = stored(warehouse, org)[id_a]
    graph = weighted(api, key, settings)
    assert graph["summary"]["avg"] == half_away((5 * 1 + -2 * 0.5) / (1 + 0.5)) == 3

    r = put(api, key, id_a, {"value": -4, "weight": 0.25, "metadata": {"reason": "changed"}})
    assert r.status_code == 200, r.text
    assert r.json()["feedback_ids"] == [id_a] and r.json()["status"] == "success"
    assert wait_until(lambda: stored(warehouse, org)[id_a]["value"] == -4)
    rows = stored(warehouse, org)
    assert len(rows) == 2
    row = rows[id_a]
    assert (row["trace_id"], row["weight"], row["metadata"]) == (trace_a, 0.25, {"reason": "changed"})
    assert row["created_at"] == original["created_at"] and row["updated_at"] > original["updated_at"]
    expected = half_away((-4 * 0.25 + -2 * 0.5) / (0.25 + 0.5))
    assert expected == -3
    graph = weighted(api, key, settings)
    assert graph["summary"]["avg"] == expected
    points = [p for p in graph["data_points"] if p["avg"] != 0]
    assert len(points) == 1 and points[0]["avg"] == expected  # both traces start in one (hourly) bucket

    # only `value` given: weight and metadata stay
    r = put(api, key, id_a, {"value": 9})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: stored(warehouse, org)[id_a]["value"] == 9)
    row = stored(warehouse, org)[id_a]
    assert (row["weight"], row["metadata"], row["created_at"]) == (0.25, {"reason": "changed"}, original["created_at"])
    assert weighted(api, key, settings)["summary"]["avg"] == half_away((9 * 0.25 + -2 * 0.5) / (0.25 + 0.5)) == 2


def test_update_of_another_tenants_feedback_is_404(settings, workers, api, warehouse, make_key, org):
    org_b = f"{org}-b"
    key_a, key_b = make_key(org, scopes=["feedback.write"]), make_key(org_b, scopes=["feedback.write"])
    r = post(api, key_b, {"trace_id": "b-secret-trace", "value": 3})
    (fid,) = r.json()["feedback_ids"]
    assert wait_until(lambda: fid in stored(warehouse, org_b))
    missing = str(uuid.uuid4())
    r_other, r_missing = put(api, key_a, fid, {"value": -10}), put(api, key_a, missing, {"value": -10})
    assert r_other.status_code == 404 and r_missing.status_code == 404, (r_other.text, r_missing.text)
    assert "b-secret-trace" not in r_other.text and org_b not in r_other.text
    assert r_other.text.replace(fid, "ID") == r_missing.text.replace(missing, "ID")
    # a workspace key of B sees only its workspace; this feedback is in the default one (an organisation key's)
    assert put(api, make_key(org_b, workspace="ws-1", scopes=["feedback.write"]), fid, {"value": -10}).status_code == 404
    sentinel(api, key_b, warehouse, org_b)
    assert stored(warehouse, org_b)[fid]["value"] == 3
    assert stored(warehouse, org) == {}


def test_401_and_403(settings, workers, api, warehouse, make_key, org):
    body = {"trace_id": "t-denied", "value": 1}
    assert post(api, None, body).status_code == 401
    assert post(api, "tg-" + "0" * 48, body).status_code == 401
    assert put(api, None, str(uuid.uuid4()), {"value": 1}).status_code == 401
    for scopes in (["analytics.read", "logs.write"], []):
        key = make_key(org, scopes=scopes)
        for r in (post(api, key, body), put(api, key, str(uuid.uuid4()), {"value": 1})):
            assert r.status_code == 403, r.text
            assert "feedback.write" in r.json()["detail"]
    sentinel(api, make_key(org, scopes=["feedback.write"]), warehouse, org)
    assert "t-denied" not in [row["trace_id"] for row in stored(warehouse, org).values()]


# --------------------------------------------------------------------------- Kafka down


def test_kafka_unreachable_is_503_and_nothing_is_stored(settings, workers, api, warehouse, make_key, org):
    key = make_key(org, scopes=["feedback.write"])
    r = post(api, key, {"trace_id": "t-kept", "value": 4})
    (kept,) = r.json()["feedback_ids"]
    assert wait_until(lambda: kept in stored(warehouse, org))
    app = create_app(settings, f"127.0.0.1:{free_port()}", pool_size=1)
    app.state.publisher.timeout = 2.0  # how long the API tries before answering 503 (default 10 s)
    with TestClient(app) as down:
        r = post(down, key, [{"trace_id": "t-lost", "value": 1}, {"trace_id": "t-lost", "value": 2}])
        assert r.status_code == 503, r.text
        assert "Kafka" in r.json()["detail"]
        r = put(down, key, kept, {"value": -4})
        assert r.status_code == 503, r.text
    sentinel(api, key, warehouse, org)
    rows = stored(warehouse, org)
    assert "t-lost" not in [row["trace_id"] for row in rows.values()]
    assert rows[kept]["value"] == 4 and rows[kept]["updated_at"] == rows[kept]["created_at"]


# --------------------------------------------------------------------------- the portkey-ai SDK


def test_portkey_sdk_creates_and_updates_feedback(live_url, workers, warehouse, make_key, org):
    from portkey_ai import Portkey

    client = Portkey(api_key=make_key(org, scopes=["feedback.write"]), base_url=live_url)
    one = client.feedback.create(trace_id="sdk-1", value=3, weight=0.5, metadata={"_user": "sdk"})
    assert one.status == "success" and len(one.feedback_ids) == 1
    bulk = client.feedback.bulk_create(feedbacks=[{"trace_id": "sdk-2", "value": -1}, {"trace_id": "sdk-3", "value": 10, "weight": 0.1}])
    assert len(bulk.feedback_ids) == 2
    ids = one.feedback_ids + bulk.feedback_ids
    assert wait_until(lambda: len(stored(warehouse, org)) == 3)
    rows = stored(warehouse, org)
    assert [(rows[i]["trace_id"], rows[i]["value"], rows[i]["weight"]) for i in ids] == [
        ("sdk-1", 3, 0.5), ("sdk-2", -1, 1.0), ("sdk-3", 10, 0.1)]
    assert rows[ids[0]]["metadata"] == {"_user": "sdk"}

    updated = client.feedback.update(feedback_id=ids[1], value=6, weight=0.75)
    assert updated.feedback_ids == [ids[1]]
    assert wait_until(lambda: stored(warehouse, org)[ids[1]]["value"] == 6)
    assert stored(warehouse, org)[ids[1]]["weight"] == 0.75


def test_updates_right_after_the_post_and_each_other_build_on_each_other(settings, workers, api, warehouse, make_key, org):
    """Feedback is read back from ClickHouse, behind Kafka by the ingest lag. An update right after the POST
    (not stored yet) is no 404, and a second update right after a first keeps the fields the first set
    (they are left out of the second): the API builds on the newest version it published itself."""
    key = make_key(org, scopes=["feedback.write"])
    (fid,) = post(api, key, {"trace_id": "quick-1", "value": 1, "weight": 1.0, "metadata": {"a": "1"}}).json()["feedback_ids"]
    first = put(api, key, fid, {"value": 2, "weight": 0.25, "metadata": {"b": "2"}})
    second = put(api, key, fid, {"value": 7})
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    sentinel(api, key, warehouse, org)  # everything produced before it is stored
    row = stored(warehouse, org)[fid]
    assert (row["value"], row["weight"], row["metadata"], row["trace_id"]) == (7, 0.25, {"b": "2"}, "quick-1")
    assert put(api, make_key(org, workspace="ws-1", scopes=["feedback.write"]), fid, {"value": 0}).status_code == 404


def test_the_published_feedback_kept_for_updates_is_bounded_in_bytes():
    """What the API keeps of the feedback it published (for updates that build on it) is capped in bytes,
    the newest kept: a client posting large metadata cannot make it grow without bound."""
    from analytics_api.auth import Principal
    from analytics_api.routers.feedback import _Published

    kept = _Published(max_bytes=10_000)
    events = [{"id": f"f{i}", "organisation_id": "o", "created_at": "2026-11-20T10:00:00.000Z", "trace_id": "t",
               "value": 1, "metadata": {"blob": "x" * 900}} for i in range(40)]
    kept.add(events, [json.dumps(e).encode() for e in events])
    principal = Principal(organisation_id="o", workspace_slug=None, key_id="k", scopes=frozenset())
    present = [e["id"] for e in events if kept.get(principal, e["id"]) is not None]
    assert kept._bytes <= 10_000 and present == [f"f{i}" for i in range(40 - len(present), 40)] and len(present) >= 9
    assert kept.get(principal, "f39")["metadata"]["blob"] == "x" * 900
    assert kept.get(Principal(organisation_id="other", workspace_slug=None, key_id="k", scopes=frozenset()), "f39") is None
