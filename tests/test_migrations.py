"""The migration runner: in order, once each, checksummed; and the retention TTL.

Each test runs in a ClickHouse database of its own inside the session's embedded
engine (one chdb engine path per process), so nothing here touches the tables the
other tests use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import migrations_before
from warehouse.migrate import MIGRATIONS_DIR, MigrationError, apply_retention, migrate

A_SQL = """-- the first table
CREATE TABLE IF NOT EXISTS mig_a
(
    id   UInt32,
    name String -- a trailing comment
)
ENGINE = MergeTree ORDER BY id;
"""

B_SQL = """-- two statements, each ended by `;` at the end of a line
CREATE TABLE IF NOT EXISTS mig_b (id UInt32, note String DEFAULT 'x;y') ENGINE = MergeTree ORDER BY id;
-- a comment between the statements; with a semicolon;
INSERT INTO mig_b (id) VALUES (1), (2);
"""

C_SQL = """CREATE TABLE IF NOT EXISTS mig_c (id UInt32) ENGINE = MergeTree ORDER BY id;
"""


@pytest.fixture
def db(empty_db):
    return empty_db


def tables(client) -> set[str]:
    return {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = currentDatabase()").result_rows}


def ledger(client) -> list[tuple[int, str, str]]:
    return [tuple(r) for r in client.query("SELECT version, name, checksum FROM schema_migrations ORDER BY version").result_rows]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mdir(tmp_path) -> Path:
    d = tmp_path / "migrations"
    d.mkdir()
    (d / "0001_a.sql").write_text(A_SQL)
    (d / "0002_b.sql").write_text(B_SQL)
    return d


def test_applies_in_order_once_each(db, mdir):
    assert migrate(db, directory=mdir) == ["0001_a.sql", "0002_b.sql"]
    assert {"mig_a", "mig_b", "schema_migrations"} <= tables(db)
    assert ledger(db) == [(1, "a", sha(mdir / "0001_a.sql")), (2, "b", sha(mdir / "0002_b.sql"))]
    # both statements of 0002 ran, and the `;` inside a string literal did not split it
    assert db.query("SELECT id, note FROM mig_b ORDER BY id").result_rows == [(1, "x;y"), (2, "x;y")]

    assert migrate(db, directory=mdir) == []  # a second run is a no-op
    assert db.command("SELECT count() FROM mig_b") == 2  # the INSERT did not run again
    assert len(ledger(db)) == 2


def test_edited_applied_migration_stops_the_run(db, mdir):
    migrate(db, directory=mdir)
    (mdir / "0002_b.sql").write_text(B_SQL.replace("(1), (2)", "(1), (2), (3)"))
    (mdir / "0003_c.sql").write_text(C_SQL)
    with pytest.raises(MigrationError) as err:
        migrate(db, directory=mdir)
    assert "0002_b.sql" in str(err.value)
    assert "mig_c" not in tables(db)  # nothing applied after the check failed
    assert len(ledger(db)) == 2


def test_new_migration_is_applied_alone(db, mdir):
    migrate(db, directory=mdir)
    (mdir / "0003_c.sql").write_text(C_SQL)
    assert migrate(db, directory=mdir) == ["0003_c.sql"]
    assert "mig_c" in tables(db)
    assert [v for v, _, _ in ledger(db)] == [1, 2, 3]
    assert ledger(db)[2] == (3, "c", sha(mdir / "0003_c.sql"))
    assert db.command("SELECT count() FROM mig_b") == 2


@pytest.mark.parametrize("bad_name", ["0004-dash.sql", "4_short.sql", "0004_Upper.sql", "abcd_x.sql", "0004_.sql"])
def test_badly_named_file_is_an_error(db, mdir, bad_name):
    (mdir / bad_name).write_text(C_SQL)
    with pytest.raises(MigrationError) as err:
        migrate(db, directory=mdir)
    assert bad_name in str(err.value)


def test_duplicate_numbers_are_an_error(db, mdir):
    (mdir / "0002_other.sql").write_text(C_SQL)
    with pytest.raises(MigrationError):
        migrate(db, directory=mdir)


# --------------------------------------------------------------------------- the real migrations


def test_real_tables_exist_in_the_session_warehouse(warehouse):
    names = tables(warehouse)
    assert {"generations", "feedback", "api_keys", "schema_migrations"} <= names
    shipped = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
    assert [f"{v:04d}_{n}.sql" for v, n, _ in ledger(warehouse)] == shipped
    assert all(c == sha(MIGRATIONS_DIR / f"{v:04d}_{n}.sql") for v, n, c in ledger(warehouse))


def _ddl(client) -> str:
    return client.command(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'generations'"
    )


def test_retention_sets_and_removes_the_ttl(db):
    applied = migrate(db)
    assert applied == sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
    assert {"generations", "feedback", "api_keys"} <= tables(db)
    assert " TTL " not in _ddl(db)

    apply_retention(db, 30)
    assert "toIntervalDay(30)" in _ddl(db)
    apply_retention(db, 30)  # idempotent
    assert "toIntervalDay(30)" in _ddl(db)
    apply_retention(db, 7)
    assert "toIntervalDay(7)" in _ddl(db) and "toIntervalDay(30)" not in _ddl(db)
    apply_retention(db, 0)
    assert " TTL " not in _ddl(db)
    apply_retention(db, 0)  # removing twice is fine
    assert " TTL " not in _ddl(db)

    # through migrate(): the setting is applied even when no file is pending
    assert migrate(db, retention_days=30) == []
    assert "toIntervalDay(30)" in _ddl(db)
    assert migrate(db, retention_days=0) == []
    assert " TTL " not in _ddl(db)


@pytest.mark.parametrize("cut_before", ["EXCHANGE TABLES", "DROP TABLE generations_daily", None],
                         ids=["during-copy", "after-swap", "before-ledger"])
def test_an_interrupted_daily_rebuild_resumes_to_the_daily_layout(db, tmp_path, cut_before):
    """docs/deploy.md: run `tollgate migrate` again after a failed run. 0015 copies generations into a
    daily-partitioned table and swaps the two; cut short anywhere, the re-run ends daily, rows kept once."""
    before = migrations_before(15, tmp_path / "before")
    migrate(db, directory=before)
    db.command("INSERT INTO generations (organisation_id, workspace_slug, id, created_at, is_success, response_status_code) "
               "VALUES ('o', 'w', 'a', '2026-11-01 00:00:00', 1, 200), ('o', 'w', 'b', '2026-11-02 00:00:00', 1, 200)")
    real = db.command

    def cut(sql, *args, **kwargs):  # the process dies at that statement (or, None: after the last, before the ledger row)
        if cut_before and sql.strip().startswith(cut_before):
            raise RuntimeError("interrupted")
        result = real(sql, *args, **kwargs)
        if cut_before is None and sql.strip().startswith("DROP TABLE generations_daily"):
            raise RuntimeError("interrupted")
        return result

    db.command = cut
    with pytest.raises(RuntimeError):
        migrate(db)
    db.command = real
    migrate(db)
    key = db.command("SELECT partition_key FROM system.tables WHERE database = currentDatabase() AND name = 'generations'")
    assert str(key).replace(" ", "") == "toDate(created_at)"
    assert db.command("SELECT count() FROM generations FINAL") == 2
    assert "generations_daily" not in tables(db)
    assert 15 in {v for v, _, _ in ledger(db)}


# --------------------------------------------------------------------------- upgrades through other commands


_OLD_WAREHOUSE = """
import sys
from pathlib import Path
from tollgate.settings import Settings
from warehouse.client import connect
from warehouse.migrate import migrate
c = connect(Settings().warehouse_dsn)
migrate(c, 30, directory=Path(sys.argv[1]), audit_retention_days=30)  # what `tollgate migrate` of a release before 0015 left
c.command("INSERT INTO generations (organisation_id, workspace_slug, id, created_at, is_success, response_status_code) "
          "VALUES ('o', 'w', 'a', now64(3), 1, 200)")
"""

_TTL = """
from tollgate.settings import Settings
from warehouse.client import connect
c = connect(Settings().warehouse_dsn)
print(c.command("SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'generations'"))
print(c.command("SELECT count() FROM generations FINAL"))
"""


def test_keys_create_on_an_old_warehouse_keeps_the_retention(tmp_path):
    """`tollgate keys create` applies pending migrations, as `tollgate migrate` does. On a warehouse of a
    release before 0015 that rebuild replaces generations with a table without a TTL; keys create must set
    TOLLGATE_RETENTION_DAYS again, or rows are kept forever until someone runs `tollgate migrate`."""
    import os
    import subprocess
    import sys

    before = migrations_before(15, tmp_path / "before")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_DATA_DIR=str(tmp_path / "data"), TOLLGATE_RETENTION_DAYS="30", TOLLGATE_AUDIT_RETENTION_DAYS="30")

    def run(*args):
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("-c", _OLD_WAREHOUSE, str(before))
    assert "toIntervalDay(30)" in run("-c", _TTL)  # the old release's retention
    run("-m", "tollgate.cli", "keys", "create", "--org", "o")
    ddl, count = run("-c", _TTL).strip().splitlines()[-2:]
    assert "toDate(created_at)" in ddl  # 0015 ran: the daily layout
    assert "toIntervalDay(30)" in ddl, ddl
    assert count == "1"
