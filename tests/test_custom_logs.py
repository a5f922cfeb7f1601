"""POST /v1/logs: custom logs normalized, priced, produced to Kafka and read back.

Expected costs are recomputed here from the raw pricing JSON files with each
provider's own token arithmetic, never through ingest.pricing.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from analytics_api.app import create_app
from analytics_api.publish import Publisher
from ingest import normalize
from ingest.pricing import PricingTable
from conftest import count_generations, read_topic, serve, wait_until
from tollgate.broker import free_port

PRICING_DIR = Path(__file__).resolve().parent.parent / "ingest" / "pricing_data" / "pricing"


@cache
def price(provider: str, model_key: str, component: str) -> float:
    """A price (cents/token) straight from the JSON file; KeyError when the entry lacks it."""
    payg = json.loads((PRICING_DIR / f"{provider}.json").read_text())[model_key]["pricing_config"]["pay_as_you_go"]
    if component == "cache_write_1h":
        return payg["additional_units"]["cache_write_1h"]["price"]
    return payg[component]["price"]


# --------------------------------------------------------------------------- the three provider fixtures

OPENAI = {
    "request": {
        "url": "https://api.openai.com/v1/chat/completions",
        "method": "POST",
        "headers": {"content-type": "application/json", "Authorization": "Bearer sk-proj-secret"},
        "body": {"model": "o3-mini", "messages": [{"role": "user", "content": "Plan a 3-day trip to Kyoto."}]},
    },
    "response": {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {
            "id": "chatcmpl-1", "object": "chat.completion", "model": "o3-mini-2025-01-31",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Day 1: ..."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2500, "completion_tokens": 900, "total_tokens": 3400,
                      "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 640, "audio_tokens": 0}},
        },
        "response_time": 4321,
    },
    "metadata": {"trace_id": "trace-cl-1", "span_id": "span-1", "span_name": "plan", "_user": "alice", "env": "prod"},
}
# (prompt − cached) uncached + cached at the cache-read price; (completion − reasoning) + reasoning at the
# output price (no reasoning_token price for o3-mini)
OPENAI_COST = ((2500 - 1920) * price("openai", "o3-mini", "request_token")
               + 1920 * price("openai", "o3-mini", "cache_read_input_token")
               + (900 - 640) * price("openai", "o3-mini", "response_token")
               + 640 * price("openai", "o3-mini", "response_token"))

ANTHROPIC = {
    "request": {
        "url": "https://api.anthropic.com/v1/messages",
        "method": "POST",
        "headers": {"x-api-key": "sk-ant-secret", "anthropic-version": "2023-06-01"},
        "body": {"model": "claude-sonnet-4-20250514", "max_tokens": 1024,
                 "system": [{"type": "text", "text": "A long cached system prompt", "cache_control": {"type": "ephemeral"}}],
                 "messages": [{"role": "user", "content": "Summarize the contract."}]},
    },
    "response": {
        "status": 200,
        "body": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": "The contract ..."}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 35, "output_tokens": 410, "cache_read_input_tokens": 12000,
                      "cache_creation_input_tokens": 3000,
                      "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1000}},
        },
        "response_time": 2870,
    },
    "metadata": {"trace_id": "trace-cl-1", "span_id": "span-2", "span_name": "summarize", "_user": "alice"},
}
# input_tokens excludes the cache reads and writes; 1-hour writes have their own price
ANTHROPIC_COST = (35 * price("anthropic", "claude-sonnet-4-20250514", "request_token")
                  + 12000 * price("anthropic", "claude-sonnet-4-20250514", "cache_read_input_token")
                  + 2000 * price("anthropic", "claude-sonnet-4-20250514", "cache_write_input_token")
                  + 1000 * price("anthropic", "claude-sonnet-4-20250514", "cache_write_1h")
                  + 410 * price("anthropic", "claude-sonnet-4-20250514", "response_token"))

GEMINI = {
    "request": {
        "url": "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSecret",
        "method": "POST",
        "body": {"contents": [{"role": "user", "parts": [{"text": "Why is the sky blue?"}]}]},
    },
    "response": {
        "status": 200,
        "body": {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Rayleigh scattering ..."}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5000, "cachedContentTokenCount": 4096, "candidatesTokenCount": 200,
                              "thoughtsTokenCount": 800, "totalTokenCount": 6000},
            "modelVersion": "gemini-2.5-flash",
        },
        "response_time": 1500,
    },
    "metadata": {"trace_id": "trace-cl-2", "_user": "bob", "attempt": 2, "beta": True},
}
# Google prices gemini-2.5-flash by prompt length (≤ 128k here); promptTokenCount includes the cached
# tokens, candidatesTokenCount excludes the thoughts, which cost as output
_G = ("google", "gemini-2.5-flash-lte-128k")
GEMINI_COST = ((5000 - 4096) * price(*_G, "request_token") + 4096 * price(*_G, "cache_read_input_token")
               + (200 + 800) * price(*_G, "response_token"))

EXPECTED = {  # ai_org, ai_model, req_units, res_units, cost
    "openai": ("openai", "o3-mini", 2500, 900, OPENAI_COST),
    "anthropic": ("anthropic", "claude-sonnet-4-20250514", 35 + 12000 + 3000, 410, ANTHROPIC_COST),
    "gemini": ("google", "gemini-2.5-flash", 5000, 1000, GEMINI_COST),
}


def post(client, key, body, **kw):
    return client.post("/v1/logs", json=body, headers={"x-portkey-api-key": key}, **kw)


def get_log(client, key, log_id):
    r = client.get(f"/v1/logs/{log_id}", headers={"x-portkey-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()


def test_provider_logs_come_back_with_model_tokens_and_cost(settings, workers, api, warehouse, org, make_key):
    key = make_key(org, scopes=["logs.write", "logs.read", "analytics.read"])
    before = datetime.now(UTC)
    r = post(api, key, [OPENAI, ANTHROPIC, GEMINI])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "success" and len(answer["log_ids"]) == 3
    ids = dict(zip(EXPECTED, answer["log_ids"]))
    assert wait_until(lambda: count_generations(warehouse, org) == 3)

    for name, sent in (("openai", OPENAI), ("anthropic", ANTHROPIC), ("gemini", GEMINI)):
        ai_org, ai_model, req_units, res_units, cost = EXPECTED[name]
        log = get_log(api, key, ids[name])
        m = log["metrics"]
        assert (m["ai_org"], m["ai_model"]) == (ai_org, ai_model), name
        assert (m["req_units"], m["res_units"], m["total_units"]) == (req_units, res_units, req_units + res_units), name
        assert m["cost"] == pytest.approx(cost, rel=1e-12), name
        assert m["pricing_status"] == "priced"
        assert m["response_time"] == log["response"]["responseTime"] == sent["response"]["response_time"]
        assert m["workspace_slug"] == settings.default_workspace and m["is_success"] is True
        assert before - timedelta(seconds=1) <= datetime.fromisoformat(log["created_at"]) <= datetime.now(UTC)
        assert log["request"]["body"] == sent["request"]["body"]
        assert log["response"]["body"] == sent["response"]["body"]
        meta = dict(zip(m["metadata.key"], m["metadata.value"]))
        trace_fields = {"trace_id", "span_id", "span_name"}
        assert {f: m[f] for f in trace_fields & sent["metadata"].keys()} == {
            f: v for f, v in sent["metadata"].items() if f in trace_fields}
        assert meta == {k: v if isinstance(v, str) else json.dumps(v) for k, v in sent["metadata"].items()
                        if k not in trace_fields}

    openai_log = get_log(api, key, ids["openai"])
    assert openai_log["request"]["headers"]["Authorization"] == "********"  # provider keys are never stored
    assert get_log(api, key, ids["anthropic"])["request"]["headers"] == {"x-api-key": "********",
                                                                          "anthropic-version": "2023-06-01"}
    assert "AIzaSecret" not in get_log(api, key, ids["gemini"])["request"]["url"]
    assert get_log(api, key, ids["gemini"])["metrics"]["metadata.value"] == ["bob", "2", "true"]

    window = {"time_of_generation_min": (before - timedelta(hours=1)).isoformat(),
              "time_of_generation_max": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    headers = {"x-portkey-api-key": key}
    graph = api.get("/v1/analytics/graphs/cost", params=window, headers=headers)
    assert graph.status_code == 200, graph.text
    total = OPENAI_COST + ANTHROPIC_COST + GEMINI_COST
    assert graph.json()["summary"]["total"] == math.floor(total + 0.5)  # the spec types it as an integer (cents)
    models = api.get("/v1/analytics/groups/ai-models", params=window, headers=headers)
    assert models.status_code == 200, models.text
    got = {row["ai_model"]: (row["requests"], row["cost"]) for row in models.json()["data"]}
    assert got == {model: ("1", f"{cost:.4f}") for _, model, _, _, cost in EXPECTED.values()}
    tokens = api.get("/v1/analytics/graphs/tokens", params=window, headers=headers).json()
    assert tokens["summary"]["total"] == sum(e[2] + e[3] for e in EXPECTED.values())


def test_unknown_model_has_no_cost_and_a_flag(settings, workers, api, warehouse, org, make_key):
    key = make_key(org, scopes=["logs.write", "logs.read"])
    unknown_model = {**OPENAI, "request": {**OPENAI["request"], "body": {"model": "gpt-9-imaginary", "messages": []}}}
    unknown_provider = {  # a self-hosted OpenAI-compatible server: kept, tokens counted, no price
        "request": {"url": "https://llm.internal.example/v1/chat/completions", "body": {"model": "llama-local"}},
        "response": {"body": {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}},
    }
    given_provider = {**unknown_provider, "request": {**unknown_provider["request"], "provider": "My-vLLM"}}
    no_usage = {"request": {"url": "https://api.openai.com/v1/chat/completions", "body": {"model": "gpt-4o"}},
                "response": {"status": 200, "body": {"id": "chatcmpl-stream"}}}
    failed = {"request": {"url": "https://api.openai.com/v1/chat/completions", "body": {"model": "gpt-4o"}},
              "response": {"status": 429, "body": {"error": {"message": "Rate limit"}}}}
    r = post(api, key, [unknown_model, unknown_provider, given_provider, no_usage, failed])
    assert r.status_code == 200, r.text
    ids = r.json()["log_ids"]
    assert wait_until(lambda: count_generations(warehouse, org) == 5)
    got = [get_log(api, key, i)["metrics"] for i in ids]
    assert [(m["ai_org"], m["ai_model"], m["cost"], m["pricing_status"]) for m in got] == [
        ("openai", "gpt-9-imaginary", None, "unknown_model"),
        ("unknown", "llama-local", None, "unknown_model"),
        ("my-vllm", "llama-local", None, "unknown_model"),
        ("openai", "gpt-4o", None, "no_usage"),
        ("openai", "gpt-4o", 0.0, "priced"),  # providers do not bill errors
    ]
    assert [(m["req_units"], m["res_units"]) for m in got] == [(2500, 900), (10, 5), (10, 5), (0, 0), (0, 0)]
    assert got[4]["is_success"] is False and got[4]["response_status_code"] == 429
    stored = warehouse.query("SELECT id, cost IS NULL FROM generations FINAL WHERE organisation_id = {o:String}",
                             parameters={"o": org}).result_rows
    assert dict(stored) == {ids[0]: 1, ids[1]: 1, ids[2]: 1, ids[3]: 1, ids[4]: 0}


def test_one_request_is_one_kafka_key_and_partition(settings, broker, api, org, make_key):
    key = make_key(org, scopes=["logs.write"])
    r = post(api, key, [GEMINI] * 5)
    assert r.status_code == 200, r.text
    records = read_topic(broker.bootstrap, settings.topic_gateway_logs, 5)
    assert [json.loads(rec.value)["_id"] for rec in sorted(records, key=lambda rec: rec.offset)] == r.json()["log_ids"]
    assert {rec.key for rec in records} == {r.json()["log_ids"][0].encode()}
    assert len({rec.partition for rec in records}) == 1


def test_portkey_sdk_logs_create(settings, workers, warehouse, org, make_key):
    from portkey_ai import Portkey

    with serve(create_app(settings, settings.kafka_bootstrap, pool_size=1)) as url:
        client = Portkey(api_key=make_key(org, scopes=["logs.write"]), base_url=url)
        raw = client.logs.create(request=OPENAI["request"], response=OPENAI["response"], metadata=OPENAI["metadata"])
        answer = raw.json()  # the SDK hands back the HTTP response of this call
        assert answer["status"] == "success" and len(answer["log_ids"]) == 1
    assert wait_until(lambda: count_generations(warehouse, org) == 1)


# --------------------------------------------------------------------------- refusals


def test_401_and_403(api, org, make_key):
    assert api.post("/v1/logs", json=OPENAI).status_code == 401
    assert post(api, "tg-" + "0" * 48, OPENAI).status_code == 401
    r = post(api, make_key(org, scopes=["logs.read", "feedback.write"]), OPENAI)
    assert r.status_code == 403 and "logs.write" in r.json()["detail"]


def test_cached_keys_skip_the_worker_thread_not_the_checks(settings, warehouse, org, make_key):
    app = create_app(settings.model_copy(update={"auth_cache_seconds": 60.0}), settings.kafka_bootstrap, pool_size=1)
    writer, reader = make_key(org, scopes=["logs.write"]), make_key(org, scopes=["logs.read"])
    with TestClient(app) as client:
        for _ in range(2):  # the second round is served from the key cache
            assert post(client, writer, GEMINI).status_code == 200
            assert post(client, reader, GEMINI).status_code == 403
            assert post(client, "tg-" + "1" * 48, GEMINI).status_code == 401
    assert app.state.keys.peek(writer).organisation_id == org
    assert app.state.keys.peek(reader).scopes == {"logs.read"}
    assert app.state.keys.peek("tg-" + "1" * 48) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"request": {"url": ', "malformed JSON"),
        (b"[1, 2]", "$[0]"),
        (b'"a string"', "$"),
        (b"[]", "empty"),
        (b'{"response": {"body": {}}}', "`request`"),
        (b'{"request": {"body": {}}, "response": {"body": {}}}', "`url` - at `$.request`"),
        (b'{"request": {"url": "https://api.openai.com/v1/chat/completions"}, "response": {"body": {}}}', "`body` - at `$.request`"),
        (b'{"request": {"url": 5, "body": {}}, "response": {"body": {}}}', "$.request.url"),
        (b'{"request": {"url": "http://[::1/v1", "body": {}}, "response": {"body": {}}}', "$.request.url"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": {}, "status": "200"}}', "$.response.status"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": {}, "status": 999}}', "$.response.status"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": {}, "response_time": -1}}', "$.response.response_time"),
        (b'{"request": {"url": "u", "body": {}, "headers": {"a": 1}}, "response": {"body": {}}}', "$.request.headers"),
        (b'{"request": {"url": "u", "body": [1]}, "response": {"body": {}}}', "$.request.body"),
        (b'{"request": {"url": "u", "body": "plain text"}, "response": {"body": {}}}', "$.request.body"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": 3}}', "$.response.body"),
        (b'{"request": {"url": "u", "body": {"x": ' + b"[" * 3000 + b"]" * 3000 + b'}}, "response": {"body": {}}}', "nested too deeply"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": {}}, "metadata": []}', "$.metadata"),
        (b'[{"request": {"url": "u", "body": {}}, "response": {"body": {}}}, {"request": {"url": "u", "body": {}}, "response": {"body": {}}, "metadata": {"": "x"}}]', "$[1].metadata"),
        (b'{"request": {"url": "u", "body": {}}, "response": {"body": {}}, "metadata": {"trace_id": "' + b"x" * 1025 + b'"}}', "$.metadata.trace_id"),
    ],
)
def test_422_names_the_field(api, org, make_key, body, field):
    r = api.post("/v1/logs", content=body, headers={"x-portkey-api-key": make_key(org), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]


def test_a_bad_item_rejects_the_whole_request(settings, broker, api, org, make_key):
    key = make_key(org, scopes=["logs.write"])
    bad = {**GEMINI, "response": {**GEMINI["response"], "status": "ok"}}
    r = post(api, key, [OPENAI, ANTHROPIC, bad])
    assert r.status_code == 422 and "$[2].response.status" in r.json()["detail"]
    ok = post(api, key, GEMINI)
    assert ok.status_code == 200
    records = read_topic(broker.bootstrap, settings.topic_gateway_logs, 2, timeout=5)
    assert [json.loads(rec.value)["_id"] for rec in records] == ok.json()["log_ids"]


@pytest.fixture
def small_api(settings, warehouse):
    app = create_app(settings.model_copy(update={"logs_max_items": 3, "logs_max_body_bytes": 20_000,
                                                 "ingest_max_event_bytes": 8_000}),
                     settings.kafka_bootstrap, pool_size=1)
    with TestClient(app) as client:
        yield client


def test_413_too_many_items_or_bytes(small_api, org, make_key):
    key = make_key(org, scopes=["logs.write"])
    assert post(small_api, key, [GEMINI] * 3).status_code == 200
    r = post(small_api, key, [GEMINI] * 4)
    assert r.status_code == 413 and "TOLLGATE_LOGS_MAX_ITEMS" in r.json()["detail"]
    big = {**GEMINI, "metadata": {"note": "x" * 25_000}}
    r = post(small_api, key, big)
    assert r.status_code == 413 and "TOLLGATE_LOGS_MAX_BODY_BYTES" in r.json()["detail"]
    chunks = [json.dumps(big).encode()[i:i + 4096] for i in range(0, 26_000, 4096)]
    r = small_api.post("/v1/logs", content=iter(chunks), headers={"x-portkey-api-key": key})  # chunked, no length
    assert r.status_code == 413 and "TOLLGATE_LOGS_MAX_BODY_BYTES" in r.json()["detail"]
    one_big_event = {**GEMINI, "metadata": {"note": "x" * 9_000}}  # under the body limit, over the event limit
    r = post(small_api, key, one_big_event)
    assert r.status_code == 413 and "TOLLGATE_INGEST_MAX_EVENT_BYTES" in r.json()["detail"]


def test_kafka_unreachable_is_503_and_nothing_is_stored(settings, workers, api, warehouse, org, make_key):
    key = make_key(org, scopes=["logs.write"])
    app = create_app(settings, f"127.0.0.1:{free_port()}", pool_size=1)
    app.state.publisher = Publisher(app.state.bootstrap, timeout=2.0)
    with TestClient(app) as down:
        r = post(down, key, [OPENAI, ANTHROPIC, GEMINI])
        assert r.status_code == 503, r.text
        assert "Kafka" in r.json()["detail"]
    sentinel = post(api, key, GEMINI)  # the same org through a working API: only this one is stored
    assert sentinel.status_code == 200
    assert wait_until(lambda: count_generations(warehouse, org) == 1)
    ids = warehouse.query("SELECT id FROM generations FINAL WHERE organisation_id = {o:String}", parameters={"o": org})
    assert [row[0] for row in ids.result_rows] == sentinel.json()["log_ids"]


# --------------------------------------------------------------------------- normalization, unit by unit


@pytest.mark.parametrize(
    ("url", "headers", "request_body", "response_body", "provider", "model"),
    [
        ("https://api.openai.com/v1/chat/completions", {}, {"model": "gpt-4o"}, {"model": "gpt-4o-2024-08-06"},
         "openai", "gpt-4o"),
        ("https://api.openai.com/v1/responses", {}, {"model": "o4-mini"}, {}, "openai", "o4-mini"),
        ("https://acme.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", {},
         {"messages": []}, {"model": "gpt-4o-2024-08-06"}, "azure-openai", "gpt-4o-2024-08-06"),
        ("https://acme.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", {},
         {"messages": []}, {}, "azure-openai", "prod-4o"),
        ("https://acme.cognitiveservices.azure.com/openai/deployments/mini/chat/completions", {}, {}, {"model": "gpt-4o-mini"},
         "azure-openai", "gpt-4o-mini"),
        ("https://api.anthropic.com/v1/messages", {}, {"model": "claude-3-5-haiku-20241022"}, {}, "anthropic",
         "claude-3-5-haiku-20241022"),
        ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash-001:generateContent", {}, {},
         {"modelVersion": "gemini-2.0-flash-001"}, "google", "gemini-2.0-flash-001"),
        ("https://generativelanguage.googleapis.com/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse", {}, {}, {},
         "google", "gemini-2.5-pro"),
        ("https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/publishers/google/models/"
         "gemini-2.5-flash:generateContent", {}, {}, {}, "vertex-ai", "gemini-2.5-flash"),
        ("https://us-east5-aiplatform.googleapis.com/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
         "claude-3-5-sonnet-v2@20241022:rawPredict", {}, {"anthropic_version": "vertex-2023-10-16"}, {},
         "vertex-ai", "claude-3-5-sonnet-v2@20241022"),
        ("https://aiplatform.googleapis.com/v1/projects/p/locations/global/endpoints/openapi/chat/completions", {},
         {"model": "google/gemini-2.0-flash-001"}, {}, "vertex-ai", "google/gemini-2.0-flash-001"),
        ("https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse",
         {}, {}, {}, "bedrock", "anthropic.claude-3-5-sonnet-20241022-v2:0"),
        ("https://bedrock-runtime.eu-west-1.amazonaws.com/model/arn%3Aaws%3Abedrock%3Aeu-west-1%3A123%3Ainference-profile"
         "%2Feu.anthropic.claude-sonnet-4-6/invoke", {}, {}, {}, "bedrock", "eu.anthropic.claude-sonnet-4-6"),
        ("https://api.mistral.ai/v1/chat/completions", {}, {"model": "mistral-large-latest"}, {}, "mistral-ai",
         "mistral-large-latest"),
        ("https://api.cohere.com/v2/chat", {}, {"model": "command-r-plus"}, {}, "cohere", "command-r-plus"),
        ("https://api.cohere.ai/v1/chat", {}, {"model": "command-r"}, {}, "cohere", "command-r"),
        ("https://api.groq.com/openai/v1/chat/completions", {}, {"model": "llama-3.3-70b-versatile"}, {}, "groq",
         "llama-3.3-70b-versatile"),
        ("https://api.together.xyz/v1/chat/completions", {}, {"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo"}, {},
         "together-ai", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        ("https://api.deepseek.com/chat/completions", {}, {"model": "deepseek-chat"}, {}, "deepseek", "deepseek-chat"),
        # explicit provider wins; unknown ones are kept as given; unknown hosts are `unknown`
        ("https://proxy.internal/v1beta/models/gemini-2.5-flash:generateContent", {"X-Portkey-Provider": "google"}, {}, {},
         "google", "gemini-2.5-flash"),
        ("https://proxy.internal/v1/chat/completions", {}, {"model": "m"}, {}, "unknown", "m"),
        ("not a url", {}, {}, {"model": "m2"}, "unknown", "m2"),
        ("https://proxy.internal/v1/chat/completions", {"x-portkey-provider": "Azure"}, {}, {"model": "gpt-4o"},
         "azure-openai", "gpt-4o"),
    ],
)
def test_provider_and_model_detection(url, headers, request_body, response_body, provider, model):
    slug, entry = normalize.detect_provider(url, headers)
    assert slug == provider
    assert normalize.detect_model(entry, url, request_body, response_body) == model


def test_request_provider_field_is_kept_as_given():
    assert normalize.detect_provider("https://api.openai.com/v1/chat/completions", {}, "Self-Hosted")[0] == "self-hosted"
    assert normalize.detect_provider("https://x.test", {}, "vertex")[0] == "vertex-ai"


U = normalize.Usage


@pytest.mark.parametrize(
    ("body", "headers", "usage"),
    [
        ({"usage": {"prompt_tokens": 100, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": 30}}}, {},
         U(input=36, cache_read=64, output=20, reasoning=30)),
        ({"usage": {"prompt_tokens": 7, "total_tokens": 7}}, {}, U(input=7)),  # embeddings
        ({"usage": {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 80,
                    "prompt_cache_miss_tokens": 20}}, {}, U(input=20, cache_read=80, output=5)),  # DeepSeek
        ({"usage": {"input_tokens": 100, "output_tokens": 50, "input_tokens_details": {"cached_tokens": 40},
                    "output_tokens_details": {"reasoning_tokens": 10}}}, {},
         U(input=60, cache_read=40, output=40, reasoning=10)),  # OpenAI Responses API
        ({"usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 300,
                    "cache_creation_input_tokens": 50}}, {}, U(input=10, cache_read=300, cache_write=50, output=20)),
        ({"usage": {"input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 50,
                    "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 30}}}, {},
         U(input=10, cache_write=20, cache_write_1h=30, output=20)),
        ({"usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 10,
                            "thoughtsTokenCount": 25, "toolUsePromptTokenCount": 5}}, {},
         U(input=45, cache_read=60, output=10, reasoning=25)),
        ({"output": {}, "usage": {"inputTokens": 11, "outputTokens": 22, "cacheReadInputTokens": 33,
                                  "cacheWriteInputTokens": 44, "totalTokens": 110}}, {},
         U(input=11, cache_read=33, cache_write=44, output=22)),  # Bedrock Converse
        ({"generation": "...", "prompt_token_count": 12, "generation_token_count": 34}, {}, U(input=12, output=34)),
        ({"inputTextTokenCount": 5, "results": [{"tokenCount": 6}, {"tokenCount": 7}]}, {}, U(input=5, output=13)),
        ({"completion": "..."}, {"X-Amzn-Bedrock-Input-Token-Count": "8", "X-Amzn-Bedrock-Output-Token-Count": "9"},
         U(input=8, output=9)),
        ({"meta": {"billed_units": {"input_tokens": 12.0, "output_tokens": 3.0}, "tokens": {"input_tokens": 80}}}, {},
         U(input=12, output=3)),  # Cohere v1: billed units
        ({"usage": {"billed_units": {"input_tokens": 5, "output_tokens": 6}, "tokens": {"input_tokens": 70}}}, {},
         U(input=5, output=6)),  # Cohere v2
        ({"usage": {"tokens": {"input_tokens": 70, "output_tokens": 8}}}, {}, U(input=70, output=8)),
        ({"id": "x"}, {}, None),
        ("streamed text", {}, None),
        ({"usage": {"prompt_tokens": "many", "completion_tokens": -3}}, {}, U()),
    ],
)
def test_usage_shapes(body, headers, usage):
    assert normalize.usage_of(body, headers) == usage


def test_prompt_length_tiers_and_name_variants():
    table = PricingTable.load()
    # Google keys gemini-2.5-pro by prompt length: <= 128k tokens and above
    assert table.find("google", "gemini-2.5-pro", 128_000).request == price("google", "gemini-2.5-pro-lte-128k", "request_token")
    assert table.find("google", "gemini-2.5-pro", 128_001).request == price("google", "gemini-2.5-pro-gt-128k", "request_token")
    assert table.find("google", "models/gemini-2.5-pro", 10).request == price("google", "gemini-2.5-pro-lte-128k", "request_token")
    # Bedrock geography prefixes, fine-tuned OpenAI models, publisher prefixes, case
    assert table.find("bedrock", "us.anthropic.claude-3-5-sonnet-20241022-v2:0") == table.rates(
        "bedrock", "anthropic.claude-3-5-sonnet-20241022-v2:0")
    assert table.find("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123").request == price(
        "openai", "ft:gpt-4o-mini-2024-07-18", "request_token")
    assert table.find("vertex-ai", "google/gemini-2.0-flash-001") == table.rates("vertex-ai", "gemini-2.0-flash-001")
    assert table.find("together-ai", "meta-llama/llama-3.3-70b-instruct-turbo").request == price(
        "together-ai", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "request_token")
    assert table.find("openai", "gpt-9-imaginary") is None and table.find("unknown", "gpt-4o") is None


def test_reasoning_price_uses_the_reasoning_token_field():
    # openrouter lists a separate `reasoning_token` price for some models
    model = "google/gemini-3-flash-preview"
    rates = PricingTable.load().rates("openrouter", model)
    assert rates.thinking == price("openrouter", model, "reasoning_token")
    usage = normalize.Usage(input=100, output=10, reasoning=50)
    cost, status = normalize.price(PricingTable.load(), "openrouter", model, usage, 200)
    assert status == "priced"
    assert cost == pytest.approx(100 * price("openrouter", model, "request_token")
                                 + 10 * price("openrouter", model, "response_token")
                                 + 50 * price("openrouter", model, "reasoning_token"))


def test_secrets_are_masked():
    assert normalize.mask_headers({"Authorization": "Bearer x", "API-Key": "y", "x-goog-api-key": "z", "accept": "a"}) == {
        "Authorization": "********", "API-Key": "********", "x-goog-api-key": "********", "accept": "a"}
    masked = normalize.mask_url("https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?alt=sse&key=AIza")
    assert "AIza" not in masked and "alt=sse" in masked
    assert normalize.mask_url("https://api.openai.com/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    # only the credentials' values change: the other parameters keep the text they were sent with
    base = "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent"
    for sent, stored in [
        (f"{base}?alt=sse&key=AIza&q=a%20b&flag", f"{base}?alt=sse&key=********&q=a%20b&flag"),
        (f"{base}?API%5FKEY=s&x=1+2&access_token=t#frag", f"{base}?API%5FKEY=********&x=1+2&access_token=********#frag"),
        (f"{base}?q=a%20b&flag", f"{base}?q=a%20b&flag"),
    ]:
        assert normalize.mask_url(sent) == stored


def test_body_given_as_a_json_string_is_stored_as_the_object():
    (log,) = normalize.decode(json.dumps({
        "request": {"url": "https://api.openai.com/v1/chat/completions", "body": json.dumps({"model": "gpt-4o"})},
        "response": {"body": json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})},
    }).encode())
    event = normalize.to_gateway_log(log, log_id=str(uuid.uuid4()), created_at=datetime.now(UTC), organisation_id="o",
                                     workspace_slug="w", api_key_id="k", pricing=PricingTable.load())
    assert json.loads(bytes(event["request"]["body"])) == {"model": "gpt-4o"}
    (streamed,) = normalize.decode(json.dumps({
        "request": {"url": "https://api.openai.com/v1/chat/completions", "body": {"model": "gpt-4o", "stream": True}},
        "response": {"body": "data: {\"choices\": []}\n\ndata: [DONE]\n\n"},
    }).encode())
    sse = normalize.to_gateway_log(streamed, log_id="s", created_at=datetime.now(UTC), organisation_id="o",
                                   workspace_slug="w", api_key_id="k", pricing=PricingTable.load())
    assert json.loads(bytes(sse["response"]["body"])).startswith("data: ")
    assert sse["metrics"]["pricing_status"] == "no_usage" and sse["metrics"]["cost"] is None
    assert (event["metrics"]["ai_model"], event["metrics"]["req_units"], event["metrics"]["res_units"]) == ("gpt-4o", 3, 4)


def test_non_string_metadata_is_stored_and_filtered_as_the_same_text(settings, workers, api, warehouse, org, make_key):
    """A non-string metadata value is stored as its JSON text, and a metadata filter with the same JSON value
    (analytics, exports) selects it: both sides use one encoding (1e20 was stored as `1e20`, filtered as `1e+20`)."""
    key = make_key(org)
    values = [1e20, 2, 0.5, True, 2**70]
    logs = [{**OPENAI, "metadata": {"v": v}} for v in values]
    assert post(api, key, logs).status_code == 200
    assert wait_until(lambda: count_generations(warehouse, org) == len(values))
    now = datetime.now(UTC)
    window = {"time_of_generation_min": (now - timedelta(hours=1)).isoformat(), "time_of_generation_max": (now + timedelta(hours=1)).isoformat()}
    for v in values:
        metadata = '{"v": ' + json.dumps(v) + "}"
        r = api.get("/v1/analytics/graphs/requests", params={**window, "metadata": metadata}, headers={"x-portkey-api-key": key})
        assert r.json()["summary"]["total"] == 1, (v, r.text)
        r = api.post("/v1/logs/exports", json={"filters": {**window, "metadata": {"v": v}}, "requested_data": ["id"]},
                     headers={"x-portkey-api-key": key})
        assert r.json()["total"] == 1, (v, r.text)
