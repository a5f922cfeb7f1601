"""Scheduled exports against the real parts (Tansu → ingest → chdb; moto's S3 server; a local dir).

The windows a schedule runs, re-runs and catches up are driven through
ScheduleService.run_due(now=…) (the function APScheduler calls, with the clock given),
and once through a real BackgroundScheduler. Every file is read back with Polars and
compared with the analytics reference over the published events.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from conftest import read_topic, wait_until
from export_helpers import METRIC_COLUMNS, S3Server, expected_rows, ingest, make_events, normalize_exported, selected_ids
from exports import schedules
from exports.schedules import ScheduleService, window_of
from factories import iso

HEADER = "x-portkey-api-key"
T = datetime(2026, 11, 20, tzinfo=UTC)


def at(hour: float) -> datetime:
    return T + timedelta(hours=hour)


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def hours(base_settings, broker, warehouse):
    """600 generations between 09:00 and 14:00 on 2026-11-20, for one organisation."""
    org = f"org-{uuid.uuid4().hex[:10]}"
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"s{suffix}.gateway-logs", topic_feedback=f"s{suffix}.feedback", topic_audit=f"s{suffix}.audit",
        topic_dead_letter=f"s{suffix}.dead-letter", ingest_consumer_group=f"gs{suffix}"))
    events = make_events(org, 600, seed=21, start=at(9), span=timedelta(hours=5))
    ingest(s, broker, warehouse, org, events, redeliver=40)
    return {"org": org, "events": events, "settings": s}


def client_for(settings, **overrides):
    s = settings.model_copy(update=overrides)
    return TestClient(create_app(s, s.kafka_bootstrap, pool_size=2)), s


def h(key):
    return {HEADER: key}


def window_filters(start: datetime, end: datetime, extra: dict | None = None) -> dict:
    return {"time_of_generation_min": iso(start), "time_of_generation_max": iso(end - timedelta(milliseconds=1)),
            **(extra or {})}


def check_window(files: dict[str, bytes], events, org, start, end, filters, columns=METRIC_COLUMNS):
    """The window's parquet files hold exactly the reference's rows, once each, with their values."""
    rows = []
    for name in sorted(files):
        if name.endswith(".parquet"):
            rows.extend(pl.read_parquet(io.BytesIO(files[name])).to_dicts())
    want = selected_ids(events, [], org, window_filters(start, end, filters))
    assert [r["id"] for r in rows] == want
    expected = expected_rows(events)
    for r in rows:
        assert normalize_exported(r, "parquet") == {c: expected[r["id"]][c] for c in columns}
    manifest = json.loads(files["manifest.json"])
    assert manifest["rows"] == len(want) and manifest["window_start"] == iso(start) and manifest["window_end"] == iso(end)
    assert sorted(f["name"] for f in manifest["files"]) == sorted(n for n in files if n != "manifest.json")
    return want


def test_window_alignment():
    utc, berlin, kolkata = ZoneInfo("UTC"), ZoneInfo("Europe/Berlin"), ZoneInfo("Asia/Kolkata")
    assert window_of(at(10), "hour", utc) == (at(9), at(10))
    assert window_of(at(10) + timedelta(minutes=5), "hour", utc) == (at(9), at(10))
    assert window_of(at(0), "day", utc) == (at(-24), at(0))
    # a week is Monday to Monday; 2026-11-23 is a Monday
    assert window_of(datetime(2026, 11, 23, 2, tzinfo=UTC), "week", utc) == (
        datetime(2026, 11, 16, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC))
    # the zone's wall clock: the day Berlin leaves summer time has 25 hours
    start, end = window_of(datetime(2026, 10, 26, 0, 0, tzinfo=berlin), "day", berlin)
    assert (start, end) == (datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC))
    # +05:30: hours start at :30 UTC
    assert window_of(datetime(2026, 11, 20, 10, 45, tzinfo=kolkata), "hour", kolkata) == (
        datetime(2026, 11, 20, 3, 30, tzinfo=UTC), datetime(2026, 11, 20, 4, 30, tzinfo=UTC))
    trigger = schedules.parse_cron("0 * * * *", utc)
    fires, skipped = schedules.fire_times(trigger, at(10), at(13) + timedelta(seconds=30), 10)
    assert fires == [at(11), at(12), at(13)] and skipped == 0
    fires, skipped = schedules.fire_times(trigger, at(10), at(13) + timedelta(seconds=30), 2)
    assert fires == [at(12), at(13)] and skipped == 1


def test_three_windows_one_rerun_leave_one_copy_of_each_row(hours, settings, s3, warehouse, make_key, broker):
    org, events = hours["org"], hours["events"]
    key = make_key(org)
    filters = {"metadata": {"env": "prod"}, "status_code": "200,500"}
    api, s = client_for(settings, export_part_rows=20, **s3.settings())
    with api:
        r = api.post("/v1/logs/exports/schedules", headers=h(key), json={
            "cron": "0 * * * *", "timezone": "UTC", "window": "hour", "filters": filters, "prefix": "lake/llm",
            "start_at": iso(at(10))})
        assert r.status_code == 200, r.text
        schedule = r.json()
        assert schedule["format"] == "parquet" and schedule["requested_data"] == METRIC_COLUMNS
        try:
            service = ScheduleService(s)
            runs = service.run_due(schedule["id"], now=at(13) + timedelta(seconds=30))
            assert [(r.window_start, r.window_end, r.status) for r in runs] == [
                (at(10), at(11), "success"), (at(11), at(12), "success"), (at(12), at(13), "success")]
            assert service.run_due(schedule["id"], now=at(13) + timedelta(minutes=5)) == []  # a duplicate trigger
            root = f"tg/schedules/{org}/lake/llm"

            def window_files(start):
                prefix = f"{root}/dt={start:%Y-%m-%d}/hour={start:%H}/"
                return {k[len(prefix):]: s3.get(k) for k in s3.keys(prefix)}

            first_11 = window_files(at(11))
            assert len([n for n in first_11 if n.endswith(".parquet")]) >= 3  # parts of 20 rows
            for hour in (10, 11, 12):
                check_window(window_files(at(hour)), events, org, at(hour), at(hour + 1), filters)

            # late events for 11:00-12:00 arrive; the window is re-run (a backfill) with bigger parts
            late = make_events(org, 50, seed=99, start=at(11), span=timedelta(hours=1))
            ingest(hours["settings"].model_copy(update={"ingest_consumer_group": f"late{uuid.uuid4().hex[:6]}",
                                                        "topic_gateway_logs": f"late{uuid.uuid4().hex[:6]}"}),
                   broker, warehouse, org, late, expected=len({e["_id"] for e in events + late}))
            hours["events"] = events + late  # the organisation's data from now on (later tests)
            r = api.post(f"/v1/logs/exports/schedules/{schedule['id']}/backfill", headers=h(key),
                         json={"start": iso(at(11)), "end": iso(at(12))})
            assert r.status_code == 200, r.text
            assert [(x["window_start"], x["status"]) for x in r.json()["data"]] == [(iso(at(11)), "pending")]
            rerun = ScheduleService(s.model_copy(update={"export_part_rows": 1_000}))
            runs = rerun.run_due(schedule["id"], now=at(13) + timedelta(minutes=6))
            assert [(r.window_start, r.status, r.cause, r.attempts) for r in runs] == [(at(11), "success", "rerun", 2)]
            # and once more, as a duplicate trigger of the same window would; and the latest window too
            rerun.request_backfill(warehouse, rerun_schedule(warehouse, schedule["id"]), at(11), at(13))
            runs = rerun.run_due(schedule["id"], now=at(13) + timedelta(minutes=7))
            assert [(r.window_start, r.cause) for r in runs] == [(at(11), "rerun"), (at(12), "rerun")]
            assert rerun.run_due(schedule["id"], now=at(13) + timedelta(minutes=8)) == []  # the cursor did not move back

            everything = events + late
            ids = []
            for hour in (10, 11, 12):
                files = window_files(at(hour))
                if hour == 11:
                    assert [n for n in files if n.endswith(".parquet")] == ["part-00000.parquet"]  # stale parts gone
                ids += check_window(files, everything, org, at(hour), at(hour + 1), filters)
            # the whole prefix, read as one Hive-partitioned data set: exactly one copy of each row
            keys = [k for k in s3.keys(root + "/") if k.endswith(".parquet")]
            df = pl.concat([pl.read_parquet(io.BytesIO(s3.get(k))).with_columns(
                hour=pl.lit(int(k.split("hour=")[1][:2]))) for k in keys])
            assert df.height == len(ids) == df["id"].n_unique() and sorted(df["id"]) == sorted(ids)
            assert set(df["hour"]) == {10, 11, 12}
            assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
            # the run history through the API: one row per window, the latest attempt
            history = api.get(f"/v1/logs/exports/schedules/{schedule['id']}/runs", headers=h(key)).json()
            assert [(x["window_start"], x["status"], x["attempts"]) for x in history["data"]] == [
                (iso(at(12)), "success", 2), (iso(at(11)), "success", 3), (iso(at(10)), "success", 1)]
            assert history["data"][1]["rows"] == len(selected_ids(everything, [], org, window_filters(at(11), at(12), filters)))
            assert all(x["error"] is None and x["files"] for x in history["data"])
        finally:
            api.delete(f"/v1/logs/exports/schedules/{schedule['id']}", headers=h(key))


def rerun_schedule(warehouse, schedule_id):
    from warehouse.queries import exports as q
    return q.get_schedule(warehouse, None, schedule_id)


def test_catch_up_after_an_outage(hours, settings, tmp_path, warehouse, make_key):
    org, events = hours["org"], hours["events"]
    key = make_key(org)
    root = tmp_path / "exports"
    api, s = client_for(settings, export_dir=root)
    with api:
        schedule = api.post("/v1/logs/exports/schedules", headers=h(key), json={
            "cron": "0 * * * *", "window": "hour", "prefix": "hourly", "start_at": iso(at(9))}).json()
        try:
            before = ScheduleService(s)
            assert [r.window_start for r in before.run_due(schedule["id"], now=at(10) + timedelta(seconds=5))] == [at(9)]
            # the process dies while exporting 10:00-11:00: its run stays 'running', a partial file stays
            from warehouse.queries import exports as q
            q.write_run(warehouse, q.RunRow(schedule["id"], org, at(10), at(11), at(11), "running", "schedule", 1, 0,
                                            "[]", "", at(11), None, schedules._version()))
            crashed = root / "schedules" / org / "hourly" / "dt=2026-11-20" / "hour=10"
            crashed.mkdir(parents=True)
            (crashed / "part-00000.parquet.partial-dead").write_bytes(b"half a file")
            # four hours later the process starts again: a new service, rebuilt from ClickHouse
            after = ScheduleService(s)
            with after.pool.borrow() as client:
                assert after.recover(client) == 1
            runs = after.run_due(schedule["id"], now=at(14) + timedelta(seconds=5))
            assert [(r.window_start, r.status, r.cause) for r in runs] == [
                (at(10), "success", "retry"), (at(11), "success", "catch-up"), (at(12), "success", "catch-up"),
                (at(13), "success", "schedule")]
            assert [r.started_at for r in runs] == sorted(r.started_at for r in runs)  # in order
            for hour in range(9, 14):
                d = root / "schedules" / org / "hourly" / "dt=2026-11-20" / f"hour={hour:02d}"
                files = {p.name: p.read_bytes() for p in d.iterdir()}
                check_window(files, events, org, at(hour), at(hour + 1), {})
            history = api.get(f"/v1/logs/exports/schedules/{schedule['id']}/runs", headers=h(key)).json()["data"]
            assert [x["window_start"] for x in history] == [iso(at(h)) for h in (13, 12, 11, 10, 9)]
            assert history[3]["attempts"] == 2 and history[3]["status"] == "success"
        finally:
            api.delete(f"/v1/logs/exports/schedules/{schedule['id']}", headers=h(key))


def test_catch_up_limit_records_what_was_skipped(hours, settings, tmp_path, make_key):
    key = make_key(hours["org"])
    api, s = client_for(settings, export_dir=tmp_path / "exports", export_catchup_max_windows=2)
    with api:
        schedule = api.post("/v1/logs/exports/schedules", headers=h(key), json={
            "cron": "0 * * * *", "window": "hour", "start_at": iso(at(8))}).json()
        try:
            runs = ScheduleService(s).run_due(schedule["id"], now=at(14) + timedelta(seconds=1))
            assert [r.window_start for r in runs] == [at(12), at(13)]
            history = api.get(f"/v1/logs/exports/schedules/{schedule['id']}/runs", headers=h(key)).json()["data"]
            skipped = [x for x in history if x["status"] == "skipped"]
            assert len(skipped) == 1 and skipped[0]["window_start"] == iso(at(8))
            assert "4 missed windows" in skipped[0]["error"] and "backfill" in skipped[0]["error"]
        finally:
            api.delete(f"/v1/logs/exports/schedules/{schedule['id']}", headers=h(key))


def test_schedule_api_validation_lifecycle_and_audit(hours, settings, tmp_path, make_key, broker):
    key = make_key(hours["org"])
    api, _ = client_for(settings, export_dir=tmp_path / "exports")
    base = {"cron": "0 * * * *", "window": "hour"}
    with api:
        for body, field in (
            ({"window": "hour"}, "cron"),
            ({"cron": "0 * * * *"}, "window"),
            ({**base, "cron": "every hour"}, "cron"),
            ({**base, "cron": "61 * * * *"}, "cron"),
            ({**base, "timezone": "Mars/Olympus"}, "timezone"),
            ({**base, "window": "month"}, "window"),
            ({**base, "prefix": "../escape"}, "prefix"),
            ({**base, "prefix": "a/dt=1"}, "prefix"),
            ({**base, "format": "xml"}, "format"),
            ({**base, "requested_data": ["id", "secret"]}, "requested_data"),
            ({**base, "filters": {"time_of_generation_min": "2026-11-20T00:00:00Z"}}, "filters.time_of_generation_min"),
            ({**base, "filters": {"cost_min": -1}}, "filters.cost_min"),
            ({**base, "start_at": "yesterday"}, "start_at"),
            ({**base, "start_at": "0999-01-01T00:00:00Z"}, "start_at"),  # outside DateTime64 (found by test_fuzz)
            ({**base, "start_at": "0001-01-01T00:00:00+05:00"}, "start_at"),  # could not even become UTC
            ({**base, "every": 5}, "every"),
        ):
            r = api.post("/v1/logs/exports/schedules", json=body, headers=h(key))
            assert r.status_code == 422, (body, r.text)
            assert any(e["msg"].startswith(field) for e in r.json()["detail"]), (field, r.json())
        created = api.post("/v1/logs/exports/schedules", headers=h(key), json={
            **base, "timezone": "Europe/Berlin", "prefix": "p1", "format": "jsonl", "requested_data": ["id", "cost"]})
        assert created.status_code == 200, created.text
        sid = created.json()["id"]
        assert api.post("/v1/logs/exports/schedules", headers=h(key), json={**base, "prefix": "p1"}).status_code == 409
        r = api.put(f"/v1/logs/exports/schedules/{sid}", headers=h(key), json={"cron": "30 2 * * *", "window": "day"})
        assert r.status_code == 200 and r.json()["cron"] == "30 2 * * *" and r.json()["format"] == "jsonl"
        assert api.put(f"/v1/logs/exports/schedules/{sid}", headers=h(key), json={"timezone": "Nowhere"}).status_code == 422
        assert api.post(f"/v1/logs/exports/schedules/{sid}/pause", headers=h(key)).json()["status"] == "paused"
        assert api.post(f"/v1/logs/exports/schedules/{sid}/resume", headers=h(key)).json()["status"] == "active"
        got = api.get(f"/v1/logs/exports/schedules/{sid}", headers=h(key)).json()
        assert got["window"] == "day" and got["timezone"] == "Europe/Berlin" and got["prefix"] == "p1"
        assert sid in [x["id"] for x in api.get("/v1/logs/exports/schedules", headers=h(key)).json()["data"]]
        r = api.post(f"/v1/logs/exports/schedules/{sid}/backfill", headers=h(key), json={"start": iso(at(24)), "end": iso(at(0))})
        assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith("start")
        stranger = make_key(f"org-{uuid.uuid4().hex[:8]}")
        assert api.get(f"/v1/logs/exports/schedules/{sid}", headers=h(stranger)).status_code == 404
        assert api.post(f"/v1/logs/exports/schedules/{sid}/pause", headers=h(stranger)).status_code == 404
        assert api.delete(f"/v1/logs/exports/schedules/{sid}", headers=h(key)).status_code == 200
        assert api.get(f"/v1/logs/exports/schedules/{sid}", headers=h(key)).status_code == 404
        # the prefix is free again
        again = api.post("/v1/logs/exports/schedules", headers=h(key), json={**base, "prefix": "p1"}).json()["id"]
        api.delete(f"/v1/logs/exports/schedules/{again}", headers=h(key))
    records = [json.loads(r.value) for r in read_topic(broker.bootstrap, settings.topic_audit, 50)]  # 25 requests
    actions = sorted((r["action"], r["response_status_code"]) for r in records
                     if r["phase"] == "final" and r["resource_type"] == "log_export_schedule")
    assert ("create", 200) in actions and ("create", 409) in actions and ("create", 422) in actions
    for action in ("update", "pause", "resume", "delete", "backfill"):
        assert any(a == action for a, _ in actions), action


def test_apscheduler_runs_due_windows_and_follows_changes(hours, settings, tmp_path, make_key):
    """A real BackgroundScheduler: the service rebuilds its jobs from ClickHouse, runs the due
    windows at once (a daily schedule that started on 2026-11-19), and drops a paused schedule."""
    org, events = hours["org"], hours["events"]
    key = make_key(org)
    api, s = client_for(settings, export_dir=tmp_path / "exports", export_schedule_sync_seconds=0.5)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start()
    with api:
        schedule = api.post("/v1/logs/exports/schedules", headers=h(key), json={
            "cron": "0 0 * * *", "window": "day", "prefix": "daily", "start_at": iso(at(-24)),
            "filters": {"ai_org_model": "openai__gpt-4o"}}).json()
        try:
            service = ScheduleService(s)
            service.install(scheduler)
            job = scheduler.get_job(schedules.JOB_PREFIX + schedule["id"])
            assert job is not None
            days = (datetime.now(UTC) - at(0)).days + 1  # windows from 2026-11-19 up to yesterday

            def runs():
                return api.get(f"/v1/logs/exports/schedules/{schedule['id']}/runs", headers=h(key)).json()["data"]
            assert wait_until(lambda: len(runs()) == days and all(x["status"] == "success" for x in runs()), timeout=60), runs()
            d = tmp_path / "exports" / "schedules" / org / "daily" / "dt=2026-11-20" / "hour=00"
            check_window({p.name: p.read_bytes() for p in d.iterdir()}, events, org, at(0), at(24),
                         {"ai_org_model": "openai__gpt-4o"})
            api.post(f"/v1/logs/exports/schedules/{schedule['id']}/pause", headers=h(key))
            assert wait_until(lambda: scheduler.get_job(schedules.JOB_PREFIX + schedule["id"]) is None, timeout=10)
            api.post(f"/v1/logs/exports/schedules/{schedule['id']}/resume", headers=h(key))
            assert wait_until(lambda: scheduler.get_job(schedules.JOB_PREFIX + schedule["id"]) is not None, timeout=10)
        finally:
            api.delete(f"/v1/logs/exports/schedules/{schedule['id']}", headers=h(key))
            scheduler.shutdown(wait=True)


def test_two_organisations_never_share_a_schedule_directory():
    """A schedule's prefix is unique within its organisation only, so the organisation's directory must be
    one per organisation: `acme corp` and `acme_corp` were one (characters outside [A-Za-z0-9_.-] became `_`),
    and one's backfill replaced the other's files."""
    from warehouse.queries.exports import ScheduleRow

    def root(org: str) -> str:
        now = datetime(2026, 11, 20, tzinfo=UTC)
        return schedules.schedule_root(ScheduleRow(
            id="s", organisation_id=org, workspace_slug="default", created_by="k", description="", cron="0 * * * *",
            timezone="UTC", window_kind="hour", filters="{}", requested_data=("id",), format="jsonl", destination="local",
            prefix="lake", status="active", start_at=now, created_at=now, updated_at=now, version=1))

    orgs = ["acme corp", "acme_corp", "acme/corp", "acme%20corp", "ünï", "___", ".", "..", "%2E", "a.b", "a%2Eb", "org-1", "_"]
    roots = [root(o) for o in orgs]
    assert len(set(roots)) == len(orgs), roots
    for r in roots:
        segment = r.split("/")[1]
        assert r == f"schedules/{segment}/lake" and segment not in (".", "..") and "/" not in segment
    assert root("org-1") == "schedules/org-1/lake" and root("acme.io") == "schedules/acme.io/lake"  # as before
