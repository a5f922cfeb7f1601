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


def new_job(lsettings, clock, org, budget_s: float = float("inf")) -> LimitsJob:
    """A job whose refreshes count every policy (no budget for closed segments: a slow machine would otherwise
    leave some for the next refresh; the budget has a test of its own)."""
    job = LimitsJob(lsettings, lsettings.kafka_bootstrap, clock=clock, organisations=[org])
    job.closed.budget_s = budget_s
    return job


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


# --------------------------------------------------------------------------- reading the job's topics


class Tail:
    """Every record of a topic, from its start: ``read()`` returns those that arrived since the last call."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                      fetch_max_wait_ms=100)
        assert wait_until(lambda: self.consumer.partitions_for_topic(topic))
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)

    def read(self) -> list:
        out, quiet = [], 0
        while quiet < 2:
            batch = self.consumer.poll(timeout_ms=300)
            quiet = 0 if batch else quiet + 1
            for records in batch.values():
                out.extend(records)
        return out

    def close(self) -> None:
        self.consumer.close()


def state_view(records) -> dict[str, dict | None]:
    """The compacted view: the last record per key (None: a tombstone)."""
    view: dict[str, dict | None] = {}
    for r in records:
        view[r.key.decode()] = None if r.value is None else orjson.loads(r.value)
    return view


# --------------------------------------------------------------------------- which closed days changed


def _days_of(ranges) -> set[int]:
    return {d for lo, hi in ranges for d in range(lo // 86_400_000, (hi - 1) // 86_400_000 + 1)}


def test_parts_watch_tells_new_data_from_merges():
    from analytics_api.limits.closed import PartsWatch
    from warehouse.queries.limits import Part

    day = 86_400_000

    def part(partition, lo, hi, t0, t1, level=1, version=None, written=100):
        suffix = "" if version is None else f"_{version}"
        return {f"{partition}_{lo}_{hi}_{level}{suffix}@{written}": Part(partition, lo, hi, lo if version is None else version,
                                                                 t0, t1, level, written)}

    seen = part("p", 1, 1, 0, day) | part("p", 2, 2, day, 2 * day) | part("q", 3, 3, 40 * day, 41 * day)
    watch = PartsWatch()
    assert watch.dirty(seen, "t1") is None  # nothing known yet: everything
    assert watch.advance(seen, "t1") and not watch.advance(seen, "t1")
    assert watch.dirty(seen, "t1") == []
    q = part("q", 3, 3, 40 * day, 41 * day)
    assert watch.dirty(part("p", 1, 2, 0, 2 * day, level=2) | q, "t1") == []  # a merge of parts already seen
    mutated = {**part("p", 1, 2, 0, 2 * day, level=2), **part("q", 3, 3, 40 * day, 41 * day, version=7)}
    assert _days_of(watch.dirty(mutated, "t1")) == {40}  # a mutation is newer than every block seen
    assert _days_of(watch.dirty(seen | part("p", 4, 4, day + 5, day + 9, level=0), "t1")) == {1}  # an insert
    # new data merged with old parts before the job saw it: the block is newer than any seen
    assert _days_of(watch.dirty(part("p", 1, 4, 0, 2 * day, level=2) | q, "t1")) == {0, 1}
    dropped = part("p", 1, 1, 0, day) | part("p", 2, 2, day, 2 * day)
    assert _days_of(watch.dirty(dropped, "t1")) == {40}  # a part gone without a successor (a dropped day)
    assert watch.dirty(seen, "t2") is None  # the table was rebuilt
    # emptied, and block numbers started again: the same part name, written later, at level 0
    assert _days_of(watch.dirty(part("p", 1, 1, 5 * day, 5 * day + 9, level=0, written=200), "t1")) >= {5}
    assert PartsWatch.from_json(watch.to_json()) == watch


def test_windows_split_into_closed_days_and_hours():
    from analytics_api.limits.closed import Dirty, PolicyWindow, split

    H, D = 3_600_000, 86_400_000
    now = ms(datetime(2026, 11, 20, 10, 30, tzinfo=UTC))
    day0 = ms(datetime(2026, 11, 20, tzinfo=UTC))
    start = ms(datetime(2026, 11, 18, 15, 20, tzinfo=UTC))
    usage_ = PolicyWindow("p", "usage_limits", None, start, day0 + 11 * D, [])
    closed, live = split(usage_, now)  # before noon: yesterday in hours
    assert closed == [(start, day0 - D)] + [(day0 - D + h * H, day0 - D + (h + 1) * H) for h in range(34)]
    assert live == [(day0 + 10 * H, day0 + 11 * D)]
    closed, live = split(usage_, now + 3 * H)  # after noon: yesterday as one day
    assert closed == [(start, day0 - D), (day0 - D, day0)] + [(day0 + h * H, day0 + (h + 1) * H) for h in range(13)]
    assert live == [(day0 + 13 * H, day0 + 11 * D)]
    fresh = PolicyWindow("p", "usage_limits", None, now - 60_000, None, [])  # created in the current hour
    assert split(fresh, now) == ([], [(now - 60_000, None)])
    rpd = PolicyWindow("r", "rate_limits", None, now - D + 1, now + 1, [])
    closed, live = split(rpd, now)
    assert closed == [(day0 - D + 11 * H + h * H, day0 - D + 12 * H + h * H) for h in range(23)]
    assert live == [(now - D + 1, day0 - D + 11 * H), (day0 + 10 * H, now + 1)]
    for w in (60_000, H):  # rpm, rph: nothing closed
        assert split(PolicyWindow("r", "rate_limits", None, now - w + 1, now + 1, []), now) == ([], [(now - w + 1, now + 1)])
    dirty = Dirty([(5, 10), (8, 20), (40, 50)])
    assert [dirty.touches(a, b) for a, b in ((0, 5), (0, 6), (19, 30), (20, 40), (49, 60), (50, 70))] == [
        False, True, True, False, True, False]
    assert Dirty(None).touches(0, 1) and not Dirty([])


# --------------------------------------------------------------------------- the scenario

USERS = ["alice", "bob", "josé", "ユーザー", "a|b", "x\\y", "Zoë 🚀"]


def stage(org, rng, n, lo: str, hi: str, **fixed) -> list[dict]:
    t0, t1 = datetime.fromisoformat(lo).replace(tzinfo=UTC), datetime.fromisoformat(hi).replace(tzinfo=UTC)
    span = int((t1 - t0).total_seconds() * 1000)
    out = []
    for _ in range(n):
        at = t0 + timedelta(milliseconds=rng.randrange(span))
        args = dict(workspace=rng.choice(["ws-a", "ws-a", "ws-b"]), api_key=rng.choice(["ak-1", "ak-2", "ak-3", "ak-4"]),
                    user=rng.choice(USERS), team=rng.choice(["red", "blue", ""]), env=rng.choice(["prod", "prod", "dev"]),
                    cost=round(rng.uniform(1, 20), 4), tokens=rng.randrange(50, 500))
        args.update(fixed)
        out.append(log(org, at.isoformat().replace("+00:00", ""), rng=rng, **args))
    return out


POLICIES = {
    "month": {"conditions": [{"key": "workspace_id", "value": "ws-a"}], "group_by": [{"key": "api_key"}],
              "type": "cost", "credit_limit": 150, "alert_threshold": 100, "periodic_reset": "monthly"},
    "week": {"conditions": [{"key": "metadata.env", "value": "prod"}], "group_by": [{"key": "metadata._user"}],
             "type": "tokens", "credit_limit": 2500, "alert_threshold": 1500, "periodic_reset": "weekly"},
    "cumulative": {"conditions": [{"key": "organisation_id", "value": "{org}"}],
                   "group_by": [{"key": "workspace_id"}, {"key": "metadata.team"}], "type": "cost", "credit_limit": 400},
}


class Scenario:
    """The published events, the policies and the reference windows, as the clock moves."""

    def __init__(self, api, key, org, clock, lsettings, producer, warehouse):
        self.api, self.key, self.org, self.clock = api, key, org, clock
        self.settings, self.producer, self.warehouse = lsettings, producer, warehouse
        self.events: list[dict] = []
        self.sent = 0
        self.ids: dict[str, str] = {}
        self.spec: dict[str, dict] = {}
        self.created_ms: dict[str, int] = {}
        self.resets: dict[str, dict[str, int]] = {}

    def create(self, name, kind, body):
        body = orjson.loads(orjson.dumps(body).replace(b"{org}", self.org.encode()))
        self.ids[name] = create(self.api, self.key, kind, body)
        self.spec[name] = body
        self.created_ms[name] = ms(self.clock())

    def publish(self, events, again: list[dict] = ()):
        self.events += events
        publish(self.producer, self.settings.topic_gateway_logs, [*events, *again])
        self.sent += len(events) + len(again)
        unique = len({e["_id"] for e in self.events})
        assert wait_until(lambda: count_generations(self.warehouse, self.org) == unique, timeout=60)

    def window(self, name, now_ms) -> tuple[int, int | None]:
        from analytics_api.limits.counters import period  # only the calendar arithmetic

        start, end = period(self.spec[name].get("periodic_reset") or "", now_ms)
        return max(start or 0, self.created_ms[name]), end

    def expected(self, name) -> dict[str, float]:
        spec, now_ms = self.spec[name], ms(self.clock())
        start, end = self.window(name, now_ms)
        resets = {vk: at for vk, at in self.resets.get(name, {}).items() if at > start}
        return usage(events_frame(self.events), org=self.org, conditions=[(c["key"], c["value"]) for c in spec["conditions"]],
                     group_by=[g["key"] for g in spec["group_by"]], measure=spec["type"], start_ms=start, end_ms=end,
                     resets=resets)

    def check(self, name) -> dict[str, float]:
        """The API's entities of policy ``name`` equal the reference (keys seen earlier are listed at 0)."""
        expected = self.expected(name)
        got = entities(self.api, self.key, self.ids[name])
        used = {k: e["current_usage"] for k, e in got.items() if e["current_usage"] != 0}
        assert used == pytest.approx(expected, abs=1e-6), name
        limit = self.spec[name]["credit_limit"]
        for k, e in got.items():
            assert e["status"] == ("exhausted" if e["current_usage"] >= limit else "active"), (name, k, e)
        assert expected, f"{name}: the scenario must give this policy usage"
        return expected


def with_policies(lapi, lsettings, warehouse, producer, make_key, org, clock) -> tuple[str, Scenario, "Tail", "Tail"]:
    """A key, the Scenario with POLICIES created at 2026-10-28 12:00, and tails of the alert and state topics."""
    key = make_key(org)
    s = Scenario(lapi, key, org, clock, lsettings, producer, warehouse)
    clock.set("2026-10-28T12:00:00")
    for name, body in POLICIES.items():
        s.create(name, "usage-limits", body)
    return key, s, Tail(lsettings.kafka_bootstrap, lsettings.topic_limit_alerts), Tail(lsettings.kafka_bootstrap, lsettings.topic_limits_state)


def test_counters_follow_periods_resets_late_events_and_redelivery(lapi, lsettings, workers, warehouse, producer, make_key,
                                                                    org, clock):
    rng = random.Random(2026)
    key, s, alerts, states = with_policies(lapi, lsettings, warehouse, producer, make_key, org, clock)
    expected_alerts: set[tuple] = set()
    job = new_job(lsettings, clock, org)

    reports = []

    def run(at: str) -> dict[str, dict[str, float]]:
        clock.set(at)
        reports.append(job.run_once())
        seen = {}
        for name in POLICIES:
            seen[name] = s.check(name)
            spec, now_ms = s.spec[name], ms(clock())
            start, _ = s.window(name, now_ms)
            for vk, amount in seen[name].items():
                window = max(start, s.resets.get(name, {}).get(vk, 0), s.created_ms[name])
                if spec.get("alert_threshold") is not None and amount >= spec["alert_threshold"]:
                    expected_alerts.add((s.ids[name], vk, window, "threshold"))
                if amount >= spec["credit_limit"]:
                    expected_alerts.add((s.ids[name], vk, window, "exhausted"))
        return seen

    # stage 1: events before the policies existed (not counted) and up to Oct 30 10:00
    s.publish(stage(org, rng, 8, "2026-10-27T00:00:00", "2026-10-28T12:00:00")
              + stage(org, rng, 50, "2026-10-28T12:00:00", "2026-10-30T10:00:00"))
    a = run("2026-10-30T10:00:00")
    exhausted_in_october = {vk for vk, v in a["month"].items() if v >= 150}

    # stage 2: up to Nov 1 08:00, straddling the month boundary by a millisecond each side
    s.publish(stage(org, rng, 50, "2026-10-30T10:00:00", "2026-11-01T08:00:00")
              + [log(org, "2026-10-31T23:59:59.999", rng=rng, api_key="ak-1", cost=40),
                 log(org, "2026-11-01T00:00:00.000", rng=rng, api_key="ak-1", cost=3)])
    records = states.read()
    october = run("2026-10-31T23:59:59.000")
    exhausted_in_october |= {vk for vk, v in october["month"].items() if v >= 150}
    assert exhausted_in_october, "some api key must exhaust the monthly limit in October"
    before = state_view(states.read())
    for vk in exhausted_in_october:
        assert before[f"{s.ids['month']}:{vk}"]["status"] == "exhausted"
    b = run("2026-11-01T08:00:00")
    # a new month starts at zero: the October records of the monthly policy are tombstoned
    after = state_view(states.read())
    for vk in exhausted_in_october:
        if b["month"].get(vk, 0) < 150:
            assert after[f"{s.ids['month']}:{vk}"] is None, vk

    # resets in mid-period: by entity id, and by reset_usage_for_value (a bare value, one group_by key)
    clock.set("2026-11-01T12:00:00")
    ent = entities(lapi, key, s.ids["month"])["api_key:ak-1"]
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['month']}/entities/{ent['id']}/reset", key).status_code == 200
    s.resets.setdefault("month", {})["api_key:ak-1"] = ms(clock())
    clock.set("2026-11-01T13:00:00")
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['week']}", key, {"reset_usage_for_value": "alice"}).status_code == 200
    s.resets.setdefault("week", {})["metadata._user:alice"] = ms(clock())

    # stage 3: up to Nov 2 09:00, straddling the ISO week boundary; some events delivered twice
    third = stage(org, rng, 60, "2026-11-01T08:00:00", "2026-11-02T09:00:00") + [
        log(org, "2026-11-01T23:59:59.999", rng=rng, user="alice", tokens=300),
        log(org, "2026-11-02T00:00:00.000", rng=rng, user="alice", tokens=200)]
    s.publish(third, again=rng.sample(third, 10))
    run("2026-11-01T18:00:00")
    assert reports[-1].closed_days_derived > 0  # after noon Oct 31 is one day, written from the hours counted before
    run("2026-11-01T23:30:00")  # Nov 1's hours, resets inside, counted as they close…
    c = run("2026-11-02T09:00:00")
    run("2026-11-02T13:00:00")
    assert reports[-1].closed_days_derived > 0  # …and after noon the closed Nov 1 is written from them
    assert "metadata._user:alice" in c["week"]

    # stage 4: late events with old timestamps (closed days), and a redelivery of stage 3
    late = (stage(org, rng, 6, "2026-11-01T14:00:00", "2026-11-01T16:00:00", workspace="ws-a", api_key="ak-1")
            + stage(org, rng, 4, "2026-10-29T00:00:00", "2026-10-29T06:00:00")
            + stage(org, rng, 5, "2026-11-02T08:00:00", "2026-11-02T08:59:00", env="prod"))
    s.publish(late, again=third[:15])
    d = run("2026-11-03T10:00:00")
    late_month = sum(e["metrics"]["cost"] for e in late[:6])
    assert d["month"]["api_key:ak-1"] >= late_month - 1e-9  # the late events on a closed day are counted

    # the same instant again, and after a restart: nothing changes, no alert is decided twice
    job.run_once()
    job.close()
    job = new_job(lsettings, clock, org)
    report = job.run_once()
    assert report.alerts_decided == 0 and report.counters_written == 0
    for name in POLICIES:
        s.check(name)
    # merging parts (what the settle job and background merges do) changes nothing that counts
    warehouse.command("OPTIMIZE TABLE generations FINAL")
    report = job.run_once()
    assert report.closed_segments_computed == 0 and report.counters_written == 0
    # the restarted job's first refresh cleaned up: no superseded segment versions are left
    job.closed.close()
    ids = list(s.ids.values())
    left = warehouse.query(
        "SELECT countIf((policy_id, start, end, version) NOT IN (SELECT policy_id, start, end, version FROM limit_segments "
        "FINAL)), count() FROM limit_segment_usage WHERE policy_id IN {ids:Array(String)}", parameters={"ids": ids}).result_rows[0]
    assert left[0] == 0 and left[1] > 0, left

    # alerts: exactly one per (policy, value key, alert window, kind), none missing
    got = [orjson.loads(r.value) for r in alerts.read()]
    keys = [(a["policy_id"], a["value_key"], ms(datetime.fromisoformat(a["alert_window_start"].replace("Z", "+00:00"))), a["kind"])
            for a in got]
    assert len(keys) == len(set(keys)), "an alert was published twice"
    assert set(keys) == expected_alerts
    assert {k[3] for k in keys} == {"threshold", "exhausted"}
    # the flags agree
    for name in ("month", "week"):
        r = call(lapi, "GET", f"/usage-limits/{s.ids[name]}", key, include_usage="true")
        assert r.status_code == 200
        for vk, u in r.json()["value_key_usage_map"].items():
            start, _ = s.window(name, ms(clock()))
            window = max(start, s.resets.get(name, {}).get(vk, 0))
            assert u["is_threshold_alerts_sent"] == ((s.ids[name], vk, window, "threshold") in expected_alerts), vk
            assert u["is_exhausted_alerts_sent"] == ((s.ids[name], vk, window, "exhausted") in expected_alerts), vk

    # the state feed: exactly the exhausted keys, with their usage
    view = state_view(records + states.read())
    live = {k: v for k, v in view.items() if v is not None}
    wanted = {f"{s.ids[name]}:{vk}": amount for name in POLICIES for vk, amount in s.expected(name).items()
              if amount >= POLICIES[name]["credit_limit"]}
    assert wanted, "the scenario must end with exhausted keys"
    assert set(live) == set(wanted)
    for k, rec in live.items():
        assert rec["current_usage"] == pytest.approx(wanted[k]) and rec["status"] == "exhausted"
        assert rec["policy_kind"] == "usage_limits" and rec["organisation_id"] == org
    job.close()
    alerts.close()
    states.close()


# --------------------------------------------------------------------------- changing and archiving a policy


def test_period_change_rebaselines_limit_change_rearms_and_archive_stops(lapi, lsettings, workers, warehouse, producer,
                                                                         make_key, org, clock):
    """Adding a period zeroes the spend from that instant (not at once "exhausted", LiteLLM #34492); a new limit
    re-evaluates the status and re-arms the alerts; an archived policy stops counting and clears its records."""
    key = make_key(org)
    rng = random.Random(7)
    s = Scenario(lapi, key, org, clock, lsettings, producer, warehouse)
    clock.set("2026-10-28T12:00:00")
    s.create("p", "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}], "group_by": [{"key": "api_key"}],
                                   "type": "cost", "credit_limit": 100, "alert_threshold": 50})
    alerts, states = Tail(lsettings.kafka_bootstrap, lsettings.topic_limit_alerts), Tail(lsettings.kafka_bootstrap, lsettings.topic_limits_state)
    job = new_job(lsettings, clock, org)
    sk = f"{s.ids['p']}:api_key:ak-1"

    s.publish([log(org, f"2026-10-29T0{i}:00:00", rng=rng, cost=30) for i in range(4)])  # ak-1: 120 cents
    clock.set("2026-10-30T10:00:00")
    job.run_once()
    assert s.check("p") == {"api_key:ak-1": pytest.approx(120)}
    assert state_view(states.read())[sk]["status"] == "exhausted"
    assert sorted(a["kind"] for a in map(lambda r: orjson.loads(r.value), alerts.read())) == ["exhausted", "threshold"]

    # cumulative → monthly at 12:00: counting restarts from that instant, at zero
    clock.set("2026-10-30T12:00:00")
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['p']}", key, {"periodic_reset": "monthly"}).status_code == 200
    s.spec["p"]["periodic_reset"], s.created_ms["p"] = "monthly", ms(clock())
    s.publish([log(org, "2026-10-30T12:05:00", rng=rng, cost=20), log(org, "2026-10-30T11:59:59.999", rng=rng, cost=500)])
    clock.set("2026-10-30T12:30:00")
    job.run_once()
    assert s.check("p") == {"api_key:ak-1": pytest.approx(20)}
    assert state_view(states.read())[sk] is None  # cleared: tombstone
    assert alerts.read() == []

    # a lower limit: exhausted at once, and the alerts of the new limits are sent (once)
    clock.set("2026-10-30T13:00:00")
    r = call(lapi, "PUT", f"/usage-limits/{s.ids['p']}", key, {"credit_limit": 10})
    assert r.status_code == 422 and "credit_limit" in r.text  # the threshold (50) must stay below the limit
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['p']}", key, {"credit_limit": 10, "alert_threshold": 5}).status_code == 200
    s.spec["p"].update(credit_limit=10, alert_threshold=5)
    clock.set("2026-10-30T13:10:00")
    job.run_once()
    job.run_once()
    assert s.check("p") == {"api_key:ak-1": pytest.approx(20)}
    rec = state_view(states.read())[sk]
    assert rec["status"] == "exhausted" and rec["limit"] == 10.0
    got = [orjson.loads(r.value) for r in alerts.read()]
    assert sorted(a["kind"] for a in got) == ["exhausted", "threshold"]
    assert {a["alert_window_start"] for a in got} == {"2026-10-30T13:00:00.000Z"}

    # a higher limit clears it; the name alone changes nothing
    clock.set("2026-10-30T14:00:00")
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['p']}", key, {"credit_limit": 1000, "name": "big"}).status_code == 200
    s.spec["p"]["credit_limit"] = 1000
    job.run_once()
    assert s.check("p") == {"api_key:ak-1": pytest.approx(20)}
    assert state_view(states.read())[sk] is None
    got = call(lapi, "GET", f"/usage-limits/{s.ids['p']}", key).json()
    assert (got["name"], got["credit_limit"], got["alert_threshold"], got["periodic_reset"]) == ("big", 1000.0, 5.0, "monthly")

    # exhausted again, then archived: the record is cleared and counting stops
    assert call(lapi, "PUT", f"/usage-limits/{s.ids['p']}", key, {"credit_limit": 15}).status_code == 200
    job.run_once()
    assert state_view(states.read())[sk]["status"] == "exhausted"
    assert call(lapi, "DELETE", f"/usage-limits/{s.ids['p']}", key).status_code == 200
    assert call(lapi, "GET", f"/usage-limits/{s.ids['p']}", key).status_code == 404
    assert call(lapi, "DELETE", f"/usage-limits/{s.ids['p']}", key).status_code == 404
    s.publish([log(org, "2026-10-30T14:30:00", rng=rng, cost=30)])
    clock.set("2026-10-30T15:00:00")
    report = job.run_once()
    assert report.policies == 0
    assert state_view(states.read())[sk] is None
    archived = call(lapi, "GET", f"/usage-limits/{s.ids['p']}", key, status="archived", include_usage="true").json()
    assert archived["status"] == "archived"
    assert archived["value_key_usage_map"]["api_key:ak-1"]["current_usage"] == pytest.approx(20)  # as when archived
    listed = call(lapi, "GET", "/usage-limits", key, status="archived").json()
    assert [p["id"] for p in listed["data"]] == [s.ids["p"]]
    assert call(lapi, "GET", "/usage-limits", key).json()["total"] == 0

    # every change is a version of its own
    from warehouse.queries import policies as pq
    versions = pq.history(warehouse, org, s.ids["p"])
    assert [v.status for v in versions] == ["active"] * 5 + ["archived"]
    assert [v.periodic_reset for v in versions] == ["", "monthly", "monthly", "monthly", "monthly", "monthly"]
    assert len({v.version for v in versions}) == 6
    for t in (alerts, states):
        t.close()
    job.close()


# --------------------------------------------------------------------------- rate limits


def test_rate_limits_count_sliding_windows(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    key = make_key(org)
    rng = random.Random(11)
    # a window never reaches before its policy's creation (docs/limits.md "Windows"): the rpd policy exists
    # since the day before, so that its window is a whole day of closed hours
    clock.set("2026-11-02T09:00:00")
    rpd = create(lapi, key, "rate-limits", {"conditions": [{"key": "workspace_id", "value": "ws-b"}],
                                            "group_by": [{"key": "api_key"}], "type": "requests", "unit": "rpd", "value": 40})
    clock.set("2026-11-03T09:00:00")
    rpm = create(lapi, key, "rate-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                            "group_by": [{"key": "api_key"}], "type": "requests", "unit": "rpm", "value": 3})
    rph = create(lapi, key, "rate-limits", {"conditions": [{"key": "metadata.env", "value": "prod"}],
                                            "group_by": [{"key": "metadata._user"}], "type": "tokens", "unit": "rph", "value": 1000})
    created = {rpd: "2026-11-02T09:00:00", rpm: "2026-11-03T09:00:00", rph: "2026-11-03T09:00:00"}
    # a day of ws-b traffic (the closed hours of the rpd window), with events on the window's edges
    day = stage(org, rng, 60, "2026-11-02T09:30:00", "2026-11-03T10:02:00", workspace="ws-b", env="dev") + [
        log(org, t, rng=rng, workspace="ws-b", api_key="ak-1", env="dev") for t in (
            "2026-11-02T10:00:00.000", "2026-11-02T10:00:00.001", "2026-11-02T10:59:59.999", "2026-11-02T11:00:00.000",
            "2026-11-02T10:01:30.000", "2026-11-02T10:01:30.001", "2026-11-03T09:59:59.999", "2026-11-03T10:00:00.000",
            "2026-11-03T10:00:00.001", "2026-11-03T10:01:30.000")]
    events = day + ([log(org, f"2026-11-03T09:59:{10 + 10 * i}", rng=rng, api_key="ak-2", user="josé", tokens=150) for i in range(4)]
              + [log(org, "2026-11-03T09:59:05", rng=rng, api_key="ak-3", user="bob", tokens=100),
                 log(org, "2026-11-03T09:58:59.999", rng=rng, api_key="ak-3", user="bob", tokens=100),  # outside the minute
                 log(org, "2026-11-03T09:00:00.001", rng=rng, api_key="ak-4", user="josé", tokens=500),  # inside the hour
                 log(org, "2026-11-03T09:00:00.000", rng=rng, api_key="ak-4", user="josé", tokens=999)])  # just outside
    publish(producer, lsettings.topic_gateway_logs, events + events[:2])  # and two redelivered
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    states = Tail(lsettings.kafka_bootstrap, lsettings.topic_limits_state)
    job = new_job(lsettings, clock, org)
    frame = events_frame(events)
    policies = {rpm: ([("workspace_id", "ws-a")], ["api_key"], "requests", 60_000, 3),
                rph: ([("metadata.env", "prod")], ["metadata._user"], "tokens", 3_600_000, 1000),
                rpd: ([("workspace_id", "ws-b")], ["api_key"], "requests", 86_400_000, 40)}

    def check(*ids) -> dict[str, dict[str, float]]:
        now, seen = clock(), {}
        for pid in ids:
            conditions, group_by, measure, width, limit = policies[pid]
            baseline = ms(datetime.fromisoformat(created[pid]).replace(tzinfo=UTC))
            expected = usage(frame, org=org, conditions=conditions, group_by=group_by, measure=measure,
                             start_ms=max(ms(now) - width + 1, baseline), end_ms=ms(now) + 1)
            got = entities(lapi, key, pid, kind="rate-limits")
            assert {k: v["current_usage"] for k, v in got.items()} == expected, pid
            assert {k: v["status"] for k, v in got.items()} == {
                k: "rate_limited" if v >= limit else "active" for k, v in expected.items()}, pid
            seen[pid] = expected
        return seen

    clock.set("2026-11-03T10:00:00")
    job.run_once()
    seen = check(rpm, rph, rpd)
    assert seen[rph] == {"metadata._user:josé": 1100, "metadata._user:bob": 200}
    assert seen[rpd]  # the day's traffic, counted from its closed hours and the two partial ones
    for at in ("2026-11-03T10:01:30", "2026-11-03T11:00:00", "2026-11-03T11:05:00"):  # the hours slide
        clock.set(at)
        job.run_once()
        check(rpd)
    clock.set("2026-11-03T10:00:00")
    job.run_once()
    check(rpm, rph, rpd)
    view = {k: v for k, v in state_view(states.read()).items() if not k.startswith(rpd)}
    assert {k for k, v in view.items() if v} == {f"{rpm}:api_key:ak-2", f"{rph}:metadata._user:josé"}
    rec = view[f"{rpm}:api_key:ak-2"]
    assert (rec["status"], rec["current_usage"], rec["limit"], rec["unit"], rec["window_seconds"], rec["policy_kind"]) == (
        "rate_limited", 4, 3, "rpm", 60, "rate_limits")
    assert rec["group"] == {"api_key": "ak-2"} and rec["conditions"] == [{"key": "workspace_id", "value": "ws-a"}]
    assert call(lapi, "GET", f"/rate-limits/{rpm}/entities", key, status="rate_limited").json()["total"] == 1

    # a raised limit clears the hourly breach at once
    assert call(lapi, "PUT", f"/rate-limits/{rph}", key, {"value": 5000, "unit": "rph"}).status_code == 200
    job.run_once()
    view = state_view(states.read())
    assert {k: v for k, v in view.items() if not k.startswith(rpd)} == {f"{rph}:metadata._user:josé": None}
    got = call(lapi, "GET", f"/rate-limits/{rph}", key).json()
    assert (got["value"], got["unit"], got["type"], got["object"]) == (5000, "rph", "tokens", "policy_rate_limits")
    # the minute slides on: ak-2 is cleared (tombstone) and no longer listed
    clock.set("2026-11-03T10:01:30")
    job.run_once()
    assert {k: v for k, v in state_view(states.read()).items() if not k.startswith(rpd)} == {f"{rpm}:api_key:ak-2": None}
    assert entities(lapi, key, rpm, kind="rate-limits") == {}
    states.close()
    job.close()


def test_a_new_rate_limit_counts_from_its_creation(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    """docs/limits.md "Windows": never before the policy's baseline, its creation. A new rpd policy is not
    rate-limited at once by the requests of the hours before it existed; its window fills from then on."""
    key = make_key(org)
    rng = random.Random(9)
    before = [log(org, f"2026-10-28T0{h}:00:00", rng=rng, api_key="ak-1") for h in range(5)]
    after = [log(org, f"2026-10-28T10:0{m}:00", rng=rng, api_key="ak-1") for m in (1, 2, 3)]
    publish(producer, lsettings.topic_gateway_logs, before + after)
    assert wait_until(lambda: count_generations(warehouse, org) == len(before) + len(after))
    clock.set("2026-10-28T10:00:00")
    pid = create(lapi, key, "rate-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                            "group_by": [{"key": "api_key"}], "type": "requests", "unit": "rpd", "value": 3})
    job = new_job(lsettings, clock, org)
    frame = events_frame(before + after)
    for at, limited in (("2026-10-28T10:00:30", False), ("2026-10-28T10:05:00", True)):
        clock.set(at)
        job.run_once()
        expected = usage(frame, org=org, conditions=[("workspace_id", "ws-a")], group_by=["api_key"], measure="requests",
                         start_ms=max(ms(clock()) - 86_400_000 + 1, ms(datetime(2026, 10, 28, 10, tzinfo=UTC))),
                         end_ms=ms(clock()) + 1)
        got = {k: (v["current_usage"], v["status"]) for k, v in entities(lapi, key, pid, kind="rate-limits").items()}
        assert got == {k: (v, "rate_limited" if v >= 3 else "active") for k, v in expected.items()}, at
        assert (got.get("api_key:ak-1", (0, "active"))[1] == "rate_limited") == limited, got
    job.close()


def test_a_refresh_that_fails_is_started_over_by_the_next(lapi, lsettings, workers, warehouse, producer, make_key, org,
                                                          clock, monkeypatch):
    """A refresh failing while it computes the hour that just closed (a transient ClickHouse error) must not
    change what the next refresh counts: that hour was left out until the next hour, unblocking the key."""
    from warehouse.queries import limits as lq

    key = make_key(org)
    clock.set("2026-10-28T12:00:00")
    pid = create(lapi, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                             "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 30})
    rng = random.Random(5)
    events = [log(org, "2026-10-28T13:10:00", rng=rng, api_key="ak-1", cost=30.0),
              log(org, "2026-10-28T14:05:00", rng=rng, api_key="ak-1", cost=5.0)]
    publish(producer, lsettings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    job = new_job(lsettings, clock, org)
    clock.set("2026-10-28T13:30:00")
    job.run_once()
    real, failures = lq.insert_segment_usage, [RuntimeError("transient ClickHouse error")]

    def fails_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(lq, "insert_segment_usage", fails_once)
    clock.set("2026-10-28T14:10:00")
    with pytest.raises(RuntimeError):
        job.run_once()
    clock.set("2026-10-28T14:11:00")
    job.run_once()
    expected = usage(events_frame(events), org=org, conditions=[("workspace_id", "ws-a")], group_by=["api_key"],
                     measure="cost", start_ms=ms(datetime(2026, 10, 28, 12, tzinfo=UTC)), end_ms=None)
    assert expected == {"api_key:ak-1": 35.0}
    got = entities(lapi, key, pid)
    assert {k: (v["current_usage"], v["status"]) for k, v in got.items()} == {"api_key:ak-1": (pytest.approx(35.0), "exhausted")}
    job.close()


def test_a_workspace_policys_records_name_its_workspace(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    """A policy made by a workspace key only counts its workspace; its enforcement records say so in
    `conditions` (docs/limits.md), or a gateway matching group and conditions would block in every workspace."""
    ws_key = make_key(org, workspace="ws-a")
    clock.set("2026-10-28T12:00:00")
    pid = create(lapi, ws_key, "usage-limits", {"conditions": [{"key": "metadata.env", "value": "prod"}],
                                                "group_by": [{"key": "metadata._user"}], "type": "cost", "credit_limit": 20})
    rng = random.Random(8)
    events = [log(org, "2026-10-28T12:10:00", rng=rng, workspace="ws-a", user="alice", cost=25.0),
              log(org, "2026-10-28T12:11:00", rng=rng, workspace="ws-b", user="alice", cost=1.0)]
    publish(producer, lsettings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    states = Tail(lsettings.kafka_bootstrap, lsettings.topic_limits_state)
    job = new_job(lsettings, clock, org)
    clock.set("2026-10-28T12:30:00")
    job.run_once()
    rec = state_view(states.read())[f"{pid}:metadata._user:alice"]
    assert rec["status"] == "exhausted" and rec["current_usage"] == pytest.approx(25.0)  # ws-a only
    assert rec["conditions"] == [{"key": "metadata.env", "value": "prod"}, {"key": "workspace_id", "value": "ws-a"}]
    states.close()
    job.close()


def _sums_per_refresh(job, clock, times):
    calls = []
    real = job.closed._sum

    def spy(*a, **k):
        calls.append(clock())
        return real(*a, **k)

    job.closed._sum = spy
    out = []
    for t in times:
        clock.set(t)
        before = len(calls)
        job.run_once()
        out.append(len(calls) - before)
    return out


def test_a_young_rate_limit_keeps_unchanged_refreshes_free(lapi, lsettings, workers, warehouse, producer,
                                                                     make_key, org, clock):
    key = make_key(org)
    rng = random.Random(4)
    events = [log(org, f"2026-10-27T{h:02d}:10:00", rng=rng) for h in range(0, 24)]
    publish(producer, lsettings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    clock.set("2026-10-27T00:00:00")
    for i in range(5):  # usage limits: a day of closed hour segments each
        create(lapi, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                           "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 1e9 + i})
    clock.set("2026-10-28T10:00:00")
    create(lapi, key, "rate-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                      "group_by": [{"key": "api_key"}], "type": "requests", "unit": "rpd", "value": 10**6})
    job = new_job(lsettings, clock, org)
    counts = _sums_per_refresh(job, clock, ["2026-10-28T10:20:00", "2026-10-28T10:20:05", "2026-10-28T10:20:10",
                                            "2026-10-28T10:20:15"])
    # the same segments, no new data: after the first refresh nothing is summed again (it is not, with an rpd
    # policy older than a day)
    assert counts[1:] == [0, 0, 0], counts
    job.close()


# --------------------------------------------------------------------------- alert-once across crashes


def test_alerts_are_published_once_across_crashes(lapi, lsettings, workers, warehouse, producer, make_key, org, clock):
    """(1) Kafka is down when alerts become due: they are decided (pending) and published by the next job.
    (2) A job died after publishing but before marking them sent: the next job finds them on the topic
    and does not publish them again."""
    from analytics_api.limits.feed import Feed
    from tollgate.broker import free_port
    from warehouse.queries import limits as lq

    key = make_key(org)
    rng = random.Random(3)
    clock.set("2026-10-28T12:00:00")
    pid = create(lapi, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                             "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 100,
                                             "alert_threshold": 50})
    publish(producer, lsettings.topic_gateway_logs, [log(org, "2026-10-28T13:00:00", rng=rng, api_key="ak-1", cost=120),
                                                     log(org, "2026-10-28T13:00:01", rng=rng, api_key="ak-2", cost=60)])
    assert wait_until(lambda: count_generations(warehouse, org) == 2)
    alerts, states = Tail(lsettings.kafka_bootstrap, lsettings.topic_limit_alerts), Tail(lsettings.kafka_bootstrap, lsettings.topic_limits_state)
    clock.set("2026-10-28T14:00:00")

    down = new_job(lsettings, clock, org)
    down.feed = Feed(f"127.0.0.1:{free_port()}", lsettings.topic_limit_alerts, lsettings.topic_limits_state, timeout=1.0)
    report = down.run_once()
    assert report.alerts_decided == 3 and report.alerts_published == 0
    rows = [r for r in lq.load_alerts(warehouse, [org])]
    assert sorted((r["value_key"], r["kind"], r["state"]) for r in rows) == [
        ("api_key:ak-1", "exhausted", "pending"), ("api_key:ak-1", "threshold", "pending"), ("api_key:ak-2", "threshold", "pending")]
    assert alerts.read() == [] and states.read() == []
    flags = call(lapi, "GET", f"/usage-limits/{pid}", key, include_usage="true").json()["value_key_usage_map"]
    assert not flags["api_key:ak-1"]["is_exhausted_alerts_sent"]  # decided, not sent
    down.close()  # the process "dies"

    up = new_job(lsettings, clock, org)
    report = up.run_once()
    assert report.alerts_decided == 0
    published = [orjson.loads(r.value) for r in alerts.read()]
    assert sorted((a["value_key"], a["kind"]) for a in published) == [
        ("api_key:ak-1", "exhausted"), ("api_key:ak-1", "threshold"), ("api_key:ak-2", "threshold")]
    assert {r["alert_id"] for r in lq.load_alerts(warehouse, [org]) if r["state"] == "sent"} == {a["alert_id"] for a in published}
    assert state_view(states.read())[f"{pid}:api_key:ak-1"]["status"] == "exhausted"  # the state record too
    flags = call(lapi, "GET", f"/usage-limits/{pid}", key, include_usage="true").json()["value_key_usage_map"]
    assert flags["api_key:ak-1"]["is_exhausted_alerts_sent"] and flags["api_key:ak-2"]["is_threshold_alerts_sent"]
    assert not flags["api_key:ak-2"]["is_exhausted_alerts_sent"]
    up.close()

    # (2) roll ClickHouse back to "published, not yet marked sent" (pending, as a crash would leave it)
    sent = lq.load_alerts(warehouse, [org])
    lq.write_alerts(warehouse, [{**r, "state": "pending", "version": r["version"] + 1} for r in sent])
    again = new_job(lsettings, clock, org)
    report = again.run_once()
    assert report.alerts_decided == 0 and report.alerts_published == 0
    assert alerts.read() == []  # nothing published twice
    assert {r["state"] for r in lq.load_alerts(warehouse, [org])} == {"sent"}
    assert again.run_once().alerts_decided == 0
    again.close()
    alerts.close()
    states.close()


# --------------------------------------------------------------------------- the job under `tollgate up`


def test_tollgate_up_refreshes_counters_and_the_state_feed(tmp_path):
    """The scheduler of `tollgate up` runs the job at the default interval (5 s) with default ingest batching:
    an event produced to the stack's broker shows in the counter and on the state topic. Prints the latency
    (freshness: docs/limits.md); timings are not asserted (benchmarks/limits.py --freshness measures more)."""
    import time

    import httpx

    from ingest.producer import make_producer
    from tollgate.broker import free_port

    port = free_port()
    stack = _up(tmp_path, port, TOLLGATE_INGEST_BATCH_SECONDS="1.0")  # the defaults, not test_stack's 0.2
    try:
        stack.wait_ready()
        key = stack.admin_key()
        info = orjson.loads((tmp_path / "stack.json").read_bytes())
        with httpx.Client(base_url=f"{stack.url}/v1/policies", headers={HEADER: key}, timeout=10) as http:
            r = http.post("/usage-limits", json={"conditions": [{"key": "workspace_id", "value": "default"}],
                                                 "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 10})
            assert r.status_code == 200, r.text
            pid = r.json()["id"]
            states = Tail(info["kafka_bootstrap"], "tollgate.limits-state")
            states.read()
            producer = make_producer(info["kafka_bootstrap"])
            event = gateway_log("default-org", workspace="default", created_at=datetime.now(UTC), rng=random.Random(),
                                api_key_id="ak-fresh", cost=50.0)
            producer.send("tollgate.gateway-logs", orjson.dumps(event)).get(timeout=30)
            produced = time.monotonic()
            counter_at = state_at = None
            deadline = produced + 60
            while (counter_at is None or state_at is None) and time.monotonic() < deadline:
                if counter_at is None:
                    data = http.get(f"/usage-limits/{pid}/entities").json()["data"]
                    if data and data[0]["current_usage"] == 50.0 and data[0]["status"] == "exhausted":
                        counter_at = time.monotonic()
                if state_at is None:
                    records = [r for r in states.read() if r.key == f"{pid}:api_key:ak-fresh".encode()]
                    if records and orjson.loads(records[-1].value)["status"] == "exhausted":
                        state_at = time.monotonic()
                time.sleep(0.05)
            producer.close()
            states.close()
        assert counter_at is not None and state_at is not None
        print(f"\nfreshness under `tollgate up` (interval 5 s, ingest batch 1 s): counter {counter_at - produced:.2f} s, "
              f"state record {state_at - produced:.2f} s after the event was produced")
        assert stack.stop() == 0
    finally:
        if stack.proc.poll() is None:
            stack.proc.kill()


def _up(data_dir, port: int, **env):
    """`tollgate up` on ``data_dir`` with ``env`` added (test_stack's Stack, other settings)."""
    import os
    import subprocess
    import threading

    from test_stack import CLI, Stack

    stack = Stack.__new__(Stack)
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    stack.env = {**base, "TOLLGATE_DATA_DIR": str(data_dir), "TOLLGATE_RETENTION_DAYS": "0", **env}
    stack.proc = subprocess.Popen([*CLI, "up", "--port", str(port)], env=stack.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    stack.lines, stack.ready, stack.url = [], threading.Event(), f"http://127.0.0.1:{port}"
    threading.Thread(target=stack._read, daemon=True).start()
    return stack


# --------------------------------------------------------------------------- a cold start in steps


def test_cold_start_counts_in_steps_and_holds_pending_policies(lapi, lsettings, workers, warehouse, producer, make_key,
                                                               org, clock):
    """With no stored segments, a refresh computes closed segments for its budget only (here: one query). A policy
    with segments left is not counted yet: no counters, state records or alerts for it, and after that its last
    ones stay as they were; once its segments are all there it equals the reference. Segments left after late
    events are computed even by a restarted job (the parts snapshot has moved on by then)."""
    rng = random.Random(99)
    key, s, alerts, states = with_policies(lapi, lsettings, warehouse, producer, make_key, org, clock)
    name_of = {pid: name for name, pid in s.ids.items()}
    s.publish(stage(org, rng, 300, "2026-10-28T12:00:00", "2026-11-03T09:59:00"))
    clock.set("2026-11-03T10:00:00")

    def counted() -> dict[str, dict[str, float]]:
        """The policies with counters (checked against the reference), by name."""
        out = {}
        for name, pid in s.ids.items():
            got = entities(lapi, key, pid)
            if got:
                out[name] = s.check(name)
        return out

    def new_stepping_job() -> LimitsJob:
        return new_job(lsettings, clock, org, budget_s=0.0)  # one query per refresh

    job = new_stepping_job()
    seen: list[set[str]] = []
    alert_records, state_records = [], []
    for _ in range(40):
        report = job.run_once()
        ready = set(counted())
        assert len(ready) == len(POLICIES) - report.policies_pending
        new_states, new_alerts = states.read(), alerts.read()
        state_records += new_states
        alert_records += new_alerts
        # nothing is published for a policy that is not counted yet
        assert {name_of[r.key.decode().split(":", 1)[0]] for r in new_states} <= ready
        assert {name_of[orjson.loads(r.value)["policy_id"]] for r in new_alerts} <= ready
        seen.append(ready)
        if not report.policies_pending:
            break
    assert report.policies_pending == 0
    assert len(seen) >= 4 and seen[0] == set() and seen[-1] == set(POLICIES)  # in steps, each policy once complete
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert len({frozenset(x) for x in seen}) >= 3  # the policies were not all complete at the same refresh
    before = counted()
    assert any(v >= POLICIES[n]["credit_limit"] for n in POLICIES for v in before[n].values()), "some key must be exhausted"

    # late events on closed days and hours: a refresh recomputes a part; the rest is held as it was
    late = (stage(org, rng, 6, "2026-10-30T01:00:00", "2026-10-30T05:00:00")
            + stage(org, rng, 6, "2026-11-01T14:00:00", "2026-11-01T16:00:00", env="prod")
            + stage(org, rng, 6, "2026-11-02T05:00:00", "2026-11-02T05:59:00", env="prod"))
    s.publish(late)
    report = job.run_once()
    assert report.closed_segments_computed >= 1 and report.closed_segments_left >= 1 and report.policies_pending >= 1
    pending = set()
    for name, pid in s.ids.items():
        got = {k: e["current_usage"] for k, e in entities(lapi, key, pid).items() if e["current_usage"] != 0}
        if got != pytest.approx(s.expected(name), abs=1e-6):
            assert got == pytest.approx(before[name], abs=1e-6), name  # pending: as before the late events
            pending.add(name)
    assert len(pending) == report.policies_pending
    new_states = states.read()
    state_records += new_states
    assert not {name_of[r.key.decode().split(":", 1)[0]] for r in new_states} & pending

    # a restart now: the parts snapshot already covers the late events, the segments left are computed anyway; the
    # scheduled run refreshes again at once while policies are held (here the interval leaves room for all of them)
    job.close()
    job = new_job(lsettings.model_copy(update={"limits_interval": 3600.0}), clock, org, budget_s=0.0)
    job.run()
    assert job.last is not None and job.last.policies_pending == 0
    after = counted()
    assert set(after) == set(POLICIES)
    assert any(after[n] != pytest.approx(before[n]) for n in POLICIES)  # the late events count

    # alerts once, none missing; the state feed holds exactly the exhausted keys
    got = [orjson.loads(r.value) for r in alert_records + alerts.read()]
    keys = [(a["policy_id"], a["value_key"], a["kind"]) for a in got]
    assert len(keys) == len(set(keys))
    wanted_alerts = {(s.ids[n], vk, kind) for n in POLICIES for vk, v in after[n].items()
                     for kind, at in (("threshold", POLICIES[n].get("alert_threshold")), ("exhausted", POLICIES[n]["credit_limit"]))
                     if at is not None and v >= at}
    assert set(keys) == wanted_alerts
    job.close()
    live = {k: v for k, v in state_view(state_records + states.read()).items() if v is not None}
    assert set(live) == {f"{s.ids[n]}:{vk}" for n in POLICIES for vk, v in after[n].items() if v >= POLICIES[n]["credit_limit"]}
    for t in (alerts, states):
        t.close()
