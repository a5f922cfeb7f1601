"""The requests whose trace has feedback (``feedback_generations``, migration 0025).

Its invariant: every request whose (organisation, workspace, trace) has feedback is in the table,
whichever side arrives first, through both sinks, under redelivery, and after a failure between
a batch's insert and its copy. Expectations are computed here from the events; the reads of the
table are checked against the probe of ``generations`` (the cluster's way) and against the
analytics reference in tests/test_analytics.py."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing import Pipe

import orjson
import pytest

from conftest import migrations_before
from factories import gateway_log, iso
from ingest import sink as sink_module
from ingest.events import FEEDBACK, GENERATIONS
from ingest.sink import DirectSink, RemoteSink, SinkServer, insert_rows
from warehouse.filters import Filters, compile_where
from warehouse.queries import analytics as q
from warehouse.queries.scope import TenantScope

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _feedback(org: str, workspace: str, trace: str, value: int = 5, weight: float = 1.0) -> dict:
    return {"id": str(uuid.uuid4()), "organisation_id": org, "workspace_slug": workspace, "trace_id": trace,
            "value": value, "weight": weight, "created_at": iso(T0 + timedelta(days=2))}


def _requests(org: str, n: int, seed: int) -> list[dict]:
    """Requests in two workspaces on 40 traces (some without a trace), over three days."""
    rng = random.Random(seed)
    events = []
    for _ in range(n):
        trace = "" if rng.random() < 0.1 else f"t{rng.randrange(40)}"
        events.append(gateway_log(org, workspace=rng.choice(["w1", "w2"]), rng=rng, trace_id=trace,
                                  created_at=T0 + timedelta(milliseconds=rng.randrange(3 * 86_400_000))))
    return events


def _expected(requests: list[dict], feedback: list[dict]) -> set[str]:
    """The ids of the requests whose (organisation, workspace, trace) has feedback."""
    with_feedback = {(f["organisation_id"], f["workspace_slug"], f["trace_id"]) for f in feedback}
    return {r["metrics"]["id"] for r in requests
            if (r["organisation_id"], r["metrics"]["workspace_slug"], r["metrics"]["trace_id"]) in with_feedback}


def _copied(client, org: str) -> list[str]:
    """The ids in the table, read with FINAL (each once, however often it was copied)."""
    return sorted(r[0] for r in client.query("SELECT id FROM feedback_generations FINAL WHERE organisation_id = {o:String}",
                                             parameters={"o": org}).result_rows)


def _insert(client, codec, events: list[dict]) -> None:
    insert_rows(client, codec, [codec.encode(orjson.dumps(e)) for e in events])


def _feedback_on(org: str, rng: random.Random) -> list[dict]:
    """Feedback on 15 of the 40 traces, in one workspace each (its requests in the other do not count)."""
    return [_feedback(org, rng.choice(["w1", "w2"]), f"t{t}") for t in rng.sample(range(40), 15)]


@pytest.mark.parametrize("order", ["requests first", "feedback first", "interleaved"])
def test_every_request_with_feedback_is_copied_whatever_arrives_first(warehouse, org, order):
    rng = random.Random(order)
    requests, feedback = _requests(org, 400, seed=len(order)), _feedback_on(org, rng)
    if order == "requests first":
        _insert(warehouse, GENERATIONS, requests)
        _insert(warehouse, FEEDBACK, feedback)
    elif order == "feedback first":
        _insert(warehouse, FEEDBACK, feedback)
        _insert(warehouse, GENERATIONS, requests)
    else:
        for i in range(4):  # batches of both streams, alternating
            _insert(warehouse, GENERATIONS, requests[i * 100:(i + 1) * 100])
            _insert(warehouse, FEEDBACK, feedback[i * 4:(i + 1) * 4])
    expected = _expected(requests, feedback)
    assert 0 < len(expected) < len(requests)
    assert _copied(warehouse, org) == sorted(expected)


def test_redelivered_batches_are_copied_once(warehouse, org):
    rng = random.Random(3)
    requests, feedback = _requests(org, 300, seed=3), _feedback_on(org, rng)
    for _ in range(2):  # every batch of both streams delivered twice
        _insert(warehouse, FEEDBACK, feedback)
        _insert(warehouse, GENERATIONS, requests)
    assert _copied(warehouse, org) == sorted(_expected(requests, feedback))
    # and analytics counts each request once: requests_with_feedback equals the expected count
    where = compile_where(Filters(start=T0 - timedelta(days=1), end=T0 + timedelta(days=4)), TenantScope(org, "w1"))
    table, fb = q.grouped_split(warehouse, None, where, "model", ["requests"], total=True)
    total = [r for r in fb.to_pylist() if r["key"] is None][0]
    expected_w1 = [r for r in requests if r["metrics"]["id"] in _expected(requests, feedback)
                   and r["metrics"]["workspace_slug"] == "w1"]
    assert total["requests_with_feedback"] == len(expected_w1)


@pytest.mark.parametrize("sink_kind", ["remote, collected", "remote, parsed by the worker"])
def test_the_remote_sink_copies_too(base_settings, warehouse, org, tmp_path, sink_kind):
    """Through the process that owns chdb: the traces travel with the spool file (or are parsed
    from the rows by the worker when the caller did not collect them)."""
    rng = random.Random(sink_kind)
    requests, feedback = _requests(org, 300, seed=11), _feedback_on(org, rng)
    _insert(warehouse, FEEDBACK, feedback)
    worker_end, owner_end = Pipe()
    SinkServer(base_settings.warehouse_dsn, owner_end, "test").start()
    from ingest.events import BatchTraces
    traces, metadata = BatchTraces(), {}
    rows = [GENERATIONS.encode(orjson.dumps(e), metadata, traces) for e in requests]
    collected = sink_kind.endswith("collected")
    RemoteSink(worker_end, tmp_path)(GENERATIONS, rows, metadata, traces if collected else None)
    worker_end.close()
    assert _copied(warehouse, org) == sorted(_expected(requests, feedback))


def test_a_copy_that_fails_fails_the_batch_and_its_retry_copies(base_settings, warehouse, org, monkeypatch):
    """A failure between a batch's insert and its copy (a crash there) fails the batch: the
    ingest inserts it again (ClickHouse keeps one version) and copies it then."""
    rng = random.Random(5)
    requests, feedback = _requests(org, 300, seed=5), _feedback_on(org, rng)
    _insert(warehouse, FEEDBACK, feedback)
    real = sink_module.copy_batch
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("crash between the insert and the copy")
        return real(*args, **kwargs)

    monkeypatch.setattr(sink_module, "copy_batch", failing_once)
    sink = DirectSink(base_settings.warehouse_dsn)
    rows = [GENERATIONS.encode(orjson.dumps(e)) for e in requests]
    with pytest.raises(RuntimeError):
        sink(GENERATIONS, rows)
    assert _copied(warehouse, org) == []  # stored, not yet copied: the offsets stay uncommitted
    sink(GENERATIONS, rows)  # the retry of the same batch
    assert _copied(warehouse, org) == sorted(_expected(requests, feedback))
    stored = int(warehouse.command("SELECT count() FROM generations FINAL WHERE organisation_id = {o:String}",
                                   parameters={"o": org}))
    assert stored == len(requests)


def test_groups_read_from_the_copy_equal_the_probe_of_generations(warehouse, org):
    """The split read (groups, then their feedback columns from the copy) gives what the one query
    that probes every request gives (what a cluster reads), for every group key and with the total row."""
    rng = random.Random(9)
    requests, feedback = _requests(org, 400, seed=9), _feedback_on(org, rng)
    _insert(warehouse, GENERATIONS, requests[:200])
    _insert(warehouse, FEEDBACK, feedback)
    _insert(warehouse, GENERATIONS, requests[200:])
    import polars as pl
    from polars.testing import assert_frame_equal

    from analytics_api.metrics.groups import merge_feedback
    measures = ["requests", "cost", "users", "latency_q", "last_seen"]
    FB = ["requests_with_feedback", "feedbacks", "weighted_sum", "weight_sum"]  # 0 where a group has none (respond() fills)
    for workspace in ("w1", None):
        scope = TenantScope(org, workspace) if workspace else TenantScope(org)
        where = compile_where(Filters(start=T0 - timedelta(days=1), end=T0 + timedelta(days=4)), scope)
        for group in ("model", "status_code", "workspace"):
            one = pl.from_arrow(q.grouped(warehouse, where, group, measures, feedback=True, total=True))
            table, fb = q.grouped_split(warehouse, None, where, group, measures, total=True)
            split = merge_feedback(pl.from_arrow(table), fb).select(one.columns).with_columns(pl.col(FB).fill_null(0))
            key = pl.col("key").cast(pl.String)
            assert_frame_equal(one.with_columns(key).sort("key", nulls_last=True), split.with_columns(key).sort("key", nulls_last=True),
                               check_dtypes=False, rel_tol=1e-12)
        for key_name in ("env", "_user"):
            one = pl.from_arrow(q.grouped(warehouse, where, "metadata", ["requests"], metadata_key=key_name, feedback=True, total=False))
            table, fb = q.grouped_split(warehouse, None, where, "metadata", ["requests"], metadata_key=key_name, total=False)
            split = merge_feedback(pl.from_arrow(table), fb).select(one.columns).with_columns(pl.col(FB).fill_null(0))
            assert_frame_equal(one.sort("key"), split.sort("key"), check_dtypes=False, rel_tol=1e-12)


def test_migration_0025_copies_what_already_has_feedback(empty_db, tmp_path):
    """A warehouse written before 0022 (no per-trace sums, no copy): after the migrations, the
    copy holds exactly the requests whose trace has feedback."""
    from warehouse.migrate import migrate

    migrate(empty_db, directory=migrations_before(22, tmp_path / "before"))
    org = "org-upgrade"
    rng = random.Random(1)
    requests, feedback = _requests(org, 300, seed=1), _feedback_on(org, rng)
    for codec, events in ((GENERATIONS, requests), (FEEDBACK, feedback)):  # as a release before 0022 stored them
        empty_db.raw_insert(codec.table, column_names=codec.columns, fmt="JSONCompactEachRow",
                            insert_block=b"".join(codec.encode(orjson.dumps(e)) + b"\n" for e in events))
    assert "0025_feedback_generations.sql" in migrate(empty_db)
    assert _copied(empty_db, org) == sorted(_expected(requests, feedback))


def test_retention_and_settling_cover_the_copy(empty_db, tmp_path):
    """The copy goes with the requests: the same retention TTL, and the settle job merges its
    ended days into one part each (so FINAL has nothing to merge there), with nothing lost."""
    from warehouse.migrate import migrate
    from warehouse.settle import settle

    migrate(empty_db, retention_days=0)
    org = "org-settle"
    rng = random.Random(2)
    requests, feedback = _requests(org, 300, seed=2), _feedback_on(org, rng)
    for half in (requests[:150], requests[150:]):  # two batches: days with two parts each
        _insert(empty_db, GENERATIONS, half)
        _insert(empty_db, FEEDBACK, feedback)
    expected = sorted(_expected(requests, feedback))
    settle(empty_db, now=T0 + timedelta(days=5))
    parts = empty_db.query("SELECT partition_id, count() FROM system.parts WHERE database = currentDatabase() "
                           "AND table = 'feedback_generations' AND active GROUP BY partition_id").result_rows
    assert parts and all(n == 1 for _, n in parts), parts
    assert _copied(empty_db, org) == expected
    rows = int(empty_db.command("SELECT count() FROM feedback_generations WHERE organisation_id = {o:String}", parameters={"o": org}))
    assert rows == len(expected)  # merged: one row per request left, without FINAL
    migrate(empty_db, retention_days=30)  # the retention set on a running warehouse
    ddl = str(empty_db.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() "
                               "AND name = 'feedback_generations'"))
    assert "TTL toDateTime(created_at) + toIntervalDay(30)" in ddl
