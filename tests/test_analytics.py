"""Every /v1/analytics route against an independent Polars reference (tests/analytics_reference.py).

One module-scoped data set: ~3,000 gateway logs and their feedback for a fresh organisation,
generated deterministically, produced to Kafka and stored by the real ingest workers. Each
(route, case) pair is one test: the API's answer must equal the reference's exactly and
validate against the spec's response schema (with strict integers).
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jsonschema
import polars as pl
import pytest
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from analytics_api.auth import SCOPES, hash_key, new_key
from analytics_reference import (Q50, Q99, Reference, Window, feedback_frame, generations_frame, quantile, round_dec, round_int,
                                 without_float_noise)
from conftest import count_generations, publish, wait_ingested, wait_until
from spec_schemas import SPEC, STRICT, resolve
from ingest.producer import ensure_topics, make_producer
from ingest.workers import IngestWorkers
from warehouse.filters import PAIRS_AS_OR
from warehouse.queries import api_keys


# --------------------------------------------------------------------------- the data set

SEED = 20260308
START = datetime(2026, 2, 27, tzinfo=UTC)
END = datetime(2026, 3, 12, 12, tzinfo=UTC)
IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))

WORKSPACES, WORKSPACE_WEIGHTS = ["default", "team-a", "team-b"], [5, 3, 2]
MODELS = [
    ("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("azure-openai", "gpt-4o"),
    ("anthropic", "claude-3-5-sonnet"), ("together", "meta-llama__Llama-3-70b"), ("google", "gemini-1.5-pro"),
]
VIRTUAL_KEYS = {"openai": ["vk-openai-prod", "vk-openai-dev"], "azure-openai": ["vk-azure"],
                "anthropic": ["vk-anthropic"], "together": ["vk-together"], "google": ["vk-google"]}
STATUSES, STATUS_WEIGHTS = [200, 201, 400, 401, 429, 500, 503], [60, 5, 6, 4, 10, 8, 7]
CACHE, CACHE_WEIGHTS = ["HIT", "SEMANTIC HIT", "MISS", None, "SEMANTIC MISS", "DISABLED"], [12, 8, 45, 28, 4, 3]
CONFIGS = ["cfg-fallback", "cfg-loadbalance", "cfg-simple"]
API_KEYS = ["key-1", "key-2", "key-3", "key-4"]
PROMPTS = ["summarise", "classify", "chat-v2", "translate-ü"]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "O'Brien", "zoë",
         "用户-1", "back\\slash", 'say "hi"', "mallory", "niaj", "olivia", "peggy", "rupert"] + [f"user-{i}" for i in range(30)]
TEAMS = ["O'Brien \"q\"", "back\\slash", "日本語", "ü", "plain", "a,b"]
WEIGHTS = [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]  # exact binary fractions


def wire_ts(ts: datetime, style: str) -> str:
    if style == "ist":
        return ts.astimezone(IST).isoformat(timespec="milliseconds")
    if style == "pst":
        return ts.astimezone(PST).isoformat(timespec="milliseconds")
    if style == "micro":  # sub-millisecond digits: stored truncated
        return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def gateway_log(rng: random.Random, org: str, n: int, ws: str, ts: datetime, trace: str) -> dict:
    ai_org, ai_model = rng.choice(MODELS)
    status = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
    cache = rng.choices(CACHE, CACHE_WEIGHTS)[0]
    hit = cache in ("HIT", "SEMANTIC HIT")
    req, res = rng.randrange(0, 4000), rng.randrange(0, 2000)
    mode = rng.choices(["single", "fallback", "loadbalance"], [5, 3, 2])[0]
    style = rng.choices(["z", "ist", "pst", "micro"], [80, 10, 5, 5])[0]
    if style == "micro":
        ts += timedelta(microseconds=rng.randrange(1000))
    log_id = f"gen-{n:05d}-{rng.getrandbits(32):08x}"
    m: dict[str, Any] = {
        "workspace_slug": ws,
        "ai_org": ai_org,
        "ai_model": ai_model,
        "req_units": req,
        "res_units": res,
        "retry_success_count": rng.choices([0, 1, 2, 3], [70, 15, 10, 5])[0],
        "mode": mode,
        "last_used_option_index": 0 if mode == "single" else rng.choice([0, 1, 2]),
        "trace_id": trace,
        "span_id": f"span-{n:05d}",
        "virtual_key": rng.choice(VIRTUAL_KEYS[ai_org]),
        "config": rng.choice(CONFIGS),
        "api_key_id": rng.choice(API_KEYS),
        "prompt_slug": rng.choice(PROMPTS),
        "request_url": "https://api.example.test/v1/chat/completions",
    }
    if rng.random() < 0.9:
        m["total_units"] = req + res  # otherwise it defaults to req_units + res_units
    response_time = rng.randrange(3, 120) if hit else rng.randrange(80, 6000)
    if rng.random() < 0.85:  # otherwise both default to the `response` object
        m["response_status_code"] = status
        m["response_time"] = response_time
    if cache is not None:
        m["cache_status"] = cache
    r = rng.random()
    if r < 0.06:
        m["cost"] = None
    elif r < 0.12:
        pass  # no cost at all
    elif r < 0.14:
        m["cost"] = 0.0
    else:
        m["cost"] = rng.randrange(1, 6000) / 1024  # cents, an exact binary fraction

    meta: dict[str, str] = {}
    if rng.random() < 0.8:
        meta["_user"] = "" if rng.random() < 0.06 else rng.choice(USERS)
    if rng.random() < 0.6:
        meta["team"] = rng.choice(TEAMS)
    if rng.random() < 0.5:
        meta["env"] = rng.choice(["prod", "staging"])
    if rng.random() < 0.4:
        meta["tier"] = rng.choice(["1", "2", "3"])
    if rng.random() < 0.3:
        meta["beta"] = rng.choice(["true", "false"])
    items = list(meta.items())
    rng.shuffle(items)
    if rng.random() < 0.3:
        m["metadata"] = dict(items)
    else:
        m["metadata.key"] = [k for k, _ in items]
        m["metadata.value"] = [v for _, v in items]

    event: dict[str, Any] = {
        "created_at": wire_ts(ts, style),
        "organisation_id": org,
        "request": {"url": m["request_url"], "method": "POST", "body": {"model": ai_model}},
        "response": {"status": status, "responseTime": response_time},
        "metrics": m,
    }
    where = rng.choices(["_id", "id", "metrics"], [90, 5, 5])[0]
    (m if where == "metrics" else event)["id" if where != "_id" else "_id"] = log_id
    return event


@dataclass
class DataSet:
    org: str
    noise_org: str
    logs: list[dict] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)


def generate(org: str, noise_org: str, seed: int = SEED) -> DataSet:
    rng = random.Random(seed)
    data = DataSet(org, noise_org)
    span_ms = (END - START) // timedelta(milliseconds=1)
    first_seen: dict[str, tuple[str, datetime]] = {}
    n = 0
    traces = 0

    def add_group(ws: str, ts: datetime, size: int | None = None) -> None:
        nonlocal n, traces
        if size is None and rng.random() < 0.15:
            size, trace = 1, ""
        else:
            size = size or rng.choices([1, 2, 3], [70, 20, 10])[0]
            trace, traces = f"tr-{traces:05d}", traces + 1
        for j in range(size):
            at = ts if j == 0 or rng.random() < 0.1 else ts + timedelta(milliseconds=rng.randrange(1, 3 * 3_600_000))
            data.logs.append(gateway_log(rng, org, n, ws, at, trace))
            n += 1
            if trace and trace not in first_seen:
                first_seen[trace] = (ws, at)

    while n < 2_800:
        add_group(rng.choices(WORKSPACES, WORKSPACE_WEIGHTS)[0], START + timedelta(milliseconds=rng.randrange(span_ms)))
    burst = datetime(2026, 3, 6, 4, 30, tzinfo=UTC)  # 10:00..11:30 IST: the minute-bucket window
    while n < 2_950:
        add_group(rng.choices(WORKSPACES, [8, 1, 1])[0], burst + timedelta(milliseconds=rng.randrange(90 * 60_000)))
    for edge in ("2026-03-01T18:30:00.000Z", "2026-03-09T18:29:59.999Z"):  # the ends of the IST window
        at = datetime.fromisoformat(edge)
        for delta in (timedelta(0), timedelta(milliseconds=-1 if edge.startswith("2026-03-01") else 1)):
            data.logs.append(gateway_log(rng, org, n, "default", at + delta, ""))
            n += 1
    data.logs += [dict(ev) for ev in rng.sample(data.logs, 30)]  # re-deliveries: the same id and timestamp

    fb_n = 0
    for trace in sorted(first_seen):
        if rng.random() >= 0.15:
            continue
        ws, at = first_seen[trace]
        weights = [rng.choice(WEIGHTS) for _ in range(rng.choice([1, 1, 2, 3]))]
        mood = rng.choice([-7, -3, 0, 2, 6])  # traces differ, so averages are not all near 0
        if not any(weights):
            weights[-1] = 1.0  # keep every trace's weighted feedback defined (Σ weight > 0)
        for w in weights:
            created = at + timedelta(seconds=rng.randrange(1, 7200))
            ev: dict[str, Any] = {"id": f"fb-{fb_n:05d}", "organisation_id": org, "workspace_slug": ws,
                                  "created_at": wire_ts(created, "z"), "trace_id": trace,
                                  "value": max(-10, min(10, mood + rng.randint(-3, 3)))}
            fb_n += 1
            if w != 1.0 or rng.random() < 0.5:
                ev["weight"] = w
            if rng.random() < 0.3:
                ev["metadata"] = {"_user": rng.choice(USERS), "source": "thumbs", "n": 3}
            data.feedback.append(ev)
            if rng.random() < 0.25:  # updated later (PUT): only the latest version counts
                update = dict(ev, value=rng.choice([v for v in range(-10, 11) if v != ev["value"]]),
                              updated_at=wire_ts(created + timedelta(hours=1, milliseconds=rng.randrange(1000)), "z"))
                if rng.random() < 0.5:
                    update["weight"] = rng.choice([0.25, 0.5, 1.0])
                data.feedback.append(update)
    for i in range(10):  # feedback of traces nobody logged
        data.feedback.append({"id": f"fb-orphan-{i}", "organisation_id": org, "created_at": "2026-03-04T00:00:00.000Z",
                              "trace_id": f"tr-orphan-{i}", "value": 10, "weight": 1.0})

    # another organisation reusing our trace ids, with feedback on them: never counted for us
    our_traces = sorted(first_seen)
    for i in range(100):
        data.logs.append(gateway_log(rng, noise_org, 90_000 + i, "default",
                                     START + timedelta(milliseconds=rng.randrange(span_ms)), rng.choice(our_traces)))
    for i in range(40):
        data.feedback.append({"id": f"fb-noise-{i}", "organisation_id": noise_org, "workspace_slug": "default",
                              "created_at": "2026-03-04T00:00:00.000Z", "trace_id": rng.choice(our_traces),
                              "value": 10, "weight": 1.0})
    rng.shuffle(data.logs)
    rng.shuffle(data.feedback)  # some updates arrive before their original
    return data


ORG = f"org-analytics-{uuid.uuid4().hex[:8]}"
DATA = generate(ORG, f"org-analytics-noise-{uuid.uuid4().hex[:8]}")
REFERENCE = Reference(generations_frame(DATA.logs, ORG), feedback_frame(DATA.feedback, ORG))


def _pick_filters() -> dict[str, str]:
    """Filter values taken from the data: shared traces that have feedback, and some span ids."""
    g = REFERENCE.gens.filter(pl.col("ws") == "default")
    shared = (g.filter(pl.col("has_fb")).group_by("trace").len().filter(pl.col("len") >= 2)
              .sort("trace")["trace"].to_list())
    spans = sorted(g["span"].to_list())[::97][:12]
    return {"trace_id": ",".join(shared[:4]), "span_id": ",".join(spans)}


PICKED = _pick_filters()

# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    lo: str
    hi: str
    params: dict = field(default_factory=dict)
    key: str = "org"  # "org": organisation key; "ws": a key of workspace team-a

    def query(self) -> dict:
        return {"time_of_generation_min": self.lo, "time_of_generation_max": self.hi, **self.params}


IST_WEEK = ("2026-03-02T00:00:00+05:30", "2026-03-09T23:59:59.999+05:30")
ALL_Z = ("2026-02-27T00:00:00Z", "2026-03-12T23:59:59.999Z")


def meta(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


CASES = [
    Case("ist-week-no-filter", *IST_WEEK),
    Case("z-team-a", *ALL_Z, {"workspace_slug": "team-a"}),
    Case("pst-dst-week-days-status", "2026-03-05T00:00:00-08:00", "2026-03-12T00:00:00-08:00",
         {"granularity": "day", "status_code": "200,,429,500"}),
    Case("ist-90min-minutes", "2026-03-06T10:00:00+05:30", "2026-03-06T11:30:00+05:30"),
    Case("z-2days-hours-tokens", "2026-03-03T06:00:00Z", "2026-03-05T06:00:00Z",
         {"total_units_min": "500", "total_units_max": "4000", "prompt_token_min": "100",
          "completion_token_max": "1500"}),
    Case("z-granularity-hour-cost-from-0", "2026-03-03T00:00:00Z", "2026-03-08T00:00:00Z",
         {"granularity": "hour", "cost_min": "0", "cost_max": "2.5"}),
    Case("z-month-team-b-cost", *ALL_Z, {"granularity": "month", "workspace_slug": "team-b", "cost_min": "0.5"}),
    Case("pst-118days-weeks-ai-org-model", "2025-12-03T00:00:00-08:00", "2026-03-31T00:00:00-08:00",
         {"ai_org_model": "azure-openai__gpt-4o,together__meta-llama__Llama-3-70b"}),
    Case("z-metadata-quotes", *ALL_Z, {"metadata": meta({"team": "O'Brien \"q\""})}),
    Case("z-metadata-unicode-number", *ALL_Z,
         {"workspace_slug": "team-a", "metadata": meta({"team": "日本語", "tier": 3})}),
    Case("ist-virtual-keys-configs", *IST_WEEK,
         {"virtual_keys": "vk-openai-prod,vk-azure", "configs": "cfg-fallback,cfg-loadbalance"}),
    Case("z-api-keys-prompts", *ALL_Z, {"api_key_ids": "key-2,key-3", "prompt_slug": "summarise,translate-ü"}),
    Case("z-trace-ids", *ALL_Z, {"trace_id": PICKED["trace_id"]}),
    Case("z-span-ids", *ALL_Z, {"span_id": PICKED["span_id"]}),
    Case("z-weighted-feedback", *ALL_Z, {"weighted_feedback_min": "-2.5", "weighted_feedback_max": "5"}),
    Case("ist-cache-status", *IST_WEEK, {"cache_status": "HIT,SEMANTIC HIT"}),
    Case("z-combination", *ALL_Z,
         {"workspace_slug": "team-a", "status_code": "200,201,500", "cache_status": "MISS,HIT",
          "ai_org_model": "openai__gpt-4o,anthropic__claude-3-5-sonnet,azure-openai__gpt-4o",
          "completion_token_min": "200", "metadata": meta({"beta": True})}),
    Case("ist-unaligned-days-team-b", "2026-03-03T13:45:10.250+05:30", "2026-03-07T09:10:00+05:30",
         {"workspace_slug": "team-b"}),
    Case("z-empty-window", "2025-06-01T00:00:00Z", "2025-06-08T00:00:00Z"),
    Case("ist-no-match", *IST_WEEK, {"virtual_keys": "vk-does-not-exist"}),
    Case("workspace-key-ignores-slug", *ALL_Z, {"workspace_slug": "team-b", "weighted_feedback_min": "-10"}, key="ws"),
    Case("mixed-offsets-env", "2026-03-07T00:00:00-08:00", "2026-03-10T12:00:00Z", {"metadata": meta({"env": "prod"})}),
]


@dataclass(frozen=True)
class Endpoint:
    route: str
    extra: dict = field(default_factory=dict)
    label: str = ""

    @property
    def id(self) -> str:
        return self.route + (f"[{self.label}]" if self.label else "")


ENDPOINTS = [Endpoint(r) for r in (
    "graphs/requests", "graphs/cost", "graphs/latency", "graphs/tokens", "graphs/users", "graphs/users/requests",
    "graphs/errors", "graphs/errors/rate", "graphs/errors/stacks", "graphs/errors/status-codes",
    "graphs/requests/rescued", "graphs/cache/hit-rate", "graphs/cache/latency", "graphs/feedbacks",
    "graphs/feedbacks/scores", "graphs/feedbacks/weighted", "graphs/feedbacks/ai-models", "summary/cache",
    "groups/users", "groups/ai-models", "groups/metadata/team", "groups/metadata/_user", "groups/metadata/tier", "groups/workspaces",
    "groups/ai_service", "groups/workspace",
)] + [
    Endpoint("groups/users", {"page_size": "5", "current_page": "1"}, "page-1-of-5"),
    Endpoint("groups/metadata/env", {"page_size": "1"}, "page-size-1"),
    Endpoint("groups/workspaces", {"columns": "requests,users,cache_hit_rate,requests_with_feedback",
                                   "include_total": "true"}, "users-total"),
    # Every column with its total (the feedback scan that makes the total row from the group rows).
    Endpoint("groups/model", {"columns": "requests,cost,avg_cost,p50_latency,p90_latency,p99_latency,"
                                         "avg_weighted_feedback,requests_with_feedback,tokens,prompt_tokens,"
                                         "completion_tokens,avg_tokens,avg_latency,errors,error_rate,cache_hits,"
                                         "cache_hit_rate,users,last_seen",
                              "include_total": "true"}, "money-latency-feedback"),
    Endpoint("groups/status_code", {"columns": "errors,error_rate,requests", "order_by": "status_code",
                                    "order_by_type": "asc"}, "by-key-asc"),
    Endpoint("groups/api_key", {"columns": "tokens,prompt_tokens,completion_tokens,avg_tokens",
                                "order_by": "avg_tokens", "order_by_type": "asc", "page_size": "2",
                                "current_page": "1", "include_total": "true"}, "tokens-page-1"),
    Endpoint("groups/config", {"columns": "cache_hits,cache_hit_rate,users", "order_by": "cache_hit_rate"},
             "cache-rate"),
    Endpoint("groups/provider", {"columns": "avg_latency,last_seen", "order_by": "last_seen", "include_total": "true"},
             "last-seen"),
    Endpoint("groups/prompt", {"columns": "cost,users,error_rate", "page_size": "3"}, "cost-first"),
    # feedback columns with measures that combine per trace and no total: the one-scan query
    Endpoint("groups/ai_service", {"columns": "requests,avg_weighted_feedback,requests_with_feedback,avg_latency,"
                                              "cache_hits,error_rate,last_seen", "order_by": "avg_weighted_feedback"},
             "feedback-one-scan"),
    # feedback columns with a percentile and no total: the two-query path
    Endpoint("groups/workspace", {"columns": "requests_with_feedback,p90_latency,users"}, "feedback-percentile"),
]

# --------------------------------------------------------------------------- fixtures


@dataclass
class Api:
    client: TestClient
    keys: dict[str, str]

    def get(self, route: str, params: dict, key: str = "org"):
        return self.client.get(f"/v1/analytics/{route}", params=params, headers={"x-portkey-api-key": self.keys[key]})


def _make_key(warehouse, org: str, workspace: str = "") -> str:
    """What conftest's `make_key(org)` does (that fixture is function-scoped; this data set is per module)."""
    key = new_key()
    api_keys.insert(warehouse, key_hash=hash_key(key), organisation_id=org, workspace_slug=workspace, scopes=list(SCOPES))
    return key


def _stored_feedback(warehouse, org: str) -> dict:
    rows = warehouse.query("SELECT id, value, weight FROM feedback FINAL WHERE organisation_id = {o:String}",
                           parameters={"o": org}).result_rows
    return {r[0]: (int(r[1]), float(r[2])) for r in rows}


@pytest.fixture(scope="module")
def api(base_settings, broker, warehouse):
    suffix = uuid.uuid4().hex[:8]
    settings = base_settings.model_copy(update=dict(
        topic_gateway_logs=f"an{suffix}.gateway-logs", topic_feedback=f"an{suffix}.feedback",
        topic_audit=f"an{suffix}.audit", topic_dead_letter=f"an{suffix}.dead-letter",
        ingest_consumer_group=f"an{suffix}",
    ))
    ensure_topics(broker.bootstrap, settings.all_topics, settings.topic_partitions)
    expected_feedback = {r["fid"]: (r["value"], r["weight"]) for r in REFERENCE.feedback.to_dicts()}
    producer = make_producer(broker.bootstrap)
    pool = IngestWorkers(settings, broker.bootstrap)
    pool.start()
    try:
        publish(producer, settings.topic_gateway_logs, DATA.logs)
        publish(producer, settings.topic_feedback, DATA.feedback)
        assert wait_until(lambda: count_generations(warehouse, ORG) == REFERENCE.gens.height, timeout=60)
        assert wait_until(lambda: count_generations(warehouse, DATA.noise_org) == 100, timeout=60)
        assert wait_until(lambda: _stored_feedback(warehouse, ORG) == expected_feedback, timeout=60)
        assert wait_ingested(settings, settings.topic_gateway_logs, settings.topic_feedback)
    finally:
        pool.stop()
        producer.close()
    keys = {"org": _make_key(warehouse, ORG), "ws": _make_key(warehouse, ORG, "team-a")}
    with TestClient(create_app(settings, settings.kafka_bootstrap, pool_size=2)) as client:
        yield Api(client, keys)


# --------------------------------------------------------------------------- spec schemas


def response_schema(route: str) -> dict | None:
    path = "/analytics/" + route
    if route.startswith("groups/metadata/"):
        path = "/analytics/groups/metadata/{metadataKey}"
    op = SPEC["paths"].get(path)
    if op is None:  # groups/workspaces and groups/{group_by} are Tollgate's own
        return None
    return resolve(op["get"]["responses"]["200"]["content"]["application/json"]["schema"])


def test_every_documented_graph_route_has_a_spec_schema():
    assert all(response_schema(e.route) is not None for e in ENDPOINTS
               if not e.route.startswith("groups/") or e.route in ("groups/users", "groups/ai-models")
               or e.route.startswith("groups/metadata/"))


# --------------------------------------------------------------------------- comparison


def non_integers(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Paths where the reference has an integer and the API sent something else (5.0, "5", true)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [p for k in expected if k in actual for p in non_integers(actual[k], expected[k], f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        return [p for i, (a, e) in enumerate(zip(actual, expected)) for p in non_integers(a, e, f"{path}[{i}]")]
    if isinstance(expected, int) and not isinstance(expected, bool):
        return [] if isinstance(actual, int) and not isinstance(actual, bool) else [f"{path}={actual!r}"]
    return []


def differences(actual: Any, expected: Any, path: str = "$", limit: int = 8) -> list[str]:
    """The first few places where two JSON values differ, for a readable failure message."""
    out: list[str] = []
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k in list(expected) + [k for k in actual if k not in expected]:
            if k not in actual or k not in expected:
                out.append(f"{path}.{k}: actual {actual.get(k, '<missing>')!r} expected {expected.get(k, '<missing>')!r}")
            else:
                out += differences(actual[k], expected[k], f"{path}.{k}", limit)
            if len(out) >= limit:
                break
    elif isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            out.append(f"{path}: {len(actual)} items, expected {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            out += differences(a, e, f"{path}[{i}]", limit)
            if len(out) >= limit:
                break
    elif actual != expected:
        out.append(f"{path}: actual {actual!r} expected {expected!r}")
    return out[:limit]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.id)
def test_matches_reference(api, endpoint, case):
    params = {**case.query(), **endpoint.extra}
    got = api.get(endpoint.route, params, key=case.key)
    assert got.status_code == 200, got.text
    body = got.json()
    schema = response_schema(endpoint.route)
    if schema is not None:
        STRICT(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER).validate(body)
    expected = REFERENCE.compute(endpoint.route, params, key_workspace="team-a" if case.key == "ws" else None)
    assert non_integers(body, expected) == []
    body = without_float_noise(body)
    assert body == expected, "\n".join(differences(body, expected))


@pytest.mark.parametrize("extra_pairs", [0, PAIRS_AS_OR], ids=["or-of-pairs", "tuple-in"])
@pytest.mark.parametrize("route", ["graphs/requests", "groups/model"])
def test_provider_model_pairs_are_exact(api, route, extra_pairs):
    """Up to PAIRS_AS_OR pairs the filter is an OR of equalities, over it one tuple IN: either
    way only the listed pairs match, not gpt-4o of openai, whose provider and model are each
    listed in another pair (the cases above never list such a cross pair)."""
    pairs = ["azure-openai__gpt-4o", "openai__gpt-4o-mini", "together__meta-llama__Llama-3-70b"]
    pairs += [f"nobody__model-{i}" for i in range(extra_pairs)]
    params = {"time_of_generation_min": ALL_Z[0], "time_of_generation_max": ALL_Z[1], "ai_org_model": ",".join(pairs)}
    got = api.get(route, params)
    assert got.status_code == 200, got.text
    expected = REFERENCE.compute(route, params, key_workspace=None)
    assert (expected["summary"]["total"] if route.startswith("graphs/") else expected["total"]) > 0  # some requests match
    assert without_float_noise(got.json()) == expected


DECIMALS = {"cost": 4, "avg_cost": 4, "error_rate": 2, "cache_hit_rate": 2, "avg_weighted_feedback": 2}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("ist-week-no-filter", "z-team-a")], ids=lambda c: c.name)
@pytest.mark.parametrize("endpoint", [  # the column groups (users/ai-models send strings, metadata integers)
    e for e in ENDPOINTS if e.route.startswith("groups/") and e.route not in ("groups/users", "groups/ai-models")
    and not e.route.startswith("groups/metadata/") and set(DECIMALS) & set(e.extra.get("columns", "cost").split(","))
], ids=lambda e: e.id)
def test_decimal_columns_are_exact_decimals(api, endpoint, case):
    """`cost`/`avg_cost` have 4 decimals, rates and feedback 2: the JSON number is that decimal
    (930.5146), not a float product next to it (930.5146000000001)."""
    body = api.get(endpoint.route, {**case.query(), **endpoint.extra}, key=case.key).json()
    rows = body["data"] + ([body["summary"]] if "summary" in body else [])
    assert any(isinstance(row.get(name), (int, float)) for row in rows for name in DECIMALS)
    noisy = [(name, row[name]) for row in rows for name, places in DECIMALS.items()
             if isinstance(row.get(name), float) and round(row[name], places) != row[name]]
    assert noisy == []


# --------------------------------------------------------------------------- the reference itself


def test_reference_buckets_keep_a_fixed_offset_across_dst():
    w = Window({"time_of_generation_min": "2026-03-05T00:00:00-08:00",
                "time_of_generation_max": "2026-03-12T00:00:00-08:00", "granularity": "day"})
    assert [w.label(b) for b in w.buckets] == [f"2026-03-{d:02d}T00:00:00.000-08:00" for d in range(5, 13)]
    week = Window({"time_of_generation_min": "2026-11-04T00:00:00+05:30",
                   "time_of_generation_max": "2027-03-01T00:00:00+05:30"})
    assert week.unit == "week" and week.label(week.buckets[0]) == "2026-11-02T00:00:00.000+05:30"
    utc = Window({"time_of_generation_min": "2026-03-06T04:30:00Z", "time_of_generation_max": "2026-03-06T06:30:00Z"})
    assert utc.unit == "minute" and len(utc.buckets) == 121 and utc.label(utc.buckets[-1]).endswith(":30:00.000+00:00")
    hours = Window({"time_of_generation_min": "2026-03-06T10:15:00+05:30",
                    "time_of_generation_max": "2026-03-08T10:15:00+05:30"})
    assert hours.unit == "hour" and hours.label(hours.buckets[0]) == "2026-03-06T10:00:00.000+05:30"


def test_reference_rounding_and_quantiles():
    assert [round_int(x) for x in (0.5, 1.5, 2.5, -0.5, -2.5, 2.49)] == [1, 2, 3, -1, -3, 2]
    assert str(round_dec(3.125, 2)) == "3.13" and str(round_dec(-3.125, 2)) == "-3.13"
    assert quantile([10, 20, 30, 40], Q50) == 30  # n = 4: p50 is the 3rd value
    assert quantile(list(range(100)), Q99) == 99 and quantile([], Q99) == 0


def test_data_set_covers_the_edge_cases():
    g, fb = REFERENCE.gens, REFERENCE.feedback
    assert 2_900 <= g.height <= 3_100
    assert g["cost"].null_count() > 100 and g["user"].null_count() > 100
    assert set(g["status"].unique().to_list()) == set(STATUSES)
    assert g.filter(g["trace"] == "").height > 100
    per_trace = g.filter(g["trace"] != "").group_by("trace").len()
    assert per_trace.filter(per_trace["len"] == 3).height > 10
    assert (fb["weight"] == 0).sum() > 0 and fb.height > 100
    assert len({ev["id"] for ev in DATA.feedback}) < len([ev for ev in DATA.feedback if ev["organisation_id"] == ORG])


# --------------------------------------------------------------------------- malformed requests


BAD = [
    ({"time_of_generation_min": "2026-03-02T00:00:00"}, "time_of_generation_min"),
    ({"time_of_generation_min": "yesterday"}, "time_of_generation_min"),
    ({"time_of_generation_min": "2026-03-10T00:00:00Z", "time_of_generation_max": "2026-03-02T00:00:00Z"},
     "time_of_generation"),
    ({"time_of_generation_min": "2025-01-01T00:00:00Z", "time_of_generation_max": "2026-03-02T00:00:00Z"},
     "time_of_generation"),
    ({"granularity": "minute"}, "granularity"),
    ({"granularity": "fortnight"}, "granularity"),
    ({"total_units_min": "10", "total_units_max": "5"}, "total_units"),
    ({"cost_min": "3", "cost_max": "1"}, "cost"),
    ({"weighted_feedback_min": "3", "weighted_feedback_max": "1"}, "weighted_feedback"),
    ({"metadata": "{not json"}, "metadata"),
    ({"metadata": "[1, 2]"}, "metadata"),
    ({"status_code": "200,abc"}, "status_code"),
    ({"ai_org_model": "openai-gpt-4o"}, "ai_org_model"),
]


@pytest.mark.parametrize("bad,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_malformed_parameter_is_422_naming_it(api, bad, name):
    params = {"time_of_generation_min": ALL_Z[0], "time_of_generation_max": ALL_Z[1], **bad}
    got = api.get("graphs/requests", params)
    assert got.status_code == 422, got.text
    assert name in json.dumps(got.json()["detail"])


@pytest.mark.parametrize("route,bad,name", [
    ("groups/nope", {}, "group_by"),
    ("groups/model", {"columns": "requests,nope"}, "columns"),
    ("groups/model", {"order_by": "nope"}, "order_by"),
])
def test_malformed_group_is_422_naming_it(api, route, bad, name):
    params = {"time_of_generation_min": ALL_Z[0], "time_of_generation_max": ALL_Z[1], **bad}
    got = api.get(route, params)
    assert got.status_code == 422, got.text
    assert name in json.dumps(got.json()["detail"])
