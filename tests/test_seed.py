"""`tollgate seed`'s synthetic traffic and the bundled pricing table (no broker needed)."""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from conftest import read_topic

import ingest
from ingest.events import decode_feedback, decode_gateway_log
from ingest.pricing import PricingTable, Rates
from ingest.producer import make_producer
from tollgate.broker import EmbeddedBroker
from tollgate.seed import generate, publish

END = datetime(2026, 11, 20, 12, tzinfo=UTC)
DAYS = 7
ORG = "org-test"
WORKSPACE = "ws-test"
N = 5000
PRICING_DIR = Path(ingest.__file__).parent / "pricing_data" / "pricing"
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def items() -> list[tuple[str, dict]]:
    return list(generate(N, DAYS, ORG, WORKSPACE, seed=7, end=END))


@pytest.fixture(scope="module")
def logs(items) -> list[dict]:
    return [ev for kind, ev in items if kind == "gateway_log"]


@pytest.fixture(scope="module")
def feedback(items) -> list[dict]:
    return [ev for kind, ev in items if kind == "feedback"]


def _ts(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _dump(items) -> bytes:
    return b"\n".join(kind.encode() + b" " + orjson.dumps(ev) for kind, ev in items)


# --------------------------------------------------------------------------- generator


def test_same_arguments_give_identical_bytes():
    a = _dump(generate(2000, 3, ORG, WORKSPACE, seed=42, end=END))
    b = _dump(generate(2000, 3, ORG, WORKSPACE, seed=42, end=END))
    c = _dump(generate(2000, 3, ORG, WORKSPACE, seed=43, end=END))
    assert a == b
    assert a != c


def test_naive_end_is_utc():
    naive = END.replace(tzinfo=None)
    assert _dump(generate(50, 1, ORG, WORKSPACE, end=naive)) == _dump(generate(50, 1, ORG, WORKSPACE, end=END))


def test_default_end_is_the_current_hour():
    before = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    logs = [ev for kind, ev in generate(200, 1, ORG, WORKSPACE) if kind == "gateway_log"]
    after = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    stamps = [_ts(ev["created_at"]) for ev in logs]
    assert before - timedelta(days=1) <= min(stamps) and max(stamps) < after


@pytest.mark.parametrize("events", [0, 1, 7, 1234])
def test_exactly_n_gateway_logs(events):
    kinds = [kind for kind, _ in generate(events, 2, ORG, WORKSPACE, end=END)]
    assert kinds.count("gateway_log") == events
    assert set(kinds) <= {"gateway_log", "feedback"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate(-1, 1, ORG, WORKSPACE)
    with pytest.raises(ValueError):
        generate(10, 0, ORG, WORKSPACE)


def test_every_event_passes_the_ingest_validator(logs, feedback):
    for ev in logs:
        row = decode_gateway_log(orjson.dumps(ev))
        assert row[0] == ev["_id"] == ev["metrics"]["id"]
        assert row[1] == ORG and row[2] == WORKSPACE
    for ev in feedback:
        row = decode_feedback(orjson.dumps(ev))
        assert row[1] == ORG and row[2] == WORKSPACE


def test_ids_are_unique(logs, feedback):
    assert len({ev["_id"] for ev in logs}) == len(logs)
    assert len({ev["id"] for ev in feedback}) == len(feedback)


def test_timestamps_inside_the_window(logs, feedback):
    start = END - timedelta(days=DAYS)
    for ev in logs:
        assert ISO_MS_Z.match(ev["created_at"]) and ev["metrics"]["created_at"] == ev["created_at"]
        assert start <= _ts(ev["created_at"]) < END
    for ev in feedback:
        assert ISO_MS_Z.match(ev["created_at"])
        assert start <= _ts(ev["created_at"]) < END
    # spread over the whole window, not bunched up
    days_seen = {_ts(ev["created_at"]).date() for ev in logs}
    assert len(days_seen) >= DAYS


def test_errors(logs):
    statuses = [ev["metrics"]["response_status_code"] for ev in logs]
    share_4xx = sum(400 <= s < 500 for s in statuses) / len(logs)
    share_5xx = sum(s >= 500 for s in statuses) / len(logs)
    assert 0.01 < share_4xx < 0.06
    assert 0.005 < share_5xx < 0.05
    assert {429, 400, 500, 503} <= set(statuses)
    for ev in logs:
        m = ev["metrics"]
        assert m["is_success"] == (m["response_status_code"] < 400)
        if not m["is_success"]:
            assert m["res_units"] == 0 and m["cost"] == 0
            assert ev["response"]["status"] == m["response_status_code"]
            assert "error" in ev["response"]["body"]


def test_cache(logs):
    by_status = defaultdict(list)
    for ev in logs:
        by_status[ev["metrics"]["cache_status"]].append(ev["metrics"])
    assert set(by_status) == {"MISS", "HIT", "SEMANTIC HIT", "DISABLED"}
    for hit in by_status["HIT"] + by_status["SEMANTIC HIT"]:
        assert hit["cost"] == 0 and hit["is_success"]
        assert hit["response_time"] < 200 and hit["upstream_response_time"] == 0
    assert all(m["cache_type"] == "semantic" for m in by_status["SEMANTIC HIT"])


def test_routing_and_retries(logs):
    metrics = [ev["metrics"] for ev in logs]
    assert {m["mode"] for m in metrics} == {"single", "fallback", "loadbalance"}
    assert any(m["mode"] == "fallback" and m["last_used_option_index"] > 0 for m in metrics)
    assert any(m["mode"] == "loadbalance" and m["last_used_option_index"] > 0 for m in metrics)
    assert {m["retry_success_count"] for m in metrics} == {0, 1, 2, 3}
    for ev in logs:
        m = ev["metrics"]
        path = f"config.targets[{m['last_used_option_index']}]" if "config" in m else ""
        assert ev["response"]["lastUsedOptionJsonPath"] == path
        assert m["mode"] == "single" or "config" in m


def test_providers_and_models(logs):
    providers = {ev["metrics"]["ai_org"] for ev in logs}
    assert {"openai", "anthropic", "google", "mistral-ai", "groq"} <= providers
    assert len({ev["metrics"]["ai_model"] for ev in logs}) >= 10
    for ev in logs:
        assert ev["request"]["body"]["model"] == ev["metrics"]["ai_model"]
        assert ev["request"]["body"]["messages"][-1]["role"] == "user"


def test_metadata_and_optional_fields(logs):
    users = defaultdict(int)
    for ev in logs:
        meta = dict(zip(ev["metrics"]["metadata.key"], ev["metrics"]["metadata.value"]))
        assert set(meta) == {"_user", "env", "team"} and meta["env"] in {"prod", "staging", "dev"}
        assert orjson.loads(ev["request"]["portkeyHeaders"]["x-portkey-metadata"]) == meta
        users[meta["_user"]] += 1
    assert 100 <= len(users) <= 400
    # Zipf-like: the busiest user sends far more than the median one
    counts = sorted(users.values())
    assert counts[-1] > 10 * counts[len(counts) // 2]
    for field in ("api_key_id", "virtual_key", "config", "prompt_slug"):
        share = sum(field in ev["metrics"] for ev in logs) / len(logs)
        assert 0.05 < share <= 1, field


def test_traces_and_spans(logs):
    traces = defaultdict(list)
    for ev in logs:
        traces[ev["metrics"]["trace_id"]].append(ev["metrics"])
    sizes = [len(spans) for spans in traces.values()]
    assert max(sizes) >= 4 and sizes.count(1) < len(sizes)
    for spans in traces.values():
        root, children = spans[0], spans[1:]
        assert "parent_span_id" not in root
        assert all(child["parent_span_id"] == root["span_id"] for child in children)
        assert len({s["span_id"] for s in spans}) == len(spans)
        assert len({dict(zip(s["metadata.key"], s["metadata.value"]))["_user"] for s in spans}) == 1


def test_feedback(logs, feedback):
    trace_end = {}
    for ev in logs:
        trace_end[ev["metrics"]["trace_id"]] = _ts(ev["created_at"])  # logs of a trace come in time order
    assert 0.01 < len(feedback) / len(trace_end) < 0.15
    users = {ev["metrics"]["trace_id"]: ev["metrics"]["metadata.value"][0] for ev in logs}
    for fb in feedback:
        assert fb["trace_id"] in trace_end
        assert _ts(fb["created_at"]) >= trace_end[fb["trace_id"]]
        assert -10 <= fb["value"] <= 10 and 0 <= fb["weight"] <= 1
        assert fb["metadata"] == {"_user": users[fb["trace_id"]]}


@functools.cache
def _raw_rates(provider: str, model: str) -> dict[str, float]:
    payg = json.loads((PRICING_DIR / f"{provider}.json").read_text())[model]["pricing_config"]["pay_as_you_go"]
    return {k: payg.get(k, {}).get("price", 0) for k in
            ("request_token", "response_token", "cache_read_input_token", "cache_write_input_token")}


def _cost_from_usage(provider: str, model: str, body: dict) -> float:
    """Recompute cost (cents) from the provider-shaped usage block and the raw pricing JSON."""
    r = _raw_rates(provider, model)
    if provider == "anthropic":
        u = body["usage"]
        return (u["input_tokens"] * r["request_token"]
                + u["cache_read_input_tokens"] * r["cache_read_input_token"]
                + u["cache_creation_input_tokens"] * r["cache_write_input_token"]
                + u["output_tokens"] * r["response_token"])
    if provider == "google":
        u = body["usageMetadata"]
        return u["promptTokenCount"] * r["request_token"] + u["candidatesTokenCount"] * r["response_token"]
    u = body["usage"]
    cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    # no model in the table has a thinking_token price: reasoning tokens (part of
    # completion_tokens) are priced as response tokens
    return ((u["prompt_tokens"] - cached) * r["request_token"]
            + cached * r["cache_read_input_token"]
            + u["completion_tokens"] * r["response_token"])


def test_cost_matches_the_raw_pricing_files(logs):
    billed = [ev for ev in logs if ev["metrics"]["is_success"]
              and ev["metrics"]["cache_status"] in ("MISS", "DISABLED")]
    assert len(billed) > 1000
    kinds = set()
    for ev in billed:
        m = ev["metrics"]
        expected = _cost_from_usage(m["ai_org"], m["ai_model"], ev["response"]["body"])
        assert m["cost"] == pytest.approx(expected, rel=1e-9), m["ai_model"]
        assert m["cost"] > 0
        usage = ev["response"]["body"].get("usage", {})
        if usage.get("completion_tokens_details", {}).get("reasoning_tokens"):
            kinds.add("reasoning")
        if usage.get("prompt_tokens_details", {}).get("cached_tokens") or usage.get("cache_read_input_tokens"):
            kinds.add("cache_read")
        if usage.get("cache_creation_input_tokens"):
            kinds.add("cache_write")
    assert kinds == {"reasoning", "cache_read", "cache_write"}


def test_units_agree_with_usage(logs):
    for ev in logs:
        m = ev["metrics"]
        assert m["total_units"] == m["req_units"] + m["res_units"]
        if m["ai_org"] == "openai" and m["is_success"]:
            u = ev["response"]["body"]["usage"]
            assert (m["req_units"], m["res_units"]) == (u["prompt_tokens"], u["completion_tokens"])


def test_event_size_is_realistic():
    size = sum(len(orjson.dumps(ev)) for kind, ev in generate(2_000, 7, ORG, WORKSPACE, end=END) if kind == "gateway_log")
    assert 1000 < size / 2_000 < 4000


# --------------------------------------------------------------------------- publish


def test_publish_sends_every_event_keyed_by_id(settings, producer, broker):
    counts = publish(producer, settings, 600, 2, ORG, WORKSPACE, seed=3, end=END, progress=False)
    expected = list(generate(600, 2, ORG, WORKSPACE, seed=3, end=END))
    assert counts == {"gateway_logs": 600, "feedback": len(expected) - 600,
                      "last_log_id": [ev["_id"] for k, ev in expected if k == "gateway_log"][-1]}
    assert counts["feedback"] > 0
    for kind, topic in (("gateway_log", settings.topic_gateway_logs), ("feedback", settings.topic_feedback)):
        want = {(ev["_id"] if kind == "gateway_log" else ev["id"]).encode(): orjson.dumps(ev) for k, ev in expected if k == kind}
        got = {r.key: r.value for r in read_topic(broker.bootstrap, topic, len(want))}
        assert got == want


def test_publish_raises_a_delivery_error(settings):
    dead = EmbeddedBroker().start()
    producer = make_producer(dead.bootstrap, max_block_ms=2_000, request_timeout_ms=2_000, retries=0)
    dead.stop()
    with pytest.raises(Exception):
        publish(producer, settings, 10, 1, ORG, WORKSPACE, end=END, progress=False)
    producer.close(timeout=1)


# --------------------------------------------------------------------------- pricing


def test_pricing_unknown_model_is_none():
    table = PricingTable.load()
    assert table.rates("openai", "no-such-model") is None
    assert table.cost_cents("openai", "no-such-model", 100, 100) is None
    assert table.rates("no-such-provider", "gpt-4o") is None
    assert table.rates("openai", "default") is None  # the provider default is not a model


def test_pricing_is_loaded_once():
    assert PricingTable.load() is PricingTable.load()


def test_cost_cents_with_cache_reads():
    # openai gpt-4o: request 0.00025, response 0.001, cache read 0.000125 cents/token
    assert PricingTable.load().rates("openai", "gpt-4o") == Rates(0.00025, 0.001, 0.000125, 0.0)
    cost = PricingTable.load().cost_cents("openai", "gpt-4o", 1000, 200, cache_read_tokens=400)
    assert cost == pytest.approx(1000 * 0.00025 + 200 * 0.001 + 400 * 0.000125)  # 0.5 cents


def test_cost_cents_with_cache_writes():
    # anthropic claude-3-5-sonnet-20241022: 0.0003 / 0.0015, cache read 0.00003, cache write 0.000375
    cost = PricingTable.load().cost_cents(
        "anthropic", "claude-3-5-sonnet-20241022", 100, 10, cache_read_tokens=1000, cache_write_tokens=2000
    )
    assert cost == pytest.approx(0.03 + 0.015 + 0.03 + 0.75)


def test_no_bundled_model_has_a_thinking_price():
    """Documents why the next test exercises the fallback: this pricing snapshot has no thinking_token prices."""
    for file in PRICING_DIR.glob("*.json"):
        for entry in json.loads(file.read_text()).values():
            payg = ((entry or {}).get("pricing_config") or {}).get("pay_as_you_go") or {}
            assert "thinking_token" not in (payg.get("additional_units") or {}), file.name


def test_cost_cents_reasoning_tokens_priced_as_response_tokens():
    # openai o3-mini: request 0.00011, response 0.00044, no thinking_token price
    assert PricingTable.load().rates("openai", "o3-mini").thinking is None
    cost = PricingTable.load().cost_cents("openai", "o3-mini", 100, 50, reasoning_tokens=300)
    assert cost == pytest.approx(100 * 0.00011 + (50 + 300) * 0.00044)  # 0.165 cents


def test_cost_cents_uses_a_thinking_price_when_there_is_one():
    table = PricingTable({("p", "m"): Rates(request=0.001, response=0.002, thinking=0.0005)})
    assert table.cost_cents("p", "m", 10, 10, reasoning_tokens=100) == pytest.approx(0.01 + 0.02 + 0.05)


def test_missing_cache_prices_cost_the_input_price():
    # mistral-small-latest lists only request and response prices: a cached token is never free by omission
    rates = PricingTable.load().rates("mistral-ai", "mistral-small-latest")
    assert rates == Rates(request=0.00001, response=0.00003)
    cost = PricingTable.load().cost_cents("mistral-ai", "mistral-small-latest", 100, 100, cache_read_tokens=500)
    assert cost == pytest.approx((100 + 500) * 0.00001 + 100 * 0.00003)
