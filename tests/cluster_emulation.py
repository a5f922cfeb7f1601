"""Cluster mode on the embedded engine: chdb configured with a one-shard cluster of itself.

Run by tests/test_cluster.py in a subprocess (the engine's configuration is fixed when a
process first opens it, and the test session's engine has none):

    python tests/cluster_emulation.py WORKDIR   → one JSON line of findings

chdb has no Keeper and runs no distributed DDL queue, so two things of a real cluster are
taken out of the SQL on the way to the engine (:class:`OneShard`): ``ON CLUSTER c`` and the
replication (``Replicated<E>MergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}', args)``
runs as ``<E>MergeTree(args)``). Everything else is what cluster mode sends: the migrations
as rewritten (local tables, Distributed tables sharded by the sorting key's hash, the ALTERs
of both, the EXCHANGE of 0015), the session settings, ingest's inserts into the Distributed
tables, the API's reads (``FINAL``, the feedback subqueries) through them, settle, a limits job
refresh (closed days counted into the Distributed segment tables and summed back), an
on-demand export, the limits job's part watch and mutations, the lease. The Distributed tables are real: the
shard is this engine itself (``prefer_localhost_replica``).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CLUSTER = "tg"
CONFIG = f"""<clickhouse>
  <tcp_port>9000</tcp_port>
  <remote_servers><{CLUSTER}><shard><replica><host>localhost</host><port>9000</port></replica></shard></{CLUSTER}></remote_servers>
  <macros><shard>01</shard><replica>r1</replica></macros>
</clickhouse>
"""
_REPLICATED = re.compile(r"Replicated(\w*MergeTree)\('/clickhouse/tables/\{uuid\}/\{shard\}', '\{replica\}'(, )?")


class OneShard:
    """A client whose SQL loses what needs Keeper: ON CLUSTER and replication."""

    def __init__(self, client):
        self._client = client
        self.statements: list[str] = []

    @staticmethod
    def local(sql: str) -> str:
        return _REPLICATED.sub(r"\1(", sql.replace(f" ON CLUSTER {CLUSTER}", ""))

    def command(self, sql, *args, **kwargs):
        self.statements.append(sql)
        return self._client.command(self.local(sql), *args, **kwargs)

    def query(self, sql, *args, **kwargs):
        return self._client.query(self.local(sql), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def compare(client, endpoints, cases, reference, keys) -> list[str]:
    from test_analytics import differences, without_float_noise

    bad = []
    for case in cases:
        for endpoint in endpoints:
            params = {**case.query(), **endpoint.extra}
            got = client.get(f"/v1/analytics/{endpoint.route}", params=params,
                             headers={"x-portkey-api-key": keys[case.key]})
            if got.status_code != 200:
                bad.append(f"{endpoint.route} {case.name}: {got.status_code} {got.text[:200]}")
                continue
            expected = reference.compute(endpoint.route, params, key_workspace="team-a" if case.key == "ws" else None)
            body = without_float_noise(got.json())
            if body != expected:
                bad.append(f"{endpoint.route} {case.name}: " + "; ".join(differences(body, expected, limit=3)))
    return bad


def limits_check(w, settings) -> dict:
    """The limits job over Distributed tables: closed days computed into limit_segment_usage (INSERT …
    SELECT … FROM generations FINAL), summed with their versions (IN and JOIN), the live hour; the
    counters must equal tests/limits_reference.py's sums of the events."""
    import random
    import uuid

    import orjson
    from fastapi.testclient import TestClient

    from analytics_api.app import create_app
    from analytics_api.limits.job import LimitsJob
    from factories import gateway_log
    from ingest.events import GENERATIONS
    from ingest.producer import ensure_topics
    from ingest.sink import insert_rows
    from limits_reference import events_frame, ms, usage
    from test_analytics import _make_key
    from test_limits import Clock, create, entities

    org = f"org-limits-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings.kafka_bootstrap, settings.all_topics, 1)
    ensure_topics(settings.kafka_bootstrap, list(settings.limit_topics), 1, configs=settings.limit_topics)
    clock = Clock(datetime(2026, 10, 25, 12, tzinfo=UTC))
    app = create_app(settings, settings.kafka_bootstrap, pool_size=2)
    app.state.limits_clock = clock
    with TestClient(app) as api:
        key = _make_key(w, org)
        pid = create(api, key, "usage-limits", {"conditions": [{"key": "workspace_id", "value": "ws-a"}],
                                                "group_by": [{"key": "api_key"}], "type": "cost", "credit_limit": 500})
        rng = random.Random(5)
        events = [gateway_log(org, workspace=rng.choice(["ws-a", "ws-b"]), rng=rng, api_key_id=f"ak-{i % 4}",
                              cost=float(rng.randrange(1, 40)) / 4,
                              created_at=datetime(2026, 10, 25, 12, tzinfo=UTC) + (datetime(2026, 10, 28, 13, 30, tzinfo=UTC)
                                                                                   - datetime(2026, 10, 25, 12, tzinfo=UTC)) * i / 300)
                  for i in range(300)]
        rows = [GENERATIONS.encode(orjson.dumps(ev)) for ev in events]
        insert_rows(w, GENERATIONS, rows)
        insert_rows(w, GENERATIONS, rows[::3])  # redelivered
        clock.set("2026-10-28T14:00:00")
        # (its cleanup thread opens a client of its own, whose ON CLUSTER mutation this engine refuses and
        # logs; the same mutation through OneShard is run in main())
        job = LimitsJob(settings, settings.kafka_bootstrap, clock=clock, client=w, organisations=[org])
        report = job.run_once()
        job.close()
        got = {k: v["current_usage"] for k, v in entities(api, key, pid).items()}
        export = export_check(api, w, settings.data_dir)
    expected = usage(events_frame(events), org=org, conditions=[("workspace_id", "ws-a")], group_by=["api_key"],
                     measure="cost", start_ms=ms(datetime(2026, 10, 25, 12, tzinfo=UTC)), end_ms=None)
    return {"got": got, "expected": expected, "closed_segments_computed": report.closed_segments_computed,
            "export": export}


def export_check(api, w, workdir: Path) -> dict:
    """An on-demand export of the analytics data set's default workspace, read through the Distributed
    ``generations`` (``FINAL``, in slices): every selected id exactly once."""
    import polars as pl

    from test_analytics import ORG, REFERENCE, _make_key
    from test_exports import run_export

    key = _make_key(w, ORG)
    window = {"time_of_generation_min": "2026-02-27T00:00:00Z", "time_of_generation_max": "2026-03-12T23:59:59.999Z"}
    _, item = run_export(api, key, window, ["id", "created_at", "cost"])
    exported: list[str] = []
    for path in sorted((workdir / "exports").rglob("part-*.jsonl")):
        exported += [json.loads(line)["id"] for line in path.read_text().splitlines()]
    expected = REFERENCE.gens.filter(pl.col("ws") == "default")["id"].to_list()
    return {"rows_written": item["rows_written"], "exported": len(exported), "distinct": len(set(exported)),
            "expected": len(expected), "same_ids": set(exported) == set(expected)}


def main(workdir: Path) -> dict:
    import clickhouse_connect
    import orjson
    from fastapi.testclient import TestClient

    from analytics_api.app import create_app
    from ingest.events import FEEDBACK, GENERATIONS
    from ingest.sink import insert_rows
    from test_analytics import CASES, DATA, ENDPOINTS, ORG, REFERENCE, _make_key
    from tollgate.settings import Settings
    from warehouse.client import SESSION_SETTINGS
    from warehouse.cluster import layout
    from warehouse.lease import Lease
    from warehouse.migrate import apply_retention, migrate
    from warehouse.queries.limits import delete_stale_segments, generation_parts, generations_identity
    from warehouse.settle import settle, unsettled

    config = workdir / "cluster.xml"
    config.write_text(CONFIG)
    path = (workdir / "warehouse").resolve()
    path.mkdir(parents=True, exist_ok=True)
    raw = clickhouse_connect.get_client(interface="chdb", path=str(path), settings=SESSION_SETTINGS,
                                        chdb_options={"config-file": str(config)})
    w = OneShard(raw)
    out: dict = {"clusters": raw.query("SELECT cluster, is_local FROM system.clusters").result_rows}

    out["applied"] = migrate(w, 30, audit_retention_days=30, cluster=CLUSTER)
    out["applied_again"] = migrate(w, 30, audit_retention_days=30, cluster=CLUSTER)
    out["ddl_on_cluster"] = sum(" ON CLUSTER tg" in s for s in w.statements)
    out["engines"] = dict(raw.query("SELECT name, engine FROM system.tables WHERE database = currentDatabase()").result_rows)
    out["distributed_generations"] = raw.command(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = 'generations'")
    out["generations_local_ttl"] = "TTL" in raw.command(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'generations_local'")
    out["layout"] = layout(w).cluster
    # the data set is from early 2026: keep it (no TTL), as the test session does
    apply_retention(w, 0, layout=layout(w))
    apply_retention(w, 0, table="metadata_values", layout=layout(w))
    apply_retention(w, 0, table="audit_logs", layout=layout(w))
    out["generations_local_ttl_removed"] = "TTL" not in raw.command(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'generations_local'")

    # ingest: every event, and a redelivered slice of them (another insert: a new part)
    logs = [GENERATIONS.encode(orjson.dumps(ev)) for ev in DATA.logs]
    insert_rows(w, GENERATIONS, logs)
    insert_rows(w, GENERATIONS, logs[:700])
    feedback = [FEEDBACK.encode(orjson.dumps(ev)) for ev in DATA.feedback]
    insert_rows(w, FEEDBACK, feedback)
    insert_rows(w, FEEDBACK, feedback[:100])
    out["stored_raw"] = int(raw.command("SELECT count() FROM generations_local WHERE organisation_id = {o:String}",
                                        parameters={"o": ORG}))
    out["stored_final"] = int(raw.command("SELECT count() FROM generations FINAL WHERE organisation_id = {o:String}",
                                          parameters={"o": ORG}))
    out["expected"] = REFERENCE.gens.height

    # the API reads through the Distributed tables (its own clients on the same engine)
    settings = Settings(data_dir=workdir, clickhouse_dsn=f"chdb://{path}", auth_cache_seconds=0)
    keys = {"org": _make_key(w, ORG), "ws": _make_key(w, ORG, "team-a")}
    cases = [c for c in CASES if c.name in ("ist-week-no-filter", "z-team-a", "z-metadata-quotes", "z-trace-ids",
                                            "z-weighted-feedback", "z-combination")]
    with TestClient(create_app(settings, None, pool_size=2)) as client:
        out["mismatches_before_settle"] = compare(client, ENDPOINTS, cases, REFERENCE, keys)
        out["parts_watch"] = sorted(generation_parts(w))[:3]
        out["identity"] = bool(generations_identity(w))
        out["settled"] = len(settle(w, now=datetime(2030, 1, 1, tzinfo=UTC)))
        out["unsettled_after"] = len(unsettled(w, now=datetime(2030, 1, 1, tzinfo=UTC)))
        out["mismatches_after_settle"] = compare(client, ENDPOINTS, cases, REFERENCE, keys)
        out["requests"] = len(ENDPOINTS) * len(cases)
    w.command("INSERT INTO limit_segment_usage (policy_id, start, end, version, value_key, usage) "
              "VALUES ('p1', '2026-01-01', '2026-01-02', 1, 'k', 1.5)")
    delete_stale_segments(w, [], cutoff=2)
    out["segments_left"] = int(raw.command("SELECT count() FROM limit_segment_usage"))

    from tollgate.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        out["limits"] = limits_check(w, settings.model_copy(update={"kafka_bootstrap": broker.bootstrap}))

    a, b = Lease(w, "a", ttl=60, guard=0.5), Lease(w, "b", ttl=60, guard=0.5)
    out["lease"] = [a.acquire(), b.acquire(), a.current().holder]
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result, default=str))
    sys.stdout.flush()
    import os

    os._exit(0)  # skip chdb's exit-time shutdown (tollgate/cli.py)
