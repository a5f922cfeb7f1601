"""Schemathesis against the app's own OpenAPI (``app.openapi()``), in-process over ASGI, with a valid key:
every operation, no 5xx, and every answer conforms to what the document declares (status code, content type,
body schema; analytics_api/openapi.py declares the error answers and Portkey's 200 bodies).

Three passes per operation: valid inputs, invalid inputs (negative mode), and valid inputs whose path
parameters name real resources of the fuzzing organisation (a log, feedback, a key, an export, a schedule,
policies), so that the 200 bodies are checked too, not only the 404s.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from analytics_api.app import create_app
from analytics_api.auth import SCOPES, hash_key, new_key
from factories import gateway_log
from ingest.events import GENERATIONS
from ingest.producer import ensure_topics
from ingest.sink import insert_rows
from warehouse.queries import api_keys

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 25  # per operation and pass: about two minutes in all
STATUSES: dict[int, int] = {}
BY_OPERATION: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def fuzz_app(base_settings, broker, warehouse):
    suffix = uuid.uuid4().hex[:8]
    s = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"f{suffix}.gateway-logs", topic_feedback=f"f{suffix}.feedback",
        topic_audit=f"f{suffix}.audit", topic_dead_letter=f"f{suffix}.dead-letter"))
    ensure_topics(broker.bootstrap, s.all_topics, s.topic_partitions)
    app = create_app(s, s.kafka_bootstrap, pool_size=2)
    with TestClient(app):  # runs the app's shutdown handlers at the end
        yield app


@pytest.fixture(scope="module")
def tenant(fuzz_app, warehouse):
    """An organisation with data and one resource of every kind; its key and the resources' ids."""
    org = f"org-fuzz-{uuid.uuid4().hex[:8]}"
    key = new_key()
    api_keys.insert(warehouse, key_hash=hash_key(key), organisation_id=org, workspace_slug="",
                              scopes=list(SCOPES))
    other = api_keys.insert(warehouse, key_hash=hash_key(new_key()), organisation_id=org, workspace_slug="",
                            scopes=["logs.read"])  # the real id of /v1/api-keys/{id}, which a pass deletes
    rng = random.Random(org)  # ids of its own: other tests look theirs up across organisations
    now = datetime.now(UTC)
    logs = [gateway_log(org, rng=rng, created_at=now - timedelta(hours=rng.randrange(1, 72))) for _ in range(200)]
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(e)) for e in logs])
    h = {"x-portkey-api-key": key}
    client = TestClient(fuzz_app)

    def created(path: str, body: dict) -> dict:
        r = client.post(path, json=body, headers=h)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    feedback = created("/v1/feedback", {"trace_id": logs[0]["metrics"]["trace_id"], "value": 1})["feedback_ids"][0]
    window = {"time_of_generation_min": (now - timedelta(days=4)).isoformat(), "time_of_generation_max": now.isoformat()}
    export = created("/v1/logs/exports", {"filters": window, "requested_data": ["id", "cost"]})["id"]
    schedule = created("/v1/logs/exports/schedules", {"cron": "0 * * * *", "timezone": "UTC", "window": "hour",
                                                      "prefix": "fuzz"})["id"]
    usage = created("/v1/policies/usage-limits", {
        "name": "fuzz", "conditions": [{"key": "workspace_id", "value": "default"}], "group_by": [{"key": "api_key"}],
        "type": "cost", "credit_limit": 10.0, "periodic_reset": "monthly"})["id"]
    rate = created("/v1/policies/rate-limits", {
        "name": "fuzz", "conditions": [{"key": "workspace_id", "value": "default"}], "group_by": [{"key": "api_key"}],
        "type": "requests", "unit": "rpm", "value": 100})["id"]
    ids = {"logId": logs[1]["_id"], "exportId": export, "scheduleId": schedule, "policyUsageLimitsId": usage,
           "rateLimitsPolicyId": rate, "metadataKey": "env"}
    return key, ids, {"/v1/feedback/": feedback, "/v1/api-keys/": str(other.id)}


def real_path_parameters(path: str, names: list[str], tenant) -> dict[str, str] | None:
    _, ids, by_prefix = tenant
    values = {}
    for name in names:
        if name in ids:
            values[name] = ids[name]
        elif name == "id":
            values[name] = next((v for prefix, v in by_prefix.items() if path.startswith(prefix)), None)
        if values.get(name) is None:
            return None
    return values


def fuzz_operation(operation, key: str, **strategy) -> None:
    @given(case=operation.as_strategy(**strategy))
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call_and_validate(headers={"x-portkey-api-key": key}, checks=CHECKS)
        STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1
        BY_OPERATION.setdefault(operation.label, {}).setdefault(response.status_code, 0)
        BY_OPERATION[operation.label][response.status_code] += 1

    run()


def test_every_operation_conforms_to_the_openapi(fuzz_app, tenant):
    key = tenant[0]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    failures = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        names = [p.name for p in operation.path_parameters]
        passes = [("valid", {}), ("invalid", {"generation_mode": GenerationMode.NEGATIVE})]
        real = real_path_parameters(operation.path, names, tenant) if names else None
        if real:
            passes.append(("real ids", {"path_parameters": real}))
        for label, strategy in passes:
            try:
                fuzz_operation(operation, key, **strategy)
            except Unsatisfiable:  # no invalid input exists for it (it takes any body, or nothing)
                assert label == "invalid", operation.label
            except (Exception, BaseExceptionGroup) as exc:  # collect them all: one report lists every failure
                details = "\n".join(f"  {e}" for e in getattr(exc, "exceptions", []))
                failures.append(f"{operation.label} ({label}): {exc!r}\n{details}")
    print("answers by status:", dict(sorted(STATUSES.items())))
    for label, counts in BY_OPERATION.items():
        print(label, dict(sorted(counts.items())))
    assert operations >= 60
    assert sum(n for code, n in STATUSES.items() if code < 300) > 100  # not only errors were checked
    assert not failures, "\n\n".join(failures)
