"""Usage-limit counters and rate-limit policies (docs/limits.md), against the real parts:
events go through the Tansu broker and real ingest into chdb; the limits job runs with
an injected clock; alerts and state records are read back from Kafka.

Every counter is compared with an independent Polars computation over the generated
events (tests/limits_reference.py), never with Tollgate's own code.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from analytics_api.limits.job import LimitsJob
from conftest import count_generations, publish, read_topic, wait_until
from factories import gateway_log
from ingest.producer import ensure_topics
from limits_reference import events_frame, ms, usage

HEADER = "x-portkey-api-key"


class Clock:
    """The injected "now" of the API and the job."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, text: str) -> datetime:
        self.now = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return self.now


@pytest.fixture
def lsettings(settings, broker):
    suffix = uuid.uuid4().hex[:8]
    s = settings.model_copy(update=dict(topic_limit_alerts=f"t{suffix}.limit-alerts",
                                        topic_limits_state=f"t{suffix}.limits-state"))
    ensure_topics(broker.bootstrap, list(s.limit_topics), s.topic_partitions, configs=s.limit_topics)
    return s


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 10, 28, 12, tzinfo=UTC))


@pytest.fixture
def lapi(lsettings, warehouse, clock):
    app = create_app(lsettings, lsettings.kafka_bootstrap, pool_size=2)
    app.state.limits_clock = clock
    with TestClient(app) as client:
        yield client


def new_job(lsettings, clock, org) -> LimitsJob:
    return LimitsJob(lsettings, lsettings.kafka_bootstrap, clock=clock, organisations=[org])


def call(api, method, path, key, body=None, **params):
    kwargs = {"headers": {HEADER: key}, "params": params}
    if body is not None:
        kwargs["json"] = body
    return api.request(method, f"/v1/policies{path}", **kwargs)


def create(api, key, kind, body) -> str:
    r = call(api, "POST", f"/{kind}", key, body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def entities(api, key, policy_id, kind="usage-limits") -> dict[str, dict]:
    out, page = {}, 0
    while True:
        r = call(api, "GET", f"/{kind}/{policy_id}/entities", key, page_size=100, current_page=page)
        assert r.status_code == 200, r.text
        body = r.json()
        out.update({e["value_key"]: e for e in body["data"]})
        if len(out) >= body["total"] or not body["data"]:
            return out
        page += 1


def log(org, at: str, *, rng, workspace="ws-a", api_key="ak-1", user="alice", team="red", env="prod", cost=10.0, tokens=100):
    return gateway_log(org, workspace=workspace, created_at=datetime.fromisoformat(at).replace(tzinfo=UTC), rng=rng,
                       api_key_id=api_key, cost=cost, total_units=tokens, req_units=tokens, res_units=0,
                       **{"metadata.key": ["_user", "team", "env"], "metadata.value": [user, team, env]})


def test_counts_what_was_published(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    key = make_key(org)
    pid = create(lapi, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                              "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 50})
    rng = random.Random(1)
    events = [log(org, f"2026-10-28T13:{i:02d}:00", rng=rng, api_key=f"ak-{i % 3}", cost=7.5) for i in range(12)]
    publish(producer, lsettings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    clock.set("2026-10-28T14:00:00")
    job = new_job(lsettings, clock, org)
    report = job.run_once()
    expected = usage(events_frame(events), org=org, conditions=[("workspace_id", "ws-a")], group_by=["api_key"],
                     measure="cost", start_ms=ms(datetime(2026, 10, 28, 12, tzinfo=UTC)), end_ms=None)
    got = entities(lapi, key, pid)
    assert {k: v["current_usage"] for k, v in got.items()} == pytest.approx(expected)
    assert {k: v["status"] for k, v in got.items()} == {k: "exhausted" if v >= 50 else "active" for k, v in expected.items()}
    assert report.value_keys == 3
    job.close()
