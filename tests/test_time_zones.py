"""Control-plane rows keep their UTC times whatever the process's local time zone.

clickhouse-connect's ``client.insert()`` reads a naive datetime as the process's local time;
a `tollgate up` on a laptop east or west of UTC must still store a policy's times, a reset, an
export job's and an API key's as the UTC instants they are. Each row is written with the time
zone of the process set to Asia/Kolkata (+05:30) and then America/Los_Angeles, and read back
both through the module and as ClickHouse's own UTC text.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from warehouse.queries import api_keys, exports, policies

AT = datetime(2031, 3, 4, 12, 0, 0, 123_000, tzinfo=UTC)
TEXT = "2031-03-04 12:00:00.123"


@pytest.fixture(params=["Asia/Kolkata", "America/Los_Angeles"])
def local_zone(request, monkeypatch):
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def _text(warehouse, table: str, column: str, id_column: str, row_id: str) -> set[str]:
    return {r[0] for r in warehouse.query(f"SELECT toString({column}) FROM {table} WHERE {id_column} = {{i:String}}",
                                          parameters={"i": row_id}).result_rows}


def test_a_policy_and_its_reset_keep_their_utc_times(warehouse, local_zone):
    org = f"org-tz-{uuid.uuid4().hex[:8]}"
    row = policies.PolicyRow(id=policies.new_id(), version=policies.next_version(), kind="usage_limits", organisation_id=org,
                             workspace_slug="", name="tz", conditions=(), group_by=("api_key",), type="cost",
                             credit_limit=10.0, created_at=AT, updated_at=AT, baseline_at=AT, limits_at=AT)
    policies.insert(warehouse, row)
    for column in ("created_at", "updated_at", "baseline_at", "limits_at"):
        assert _text(warehouse, "limit_policies", column, "id", row.id) == {TEXT}, (local_zone, column)
    got = policies.get(warehouse, "usage_limits", org, None, row.id)
    assert got is not None and (got.created_at, got.baseline_at, got.limits_at) == (AT, AT, AT)

    policies.insert_reset(warehouse, row, "key-1", AT, "tester")
    assert _text(warehouse, "limit_resets", "reset_at", "policy_id", row.id) == {TEXT}, local_zone
    assert policies.latest_resets(warehouse, [row.id]) == [(row.id, "key-1", AT)]


def test_an_api_key_and_an_export_job_keep_their_utc_times(warehouse, local_zone):
    org = f"org-tz-{uuid.uuid4().hex[:8]}"
    key = api_keys.insert(warehouse, key_hash=uuid.uuid4().hex, organisation_id=org, workspace_slug="", scopes=["logs.view"])
    stored = _text(warehouse, "api_keys", "created_at", "id", key.id)
    assert stored == {key.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]}, local_zone

    job = exports.JobRow(id=uuid.uuid4().hex, organisation_id=org, workspace_slug="", created_by="tester", description="",
                         filters="{}", requested_data=("id",), format="parquet", destination="local", status="draft",
                         total=0, rows_written=0, files="[]", error="", created_at=AT, updated_at=AT,
                         started_at=AT, finished_at=None, version=exports.job_version("draft"))
    exports.write_job(warehouse, job)
    assert _text(warehouse, "export_jobs", "started_at", "id", job.id) == {TEXT}, local_zone
    assert replace(exports.get_job_by_id(warehouse, job.id), version=job.version) == job
