"""(a) A LogObject produced to Kafka comes back field for field from GET /v1/logs/{id}."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from conftest import count_generations, publish, wait_until
from factories import gateway_log


def test_log_object_round_trip(settings, producer, workers, api, warehouse, org, make_key):
    rng = random.Random(7)
    full = gateway_log(org, workspace="ws-a", rng=rng, created_at=datetime(2026, 11, 20, 10, 30, 0, 123000, tzinfo=UTC))
    full["metrics"].update(
        organisation_name="Acme", prompt_id="p-1", prompt_version_id="pv-1", config_id="c-1", config="pc-cfg",
        config_version_id="cv-1", is_proxy_call=True, cache_status="SEMANTIC HIT", cache_type="semantic",
        stream_mode=1, retry_success_count=2, span_name="llm", parent_span_id="span-0", mode="fallback",
        virtual_key="vk-1", source="rubeus", runtime="node", runtime_version="20.1.0", sdk_version="1.2.3",
        internal_trace_id="it-1", last_used_option_index=1, prompt_slug="my-prompt", log_store_file_path_format="v1",
        api_key_id="key-1", request_parsing_time=5, pre_processing_time=6, cache_processing_time=7,
        response_parsing_time=8, gateway_processing_time=9, upstream_response_time=1200,
    )
    full["metrics"]["metadata.key"] = ["_user", "quote", "unicode"]
    full["metrics"]["metadata.value"] = ["alice", "it's \"quoted\"", "naïve ☃ 日本"]
    full["transformedRequest"] = {"body": {"model": "gpt-4o"}, "url": "https://x.test/v1"}
    # the other metadata form: an object of strings; and `id` instead of `_id`
    alt = gateway_log(org, workspace="ws-a", rng=rng, status=502)
    alt["id"] = alt.pop("_id")
    meta = dict(zip(alt["metrics"].pop("metadata.key"), alt["metrics"].pop("metadata.value")))
    alt["metrics"]["metadata"] = meta

    publish(producer, settings.topic_gateway_logs, [full, alt])
    assert wait_until(lambda: count_generations(warehouse, org) == 2)
    key = make_key(org)

    got = api.get(f"/v1/logs/{full['_id']}", headers={"x-portkey-api-key": key})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["_id"] == full["_id"]
    assert body["organisation_id"] == org
    assert body["created_at"] == "2026-11-20T10:30:00.123Z"
    for field in ("url", "method", "headers", "body", "portkeyHeaders"):
        assert body["request"][field] == full["request"][field], field
    for field in ("status", "headers", "body", "responseTime", "lastUsedOptionJsonPath"):
        assert body["response"][field] == full["response"][field], field
    assert body["transformedRequest"] == full["transformedRequest"]
    for field, value in full["metrics"].items():
        assert body["metrics"][field] == value, field

    got_alt = api.get(f"/v1/logs/{alt['id']}", headers={"x-portkey-api-key": key}).json()
    assert got_alt["response"]["status"] == 502
    assert got_alt["metrics"]["is_success"] is False
    assert dict(zip(got_alt["metrics"]["metadata.key"], got_alt["metrics"]["metadata.value"])) == meta


def test_stored_types_are_the_documented_ones(warehouse):
    types = dict(warehouse.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'generations'").result_rows)
    assert types["created_at"] == "DateTime64(3, 'UTC')"
    assert types["req_units"] == "UInt32" and types["response_status_code"] == "UInt16"
    assert types["ai_model"] == "LowCardinality(String)"
    assert types["metadata.key"] == "Array(LowCardinality(String))"
    ddl = warehouse.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'generations'")
    assert "ZSTD(3)" in ddl and "PARTITION BY toDate(created_at)" in ddl
    assert "ORDER BY (organisation_id, workspace_slug, created_at, id)" in ddl
