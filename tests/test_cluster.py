"""Cluster mode: the DDL the migration runner generates for TOLLGATE_CLICKHOUSE_CLUSTER.

chdb cannot run a cluster (no ON CLUSTER, no Distributed engine without a configured
cluster), so these tests check the generated statements: golden text per statement kind,
every migration file converting, and every generated statement parsing in the real
ClickHouse parser (``formatQuery`` of the embedded engine). docs/deploy.md says what was
and was not run against a server.
"""

from __future__ import annotations

import re

import pytest

from warehouse.cluster import SINGLE, ClusterDDLError, Layout, check_cluster_name, for_cluster, layout
from warehouse.migrate import LEDGER_DDL, discover
from warehouse.settle import unsettled_days_sql

REPLICA = "'/clickhouse/tables/{uuid}/{shard}', '{replica}'"


def parses(client, sql: str) -> str:
    return client.command("SELECT formatQuery({q:String})", parameters={"q": sql})


def test_create_table_becomes_a_replicated_local_table_and_a_distributed_one():
    sql = """CREATE TABLE IF NOT EXISTS feedback
(
    id              String,
    organisation_id LowCardinality(String), -- the tenant's (a comment with an apostrophe, and a comma)
    note            String DEFAULT 'a (b, c)',
    updated_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (organisation_id, id)
SETTINGS non_replicated_deduplication_window = 1000"""
    local, distributed = for_cluster(sql, "tg", "analytics")
    columns = sql[sql.index("("):sql.index("ENGINE")].rstrip()
    assert local == (
        "CREATE TABLE IF NOT EXISTS feedback_local ON CLUSTER tg\n" + columns + "\n"
        f"ENGINE = ReplicatedReplacingMergeTree({REPLICA}, updated_at)\n"
        "ORDER BY (organisation_id, id)\nSETTINGS non_replicated_deduplication_window = 1000")
    assert distributed == (
        "CREATE TABLE IF NOT EXISTS feedback ON CLUSTER tg AS feedback_local\n"
        "ENGINE = Distributed('tg', 'analytics', 'feedback_local', cityHash64(organisation_id, id))")


def test_create_table_without_engine_arguments_and_a_single_column_key():
    local, distributed = for_cluster("CREATE TABLE t (id String, v UInt64) ENGINE = MergeTree ORDER BY id;", "c1", "db")
    assert local == f"CREATE TABLE t_local ON CLUSTER c1\n(id String, v UInt64)\nENGINE = ReplicatedMergeTree({REPLICA}) ORDER BY id"
    assert distributed == "CREATE TABLE t ON CLUSTER c1 AS t_local\nENGINE = Distributed('c1', 'db', 't_local', cityHash64(id))"


def test_alter_of_columns_changes_the_local_and_the_distributed_table():
    sql = ("ALTER TABLE generations\n    ADD COLUMN IF NOT EXISTS a UInt64 MATERIALIZED cityHash64(x, y),\n"
           "    ADD COLUMN IF NOT EXISTS b String DEFAULT ','")
    rest = sql.split("generations", 1)[1].strip()
    assert for_cluster(sql, "tg", "db") == [f"ALTER TABLE generations_local ON CLUSTER tg {rest}",
                                            f"ALTER TABLE generations ON CLUSTER tg {rest}"]


def test_other_alters_change_the_local_table_only():
    assert for_cluster("ALTER TABLE generations MODIFY TTL toDateTime(created_at) + toIntervalDay(30)", "tg", "db") == [
        "ALTER TABLE generations_local ON CLUSTER tg MODIFY TTL toDateTime(created_at) + toIntervalDay(30)"]
    assert for_cluster("ALTER TABLE t DELETE WHERE x IN (1, 2)", "tg", "db") == [
        "ALTER TABLE t_local ON CLUSTER tg DELETE WHERE x IN (1, 2)"]


def test_an_alter_mixing_column_and_other_clauses_is_refused():
    with pytest.raises(ClusterDDLError, match="split it in two"):
        for_cluster("ALTER TABLE t ADD COLUMN a UInt8, MODIFY TTL d + INTERVAL 1 DAY", "tg", "db")


def test_truncate_optimize_exchange_drop_and_insert():
    assert for_cluster("TRUNCATE TABLE generations_daily;", "tg", "db") == [
        "TRUNCATE TABLE generations_daily_local ON CLUSTER tg"]
    assert for_cluster("TRUNCATE TABLE IF EXISTS t", "tg", "db") == ["TRUNCATE TABLE IF EXISTS t_local ON CLUSTER tg"]
    assert for_cluster("OPTIMIZE TABLE generations PARTITION ID '20261120' FINAL", "tg", "db") == [
        "OPTIMIZE TABLE generations_local ON CLUSTER tg PARTITION ID '20261120' FINAL"]
    assert for_cluster("EXCHANGE TABLES generations AND generations_daily", "tg", "db") == [
        "EXCHANGE TABLES generations_local AND generations_daily_local ON CLUSTER tg"]
    assert for_cluster("DROP TABLE generations_daily", "tg", "db") == [
        "DROP TABLE generations_daily ON CLUSTER tg", "DROP TABLE generations_daily_local ON CLUSTER tg"]
    assert for_cluster("DROP TABLE IF EXISTS t SYNC", "tg", "db") == [
        "DROP TABLE IF EXISTS t ON CLUSTER tg SYNC", "DROP TABLE IF EXISTS t_local ON CLUSTER tg SYNC"]
    insert = "INSERT INTO generations_daily SELECT * FROM generations SETTINGS insert_deduplicate = 0"
    assert for_cluster(insert, "tg", "db") == [insert]  # through the Distributed tables: sharded like ingest


@pytest.mark.parametrize("sql", [
    "CREATE VIEW v AS SELECT 1",
    "CREATE MATERIALIZED VIEW mv TO t AS SELECT * FROM s",
    "RENAME TABLE a TO b",
    "CREATE TABLE t ENGINE = MergeTree ORDER BY id AS SELECT 1 AS id",
    "CREATE TABLE t (id String) ENGINE = Log",
    "CREATE TABLE t (id String) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY id",
    "CREATE TABLE t (id String) ENGINE = MergeTree ORDER BY tuple()",
    "SELECT 1",
])
def test_what_cannot_be_rewritten_is_refused_with_the_statement(sql):
    with pytest.raises(ClusterDDLError):
        for_cluster(sql, "tg", "db")


@pytest.mark.parametrize("name", ["", "1st", "tg; DROP TABLE x", "a-b", "tg'"])
def test_cluster_and_database_names_are_identifiers(name):
    with pytest.raises(ValueError):
        check_cluster_name(name)
    with pytest.raises(ValueError):
        for_cluster("TRUNCATE TABLE t", name, "db")
    with pytest.raises(ValueError):
        for_cluster("TRUNCATE TABLE t", "tg", name)


def _order_key(create: str) -> str:
    m = re.search(r"\bORDER BY\s+(\([^)]*\)|\S+)", create)
    return m.group(1).strip("()").replace("\n", " ")


def test_every_migration_converts_and_parses(warehouse):
    statements = [("ledger", LEDGER_DDL)] + [(m.path.name, s) for m in discover() for s in m.statements()]
    created: dict[str, str] = {}
    for name, statement in statements:
        out = for_cluster(statement, "tollgate", "default")
        assert out, name
        for sql in out:
            assert parses(warehouse, sql), (name, sql)  # the real parser accepts it
            if not sql.startswith("INSERT"):
                assert " ON CLUSTER tollgate" in sql, (name, sql)
        if statement.lstrip().upper().startswith("CREATE TABLE"):
            local, distributed = out
            table = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement.strip()).group(1)
            assert local.startswith(f"CREATE TABLE IF NOT EXISTS {table}_local ON CLUSTER tollgate\n"), name
            assert re.search(r"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/\{uuid\}/\{shard\}', '\{replica\}'",
                             local), name
            # duplicates (same sorting key) land on the same shard: FINAL stays exact on Distributed
            key = _order_key(statement)
            assert distributed.endswith(f"'default', '{table}_local', cityHash64({key}))"), (name, distributed)
            created[table] = key
    assert {"generations", "feedback", "audit_logs", "api_keys", "scheduler_lease", "schema_migrations"} <= set(created)
    assert created["generations"] == "organisation_id, workspace_slug, created_at, id"


def test_the_embedded_warehouse_is_a_single_server(warehouse):
    assert layout(warehouse) == SINGLE
    assert SINGLE.local("generations") == "generations" and SINGLE.on_cluster == "" and SINGLE.parts == "system.parts"
    tg = Layout("tg")
    assert tg.local("generations") == "generations_local" and tg.on_cluster == " ON CLUSTER tg"


def test_the_settle_query_of_a_cluster_parses_and_a_single_server_runs_it(warehouse):
    assert "clusterAllReplicas(" in parses(warehouse, unsettled_days_sql(Layout("tg")))
    rows = warehouse.query(unsettled_days_sql(SINGLE), parameters={"db": "nope", "t": "generations"}).result_rows
    assert rows == []


def test_the_limits_part_watch_keeps_each_replicas_block_numbers_apart():
    """In cluster mode each shard numbers its blocks itself: new data merged away on a shard whose
    numbers are behind another's is still new data (generation_parts prefixes partitions by host)."""
    from analytics_api.limits.closed import PartsWatch
    from warehouse.queries.limits import Part

    day = 86_400_000

    def part(host, lo, hi, t0, level=1):
        return {f"{host}/all_{lo}_{hi}_{level}@1": Part(f"{host}/20261120", lo, hi, lo, t0, t0 + day, level, 1)}

    seen = part("ch1", 1, 50, 0) | part("ch2", 1, 3, day)
    watch = PartsWatch()
    watch.advance(seen, "t")
    assert watch.high == {"ch1": 50, "ch2": 3}
    # ch2 got blocks 4-5 and merged them with 1-3 before the job looked: level 1, blocks below ch1's 50
    merged = part("ch1", 1, 50, 0) | part("ch2", 1, 5, day)
    assert watch.dirty(merged, "t") == [(day, 2 * day)]
    # ch1's part does not cover ch2's (same partition id, another host)
    assert watch.dirty(part("ch1", 1, 50, 0), "t") == [(day, 2 * day)]
    assert PartsWatch.from_json(watch.to_json()) == watch
    # a snapshot written before cluster mode (one number) still loads
    old = PartsWatch.from_json('{"table": "t", "high": 7, "parts": {}}')
    assert old.high == {"": 7}


def test_cluster_mode_runs_on_a_one_shard_cluster_of_the_embedded_engine(tmp_path):
    """tests/cluster_emulation.py: chdb configured with a cluster of itself runs what cluster mode sends
    (without ON CLUSTER and replication, which need Keeper): the rewritten migrations, ingest's inserts and
    the API's reads through real Distributed tables, settle, the limits job's part watch and mutations,
    the lease, a limits job refresh. The analytics answers and the limit counters must equal the independent
    references', the analytics before and after settling."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from warehouse.migrate import discover

    script = Path(__file__).resolve().parent / "cluster_emulation.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["clusters"] == [["tg", 1]]
    assert out["applied"] == [m.path.name for m in discover()] and out["applied_again"] == []
    assert out["ddl_on_cluster"] > 40  # every DDL statement was sent ON CLUSTER
    statements = [s.strip() for m in discover() for s in m.statements()]
    dropped = {re.match(r"DROP TABLE (?:IF EXISTS )?(\w+)", s).group(1) for s in statements if s.startswith("DROP TABLE")}
    assert dropped == {"generations_daily", "feedback_traces"}  # 0015's copy; 0021's sums, replaced by 0022's
    tables = {re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", s).group(1) for s in statements if s.startswith("CREATE TABLE")} - dropped
    for table in tables | {"schema_migrations"}:
        assert out["engines"][table] == "Distributed", table
        assert out["engines"][f"{table}_local"].endswith("MergeTree"), table
    for table in dropped:
        assert table not in out["engines"] and f"{table}_local" not in out["engines"], table
    assert "cityHash64(organisation_id, workspace_slug, created_at, id)" in out["distributed_generations"]
    assert out["generations_local_ttl"] and out["generations_local_ttl_removed"]  # retention acts on the local table
    assert out["layout"] == "tg"
    # redelivered rows are stored twice and read once, through the Distributed table
    assert out["stored_raw"] > out["stored_final"] == out["expected"]
    assert out["requests"] >= 200
    assert out["mismatches_before_settle"] == []
    assert out["mismatches_after_settle"] == []
    assert out["parts_watch"] and all("/" in name for name in out["parts_watch"])  # host-qualified parts
    assert out["identity"]
    assert out["settled"] > 0 and out["unsettled_after"] == 0
    assert out["segments_left"] == 0  # the mutation ran on the local table
    assert out["lease"] == [True, False, "a"]
    limits = out["limits"]  # counters of a usage limit over 3 closed days and the live hour = the reference
    assert limits["closed_segments_computed"] > 0
    assert limits["got"] == pytest.approx(limits["expected"]) and len(limits["expected"]) == 4
    export = limits["export"]  # an on-demand export through the API: every selected id once
    assert export["same_ids"] and export["exported"] == export["distinct"] == export["expected"] == export["rows_written"]
    assert export["expected"] > 1000
