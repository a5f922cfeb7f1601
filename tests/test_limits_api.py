"""/v1/policies through HTTP: validation (422 naming the field, nothing stored), tenancy,
responses against the bundled spec, and user values that never become SQL.

(Counting itself is tested in test_limits.py.)
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from test_limits import Clock, call, create, entities, lapi, log, lsettings, new_job  # noqa: F401 (fixtures)
from conftest import count_generations, publish, wait_until
from spec_schemas import SPEC, STRICT, resolve



@pytest.fixture
def clock() -> Clock:
    c = Clock.__new__(Clock)
    c.set("2026-11-10T12:00:00")
    return c


def schema(name: str) -> dict:
    return resolve(SPEC["components"]["schemas"][name])


def response_schema(path: str, method: str = "get") -> dict:
    return resolve(SPEC["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"])


def valid(body: Any, s: dict) -> None:
    STRICT(s).validate(body)


USAGE = {"name": "Monthly cost per key", "conditions": [{"key": "workspace_id", "value": "ws-1"}],
         "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 1000.0, "alert_threshold": 800.0,
         "periodic_reset": "monthly"}
RATE = {"name": "100 RPM per key", "conditions": [{"key": "workspace_id", "value": "ws-1"}],
        "group_by": [{"key": "api_key"}], "type": "requests", "unit": "rpm", "value": 100}


def with_(base: dict, **changes) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


BAD_USAGE = [
    (with_(USAGE, conditions=...), "conditions"),
    (with_(USAGE, conditions=[]), "conditions"),
    (with_(USAGE, conditions=[{"key": "user", "value": "x"}]), "conditions.0.key"),
    (with_(USAGE, conditions=[{"key": "metadata.", "value": "x"}]), "conditions.0.key"),
    (with_(USAGE, conditions=[{"key": "metadata.a:b", "value": "x"}]), "conditions.0.key"),
    (with_(USAGE, conditions=[{"key": "workspace_id"}]), "conditions.0.value"),
    (with_(USAGE, conditions=[{"key": "workspace_id", "value": ""}]), "conditions.0.value"),
    (with_(USAGE, conditions=[{"key": "workspace_id", "value": 5}]), "conditions.0.value"),
    (with_(USAGE, conditions=[{"key": "api_key", "value": "a"}, {"key": "api_key", "value": "b"}]), "conditions.1.key"),
    (with_(USAGE, conditions=[{"key": "organisation_id", "value": "another-org"}]), "conditions.0.value"),
    (with_(USAGE, group_by=...), "group_by"),
    (with_(USAGE, group_by=[]), "group_by"),
    (with_(USAGE, group_by=[{"key": "model"}]), "group_by.0.key"),
    (with_(USAGE, group_by=[{"key": "api_key"}, {"key": "api_key"}]), "group_by.1.key"),
    (with_(USAGE, type="money"), "type"),
    (with_(USAGE, type=...), "type"),
    (with_(USAGE, credit_limit=...), "credit_limit"),
    (with_(USAGE, credit_limit="1000"), "credit_limit"),
    (with_(USAGE, credit_limit=True), "credit_limit"),
    (with_(USAGE, credit_limit=-1), "credit_limit"),
    (with_(USAGE, alert_threshold=-5), "alert_threshold"),
    (with_(USAGE, alert_threshold=1000.0), "alert_threshold"),
    (with_(USAGE, alert_threshold=2000.0), "alert_threshold"),
    (with_(USAGE, type="tokens", credit_limit=1000.5, alert_threshold=None), "credit_limit"),
    (with_(USAGE, type="tokens", credit_limit=1000, alert_threshold=10.5), "alert_threshold"),
    (with_(USAGE, periodic_reset="daily"), "periodic_reset"),
    (with_(USAGE, name="n" * 256), "name"),
    (with_(USAGE, name=7), "name"),
]
BAD_RATE = [
    (with_(RATE, unit="rps"), "unit"),
    (with_(RATE, unit=...), "unit"),
    (with_(RATE, value=-1), "value"),
    (with_(RATE, value=1.5), "value"),
    (with_(RATE, value="100"), "value"),
    (with_(RATE, value=...), "value"),
    (with_(RATE, type="cost"), "type"),
    (with_(RATE, group_by=[{"key": "metadata.a|b"}]), "group_by.0.key"),
]


def stored(warehouse, org) -> int:
    return int(warehouse.command("SELECT count() FROM limit_policies WHERE organisation_id = {o:String}", parameters={"o": org}))


def test_create_refuses_invalid_bodies_naming_the_field(lapi, warehouse, make_key, org):
    key = make_key(org)
    cases = [("usage-limits", b, f) for b, f in BAD_USAGE] + [("rate-limits", b, f) for b, f in BAD_RATE]
    for kind, body, field in cases:
        r = call(lapi, "POST", f"/{kind}", key, body)
        assert r.status_code == 422, (body, r.text)
        assert any(e["msg"].startswith(f"{field}:") for e in r.json()["detail"]), (body, r.json())
    for raw in (b"[]", b'"x"', b"{", b"null"):
        r = lapi.post("/v1/policies/usage-limits", content=raw, headers={"x-portkey-api-key": key, "content-type": "application/json"})
        assert r.status_code == 422, raw
    assert stored(warehouse, org) == 0
    # the spec's own examples are accepted
    for kind in ("usage-limits", "rate-limits"):
        for example in SPEC["paths"][f"/policies/{kind}"]["post"]["requestBody"]["content"]["application/json"]["examples"].values():
            body = example["value"]
            if body["conditions"][0]["key"] == "workspace_id":
                body = {**body, "workspace_id": body["conditions"][0]["value"]}
            assert call(lapi, "POST", f"/{kind}", key, body).status_code == 200, body


def test_updates_are_validated(lapi, warehouse, make_key, org):
    key = make_key(org)
    pid = create(lapi, key, "usage-limits", with_(USAGE, group_by=[{"key": "workspace_id"}, {"key": "metadata.team"}]))
    rid = create(lapi, key, "rate-limits", RATE)
    cases = [
        ("usage-limits", pid, {"conditions": []}, "conditions"),
        ("usage-limits", pid, {"group_by": [{"key": "api_key"}]}, "group_by"),
        ("usage-limits", pid, {"type": "tokens"}, "type"),
        ("usage-limits", pid, {"workspace_id": "ws-2"}, "workspace_id"),
        ("usage-limits", pid, {"credit_limit": None}, "credit_limit"),
        ("usage-limits", pid, {"credit_limit": 500}, "credit_limit"),  # below the threshold (800)
        ("usage-limits", pid, {"alert_threshold": 1000}, "alert_threshold"),
        ("usage-limits", pid, {"periodic_reset": "daily"}, "periodic_reset"),
        ("usage-limits", pid, {"reset_usage_for_value": "team:x"}, "reset_usage_for_value"),
        ("usage-limits", pid, {"reset_usage_for_value": "bare-value"}, "reset_usage_for_value"),  # two group_by keys
        ("usage-limits", pid, {"reset_usage_for_value": "workspace_id:a|metadata.team:"}, "reset_usage_for_value"),
        ("rate-limits", rid, {"unit": "rps"}, "unit"),
        ("rate-limits", rid, {"unit": None}, "unit"),
        ("rate-limits", rid, {"value": 2.5}, "value"),
        ("rate-limits", rid, {"conditions": []}, "conditions"),
    ]
    before = stored(warehouse, org)
    for kind, policy_id, body, field in cases:
        r = call(lapi, "PUT", f"/{kind}/{policy_id}", key, body)
        assert r.status_code == 422, (body, r.text)
        assert any(e["msg"].startswith(f"{field}:") for e in r.json()["detail"]), (body, r.json())
    assert stored(warehouse, org) == before
    # a two-key value key is accepted whole; null removes the threshold and the period
    assert call(lapi, "PUT", f"/usage-limits/{pid}", key, {"reset_usage_for_value": "workspace_id:a|metadata.team:b\\|c"}).status_code == 200
    assert call(lapi, "PUT", f"/usage-limits/{pid}", key, {"alert_threshold": None, "periodic_reset": None}).status_code == 200
    got = call(lapi, "GET", f"/usage-limits/{pid}", key).json()
    assert (got["alert_threshold"], got["periodic_reset"]) == (None, None)
    assert warehouse.query("SELECT value_key FROM limit_resets WHERE policy_id = {p:String}", parameters={"p": pid}).result_rows == [
        ("workspace_id:a|metadata.team:b\\|c",)]


BAD_QUERIES = [
    ("/usage-limits", {"page_size": "5000"}, "page_size"),
    ("/usage-limits", {"status": "deleted"}, "status"),
    ("/usage-limits", {"type": "money"}, "type"),
    ("/usage-limits", {"current_page": "-1"}, "current_page"),
    ("/rate-limits", {"unit": "rps"}, "unit"),
    ("/usage-limits/{pid}", {"include_usage": "maybe"}, "include_usage"),
    ("/usage-limits/{pid}/entities", {"page_size": "0"}, "page_size"),
    ("/usage-limits/{pid}/entities", {"page_size": "101"}, "page_size"),
    ("/usage-limits/{pid}/entities", {"status": "archived"}, "status"),
    ("/usage-limits/not-a-uuid", {}, "policyUsageLimitsId"),
    ("/rate-limits/not-a-uuid", {}, "rateLimitsPolicyId"),
]


def test_bad_query_parameters_are_422_naming_them(lapi, make_key, org):
    key = make_key(org)
    pid = create(lapi, key, "usage-limits", USAGE)
    for path, params, name in BAD_QUERIES:
        r = call(lapi, "GET", path.format(pid=pid), key, **params)
        assert r.status_code == 422, (path, params, r.text)
        assert any(name in (e.get("loc") or []) or e["msg"].startswith(name) for e in r.json()["detail"]), r.json()


def test_responses_follow_the_spec(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    key = make_key(org)
    r = call(lapi, "POST", "/usage-limits", key, with_(USAGE, workspace_id="ws-1"))
    assert r.status_code == 200
    valid(r.json(), response_schema("/policies/usage-limits", "post"))
    assert r.json()["object"] == "policy_usage_limits" and uuid.UUID(r.json()["id"])
    pid = r.json()["id"]
    r = call(lapi, "POST", "/rate-limits", key, with_(RATE, workspace_id="ws-1"))
    valid(r.json(), response_schema("/policies/rate-limits", "post"))
    rid = r.json()["id"]

    publish(producer, lsettings.topic_gateway_logs, [log(org, "2026-11-10T12:30:00", rng=random.Random(1), workspace="ws-1",
                                                         api_key="ak-9", cost=900)])
    assert wait_until(lambda: count_generations(warehouse, org) == 1)
    clock.set("2026-11-10T12:30:30")
    job = new_job(lsettings, clock, org)
    job.run_once()
    job.close()

    got = call(lapi, "GET", f"/usage-limits/{pid}", key, include_usage="true").json()
    valid(got, response_schema("/policies/usage-limits/{policyUsageLimitsId}"))
    assert got == {
        "id": pid, "name": "Monthly cost per key", "conditions": [{"key": "workspace_id", "value": "ws-1"}],
        "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 1000.0, "alert_threshold": 800.0,
        "periodic_reset": "monthly", "status": "active", "workspace_id": "ws-1", "organisation_id": org,
        "created_at": "2026-11-10T12:00:00.000Z", "last_updated_at": "2026-11-10T12:00:00.000Z", "object": "policy_usage_limits",
        "value_key_usage_map": {"api_key:ak-9": {"current_usage": 900.0, "status": "active", "is_threshold_alerts_sent": True,
                                                 "is_exhausted_alerts_sent": False}},
    }
    listed = call(lapi, "GET", "/usage-limits", key).json()
    valid(listed, response_schema("/policies/usage-limits"))
    assert [p["id"] for p in listed["data"]] == [pid] and listed["total"] == 1
    ents = call(lapi, "GET", f"/usage-limits/{pid}/entities", key).json()
    valid(ents, response_schema("/policies/usage-limits/{policyUsageLimitsId}/entities"))
    assert [(e["value_key"], e["current_usage"]) for e in ents["data"]] == [("api_key:ak-9", 900.0)]
    assert call(lapi, "GET", f"/usage-limits/{pid}/entities", key, search="AK-9").json()["total"] == 1
    assert call(lapi, "GET", f"/usage-limits/{pid}/entities", key, search="zz").json()["total"] == 0
    assert call(lapi, "GET", f"/usage-limits/{pid}/entities", key, status="exhausted").json()["total"] == 0
    got = call(lapi, "GET", f"/rate-limits/{rid}", key).json()
    valid(got, response_schema("/policies/rate-limits/{rateLimitsPolicyId}"))
    assert (got["unit"], got["value"], got["type"]) == ("rpm", 100, "requests")
    valid(call(lapi, "GET", "/rate-limits", key, unit="rpm").json(), response_schema("/policies/rate-limits"))
    assert call(lapi, "GET", "/rate-limits", key, unit="rph").json()["total"] == 0
    for method, path in (("PUT", f"/usage-limits/{pid}"), ("PUT", f"/rate-limits/{rid}")):
        assert call(lapi, method, path, key, {"name": "renamed"}).json() == {}
    ent = ents["data"][0]["id"]
    assert call(lapi, "PUT", f"/usage-limits/{pid}/entities/{ent}/reset", key).json() == {}
    assert call(lapi, "PUT", f"/usage-limits/{pid}/entities/nope/reset", key).status_code == 404
    # an organisation-wide policy has no workspace (null: Tollgate's reading of the spec, as for API keys)
    org_wide = create(lapi, key, "usage-limits", USAGE)
    assert call(lapi, "GET", f"/usage-limits/{org_wide}", key).json()["workspace_id"] is None
    assert call(lapi, "DELETE", f"/rate-limits/{rid}", key).json() == {}

    # every change is in the audit trail, as the policy resource it changed
    def audited():
        return set(warehouse.query("SELECT resource_type, action, response_status_code FROM audit_logs FINAL "
                                   "WHERE organisation_id = {o:String}", parameters={"o": org}).result_rows)
    expected = {("usage_limits_policy", "create", 200), ("rate_limits_policy", "create", 200),
                ("usage_limits_policy", "update", 200), ("rate_limits_policy", "update", 200),
                ("usage_limits_policy", "reset", 200), ("usage_limits_policy", "reset", 404),
                ("rate_limits_policy", "delete", 200)}
    assert wait_until(lambda: expected <= audited()), audited()


def test_tenancy(lapi, make_key, org):
    admin, ws1, ws2 = make_key(org), make_key(org, workspace="ws-1"), make_key(org, workspace="ws-2")
    other = make_key(f"other-{org}")
    reader = make_key(org, scopes=["policies.read"])
    org_policy = create(lapi, admin, "usage-limits", USAGE)
    ws1_policy = create(lapi, ws1, "usage-limits", with_(USAGE, conditions=[{"key": "api_key", "value": "k"}]))
    assert call(lapi, "GET", f"/usage-limits/{ws1_policy}", admin).json()["workspace_id"] == "ws-1"
    # a workspace key sees its workspace's policies only; another organisation sees nothing
    assert call(lapi, "GET", f"/usage-limits/{org_policy}", ws1).status_code == 404
    assert call(lapi, "GET", f"/usage-limits/{ws1_policy}", ws2).status_code == 404
    for k in (other,):
        for method in ("GET", "DELETE"):
            assert call(lapi, method, f"/usage-limits/{org_policy}", k).status_code == 404
        assert call(lapi, "PUT", f"/usage-limits/{org_policy}", k, {"name": "x"}).status_code == 404
        assert call(lapi, "GET", f"/usage-limits/{org_policy}/entities", k).status_code == 404
        assert call(lapi, "GET", "/usage-limits", k).json()["total"] == 0
    assert call(lapi, "GET", f"/usage-limits/{uuid.uuid4()}", admin).status_code == 404
    assert call(lapi, "GET", f"/rate-limits/{org_policy}", admin).status_code == 404  # a usage policy is not a rate policy
    assert {p["id"] for p in call(lapi, "GET", "/usage-limits", admin).json()["data"]} == {org_policy, ws1_policy}
    assert [p["id"] for p in call(lapi, "GET", "/usage-limits", admin, workspace_id="ws-1").json()["data"]] == [ws1_policy]
    assert [p["id"] for p in call(lapi, "GET", "/usage-limits", ws1).json()["data"]] == [ws1_policy]
    assert call(lapi, "GET", "/usage-limits", ws1, workspace_id="ws-2").status_code == 403
    # creating: the key's organisation only; a workspace key for its workspace only; its condition must agree
    assert call(lapi, "POST", "/usage-limits", admin, with_(USAGE, organisation_id="someone-else")).status_code == 403
    assert call(lapi, "POST", "/usage-limits", ws1, with_(USAGE, workspace_id="ws-2")).status_code == 403
    r = call(lapi, "POST", "/usage-limits", ws1, USAGE | {"conditions": [{"key": "workspace_id", "value": "ws-2"}]})
    assert r.status_code == 422 and "conditions.0.value" in r.text
    assert call(lapi, "POST", "/usage-limits", reader, USAGE).status_code == 403
    assert call(lapi, "GET", "/usage-limits", reader).status_code == 200


INJECTIONS = ["' OR 1=1 --", "x'); DROP TABLE generations; --", "{scope_org:String}", "\\'", "`id`", "ユーザー|\\"]


def test_user_values_are_bound_never_sql(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    key = make_key(org)
    rng = random.Random(5)
    events = [log(org, "2026-11-10T12:10:00", rng=rng, user=v, team=v, workspace="ws-1", cost=5) for v in INJECTIONS]
    publish(producer, lsettings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    ids = []
    for value in INJECTIONS:
        ids.append(create(lapi, key, "usage-limits", {
            "conditions": [{"key": "metadata.team", "value": value}], "group_by": [{"key": "metadata._user"}],
            "type": "cost", "credit_limit": 100}))
    odd_key = create(lapi, key, "usage-limits", {"conditions": [{"key": "metadata.' OR 1=1 --", "value": "x"}],
                                                 "group_by": [{"key": "metadata.{scope_org}"}], "type": "cost",
                                                 "credit_limit": 1})
    quoted_group = create(lapi, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-1"}],
                                                      "group_by": [{"key": "metadata.' OR 1=1 --"}, {"key": "metadata._user"}],
                                                      "type": "cost", "credit_limit": 1})
    clock.set("2026-11-10T12:20:00")
    job = new_job(lsettings, clock, org)
    job.run_once()
    job.close()
    assert entities(lapi, key, quoted_group) == {}  # no request has that key; the name never became SQL
    for value, pid in zip(INJECTIONS, ids):
        escaped = value.replace("\\", "\\\\").replace("|", "\\|")
        assert {k: v["current_usage"] for k, v in entities(lapi, key, pid).items()} == {f"metadata._user:{escaped}": 5.0}
        r = call(lapi, "GET", f"/usage-limits/{pid}/entities", key, search=escaped)
        assert r.status_code == 200 and r.json()["total"] == 1
    assert entities(lapi, key, odd_key) == {}
    assert count_generations(warehouse, org) == len(events)


def test_a_change_racing_a_delete_does_not_bring_the_policy_back(api, warehouse, make_key, org):
    """A DELETE that lands between a PUT's read and its write (made here at the moment the PUT asks the
    API's clock, after it read the policy) must stand: archiving outranks any later change of the stale
    row, so the limits job never counts the policy again."""
    from datetime import UTC, datetime

    from warehouse.queries import policies as pq

    admin = make_key(org)
    pid = api.post("/v1/policies/usage-limits", json=USAGE, headers={"x-portkey-api-key": admin}).json()["id"]
    armed = [True]

    def clock():
        now = datetime.now(UTC)
        if armed.pop() if armed else False:  # once: what DELETE /v1/policies/usage-limits/{id} writes
            pq.write_version(warehouse, pq.get(warehouse, "usage_limits", org, None, pid), status="archived",
                             updated_at=now, changed_by="concurrent-delete")
        return now

    api.app.state.limits_clock = clock
    r = api.put(f"/v1/policies/usage-limits/{pid}", json={"name": "renamed"}, headers={"x-portkey-api-key": admin})
    assert not armed and r.status_code == 200, r.text
    assert pq.get(warehouse, "usage_limits", org, None, pid).status == "archived"
    assert pid not in {p.id for p in pq.active(warehouse, [org])}
    assert api.get(f"/v1/policies/usage-limits/{pid}", headers={"x-portkey-api-key": admin}).status_code == 404
