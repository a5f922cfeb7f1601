"""On-demand log exports against the real parts: events published through the Tansu broker and
ingested into chdb, moto's S3 server (server mode, loopback) and the local destination.

Every exported file is read back with Polars/PyArrow and compared with an independent
expectation computed from the generated events (tests/export_helpers.py, which uses the
analytics reference for the filters): exactly the selected rows, once each, with their values.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from conftest import read_topic, wait_until
from export_helpers import (ALL_COLUMNS, DAY, METRIC_COLUMNS, WINDOW, S3Server, expected_rows, feedback_events, ingest,
                            make_events, normalize_exported, selected_ids)
from exports import destinations as d
from warehouse.queries import exports as q

HEADER = "x-portkey-api-key"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def dataset(base_settings, broker, warehouse):
    """1,200 generations on 2026-11-20 (most in `default`, some in `other`), 60 of them delivered twice,
    and feedback on a third of the traces, for one organisation."""
    org = f"org-{uuid.uuid4().hex[:10]}"
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"x{suffix}.gateway-logs", topic_feedback=f"x{suffix}.feedback", topic_audit=f"x{suffix}.audit",
        topic_dead_letter=f"x{suffix}.dead-letter", ingest_consumer_group=f"gx{suffix}"))
    events = make_events(org, 1_200, seed=11, start=DAY, span=timedelta(hours=23))
    feedback = feedback_events(org, events, seed=12)
    ingest(s, broker, warehouse, org, events, feedback, redeliver=60)
    return {"org": org, "events": events, "feedback": feedback, "expected": expected_rows(events)}


def make_client(settings, **overrides):
    s = settings.model_copy(update=overrides)
    return TestClient(create_app(s, s.kafka_bootstrap, pool_size=2))


@pytest.fixture
def local(settings, tmp_path):
    with make_client(settings, export_dir=tmp_path / "exports", export_part_rows=250) as client:
        yield client


@pytest.fixture
def remote(settings, s3):
    with make_client(settings, export_part_rows=250, **s3.settings()) as client:
        yield client


def h(key):
    return {HEADER: key}


def create(api, key, filters, columns, fmt=None, **extra):
    body = {"filters": filters, "requested_data": columns, **extra}
    if fmt:
        body["format"] = fmt
    return api.post("/v1/logs/exports", json=body, headers=h(key))


def run_export(api, key, filters, columns, fmt=None, timeout=60):
    r = create(api, key, filters, columns, fmt)
    assert r.status_code == 200, r.text
    export_id = r.json()["id"]
    assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
    assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"]
                      in ("success", "failed"), timeout=timeout)
    item = api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
    assert item["status"] == "success", item
    return r.json(), item


def fetch(api, url: str) -> httpx.Response:
    """A signed URL: Tollgate's own (through the test client) or moto's presigned one."""
    if url.startswith("http://testserver"):
        return api.get(url)
    return httpx.get(url)


def read_rows(data: bytes, fmt: str) -> list[dict]:
    if fmt == "jsonl":
        text = data.decode()
        assert text.endswith("\n")
        lines = text[:-1].split("\n")  # not splitlines(): U+2028 in a body is not a line break in JSONL
        assert all(lines), "no empty lines"
        pl.read_ndjson(io.BytesIO(data))  # Polars reads it too
        return [json.loads(line, object_pairs_hook=dict) for line in lines]
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if fmt == "csv":
        df = pl.read_csv(io.BytesIO(data), infer_schema=False)  # every value as text
        return df.to_dicts()
    raise ValueError(fmt)


def download_all(api, key, export_id, fmt) -> tuple[dict, list[dict], dict]:
    r = api.get(f"/v1/logs/exports/{export_id}/download", headers=h(key))
    assert r.status_code == 200, r.text
    body = r.json()
    manifest = fetch(api, body["manifest_url"]).json()
    rows = []
    for f in body["files"]:
        data = fetch(api, f["signed_url"]).content
        assert hashlib.sha256(data).hexdigest() == f["sha256"], "the manifest's checksum"
        part_rows = read_rows(data, fmt)
        assert len(part_rows) == f["rows"]
        rows.extend(part_rows)
    assert [f["name"] for f in manifest["files"]] == [f["name"] for f in body["files"]]
    assert manifest["rows"] == len(rows)
    return body, rows, manifest


def check_rows(rows: list[dict], expected_ids: list[str], dataset, columns: list[str], fmt: str) -> None:
    assert [r["id"] for r in rows] == expected_ids  # each selected row once, in (created_at, id) order
    for row in rows:
        assert list(row) == columns, "the requested columns, in the requested order"
        got = normalize_exported(row, fmt)
        want = {c: dataset["expected"][row["id"]][c] for c in columns}
        assert got == want, (row["id"], {k: (got[k], want[k]) for k in columns if got[k] != want[k]})


FILTERED = {**WINDOW, "status_code": "200,429", "ai_org_model": "openai__gpt-4o,anthropic__claude-3-5-sonnet",
            "metadata": {"env": "prod"}, "cost_min": 1}


# --------------------------------------------------------------------------- formats and destinations


def test_jsonl_to_local_with_bodies(local, dataset, make_key):
    key = make_key(dataset["org"])
    columns = ["created_at", "id", "request", "response", "metadata", "cost", "is_success", "trace_id"]
    created, item = run_export(local, key, FILTERED, columns)  # JSONL: the default format
    want = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], FILTERED)
    assert 30 < len(want) < 600
    assert created["total"] == len(want) == item["total"] == item["rows_written"]
    assert item["format"] == "jsonl" and item["progress"] == 1.0
    body, rows, manifest = download_all(local, key, created["id"], "jsonl")
    check_rows(rows, want, dataset, columns, "jsonl")
    assert len(body["files"]) == -(-len(want) // 250)  # parts of at most TOLLGATE_EXPORT_PART_ROWS
    assert all(f["rows"] == 250 for f in body["files"][:-1])
    assert manifest["filters"] == FILTERED and manifest["requested_data"] == columns and manifest["format"] == "jsonl"


def test_metric_columns_exclude_bodies_unless_asked(local, dataset, make_key):
    key = make_key(dataset["org"])
    created, _ = run_export(local, key, WINDOW, METRIC_COLUMNS, "jsonl")
    _, rows, _ = download_all(local, key, created["id"], "jsonl")
    assert rows and all("request" not in r and "response" not in r for r in rows)
    check_rows(rows, selected_ids(dataset["events"], dataset["feedback"], dataset["org"], WINDOW), dataset,
               METRIC_COLUMNS, "jsonl")


def test_parquet_to_s3_real_types_parts_and_manifest(remote, s3, dataset, make_key):
    key = make_key(dataset["org"])
    filters = {**WINDOW, "weighted_feedback_min": -2, "total_units_max": 4000}
    created, item = run_export(remote, key, filters, ALL_COLUMNS, "parquet")
    want = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], filters)
    assert created["total"] == len(want) > 0
    body, rows, manifest = download_all(remote, key, created["id"], "parquet")
    check_rows(rows, want, dataset, ALL_COLUMNS, "parquet")
    # the objects are in the bucket under the configured prefix
    keys = s3.keys(f"tg/exports/{created['id']}/")
    assert keys == sorted([f"tg/exports/{created['id']}/{f['name']}" for f in body["files"]]
                          + [f"tg/exports/{created['id']}/manifest.json"])
    assert "X-Amz-Signature" in body["signed_url"] and "X-Amz-Expires=3600" in body["signed_url"]
    # real types
    first = next(k for k in keys if k.endswith(".parquet"))
    schema = pq.read_schema(io.BytesIO(s3.get(first)))
    assert schema.field("created_at").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("req_units").type == pa.uint32() and schema.field("response_status_code").type == pa.uint16()
    assert schema.field("cost").type == pa.float64() and schema.field("cost").nullable
    assert pa.types.is_map(schema.field("metadata").type) and schema.field("is_success").type == pa.bool_()
    meta = pq.ParquetFile(io.BytesIO(s3.get(first))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert {c["name"]: c["type"] for c in manifest["schema"]}["created_at"] == "timestamp[ms, tz=UTC]"
    # Polars reads the whole export (all parts) to exactly the expected rows
    frames = [pl.read_parquet(io.BytesIO(s3.get(k))) for k in keys if k.endswith(".parquet")]
    df = pl.concat(frames)
    assert df.height == len(want) and df["id"].n_unique() == len(want) and set(df["id"]) == set(want)


def test_csv_to_local(local, dataset, make_key):
    key = make_key(dataset["org"])
    filters = {**WINDOW, "ai_model": "gpt-4o-mini,gemini-2.0-flash", "prompt_token_min": 100}
    created, _ = run_export(local, key, filters, METRIC_COLUMNS, "csv")
    want = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], filters)
    assert created["total"] == len(want) > 0
    _, rows, _ = download_all(local, key, created["id"], "csv")
    check_rows(rows, want, dataset, METRIC_COLUMNS, "csv")


@pytest.mark.parametrize("filters", [
    {**WINDOW},
    {**WINDOW, "workspace_slug": "other"},
    {**WINDOW, "status_code": "500", "trace_id": "trace-1,trace-2,trace-3,trace-50,trace-99"},
    {**WINDOW, "metadata": {"_user": "user-3"}},
    {**WINDOW, "metadata": {"team": "a\"b,c\nd", "env": "dev"}},
    {**WINDOW, "configs": "pc-1", "prompt_slug": "welcome"},
    {**WINDOW, "cost_max": 5, "completion_token_min": 500},
    {**WINDOW, "weighted_feedback_min": 3, "weighted_feedback_max": 8},
    {"time_of_generation_min": "2026-11-20T15:30:00+05:30", "time_of_generation_max": "2026-11-20T12:00:00.500Z"},
])
def test_total_is_the_number_of_matching_rows(local, dataset, make_key, filters):
    key = make_key(dataset["org"])
    r = create(local, key, filters, ["id"])
    assert r.status_code == 200, r.text
    workspace = filters.get("workspace_slug", "default")
    assert r.json()["total"] == len(selected_ids(dataset["events"], dataset["feedback"], dataset["org"], filters, workspace))


def test_page_size_and_current_page(local, dataset, make_key):
    key = make_key(dataset["org"])
    everything = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], WINDOW)
    for page in (0, 2, len(everything) // 70):
        filters = {**WINDOW, "page_size": 70, "current_page": page}
        created, _ = run_export(local, key, filters, ["id", "created_at"])
        want = everything[page * 70:(page + 1) * 70]
        assert created["total"] == len(want)
        _, rows, _ = download_all(local, key, created["id"], "jsonl")
        assert [r["id"] for r in rows] == want


# --------------------------------------------------------------------------- lifecycle and 409s


def test_lifecycle_edit_and_409s(local, dataset, make_key):
    key = make_key(dataset["org"])
    r = create(local, key, {**WINDOW, "status_code": "500"}, ["id"], description="first")
    export_id = r.json()["id"]
    item = local.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
    assert item["status"] == "draft" and item["description"] == "first" and item["object"] == "export"
    assert local.get(f"/v1/logs/exports/{export_id}/download", headers=h(key)).status_code == 409
    # a draft can be edited; total follows the new filters
    r = local.put(f"/v1/logs/exports/{export_id}", json={"filters": WINDOW, "requested_data": ["id", "cost"]}, headers=h(key))
    assert r.status_code == 200, r.text
    assert r.json()["total"] == len(selected_ids(dataset["events"], dataset["feedback"], dataset["org"], WINDOW))
    assert local.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["requested_data"] == ["id", "cost"]
    assert local.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
    assert local.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 409
    assert local.put(f"/v1/logs/exports/{export_id}", json={"filters": WINDOW}, headers=h(key)).status_code == 409
    assert wait_until(lambda: local.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] == "success")
    assert local.post(f"/v1/logs/exports/{export_id}/cancel", headers=h(key)).status_code == 409
    assert local.put(f"/v1/logs/exports/{export_id}", json={"filters": WINDOW}, headers=h(key)).status_code == 409
    # cancel a draft: stopped, then nothing works on it
    other = create(local, key, WINDOW, ["id"]).json()["id"]
    assert local.post(f"/v1/logs/exports/{other}/cancel", headers=h(key)).status_code == 200
    assert local.get(f"/v1/logs/exports/{other}", headers=h(key)).json()["status"] == "stopped"
    for method, path in (("post", "start"), ("post", "cancel"), ("get", "download")):
        assert getattr(local, method)(f"/v1/logs/exports/{other}/{path}", headers=h(key)).status_code == 409
    # list (newest first), by workspace
    listed = local.get("/v1/logs/exports", headers=h(key)).json()
    assert listed["object"] == "list" and [e["id"] for e in listed["data"][:2]] == [other, export_id]
    in_other = local.get("/v1/logs/exports", params={"workspace_id": "other", "page_size": 100}, headers=h(key)).json()
    assert all(e["workspace_id"] == "other" for e in in_other["data"])
    assert not {other, export_id} & {e["id"] for e in in_other["data"]}
    # another organisation sees none of it
    stranger = make_key(f"org-{uuid.uuid4().hex[:8]}")
    assert local.get(f"/v1/logs/exports/{export_id}", headers=h(stranger)).status_code == 404
    assert local.post(f"/v1/logs/exports/{export_id}/start", headers=h(stranger)).status_code == 404
    assert local.get("/v1/logs/exports", headers=h(stranger)).json()["total"] == 0


def test_an_update_that_names_no_workspace_keeps_the_exports(local, dataset, make_key):
    """The SDK's update(export_id, filters=…) sends no workspace_id: the export stays in its workspace
    (it moved to the default one, and its total and rows with it)."""
    key = make_key(dataset["org"])
    export_id = create(local, key, WINDOW, ["id"], workspace_id="other").json()["id"]
    narrowed = {**WINDOW, "status_code": "200"}
    r = local.put(f"/v1/logs/exports/{export_id}", json={"filters": narrowed}, headers=h(key))
    assert r.status_code == 200, r.text
    assert r.json()["total"] == len(selected_ids(dataset["events"], dataset["feedback"], dataset["org"], narrowed, workspace="other"))
    item = local.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
    assert item["workspace_id"] == "other" and item["filters"]["status_code"] == "200"
    # naming another workspace still moves it
    r = local.put(f"/v1/logs/exports/{export_id}", json={"filters": WINDOW, "workspace_id": "default"}, headers=h(key))
    assert r.status_code == 200 and local.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["workspace_id"] == "default"


def test_a_filter_with_an_integer_beyond_64_bits_runs_as_it_counted(api, warehouse, make_key, org):
    """An export stores its filters as JSON text and runs them later: read back, an integer beyond 64 bits
    must stay that integer (orjson made it a float: the export counted one row and wrote none)."""
    import random

    from factories import gateway_log
    from ingest.events import GENERATIONS
    from ingest.sink import insert_rows

    big, t0 = 2**70, datetime(2026, 11, 20, 10, tzinfo=UTC)
    ev = gateway_log(org, rng=random.Random(3), created_at=t0)
    ev["metrics"].pop("metadata.key"), ev["metrics"].pop("metadata.value")
    ev["metrics"]["metadata"] = {"v": str(big)}
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(json.dumps(ev).encode())])
    key = make_key(org)
    window = {"time_of_generation_min": (t0 - timedelta(hours=1)).isoformat(), "time_of_generation_max": (t0 + timedelta(hours=1)).isoformat()}
    r = create(api, key, {**window, "metadata": {"v": big}}, ["id"])
    assert r.status_code == 200 and r.json()["total"] == 1, r.text
    export_id = r.json()["id"]
    assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
    assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] in ("success", "failed"))
    item = api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
    assert (item["status"], item["rows_written"], item["filters"]["metadata"]) == ("success", 1, {"v": big}), item


def test_workspace_key_exports_its_workspace_only(local, dataset, make_key):
    key = make_key(dataset["org"], workspace="other")
    created, _ = run_export(local, key, {**WINDOW, "workspace_slug": "default"}, ["id"])
    want = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], WINDOW, workspace="other")
    _, rows, _ = download_all(local, key, created["id"], "jsonl")
    assert [r["id"] for r in rows] == want and want
    assert local.get("/v1/logs/exports", params={"workspace_id": "default"}, headers=h(key)).status_code == 403


@pytest.mark.parametrize("body, field", [
    ({"filters": WINDOW}, "requested_data"),
    ({"requested_data": ["id"]}, "filters"),
    ({"filters": WINDOW, "requested_data": []}, "requested_data"),
    ({"filters": WINDOW, "requested_data": ["id", "password"]}, "requested_data"),
    ({"filters": WINDOW, "requested_data": ["id"], "format": "xlsx"}, "format"),
    ({"filters": {**WINDOW, "cost_min": "abc"}, "requested_data": ["id"]}, "filters.cost_min"),
    ({"filters": {**WINDOW, "total_units_min": 1.5}, "requested_data": ["id"]}, "filters.total_units_min"),
    ({"filters": {"time_of_generation_max": WINDOW["time_of_generation_max"]}, "requested_data": ["id"]},
     "filters.time_of_generation_min"),
    ({"filters": {**WINDOW, "time_of_generation_min": "2026-11-20"}, "requested_data": ["id"]}, "filters.time_of_generation_min"),
    ({"filters": {**WINDOW, "metadata": [1]}, "requested_data": ["id"]}, "filters.metadata"),
    ({"filters": {**WINDOW, "status_code": "abc"}, "requested_data": ["id"]}, "filters.status_code"),
    ({"filters": {**WINDOW, "ai_org_model": "gpt-4o"}, "requested_data": ["id"]}, "filters.ai_org_model"),
    ({"filters": {**WINDOW, "page_size": 50_001}, "requested_data": ["id"]}, "filters.page_size"),
    ({"filters": {**WINDOW, "current_page": -1}, "requested_data": ["id"]}, "filters.current_page"),
    ({"filters": {**WINDOW, "colour": "red"}, "requested_data": ["id"]}, "filters.colour"),
    ({"filters": WINDOW, "requested_data": ["id"], "destination": "ftp"}, "destination"),
    ({"filters": WINDOW, "requested_data": ["id"], "workspace_id": "a", "filters_": 1}, "filters_"),
])
def test_bad_input_is_422_naming_the_field(local, dataset, make_key, body, field):
    key = make_key(dataset["org"])
    r = local.post("/v1/logs/exports", json=body, headers=h(key))
    assert r.status_code == 422, r.text
    assert any(e["msg"].startswith(field) for e in r.json()["detail"]), r.json()


def test_injection_in_filters_exports_nothing(local, dataset, make_key, warehouse):
    key = make_key(dataset["org"])
    for value in ("' OR 1=1 --", "x'; DROP TABLE generations; --", "{scope_org:String}"):
        for name in ("trace_id", "configs", "ai_model", "workspace_slug"):
            r = create(local, key, {**WINDOW, name: value}, ["id"])
            assert r.status_code == 200 and r.json()["total"] == 0, (name, r.text)
        r = create(local, key, {**WINDOW, "metadata": {value: value}}, ["id"])
        assert r.status_code == 200 and r.json()["total"] == 0
    assert int(warehouse.command("SELECT count() FROM generations FINAL WHERE organisation_id = {o:String}",
                                 parameters={"o": dataset["org"]})) == len(dataset["expected"])


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cancel_mid_export_removes_partial_files(where, settings, s3, tmp_path, dataset, make_key, monkeypatch):
    """The export is held before its fifth slice (a gate in the stream, nothing else changed): a part is
    committed and the next one open when the cancel arrives; afterwards no file is left."""
    gate, reached = threading.Event(), threading.Event()
    original = q.Stream.read

    def held_read(self, lo, hi):
        if self.stats.slices == 4:
            reached.set()
            gate.wait(30)
        return original(self, lo, hi)

    monkeypatch.setattr(q.Stream, "read", held_read)
    monkeypatch.setattr(q, "SLICE_BYTES", 1)  # the smallest slices: MIN_SLICE_ROWS rows
    monkeypatch.setattr(q, "MIN_SLICE_ROWS", 100)
    overrides = dict(export_dir=tmp_path / "exports", export_part_rows=300)
    if where == "s3":
        overrides.update(s3.settings())
    key = make_key(dataset["org"])
    with make_client(settings, **overrides) as api:
        export_id = create(api, key, WINDOW, ALL_COLUMNS, "parquet").json()["id"]
        assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
        assert reached.wait(30)

        def written():
            if where == "s3":
                return [k.rsplit("/", 1)[1] for k in s3.keys(f"tg/exports/{export_id}/")]
            d = tmp_path / "exports" / "exports" / export_id
            return sorted(p.name for p in d.iterdir()) if d.exists() else []
        # slices 1-4 are written: part-00000 (300 rows) committed, part-00001 open
        assert wait_until(lambda: "part-00000.parquet" in written(), timeout=30), written()
        assert api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] == "in_progress"
        threading.Timer(0.5, gate.set).start()
        r = api.post(f"/v1/logs/exports/{export_id}/cancel", headers=h(key))
        assert r.status_code == 200, r.text
        assert api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] == "stopped"
        assert written() == []
        if where == "s3":
            assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
        assert api.get(f"/v1/logs/exports/{export_id}/download", headers=h(key)).status_code == 409
        time.sleep(0.5)
        assert api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] == "stopped"


# --------------------------------------------------------------------------- signed URLs


def _with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_local_signed_url_expires_and_refuses_tampering(settings, tmp_path, dataset, make_key):
    key = make_key(dataset["org"])
    with make_client(settings, export_dir=tmp_path / "exports", export_url_ttl_seconds=2) as api:
        created, _ = run_export(api, key, WINDOW, ["id"])
        body = api.get(f"/v1/logs/exports/{created['id']}/download", headers=h(key)).json()
        url = body["signed_url"]
        assert "/files/part-00000.jsonl?" in url
        assert api.get(url).status_code == 200  # no API key needed: the signature is the credential
        query = parse_qs(urlsplit(url).query)
        sig, exp = query["signature"][0], int(query["expires"][0])
        tampered = [
            _with_query(url, signature=("0" if sig[0] != "0" else "1") + sig[1:]),
            _with_query(url, expires=str(exp + 3600)),
            url.replace("part-00000.jsonl", "manifest.json"),
            url.replace(created["id"], str(uuid.uuid4())),
            _with_query(url, signature=""),
            url.split("?")[0],
        ]
        for bad in tampered:
            r = api.get(bad)
            assert r.status_code == 403, (bad, r.status_code)
        time.sleep(exp - time.time() + 1.1)
        r = api.get(url)
        assert r.status_code == 403 and "expired" in r.json()["detail"]


def test_a_signing_key_file_left_empty_never_signs_urls_anyone_could_forge(tmp_path):
    """The first process to use the local destination creates <data dir>/export-signing.key. A process
    reading it while the first has created it but not yet written it (or after the first died in
    between) must not sign with an empty secret: anyone could then make a valid URL for any export id."""
    from exports import signing
    from tollgate.settings import Settings

    settings = Settings(data_dir=tmp_path)
    (tmp_path / signing.KEY_FILE).touch(mode=0o600)  # created (O_EXCL), not written yet
    export_id, name = str(uuid.uuid4()), "part-00000.jsonl"
    expires = int(time.time()) + 3600
    forged = hmac.new(b"", f"{export_id}/{name}:{expires}".encode(), hashlib.sha256).hexdigest()
    try:
        secret = signing.signing_secret(settings)
    except RuntimeError as exc:  # refused, naming the file
        assert signing.KEY_FILE in str(exc)
    else:
        assert signing.verify(secret, export_id, name, str(expires), forged) is not None, \
            f"a URL signed with an empty key was accepted (secret {secret!r})"


def test_a_signature_that_is_not_ascii_hex_is_a_403(api):
    """The route takes no key: whatever a client puts in `signature` is refused as a bad signature."""
    url = f"/v1/logs/exports/{uuid.uuid4()}/files/part-00000.jsonl"
    for signature in ("é" * 64, "zz", "0" * 64, "\u0660" * 64):
        r = api.get(url, params={"expires": str(int(time.time()) + 60), "signature": signature})
        assert r.status_code == 403 and "signature" in r.json()["detail"], (signature, r.status_code)


def test_processes_creating_the_signing_key_at_once_share_one_whole_secret(tmp_path):
    from exports import signing
    from tollgate.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(signing.signing_secret(settings))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and len(got[0]) == 64, got
    assert (tmp_path / "data" / signing.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "data").iterdir()] == [signing.KEY_FILE]  # no temporary file left


def test_s3_download_is_a_presigned_get_with_the_configured_ttl(settings, s3, dataset, make_key):
    """moto's server does not enforce the expiry of presigned URLs (real S3 and MinIO do), so this
    checks what Tollgate controls: a SigV4 presigned GET of the object, signed now, for the TTL."""
    key = make_key(dataset["org"])
    with make_client(settings, export_url_ttl_seconds=123, **s3.settings()) as api:
        created, _ = run_export(api, key, WINDOW, ["id"])
        body = api.get(f"/v1/logs/exports/{created['id']}/download", headers=h(key)).json()
        query = parse_qs(urlsplit(body["signed_url"]).query)
        assert query["X-Amz-Expires"] == ["123"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
        expires_at = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        assert abs((expires_at - signed_at).total_seconds() - 123) <= 2
        assert urlsplit(body["signed_url"]).path == f"/{s3.bucket}/tg/exports/{created['id']}/part-00000.jsonl"
        assert httpx.get(body["signed_url"]).status_code == 200


# --------------------------------------------------------------------------- audit


def test_mutations_leave_audit_records(settings, tmp_path, dataset, make_key, broker):
    key = make_key(dataset["org"])
    with make_client(settings, export_dir=tmp_path / "exports") as api:
        export_id = create(api, key, WINDOW, ["id"]).json()["id"]
        api.put(f"/v1/logs/exports/{export_id}", json={"filters": WINDOW}, headers=h(key))
        api.post(f"/v1/logs/exports/{export_id}/cancel", headers=h(key))
        api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key))  # 409: audited too
    records = [json.loads(r.value) for r in read_topic(broker.bootstrap, settings.topic_audit, 8)]
    final = [(r["method"], r["resource_type"], r["action"], r["response_status_code"]) for r in records
             if r["phase"] == "final"]
    assert sorted(final) == sorted([("POST", "log_export", "create", 200), ("PUT", "log_export", "update", 200),
                                    ("POST", "log_export", "cancel", 200), ("POST", "log_export", "start", 409)])
    assert all(r["organisation_id"] == dataset["org"] for r in records)


# --------------------------------------------------------------------------- the CLI


def test_cli_create_start_status_download(settings, tmp_path, dataset, make_key):
    """`tollgate export …` as a user runs it, against the API served on a port."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import serve

    key = make_key(dataset["org"])
    s = settings.model_copy(update={"export_dir": tmp_path / "exports", "export_part_rows": 400})
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOLLGATE_API_KEY": key}

    def tollgate(*args):
        r = subprocess.run([sys.executable, "-m", "tollgate.cli", "export", *args, "--url", url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    with serve(create_app(s, s.kafka_bootstrap, pool_size=2)) as url:
        r = tollgate("create", "--since", WINDOW["time_of_generation_min"], "--until", WINDOW["time_of_generation_max"],
                     "--filters", json.dumps({"status_code": "200"}), "--format", "parquet")
        export_id = r.stdout.strip().splitlines()[-1]
        want = selected_ids(dataset["events"], dataset["feedback"], dataset["org"], {**WINDOW, "status_code": "200"})
        assert f"{len(want)} rows match" in r.stdout
        r = tollgate("start", export_id, "--wait")
        assert f"status: success, {len(want)} of {len(want)} rows written" in r.stdout
        assert "rows" in r.stderr  # the progress bar
        assert "part-00000.parquet" in tollgate("status", export_id).stdout
        out = tmp_path / "downloaded"
        tollgate("download", export_id, "--out", str(out))
        parts = sorted(out.glob("part-*.parquet"))
        assert len(parts) == -(-len(want) // 400) and (out / "manifest.json").exists()
        rows = pl.concat([pl.read_parquet(p) for p in parts]).to_dicts()
        check_rows(rows, want, dataset, METRIC_COLUMNS, "parquet")
        bad = subprocess.run([sys.executable, "-m", "tollgate.cli", "export", "start", export_id, "--url", url], env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "HTTP 409" in bad.stderr


def test_a_destination_that_fails_makes_a_failed_export_with_its_reason(settings, s3, dataset, make_key):
    key = make_key(dataset["org"])
    with make_client(settings, **{**s3.settings(), "export_s3_bucket": "no-such-bucket"}) as api:
        export_id = create(api, key, WINDOW, ["id"], "parquet").json()["id"]
        assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
        assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"] != "in_progress")
        item = api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
        assert item["status"] == "failed" and "NoSuchBucket" in item["error"] and item["files"] == []
        assert api.get(f"/v1/logs/exports/{export_id}/download", headers=h(key)).status_code == 409
        assert s3.keys(f"tg/exports/{export_id}/") == []


class _Injected(Exception):
    pass


def test_s3_upload_failing_at_its_last_step_leaves_no_multipart_upload(settings, s3, dataset, make_key, monkeypatch):
    """docs/exports.md: a failed export leaves nothing (an S3 multipart upload is aborted). The fault: S3
    refuses the CompleteMultipartUpload of the part (a transient error at the last step of the file)."""
    monkeypatch.setattr(d, "S3_PART_BYTES", 256 * 1024)  # several multipart parts for this small dataset
    original_init = d.S3Destination.__init__

    def init(self, settings):
        original_init(self, settings)

        def refuse(**kwargs):
            raise _Injected("S3 unavailable (injected at CompleteMultipartUpload)")

        self.client.meta.events.register("before-call.s3.CompleteMultipartUpload", refuse)

    monkeypatch.setattr(d.S3Destination, "__init__", init)
    key = make_key(dataset["org"])
    with make_client(settings, export_part_rows=1_000_000, **s3.settings()) as api:
        export_id = create(api, key, WINDOW, ALL_COLUMNS, "jsonl").json()["id"]
        assert api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code == 200
        assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"]
                          != "in_progress", timeout=60)
        item = api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()
        assert item["status"] == "failed", item
        assert s3.keys(f"tg/exports/{export_id}/") == []
        uploads = [u["Key"] for u in s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
                   if f"exports/{export_id}/" in u["Key"]]
        assert uploads == [], f"multipart upload left open after the failed export: {uploads}"


def test_two_concurrent_starts_run_the_export_once(settings, tmp_path, dataset, make_key, monkeypatch):
    """docs/exports.md: start is draft → in_progress, 409 unless draft. Two start requests racing (a double
    click, a client retry) must not both be accepted: each accepted start runs a runner on the same files."""
    from exports import jobs as export_jobs

    submitted: list[str] = []
    original_submit = export_jobs.ExportRunner.submit

    def counting_submit(self, job_id):
        submitted.append(job_id)
        return original_submit(self, job_id)

    monkeypatch.setattr(export_jobs.ExportRunner, "submit", counting_submit)
    key = make_key(dataset["org"])
    doubled = []
    with make_client(settings, export_dir=tmp_path / "exports") as api:
        for _ in range(8):
            export_id = create(api, key, WINDOW, ["id"], "jsonl").json()["id"]
            barrier = threading.Barrier(2)
            codes = []

            def start():
                barrier.wait()
                codes.append(api.post(f"/v1/logs/exports/{export_id}/start", headers=h(key)).status_code)

            threads = [threading.Thread(target=start) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if sorted(codes) != [200, 409] or submitted.count(export_id) != 1:
                doubled.append((export_id, sorted(codes), submitted.count(export_id)))
            assert wait_until(lambda: api.get(f"/v1/logs/exports/{export_id}", headers=h(key)).json()["status"]
                              != "in_progress", timeout=30)
    assert doubled == [], f"(export, start answers, runners) accepted twice: {doubled}"


def test_stopping_the_api_fails_a_queued_export_too(settings, tmp_path, dataset, make_key, monkeypatch):
    """docs/exports.md: with TOLLGATE_EXPORT_WORKERS busy the others wait `in_progress`; 'When the process running
    an export stops, the export ends `failed` (`interrupted: …`)'. One worker: export A is held in its first
    slice (a gate in the stream), export B waits its turn; the API stops. Both must end failed."""
    gate, reached = threading.Event(), threading.Event()
    original = q.Stream.read

    def held_read(self, lo, hi):
        reached.set()
        gate.wait(30)
        return original(self, lo, hi)

    monkeypatch.setattr(q.Stream, "read", held_read)
    key = make_key(dataset["org"])
    api = make_client(settings, export_dir=tmp_path / "exports", export_workers=1)
    with api:
        a = create(api, key, WINDOW, ["id"], "jsonl").json()["id"]
        b = create(api, key, WINDOW, ["id"], "jsonl").json()["id"]
        assert api.post(f"/v1/logs/exports/{a}/start", headers=h(key)).status_code == 200
        assert reached.wait(30)
        assert api.post(f"/v1/logs/exports/{b}/start", headers=h(key)).status_code == 200
        threading.Timer(1.0, gate.set).start()
    # the process stopped; read the jobs back from the warehouse with a fresh app
    with make_client(settings, export_dir=tmp_path / "exports") as again:
        status = {x: again.get(f"/v1/logs/exports/{x}", headers=h(key)).json()["status"] for x in (a, b)}
    assert status == {a: "failed", b: "failed"}, status
