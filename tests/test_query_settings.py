"""Read queries carry their settings in their text (warehouse.client.with_settings).

The settings change results (the NULL key of total rows, a measure named like a column,
exact FINAL reads), so each must reach the engine for the whole query, subqueries and
UNION branches included, and must not outlive the query on the shared client.
"""

from __future__ import annotations

import uuid

import pytest

from warehouse.client import with_settings
from warehouse.queries import limits
from warehouse.queries.analytics import FINAL_SETTINGS, read
from warehouse.queries.exports import DATA_CLIENT_SETTINGS


def _seen(warehouse, sql_of) -> list[dict[str, str]]:
    """Per result row: each FINAL_SETTINGS name → the value the engine reports inside a query built by ``sql_of``."""
    names = list(FINAL_SETTINGS)
    return read(warehouse, sql_of(", ".join(f"toString(getSetting('{n}')) AS {n}" for n in names)), {}).to_pylist()


def _expected(settings: dict) -> dict[str, str]:
    return {n: str(v) if n in NUMERIC else {1: "true", 0: "false"}[v] for n, v in settings.items()}


# The FINAL_SETTINGS that are numbers rather than booleans (getSetting returns booleans as true/false).
NUMERIC = {"merge_tree_max_rows_to_use_cache"}


@pytest.mark.parametrize("shape", ["plain", "subquery", "union"])
def test_analytics_settings_reach_every_part_of_the_query(warehouse, shape):
    sql_of = {
        "plain": lambda cols: f"SELECT {cols}",
        "subquery": lambda cols: f"SELECT * FROM (SELECT {cols})",
        "union": lambda cols: f"SELECT {cols} UNION ALL SELECT {cols}",
    }[shape]
    seen = _seen(warehouse, sql_of)
    assert seen == [_expected(FINAL_SETTINGS)] * (2 if shape == "union" else 1)


def test_settings_do_not_outlive_their_query(warehouse):
    read(warehouse, "SELECT 1", {})
    after = warehouse.query("SELECT toString(getSetting('group_by_use_nulls')), toString(getSetting('prefer_column_name_to_alias'))")
    assert after.result_rows == [("false", "false")]


def test_a_total_row_keeps_its_null_key(warehouse):
    """group_by_use_nulls (FINAL_SETTINGS): without it the total row's key would be '' like a real one."""
    table = read(warehouse, "SELECT toString(number % 2) AS key, count() AS n FROM numbers(5) GROUP BY GROUPING SETS ((key), ())", {})
    assert sorted(table.to_pylist(), key=lambda r: (r["key"] is not None, r["key"] or "")) == [
        {"key": None, "n": 5}, {"key": "0", "n": 3}, {"key": "1", "n": 2}]


def _plan(warehouse, table: str, settings: dict) -> str:
    sql = (f"EXPLAIN PLAN actions = 1 SELECT count() FROM {table} FINAL WHERE organisation_id = 'o' "
           "AND workspace_slug = 'w' AND created_at >= toDateTime64('2026-01-01 00:00:00', 3, 'UTC')")
    return "\n".join(row[0] for row in warehouse.query(with_settings(sql, settings)).result_rows)


@pytest.mark.parametrize("settings", [FINAL_SETTINGS, limits.SETTINGS, DATA_CLIENT_SETTINGS], ids=["analytics", "limits", "exports"])
def test_final_reads_have_no_prewhere_step(warehouse, settings):
    """optimize_move_to_prewhere_if_final = 0 (warehouse/queries/final.py), in analytics, usage
    limits and exports: under FINAL such a step holds only the scope's sorting-key conditions,
    which the primary key has already applied; each row would be tested twice. The same read
    with the setting on does get the step, so the plan shows it. (A table shaped like
    generations, with a row: an empty table's read is planned as nothing.)"""
    table = f"prewhere_{uuid.uuid4().hex[:8]}"
    warehouse.command(f"CREATE TABLE {table} (organisation_id LowCardinality(String), workspace_slug LowCardinality(String), "
                      "created_at DateTime64(3, 'UTC'), id String, cost Float64) "
                      "ENGINE = ReplacingMergeTree PARTITION BY toDate(created_at) ORDER BY (organisation_id, workspace_slug, created_at, id)")
    try:
        warehouse.command(f"INSERT INTO {table} VALUES ('o', 'w', '2026-06-01 00:00:00', 'a', 1)")
        without = _plan(warehouse, table, settings)
        assert "organisation_id" in without and "Prewhere" not in without
        assert "Prewhere" in _plan(warehouse, table, {**settings, "optimize_move_to_prewhere_if_final": 1})
    finally:
        warehouse.command(f"DROP TABLE IF EXISTS {table}")


def test_limits_settings_are_in_the_text():
    sql = with_settings("SELECT 1", limits.SETTINGS)
    assert sql == "SELECT 1 SETTINGS " + ", ".join(f"{k} = {v}" for k, v in limits.SETTINGS.items())


@pytest.mark.parametrize("settings", [
    {"max_threads; DROP TABLE x": 1},
    {"max_threads": "1; DROP TABLE x"},
    {"max_threads": "'a'"},
    {"max_threads": 1.5},
    {"max_threads": True},
    {"Max Threads": 1},
])
def test_anything_but_a_plain_setting_is_refused(settings):
    with pytest.raises(ValueError, match="setting"):
        with_settings("SELECT 1", settings)


def test_no_settings_leave_the_query_as_is():
    assert with_settings("SELECT 1", {}) == "SELECT 1"
