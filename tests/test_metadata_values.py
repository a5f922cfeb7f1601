"""The texts of metadata pairs (``metadata_values``, migration 0023): metadata groups group requests
by pair hash and read their values' texts from that table. Every way generations are written
must store the texts first: the ingest's encoding collects them, both sinks store them, and 0023
backfills a warehouse written before it. Expectations are computed here from the events."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from multiprocessing import Pipe

import orjson
import polars as pl
import pytest

from conftest import migrations_before
from factories import gateway_log
from ingest.events import GENERATIONS
from ingest.sink import DirectSink, RemoteSink, SinkServer, insert_rows
from warehouse.filters import Filters, compile_where
from warehouse.queries import analytics as q
from warehouse.queries.scope import TenantScope

TEXTS = ["a", "O'Brien \"q\"", "日本語", "", "x,y", "prod", "tab\there"]


def _events(org: str, n: int, seed: int) -> list[dict]:
    """Gateway logs with 0–4 metadata keys, repeated keys (only the first counts in groups),
    empty values, quotes and unicode, in two workspaces and the empty one."""
    rng = random.Random(seed)
    events = []
    for _ in range(n):
        keys = rng.sample(["_user", "env", "team", "note"], k=rng.randrange(0, 5))
        values = [rng.choice(TEXTS) for _ in keys]
        if keys and rng.random() < 0.25:
            keys.append(keys[0])
            values.append("a repeated key's later value")
        events.append(gateway_log(org, workspace=rng.choice(["w1", "w2", ""]), rng=rng,
                                  **{"metadata.key": keys, "metadata.value": values}))
    return events


def _expected_texts(events: list[dict]) -> dict[tuple, int]:
    """(org, workspace, key, value) → the latest created_at (epoch ms) of the requests that carry it."""
    out: dict[tuple, int] = {}
    for ev in events:
        m = ev["metrics"]
        ms = int(datetime.fromisoformat(m["created_at"]).timestamp() * 1000 + 0.5)
        for k, v in zip(m["metadata.key"], m["metadata.value"]):
            pair = (m["organisation_id"], m["workspace_slug"], k, v)
            out[pair] = max(out.get(pair, ms), ms)
    return out


def _stored_texts(client, org: str) -> dict[tuple, int]:
    rows = client.query("SELECT organisation_id, workspace_slug, key, value, toUnixTimestamp64Milli(max(last_seen)) "
                        "FROM metadata_values WHERE organisation_id = {o:String} GROUP BY 1, 2, 3, 4",
                        parameters={"o": org}).result_rows
    return {tuple(r[:4]): int(r[4]) for r in rows}


def _expected_groups(events: list[dict], workspace: str, key: str) -> dict[str, tuple[int, float]]:
    """value → (requests, cost) over the workspace's requests whose first ``key`` has a non-empty value."""
    rows = []
    for ev in events:
        m = ev["metrics"]
        if m["workspace_slug"] == workspace and key in m["metadata.key"]:
            rows.append({"value": m["metadata.value"][m["metadata.key"].index(key)], "cost": m["cost"]})
    df = pl.DataFrame(rows, schema={"value": pl.Utf8, "cost": pl.Float64}).filter(pl.col("value") != "")
    return {v: (n, round(c, 6)) for v, n, c in df.group_by("value").agg(pl.len(), pl.col("cost").sum()).iter_rows()}


def _groups(client, org: str, workspace: str, key: str) -> dict[str, tuple[int, float]]:
    where = compile_where(Filters(start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 12, 1, tzinfo=UTC)),
                          TenantScope(org, workspace))
    table = q.grouped(client, where, "metadata", ["requests", "cost"], metadata_key=key, total=False)
    return {r["key"]: (r["requests"], round(r["cost"], 6)) for r in table.to_pylist()}


def test_encoding_collects_every_pair_with_its_latest_request():
    """What the ingest collects while encoding equals what the events carry, and what parsing the
    encoded rows back finds (the path of writers that did not collect)."""
    events = _events("org-unit", 400, seed=1)
    collected: dict = {}
    rows = [GENERATIONS.encode(orjson.dumps(ev), collected) for ev in events]
    as_ms = {pair: int(seconds * 1000 + 0.5) for pair, seconds in collected.items()}
    assert as_ms == _expected_texts(events)
    assert GENERATIONS.metadata_values_of(rows) == collected
    assert len({pair[2] for pair in collected}) == 4  # every key occurred


@pytest.mark.parametrize("sink_kind", ["direct", "remote, collected", "remote, parsed by the worker"])
def test_both_sinks_store_the_texts_before_the_rows(base_settings, warehouse, org, tmp_path, sink_kind):
    events = _events(org, 300, seed=len(sink_kind))
    collected: dict = {}
    rows = [GENERATIONS.encode(orjson.dumps(ev), collected) for ev in events]
    if sink_kind == "direct":
        DirectSink(base_settings.warehouse_dsn)(GENERATIONS, rows, collected)
    else:
        worker_end, owner_end = Pipe()
        SinkServer(base_settings.warehouse_dsn, owner_end, "test").start()
        RemoteSink(worker_end, tmp_path)(GENERATIONS, rows, collected if sink_kind.endswith("collected") else None)
        worker_end.close()
    assert _stored_texts(warehouse, org) == _expected_texts(events)
    for workspace in ("w1", ""):
        for key in ("env", "note", "_user"):
            assert _groups(warehouse, org, workspace, key) == _expected_groups(events, workspace, key), (workspace, key)


def test_migration_0023_backfills_the_texts_of_an_older_warehouse(empty_db, tmp_path):
    """Generations stored by a release before 0023 (no texts table): after the migration, their
    metadata groups carry the right texts and figures."""
    from warehouse.migrate import migrate

    migrate(empty_db, directory=migrations_before(23, tmp_path / "before"))
    org = "org-upgrade"
    events = _events(org, 300, seed=7)
    empty_db.raw_insert("generations", column_names=GENERATIONS.columns, fmt="JSONCompactEachRow",
                        insert_block=b"".join(GENERATIONS.encode(orjson.dumps(ev)) + b"\n" for ev in events))
    assert migrate(empty_db, directory=migrations_before(24, tmp_path / "upto23")) == ["0023_metadata_values.sql"]
    assert _stored_texts(empty_db, org) == _expected_texts(events)
    for key in ("env", "team", "note", "_user"):
        assert _groups(empty_db, org, "w2", key) == _expected_groups(events, "w2", key), key


def test_the_retention_ttl_applies_to_the_texts(empty_db):
    """TOLLGATE_RETENTION_DAYS drops a text once the last request that carries it is dropped."""
    from warehouse.migrate import apply_retention, migrate

    migrate(empty_db, retention_days=30)

    def ddl() -> str:
        return str(empty_db.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() "
                                    "AND name = 'metadata_values'"))

    assert "TTL toDateTime(least(last_seen + toIntervalDay(30), " in ddl()
    apply_retention(empty_db, 0, table="metadata_values")
    assert " TTL " not in ddl()


def test_a_text_outlives_its_requests_when_one_is_dated_after_2106(empty_db):
    """Requests may be dated up to 2200 (docs/events.md); toDateTime() of a later last_seen wraps
    around (2150 → 2013), so a TTL on it dropped a text that requests of today still carry."""
    from warehouse.migrate import migrate

    migrate(empty_db, retention_days=30)
    org = "org-far-future"
    now = datetime.now(UTC).replace(microsecond=0)
    events = [gateway_log(org, workspace="w1", created_at=at, **{"metadata.key": ["env"], "metadata.value": ["prod"]})
              for at in (now, datetime(2150, 1, 1, tzinfo=UTC))]
    insert_rows(empty_db, GENERATIONS, [GENERATIONS.encode(orjson.dumps(ev)) for ev in events])
    empty_db.command("OPTIMIZE TABLE metadata_values FINAL")  # a merge, which applies the TTL
    where = compile_where(Filters(start=now - timedelta(days=1), end=now + timedelta(days=1)), TenantScope(org, "w1"))
    table = q.grouped(empty_db, where, "metadata", ["requests"], metadata_key="env", total=False)
    assert table.select(["key", "requests"]).to_pylist() == [{"key": "prod", "requests": 1}]


@pytest.mark.parametrize("sink_kind", ["direct", "remote"])
def test_texts_parsed_from_rows_whose_bodies_span_lines(base_settings, warehouse, org, tmp_path, sink_kind):
    """A row keeps a raw JSON body as sent, line breaks included (ClickHouse reads the row whole):
    writers that did not collect the pairs must parse each row whole, not line by line."""
    events = _events(org, 20, seed=3)
    rows = [GENERATIONS.encode(json.dumps(ev, indent=2).encode()) for ev in events]
    assert all(b"\n" in row for row in rows)
    if sink_kind == "direct":
        DirectSink(base_settings.warehouse_dsn)(GENERATIONS, rows)
    else:
        worker_end, owner_end = Pipe()
        SinkServer(base_settings.warehouse_dsn, owner_end, "test").start()
        RemoteSink(worker_end, tmp_path)(GENERATIONS, rows)
        worker_end.close()
    assert _stored_texts(warehouse, org) == _expected_texts(events)
    assert _groups(warehouse, org, "w1", "env") == _expected_groups(events, "w1", "env")


def test_a_metadata_group_reads_only_the_texts_seen_since_its_window_started(base_settings, warehouse, org):
    """A key with a value per request (an id) has as many texts as requests over the whole retention:
    the group of one day must not aggregate a year of them (3× slower than the string scan it replaced
    on 3M texts, and out of memory long before the scan of the day would be)."""
    from warehouse.client import connect

    def logs(start: datetime, n: int, prefix: str) -> list[dict]:
        return [gateway_log(org, workspace="w1", created_at=start + timedelta(minutes=i),
                            **{"metadata.key": ["rid"], "metadata.value": [f"{prefix}-{i}"]}) for i in range(n)]

    events = logs(datetime(2025, 12, 1, tzinfo=UTC), 3000, "old") + logs(datetime(2026, 11, 20, tzinfo=UTC), 10, "new")
    insert_rows(warehouse, GENERATIONS, [GENERATIONS.encode(orjson.dumps(ev)) for ev in events])
    limited = connect(base_settings.warehouse_dsn, max_rows_to_group_by=1000, group_by_overflow_mode="throw")
    where = compile_where(Filters(start=datetime(2026, 11, 20, tzinfo=UTC), end=datetime(2026, 11, 21, tzinfo=UTC)),
                          TenantScope(org, "w1"))
    table = q.grouped(limited, where, "metadata", ["requests"], metadata_key="rid", feedback=True, total=False)
    assert sorted(r["key"] for r in table.to_pylist()) == sorted(f"new-{i}" for i in range(10))
