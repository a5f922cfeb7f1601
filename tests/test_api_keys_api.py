"""/v1/api-keys through HTTP: lifecycle, shown once, hash only stored, revocation,
rotation, scopes, workspace rules and tenant isolation (real chdb; the test
settings use auth_cache_seconds=0, so revocation shows on the next request).
"""

from __future__ import annotations

import hashlib
import time
import uuid

import httpx
import pytest

from analytics_api.auth import HEADER, SCOPES, hash_key
from warehouse.queries import api_keys

WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-22T00:00:00Z"}


def call(api, method, path, key, body=None, **params):
    kwargs = {"headers": {HEADER: key} if key else {}, "params": params}
    if body is not None:
        kwargs["json"] = body
    return api.request(method, f"/v1/api-keys{path}", **kwargs)


def create(api, admin, body, kind="organisation/service"):
    return call(api, "POST", f"/{kind}", admin, body)


def key_id(warehouse, key: str) -> str:
    return api_keys.find_by_hash(warehouse, hash_key(key)).id


def all_versions(warehouse, kid: str) -> list[tuple]:
    return warehouse.query("SELECT * FROM api_keys WHERE id = {id:String}", parameters={"id": kid}).result_rows


def can_read_analytics(api, key) -> int:
    return api.get("/v1/analytics/graphs/requests", params=WINDOW, headers={HEADER: key}).status_code


def listed_ids(api, key, **params) -> set[str]:
    r = call(api, "GET", "", key, page_size=100, **params)
    assert r.status_code == 200, r.text
    return {k["id"] for k in r.json()["data"]}


# --------------------------------------------------------------------------- lifecycle


def test_full_lifecycle(api, warehouse, make_key, org):
    admin = make_key(org)
    r = create(api, admin, {"name": "ci", "description": "for CI", "scopes": ["analytics.read", "logs.read"]})
    assert r.status_code == 200, r.text
    created = r.json()
    kid, key = created["id"], created["key"]
    assert created["object"] == "api-key" and key.startswith("tg-") and len(key) == 51
    assert can_read_analytics(api, key) == 200

    # shown once: get and list show everything but the key
    r = call(api, "GET", f"/{kid}", admin)
    assert r.status_code == 200, r.text
    got = r.json()
    assert {k: got[k] for k in ("id", "name", "description", "type", "organisation_id", "workspace_id", "status", "scopes", "object")} == {
        "id": kid, "name": "ci", "description": "for CI", "type": "organisation-service", "organisation_id": org,
        "workspace_id": None, "status": "active", "scopes": ["analytics.read", "logs.read"], "object": "api-key"}
    assert "key" not in got and key not in r.text and hashlib.sha256(key.encode()).hexdigest() not in r.text
    r = call(api, "GET", "", admin)
    assert r.status_code == 200 and kid in {k["id"] for k in r.json()["data"]}
    assert key not in r.text

    # only the hash is stored
    (row,) = all_versions(warehouse, kid)
    assert hashlib.sha256(key.encode()).hexdigest() in row and not any(key in str(v) for v in row)

    # update: name and scopes; the narrower scopes apply at once
    r = call(api, "PUT", f"/{kid}", admin, {"id": kid, "name": "ci-2", "scopes": ["logs.read"]})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["scopes"], r.json()["description"]) == ("ci-2", ["logs.read"], "for CI")
    assert call(api, "GET", f"/{kid}", admin).json()["name"] == "ci-2"
    assert can_read_analytics(api, key) == 403

    # disable and re-enable
    assert call(api, "PUT", f"/{kid}", admin, {"status": "disabled"}).json()["status"] == "disabled"
    assert can_read_analytics(api, key) == 401
    call(api, "PUT", f"/{kid}", admin, {"status": "active", "scopes": ["analytics.read"]})
    assert can_read_analytics(api, key) == 200

    # rotate: same id, a new secret; the old one stops working
    r = call(api, "POST", f"/{kid}/rotate", admin)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == kid
    new = r.json()["key"]
    assert new != key and new.startswith("tg-")
    assert can_read_analytics(api, key) == 401 and can_read_analytics(api, new) == 200
    assert call(api, "GET", f"/{kid}", admin).json()["name"] == "ci-2"

    # delete revokes
    r = call(api, "DELETE", f"/{kid}", admin)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked" and new not in r.text
    assert can_read_analytics(api, new) == 401
    assert call(api, "GET", f"/{kid}", admin).status_code == 404
    assert kid not in listed_ids(api, admin)
    for method, path in (("PUT", f"/{kid}"), ("DELETE", f"/{kid}"), ("POST", f"/{kid}/rotate")):
        assert call(api, method, path, admin, {"name": "x"} if method == "PUT" else None).status_code == 404

    # no stored version of the row holds a plaintext key; the latest holds the rotated key's hash
    assert not any(k in str(v) for v in all_versions(warehouse, kid) for k in (key, new))
    assert api_keys.find_by_hash(warehouse, hashlib.sha256(new.encode()).hexdigest()).status == "revoked"
    assert api_keys.find_by_hash(warehouse, hashlib.sha256(key.encode()).hexdigest()) is None


def test_list_pages_newest_first_and_filters_by_workspace(api, make_key, org):
    admin = make_key(org)
    made = []
    for i in range(3):
        made.append(create(api, admin, {"name": f"k{i}", "scopes": ["logs.read"]}).json()["id"])
        time.sleep(0.002)  # distinct created_at milliseconds, so "newest first" is one order
    ws = create(api, admin, {"name": "w", "workspace_id": "ws-1", "scopes": ["logs.read"]}, "workspace/user").json()["id"]
    page = call(api, "GET", "", admin, page_size=2, current_page=0).json()
    assert page["object"] == "list" and page["total"] == 5  # + the admin key itself
    assert [k["id"] for k in page["data"]] == [ws, made[2]]
    assert [k["id"] for k in call(api, "GET", "", admin, page_size=2, current_page=1).json()["data"]] == [made[1], made[0]]
    assert listed_ids(api, admin, workspace_id="ws-1") == {ws}
    got = call(api, "GET", f"/{ws}", admin).json()
    assert (got["type"], got["workspace_id"]) == ("workspace-user", "ws-1")
    assert call(api, "GET", "", admin, page_size=101).status_code == 422


# --------------------------------------------------------------------------- validation and scopes


BAD = [
    ("organisation/service", {"scopes": ["logs.read", "bogus.scope"]}, "bogus.scope"),
    ("organisation/service", {"scopes": ["logs.read", "bogus.scope"]}, "scopes"),
    ("organisation/service", {"name": "no scopes"}, "scopes"),
    ("organisation/service", {"scopes": []}, "scopes"),
    ("organisation/service", {"scopes": ["logs.read"], "expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
    ("organisation/service", {"scopes": ["logs.read"], "rate_limits": [{"type": "requests", "unit": "rpm", "value": 1}]}, "rate_limits"),
    ("organisation/service", {"scopes": ["logs.read"], "workspace_id": "ws-1"}, "workspace_id"),
    ("workspace/service", {"scopes": ["logs.read"]}, "workspace_id"),
    ("team/service", {"scopes": ["logs.read"]}, "type"),
    ("organisation/robot", {"scopes": ["logs.read"]}, "sub_type"),
    ("organisation/service", {"scopes": ["logs.read"], "name": 5}, "name"),
]


@pytest.mark.parametrize("kind,body,named", BAD)
def test_invalid_create_is_422_naming_the_problem(api, make_key, org, kind, body, named):
    admin = make_key(org)
    r = create(api, admin, body, kind)
    assert r.status_code == 422, r.text
    assert named in r.text
    assert listed_ids(api, admin) == {key_id_of(api, admin)}  # nothing was created


def key_id_of(api, admin) -> str:
    (only,) = call(api, "GET", "", admin).json()["data"]
    return only["id"]


def test_invalid_update_is_422(api, make_key, org):
    admin = make_key(org)
    kid = create(api, admin, {"scopes": ["logs.read"]}).json()["id"]
    for body, named in (({"scopes": ["nope"]}, "nope"), ({"status": "revoked"}, "status"), ({"id": str(uuid.uuid4())}, "id"),
                        ({"usage_limits": {"credit_limit": 1}}, "usage_limits")):
        r = call(api, "PUT", f"/{kid}", admin, body)
        assert r.status_code == 422, (body, r.text)
        assert named in r.text
    assert call(api, "GET", f"/{kid}", admin).json()["scopes"] == ["logs.read"]


def test_scopes_gate_every_route(api, make_key, org):
    admin = make_key(org)
    kid = create(api, admin, {"scopes": ["logs.read"]}).json()["id"]
    reader = make_key(org, scopes=["api_keys.read"])
    writer = make_key(org, scopes=["api_keys.write", "logs.read"])
    other = make_key(org, scopes=[s for s in SCOPES if s not in ("api_keys.read", "api_keys.write")])
    writes = [("POST", "/organisation/service", {"scopes": ["logs.read"]}), ("PUT", f"/{kid}", {"name": "x"}),
              ("POST", f"/{kid}/rotate", None), ("DELETE", f"/{kid}", None)]
    reads = [("GET", "", None), ("GET", f"/{kid}", None)]
    for method, path, body in writes + reads:
        assert call(api, method, path, None, body).status_code == 401
        assert call(api, method, path, "tg-" + "0" * 48, body).status_code == 401
        r = call(api, method, path, other, body)
        assert r.status_code == 403 and "api_keys." in r.json()["detail"], (method, path, r.text)
    for method, path, body in writes[:2]:
        assert call(api, method, path, reader, body).status_code == 403
    for method, path, body in reads:
        assert call(api, method, path, reader, body).status_code == 200
        assert call(api, method, path, writer, body).status_code == 403
    assert create(api, writer, {"scopes": ["logs.read"]}).status_code == 200
    # a caller grants only scopes it holds
    r = create(api, writer, {"scopes": ["logs.read", "analytics.read"]})
    assert r.status_code == 403 and "analytics.read" in r.json()["detail"]
    assert call(api, "PUT", f"/{kid}", writer, {"scopes": ["api_keys.read"]}).status_code == 403
    assert call(api, "GET", f"/{kid}", admin).json()["scopes"] == ["logs.read"]


# --------------------------------------------------------------------------- workspaces and tenants


def test_workspace_key_manages_only_its_workspace(api, warehouse, make_key, org):
    admin = make_key(org)
    ws_admin = make_key(org, workspace="ws-1", scopes=["api_keys.read", "api_keys.write", "logs.read"])
    other_ws = create(api, admin, {"scopes": ["logs.read"], "workspace_id": "ws-2"}, "workspace/service").json()["id"]
    r = create(api, ws_admin, {"scopes": ["logs.read"]})
    assert r.status_code == 403 and "organisation" in r.json()["detail"]
    r = create(api, ws_admin, {"scopes": ["logs.read"], "workspace_id": "ws-2"}, "workspace/service")
    assert r.status_code == 403
    r = create(api, ws_admin, {"scopes": ["logs.read"]}, "workspace/service")  # its own workspace by default
    assert r.status_code == 200, r.text
    mine = r.json()["id"]
    assert call(api, "GET", f"/{mine}", ws_admin).json()["workspace_id"] == "ws-1"
    assert listed_ids(api, ws_admin) == {mine, key_id(warehouse, ws_admin)}
    assert call(api, "GET", "", ws_admin, workspace_id="ws-2").status_code == 403
    for kid in (key_id(warehouse, admin), other_ws):  # an organisation key, another workspace's key
        for method, path in (("GET", f"/{kid}"), ("PUT", f"/{kid}"), ("DELETE", f"/{kid}"), ("POST", f"/{kid}/rotate")):
            assert call(api, method, path, ws_admin, {"name": "x"} if method == "PUT" else None).status_code == 404, (kid, method)
    assert call(api, "GET", f"/{other_ws}", admin).json()["status"] == "active"


def test_another_organisations_key_is_404_and_untouched(api, make_key, org):
    admin_a, admin_b = make_key(org), make_key(f"{org}-b")
    r = create(api, admin_b, {"name": "b-secret-name", "scopes": ["analytics.read"]})
    kid_b, key_b = r.json()["id"], r.json()["key"]
    missing = str(uuid.uuid4())
    for method, body in (("GET", None), ("PUT", {"name": "taken", "scopes": ["analytics.read"]}), ("DELETE", None)):
        r_b, r_missing = call(api, method, f"/{kid_b}", admin_a, body), call(api, method, f"/{missing}", admin_a, body)
        assert r_b.status_code == 404 and r_missing.status_code == 404
        assert r_b.text.replace(kid_b, "ID") == r_missing.text.replace(missing, "ID")
        assert "b-secret-name" not in r_b.text
    assert call(api, "POST", f"/{kid_b}/rotate", admin_a).status_code == 404
    assert kid_b not in listed_ids(api, admin_a)
    assert call(api, "GET", f"/{kid_b}", admin_b).json()["name"] == "b-secret-name"
    assert can_read_analytics(api, key_b) == 200


# --------------------------------------------------------------------------- the portkey-ai SDK


def test_portkey_sdk_manages_keys(live_url, make_key, org):
    from portkey_ai import Portkey
    from portkey_ai.api_resources.exceptions import NotFoundError

    client = Portkey(api_key=make_key(org), base_url=live_url)
    made = client.api_keys.create(type="workspace", sub_type="service", name="sdk", workspace_id="ws-sdk",
                                  scopes=["logs.read", "analytics.read"])
    assert made.id and made.key.startswith("tg-")
    got = client.api_keys.retrieve(id=made.id)
    assert (got.name, got.workspace_id, got.type, got.key) == ("sdk", "ws-sdk", "workspace-service", None)
    listed = client.api_keys.list(workspace_id="ws-sdk")
    assert listed.total == 1 and listed.data[0]["id"] == made.id
    client.api_keys.update(id=made.id, name="sdk-2", scopes=["logs.read"])
    assert client.api_keys.retrieve(id=made.id).scopes == ["logs.read"]
    graph = f"{live_url}/analytics/graphs/requests"
    assert httpx.get(graph, params=WINDOW, headers={HEADER: made.key}).status_code == 403  # analytics.read was removed
    client.api_keys.delete(id=made.id)
    assert httpx.get(graph, params=WINDOW, headers={HEADER: made.key}).status_code == 401
    with pytest.raises(NotFoundError):
        client.api_keys.retrieve(id=made.id)


def test_rotating_a_key_with_scopes_the_caller_lacks_is_refused(api, make_key, org):
    """api_keys.write is not a way to more access: rotating returns the key's new secret, so a caller may
    only rotate keys whose scopes it holds (it could not create such a key either)."""
    admin = make_key(org)
    manager = make_key(org, scopes=["api_keys.read", "api_keys.write"])
    assert call(api, "POST", "/organisation/service", manager, {"scopes": ["analytics.read"]}).status_code == 403
    powerful = create(api, admin, {"name": "ops", "scopes": list(SCOPES)}).json()["id"]
    r = call(api, "POST", f"/{powerful}/rotate", manager)
    assert r.status_code == 403 and "analytics.read" in r.text, r.text
    peer = create(api, admin, {"name": "peer", "scopes": ["api_keys.read"]}).json()["id"]
    rotated = call(api, "POST", f"/{peer}/rotate", manager)
    assert rotated.status_code == 200 and rotated.json()["key"], rotated.text


def test_a_revocation_is_final_even_against_a_change_that_read_the_key_before_it(warehouse, make_key, org):
    """A rotation or update reads the key, then writes its next version. A revocation landing in between
    must stand: the revoked version outranks any later change of the stale row."""
    kid = key_id(warehouse, make_key(org))
    stale = api_keys.get(warehouse, org, None, kid)
    api_keys.write_version(warehouse, stale, status="revoked")
    api_keys.write_version(warehouse, stale, key_hash=hash_key("tg-" + "0" * 48), name="renamed")  # the racing change
    assert api_keys.get(warehouse, org, None, kid) is None
    assert api_keys.find_by_hash(warehouse, hash_key("tg-" + "0" * 48)) is None  # the racing rotation's secret never works


def test_re_enabling_a_key_with_scopes_the_caller_lacks_is_refused(api, make_key, org):
    """Re-enabling a disabled key gives its secret's holder back every scope of the key: like granting
    them, a caller may only do it for scopes it holds (else api_keys.write is a way to more access)."""
    admin = make_key(org)
    manager = make_key(org, scopes=["api_keys.read", "api_keys.write"])
    made = create(api, admin, {"name": "ops", "scopes": ["analytics.read", "api_keys.read"]}).json()
    kid, key = made["id"], made["key"]
    assert call(api, "PUT", f"/{kid}", admin, {"status": "disabled"}).json()["status"] == "disabled"
    assert can_read_analytics(api, key) == 401

    r = call(api, "PUT", f"/{kid}", manager, {"status": "active"})
    assert r.status_code == 403 and "analytics.read" in r.json()["detail"], r.text
    assert call(api, "GET", f"/{kid}", admin).json()["status"] == "disabled"
    assert can_read_analytics(api, key) == 401

    # What the manager may do: rename it, disable it, re-enable it narrowed to scopes it holds.
    assert call(api, "PUT", f"/{kid}", manager, {"name": "ops-2"}).status_code == 200
    r = call(api, "PUT", f"/{kid}", manager, {"status": "active", "scopes": ["api_keys.read"]})
    assert r.status_code == 200 and (r.json()["status"], r.json()["scopes"]) == ("active", ["api_keys.read"]), r.text
    assert can_read_analytics(api, key) == 403
    assert call(api, "PUT", f"/{kid}", manager, {"status": "disabled"}).status_code == 200
    assert call(api, "PUT", f"/{kid}", admin, {"status": "active"}).status_code == 200  # the admin holds every scope
