"""Conformance of the non-analytics resources with the bundled spec and the portkey-ai SDK's types,
where earlier tests left a gap: pagination past any real page, JSON integers beyond 64 bits in export
filters, the SDK's export object.

Expectations come from the spec (`spec/portkey-api-subset.yaml`), the SDK's pydantic types and, for
filters, the analytics endpoints the export filters are documented to mean the same as.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

from conftest import serve, wait_until
from factories import gateway_log

from analytics_api.app import create_app
from ingest.events import GENERATIONS
from ingest.sink import insert_rows

HEADER = "x-portkey-api-key"
T0 = datetime(2026, 11, 20, 10, tzinfo=UTC)
WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-20T23:59:59.999Z"}


def h(key: str) -> dict:
    return {HEADER: key}


def store_logs(warehouse, org: str, n: int) -> list[dict]:
    """``n`` generations of ``org`` on 2026-11-20, straight into the warehouse (what ingest would write)."""
    events = [gateway_log(org, rng=random.Random(i), created_at=T0 + timedelta(minutes=i)) for i in range(n)]
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(json.dumps(ev).encode()) for ev in events])
    return events


def names(r) -> list[str]:
    """The parameters or fields a 422 names (FastAPI's `loc`, and the start of each message)."""
    return [str(part) for e in r.json()["detail"] for part in e["loc"]] + [e["msg"] for e in r.json()["detail"]]


# --------------------------------------------------------------------------- pagination


def test_a_page_past_the_end_is_never_another_page(api, warehouse, make_key, org):
    """`current_page` × `page_size` is the offset ClickHouse skips, a UInt64: 2^64 wrapped to 0, so a
    page far past the end answered with the first page (the spec: `current_page` is an integer from 0;
    a page past the end holds nothing). Now a `current_page` beyond 2^31 is a 422 naming it, as for
    policies and audit logs (docs/api.md, docs/exports.md)."""
    key = make_key(org)
    assert api.post("/v1/logs/exports", json={"filters": WINDOW, "requested_data": ["id"]}, headers=h(key)).status_code == 200
    for path in ("/v1/logs/exports", "/v1/api-keys"):
        first = api.get(path, params={"page_size": 1}, headers=h(key)).json()
        assert first["total"] >= 1 and len(first["data"]) == 1, first
        r = api.get(path, params={"page_size": 1, "current_page": 2**64}, headers=h(key))
        assert r.status_code == 422, (path, r.status_code, r.text[:300])
        assert "current_page" in names(r), r.json()
        # the last page the API accepts is an (empty) page, not a wrapped one
        r = api.get(path, params={"page_size": 100, "current_page": 2**31}, headers=h(key))
        assert r.status_code == 200 and r.json()["data"] == [], (path, r.text[:300])


def test_an_export_page_past_the_end_exports_nothing(api, warehouse, make_key, org):
    """filters.page_size / current_page (GenerationsFilterSchema) select rows current_page × page_size …:
    with page_size 64 and current_page 2^58 that offset is 2^64, which ClickHouse wrapped to 0. The
    export then counted 0 rows (`total`) and wrote the first 64. Now it is a 422 naming the field."""
    store_logs(warehouse, org, 3)
    key = make_key(org)
    r = api.post("/v1/logs/exports", json={"filters": {**WINDOW, "page_size": 64, "current_page": 2**58},
                                           "requested_data": ["id"]}, headers=h(key))
    if r.status_code == 200:  # before the fix: run it, to show what it exported
        export_id = r.json()["id"]
        api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key))
        wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] != "in_progress")
        item = api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
        raise AssertionError(f"accepted: total {r.json()['total']}, then {item['status']} with {item['rows_written']} rows")
    assert r.status_code == 422, r.text
    assert any(e["msg"].startswith("filters.current_page") for e in r.json()["detail"]), r.json()
    # non-finite numbers (Python's JSON parser reads Infinity and NaN) are not integers either: a 422, not a 500
    window = ", ".join(f'"{k}": "{v}"' for k, v in WINDOW.items())
    for name in ("page_size", "current_page"):
        for number in ("Infinity", "-Infinity", "NaN"):
            r = api.post("/v1/logs/exports", content=f'{{"filters": {{{window}, "{name}": {number}}}, "requested_data": ["id"]}}',
                         headers={**h(key), "content-type": "application/json"})
            assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith(f"filters.{name}"), (name, number, r.text)
    # the largest page that cannot wrap is accepted, and empty
    r = api.post("/v1/logs/exports", json={"filters": {**WINDOW, "page_size": 64, "current_page": (2**63 - 1) // 64 - 1},
                                           "requested_data": ["id"]}, headers=h(key))
    assert r.status_code == 200 and r.json()["total"] == 0, r.text


# --------------------------------------------------------------------------- export filters


def test_export_filters_with_integers_beyond_64_bits_mean_what_analytics_means(api, warehouse, make_key, org):
    """An export's filters are the analytics filters (docs/exports.md): a bound like 2^70 is a valid
    JSON integer, and analytics take it (200). Exports answered 500 (orjson cannot encode it)."""
    store_logs(warehouse, org, 2)
    key = make_key(org)
    big = 2**70
    for name, expected_total in (("total_units_min", 0), ("total_units_max", 2), ("cost_max", 2),
                                 ("prompt_token_min", 0), ("weighted_feedback_max", None)):
        graph = api.get("/v1/analytics/graphs/requests", params={**WINDOW, name: str(big)}, headers=h(key))
        r = api.post("/v1/logs/exports", json={"filters": {**WINDOW, name: big}, "requested_data": ["id"]}, headers=h(key))
        assert r.status_code == (200 if graph.status_code == 200 else 422), (name, graph.status_code, r.status_code, r.text[:200])
        if r.status_code == 200:
            assert r.json()["total"] == graph.json()["summary"]["total"], (name, r.json(), graph.json()["summary"])
            if expected_total is not None:
                assert r.json()["total"] == expected_total, (name, r.json())
        else:
            assert any(e["msg"].startswith(f"filters.{name}") for e in r.json()["detail"]), r.json()
    # in a list filter too: not a status code, so a 422 naming it (analytics: the same)
    r = api.post("/v1/logs/exports", json={"filters": {**WINDOW, "status_code": [200, big]}, "requested_data": ["id"]},
                 headers=h(key))
    assert r.status_code == 422 and any(e["msg"].startswith("filters.status_code") for e in r.json()["detail"]), r.text[:300]


# --------------------------------------------------------------------------- the SDK's export object


def test_portkey_sdk_export_objects_have_every_field_of_the_sdk_type(settings, warehouse, make_key, org, tmp_path):
    """`LogsExportRetrieveResponse` (portkey-ai) declares `total_records`: Tollgate left it out, so
    `client.logs.exports.retrieve(...).total_records` was None. It is the number of rows the export
    holds, the same as `total`; list items carry it too. Every other declared field is set, and the
    whole flow (create, retrieve, list, update, start, download, cancel) returns the SDK's types."""
    from portkey_ai import Portkey
    from portkey_ai.api_resources.types.logs_type import LogsExportRetrieveResponse

    store_logs(warehouse, org, 3)
    s = settings.model_copy(update=dict(export_dir=tmp_path / "exports"))
    with serve(create_app(s, s.kafka_bootstrap, pool_size=2)) as url:
        client = Portkey(api_key=make_key(org), base_url=url)
        created = client.logs.exports.create(filters=WINDOW, requested_data=["id", "cost"], description="sdk")
        assert (created.total, created.object) == (3, "export")
        export_id = created.id
        got = client.logs.exports.retrieve(export_id=export_id)
        assert isinstance(got, LogsExportRetrieveResponse)
        declared = set(LogsExportRetrieveResponse.model_fields)
        assert {f for f in declared if getattr(got, f) is None} == set(), got
        assert got.total_records == 3
        listed = client.logs.exports.list()
        assert [(e["id"], e["total_records"]) for e in listed.data] == [(export_id, 3)]
        updated = client.logs.exports.update(export_id=export_id, filters={**WINDOW, "total_units_min": 0})
        assert (updated.id, updated.total, updated.object) == (export_id, 3, "export")
        started = client.logs.exports.start(export_id=export_id)
        assert started.object == "export" and started.message
        assert wait_until(lambda: client.logs.exports.retrieve(export_id=export_id).status == "success")
        done = client.logs.exports.retrieve(export_id=export_id)
        assert (done.total_records, done.total) == (3, 3)
        assert client.logs.exports.download(export_id=export_id).signed_url.startswith("http")
        other = client.logs.exports.create(filters=WINDOW, requested_data=["id"]).id
        cancelled = client.logs.exports.cancel(export_id=other)
        assert cancelled.object == "export" and client.logs.exports.retrieve(export_id=other).status == "stopped"


# --------------------------------------------------------------------------- custom logs read back


def test_a_minimal_custom_log_reads_back_as_docs_api_md_says(settings, workers, api, make_key, org):
    """CustomLog leaves `request.method`, `response.status` and `response.response_time` optional; LogObject
    requires `request.method` (an enum), `response.status`, `responseTime` and `lastUsedOptionJsonPath`.
    docs/api.md now says what a log that left them out reads back as, and which metrics are null rather
    than "" or 0 (it said every absent number was 0: `cost` of a 2xx without usage is null, and so are the
    spec's nullable `cache_status`, `cache_type`, `stream_mode` when nothing was logged)."""
    key = make_key(org)
    r = api.post("/v1/logs", json={"request": {"url": "https://api.openai.com/v1/chat/completions", "body": {"model": "gpt-4o"}},
                                   "response": {"body": {"id": "x"}}}, headers=h(key))
    assert r.status_code == 200, r.text
    log_id = r.json()["log_ids"][0]
    assert wait_until(lambda: api.get(f"/v1/logs/{log_id}", headers=h(key)).status_code == 200)
    got = api.get(f"/v1/logs/{log_id}", headers=h(key)).json()
    assert got["request"]["method"] == "POST" and got["request"]["portkeyHeaders"] == {}
    assert (got["response"]["status"], got["response"]["responseTime"], got["response"]["lastUsedOptionJsonPath"]) == (200, 0, "")
    m = got["metrics"]
    assert (m["cost"], m["pricing_status"]) == (None, "no_usage")
    assert (m["cache_status"], m["cache_type"], m["stream_mode"]) == (None, None, None)
    assert (m["workspace_slug"], m["prompt_slug"], m["req_units"]) == ("default", "", 0)
