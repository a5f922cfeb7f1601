"""(a) A LogObject produced to Kafka comes back field for field from GET /v1/logs/{id}."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson

from conftest import count_generations, publish, wait_until
from factories import gateway_log
from ingest.events import GENERATIONS
from ingest.sink import insert_rows


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


def test_request_body_is_any_json(settings, producer, workers, api, warehouse, org, make_key):
    """docs/events.md: the request's `body` is any JSON (a text-completion prompt, a raw payload):
    a string or an array is stored and served back as given, not dead-lettered."""
    rng = random.Random(8)
    bodies = ["plain text prompt", [{"role": "user", "content": "hi"}], 42]
    events = []
    for body in bodies:
        ev = gateway_log(org, rng=rng)
        ev["request"]["body"] = body
        events.append(ev)
    publish(producer, settings.topic_gateway_logs, events)
    assert wait_until(lambda: count_generations(warehouse, org) == len(events))
    key = make_key(org)
    for ev in events:
        got = api.get(f"/v1/logs/{ev['_id']}", headers={"x-portkey-api-key": key})
        assert got.status_code == 200, got.text
        assert got.json()["request"]["body"] == ev["request"]["body"]


def _stored_ms(warehouse, org) -> dict[str, int]:
    return dict(warehouse.query("SELECT id, toUnixTimestamp64Milli(created_at) FROM generations FINAL "
                                "WHERE organisation_id = {o:String}", parameters={"o": org}).result_rows)


def test_digits_past_the_millisecond_are_truncated(warehouse, org):
    """docs/events.md: created_at is stored with millisecond precision, sub-millisecond digits truncated,
    however many there are (RFC 3339 allows any number; nanosecond clocks write nine). Rounding to the
    microsecond first would make …59.9999996 the next second, here the next day (another partition)."""
    ten, last = datetime(2026, 11, 20, 10, tzinfo=UTC), datetime(2026, 11, 20, 23, 59, 59, tzinfo=UTC)
    cases = {  # text → (the UTC second, the milliseconds its digits give)
        "2026-11-20T10:00:00.1239996Z": (ten, 123),
        "2026-11-20T23:59:59.999999999Z": (last, 999),
        "2026-11-20T23:59:59.9995+00:00": (last, 999),
        "2026-11-21T05:29:59.999999999+05:30": (last, 999),
        "2026-11-20T10:00:00.5Z": (ten, 500),
        "2026-11-20T10:00:00Z": (ten, 0),
    }
    rows = []
    for i, text in enumerate(cases):
        ev = gateway_log(org, rng=random.Random(i))
        ev["_id"] = ev["metrics"]["id"] = f"ts-{i}"
        ev["created_at"] = text
        rows.append(GENERATIONS.encode(orjson.dumps(ev)))
    insert_rows(warehouse, GENERATIONS, rows)
    assert _stored_ms(warehouse, org) == {f"ts-{i}": int(second.timestamp()) * 1000 + ms for i, (second, ms) in enumerate(cases.values())}


def test_identity_is_id_timestamp_and_workspace(warehouse, org):
    """docs/events.md: a re-sent event (same id, timestamp and workspace) is the same generation, whatever
    else changed; the workspace is part of the identity (the table's sorting key), so an event re-sent
    under another workspace is a second generation."""
    ev = gateway_log(org, workspace="ws-a", rng=random.Random(13))
    changed = orjson.loads(orjson.dumps(ev))
    changed["metrics"]["cost"] = 99.0
    moved = orjson.loads(orjson.dumps(ev))
    moved["metrics"]["workspace_slug"] = "ws-b"
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(e)) for e in (ev, changed)])
    assert count_generations(warehouse, org) == 1
    assert warehouse.command("SELECT cost FROM generations FINAL WHERE organisation_id = {o:String}", parameters={"o": org}) == 99.0
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(moved))])
    assert count_generations(warehouse, org) == 2
