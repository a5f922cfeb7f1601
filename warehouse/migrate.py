"""Migration runner: applies ``migrations/NNNN_name.sql`` in order, once each.

Each applied file is recorded in ``schema_migrations`` with its SHA-256. Running
twice is a no-op; an applied file whose text changed stops the run (write a new
migration instead of editing an old one). After the files, the retention TTLs are
set from settings (not files, so changing one needs no new migration): of
``generations`` (and the metadata texts of 0023, the requests with feedback of 0025) from ``TOLLGATE_RETENTION_DAYS`` and of ``audit_logs`` from
``TOLLGATE_AUDIT_RETENTION_DAYS``.

With ``cluster`` (``TOLLGATE_CLICKHOUSE_CLUSTER``) every statement, the ledger's included,
is rewritten for that ClickHouse cluster first (``warehouse/cluster.py``): replicated
local tables and Distributed tables, ``ON CLUSTER``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

from warehouse.cluster import Layout, for_cluster

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY version
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def statements(self) -> list[str]:
        """Statements are separated by a ``;`` at the end of a line."""
        body = "\n".join(line for line in self.sql.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {directory}")
    return found


def applied(client: Client) -> dict[int, tuple[str, str]]:
    rows = client.query("SELECT version, name, checksum FROM schema_migrations ORDER BY version").result_rows
    return {int(v): (n, c) for v, n, c in rows}


def migrate(client: Client, retention_days: int | None = None, directory: Path = MIGRATIONS_DIR,
            audit_retention_days: int | None = None, cluster: str | None = None) -> list[str]:
    """Apply pending migrations (for ``cluster``, when given); return the names applied now."""
    database = client.command("SELECT currentDatabase()") if cluster else ""

    def run(statement: str) -> None:
        for sql in for_cluster(statement, cluster, database) if cluster else [statement]:
            client.command(sql)

    run(LEDGER_DDL)
    done = applied(client)
    files = discover(directory)
    for m in files:
        if m.version in done and done[m.version][1] != m.checksum:
            raise MigrationError(
                f"migration {m.path.name} was edited after it was applied "
                f"(recorded sha256 {done[m.version][1][:12]}…, file now {m.checksum[:12]}…); "
                "add a new migration instead"
            )
    newly: list[str] = []
    for m in files:
        if m.version in done:
            continue
        if m.version == 15:
            _resume_daily_rebuild(client, run, Layout(cluster))
        for statement in m.statements():
            run(statement)
        client.insert(
            "schema_migrations", [[m.version, m.name, m.checksum]], column_names=["version", "name", "checksum"]
        )
        newly.append(m.path.name)
    where = Layout(cluster)
    if retention_days is not None:
        apply_retention(client, retention_days, layout=where)
        # the texts of metadata pairs (0023) go with the last request that carries them
        apply_retention(client, retention_days, table="metadata_values", layout=where)
        # the copies of the requests whose trace has feedback (0025) go with the requests
        apply_retention(client, retention_days, table="feedback_generations", layout=where)
    if audit_retention_days is not None:
        apply_retention(client, audit_retention_days, table="audit_logs", layout=where)
    return newly


def _resume_daily_rebuild(client: Client, run, layout: Layout) -> None:
    """Migration 0015 copies ``generations`` into ``generations_daily`` and swaps the two. A run cut short
    after the swap leaves ``generations`` daily and ``generations_daily`` the old monthly table, whose rows
    are all in ``generations``: run again as it is, 0015 would copy the daily rows into that monthly table
    and swap it back in. Drop it first; 0015 then rebuilds from the daily table (the same layout again)."""
    def table(name: str) -> str:
        return str(client.command(
            "SELECT any(partition_key) FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            parameters={"t": layout.local(name)}))

    exists = int(client.command("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
                                parameters={"t": layout.local("generations_daily")}))
    if exists and table("generations").replace(" ", "") == "toDate(created_at)":
        run("DROP TABLE IF EXISTS generations_daily")


# table → its time column; the only tables a retention TTL is set on
RETENTION_COLUMNS = {"generations": "created_at", "metadata_values": "last_seen", "audit_logs": "timestamp",
                     "feedback_generations": "created_at"}


def apply_retention(client: Client, days: int, table: str = "generations", layout: Layout = Layout()) -> None:
    """Set (or remove, for 0) the row TTL of ``table`` without rewriting parts (of its local tables in cluster mode).
    Nothing for a table that does not exist (yet: migrations applied only up to before it)."""
    column = RETENTION_COLUMNS[table]
    target = layout.local(table)
    ddl = client.command(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": target},
    )
    if not str(ddl).strip():
        return
    wanted = f"toIntervalDay({int(days)})"
    has_ttl = " TTL " in str(ddl)
    if days == 0:
        if has_ttl:
            client.command(f"ALTER TABLE {target}{layout.on_cluster} REMOVE TTL")
        return
    if has_ttl and wanted in str(ddl):
        return
    ttl = f"toDateTime({column}) + {wanted}"
    if table == "metadata_values":
        # toDateTime() wraps around after 2106-02-07 (2150 → 2013, and so does adding days to it), where
        # requests may be dated up to 2200: a text's last_seen, the latest of its requests', would then
        # drop it before its requests of today. Its end is computed in DateTime64 and capped instead.
        ttl = f"toDateTime(least({column} + {wanted}, toDateTime64('2106-02-07 06:28:15', 3, 'UTC')))"
    client.command(
        f"ALTER TABLE {target}{layout.on_cluster} MODIFY TTL {ttl}",
        settings={"materialize_ttl_after_modify": 0},
    )
