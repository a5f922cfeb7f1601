"""Cluster mode (``TOLLGATE_CLICKHOUSE_CLUSTER``): the migrations' DDL rewritten for a ClickHouse cluster.

Migrations stay plain single-server SQL. With a cluster name, the migration runner passes
each statement through :func:`for_cluster`:

- ``CREATE TABLE x (…) ENGINE = <E>MergeTree(args) …`` becomes ``x_local`` ``ON CLUSTER``
  with ``Replicated<E>MergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}', args)``,
  plus ``x`` ``ON CLUSTER``, a ``Distributed`` table over ``x_local`` sharded by
  ``cityHash64(<the ORDER BY key>)``. Every row with the same sorting key (a redelivered
  event, a newer version of a control-plane row) lands on the same shard, so
  ReplacingMergeTree and ``FINAL`` (which Distributed runs on each shard) stay exact.
- ``ALTER TABLE x`` runs on ``x_local`` ``ON CLUSTER``; when it only changes columns it runs
  on the Distributed ``x`` as well (so both keep the same columns). Mixing column and other
  clauses in one ALTER is refused: write two statements.
- ``TRUNCATE`` and ``OPTIMIZE`` act on ``x_local`` ``ON CLUSTER``; ``EXCHANGE TABLES a AND b``
  exchanges ``a_local`` and ``b_local`` (the Distributed tables point at the local tables by
  name, so they then read the exchanged data; their columns must be the same); ``DROP
  TABLE x`` drops both.
- ``INSERT`` is unchanged: it goes through the Distributed table (sharded like ingest's).
- Anything else (views, ``CREATE … AS SELECT``, ``RENAME``) is refused with the statement.

Code keeps reading and inserting ``x`` (the Distributed table). What must name the local
tables at run time (settle's OPTIMIZE, the limits job's mutations and part watch, the
retention TTL) asks :func:`layout`, which reads it off the warehouse itself: ``generations``
is a Distributed table only in cluster mode. The cluster name is an identifier checked by
:func:`check_cluster_name`; no other input reaches the DDL.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

LOCAL = "_local"
REPLICA_ARGS = "'/clickhouse/tables/{uuid}/{shard}', '{replica}'"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COLUMN_CLAUSE = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT)\s+COLUMN\b", re.IGNORECASE)


class ClusterDDLError(ValueError):
    """A migration statement that cluster mode cannot rewrite."""


def check_cluster_name(name: str) -> str:
    if not _IDENT.match(name or ""):
        raise ValueError(f"cluster name {name!r}: letters, digits and '_' only, not starting with a digit")
    return name


# --------------------------------------------------------------------------- the layout the code reads


@dataclass(frozen=True)
class Layout:
    cluster: str | None = None

    def local(self, table: str) -> str:
        """The table that holds ``table``'s parts (the one to OPTIMIZE, ALTER, watch)."""
        return table + LOCAL if self.cluster else table

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER {self.cluster}" if self.cluster else ""

    @property
    def parts(self) -> str:
        """Where the active parts of a local table are listed: every replica's ``system.parts`` in cluster mode."""
        return f"clusterAllReplicas('{self.cluster}', system.parts)" if self.cluster else "system.parts"


# Read-after-write on replicated tables (the scheduler lease; feedback and the rewrite of its
# per-trace sums): a write returns once a majority of the shard's replicas has it, and a
# read sees every such write, whichever replica answers it.
CLUSTER_WRITE = {"insert_quorum": "auto", "insert_quorum_parallel": 0}
CLUSTER_READ = {"select_sequential_consistency": 1}

SINGLE = Layout()
_DISTRIBUTED = re.compile(r"^Distributed\(\s*'?([A-Za-z_][A-Za-z0-9_]*)'?\s*,")
_known: "weakref.WeakKeyDictionary[object, Layout]" = weakref.WeakKeyDictionary()


def layout(client) -> Layout:
    """The warehouse's layout: cluster mode when ``generations`` is a Distributed table (its cluster)."""
    if client in _known:
        return _known[client]
    rows = client.query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
                        "AND name = 'generations'").result_rows
    if not rows:
        return SINGLE  # not migrated yet: asked again next time
    match = _DISTRIBUTED.match(rows[0][0])
    found = Layout(match.group(1)) if match else SINGLE
    _known[client] = found
    return found


# --------------------------------------------------------------------------- DDL rewriting


def _scan(sql: str, start: int = 0):
    """(index, char, depth) of every character outside quotes and ``--`` comments, with the paren depth."""
    depth = 0
    quote = ""
    i = start
    while i < len(sql):
        ch = sql[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "'`\"":
            quote = ch
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
            continue
        else:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            yield i, ch, depth
        i += 1


def _closing(sql: str, open_at: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``open_at``."""
    for i, ch, depth in _scan(sql, open_at):
        if ch == ")" and depth == 0:
            return i
    raise ClusterDDLError(f"unbalanced parentheses: {sql[:80]!r}")


def _find_top(sql: str, pattern: str, start: int = 0) -> re.Match | None:
    """The first match of ``pattern`` that starts outside parentheses and quotes."""
    regex = re.compile(pattern, re.IGNORECASE)
    for i, _, depth in _scan(sql, start):
        if depth == 0 and sql[i] not in "()":
            m = regex.match(sql, i)
            if m and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                return m
    return None


def _split_top(text: str) -> list[str]:
    """``text`` split at commas outside parentheses and quotes."""
    parts, last = [], 0
    for i, ch, depth in _scan(text):
        if ch == "," and depth == 0:
            parts.append(text[last:i].strip())
            last = i + 1
    parts.append(text[last:].strip())
    return [p for p in parts if p]


_CREATE = re.compile(r"^CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?(\w+)\s*\(", re.IGNORECASE)
_ALTER = re.compile(r"^ALTER\s+TABLE\s+(\w+)\s+(.*)$", re.IGNORECASE | re.DOTALL)
_TRUNCATE = re.compile(r"^TRUNCATE\s+(TABLE\s+)?(IF\s+EXISTS\s+)?(\w+)\s*$", re.IGNORECASE)
_OPTIMIZE = re.compile(r"^OPTIMIZE\s+TABLE\s+(\w+)(\s+.*)?$", re.IGNORECASE | re.DOTALL)
_EXCHANGE = re.compile(r"^EXCHANGE\s+TABLES\s+(\w+)\s+AND\s+(\w+)\s*$", re.IGNORECASE)
_DROP = re.compile(r"^DROP\s+TABLE\s+(IF\s+EXISTS\s+)?(\w+)(\s+SYNC)?\s*$", re.IGNORECASE)
_INSERT = re.compile(r"^INSERT\s+INTO\s+", re.IGNORECASE)


def for_cluster(statement: str, cluster: str, database: str) -> list[str]:
    """The statements that do ``statement``'s work on ``cluster`` (tables in ``database``)."""
    check_cluster_name(cluster)
    if not _IDENT.match(database):
        raise ClusterDDLError(f"database name {database!r} is not a plain identifier")
    sql = statement.strip().rstrip(";").strip()
    on = f"ON CLUSTER {cluster}"
    if m := _CREATE.match(sql):
        return _create(sql, m, cluster, database)
    if m := _ALTER.match(sql):
        table, rest = m.group(1), m.group(2).strip()
        kinds = {bool(_COLUMN_CLAUSE.match(clause)) for clause in _split_top(rest)}
        if kinds == {True, False}:
            raise ClusterDDLError(f"ALTER TABLE {table}: column and other clauses in one statement; split it in two")
        local = f"ALTER TABLE {table}{LOCAL} {on} {rest}"
        return [local, f"ALTER TABLE {table} {on} {rest}"] if kinds == {True} else [local]
    if m := _TRUNCATE.match(sql):
        return [f"TRUNCATE TABLE {m.group(2) or ''}{m.group(3)}{LOCAL} {on}"]
    if m := _OPTIMIZE.match(sql):
        return [f"OPTIMIZE TABLE {m.group(1)}{LOCAL} {on}{m.group(2) or ''}"]
    if m := _EXCHANGE.match(sql):
        return [f"EXCHANGE TABLES {m.group(1)}{LOCAL} AND {m.group(2)}{LOCAL} {on}"]
    if m := _DROP.match(sql):
        if_exists, table, sync = m.group(1) or "", m.group(2), m.group(3) or ""
        return [f"DROP TABLE {if_exists}{table} {on}{sync}", f"DROP TABLE {if_exists}{table}{LOCAL} {on}{sync}"]
    if _INSERT.match(sql):
        return [sql]
    raise ClusterDDLError(f"cluster mode cannot rewrite this statement: {sql.splitlines()[0][:120]!r}")


def _create(sql: str, m: re.Match, cluster: str, database: str) -> list[str]:
    if_not_exists, table = m.group(1) or "", m.group(2)
    columns_end = _closing(sql, m.end() - 1)
    columns = sql[m.end() - 1:columns_end + 1]
    tail = sql[columns_end + 1:]
    engine = _find_top(tail, r"ENGINE\s*=\s*(\w+)")
    if not engine:
        raise ClusterDDLError(f"CREATE TABLE {table}: no ENGINE")
    name = engine.group(1)
    if not name.endswith("MergeTree") or name.startswith("Replicated"):
        raise ClusterDDLError(f"CREATE TABLE {table}: engine {name} (cluster mode takes a non-replicated *MergeTree)")
    after = engine.end()
    args = ""
    rest_at = after
    if after < len(tail) and tail[after] == "(":
        close = _closing(tail, after)
        args = tail[after + 1:close].strip()
        rest_at = close + 1
    rest = tail[rest_at:]
    order = _find_top(rest, r"ORDER\s+BY\s+")
    if not order:
        raise ClusterDDLError(f"CREATE TABLE {table}: no ORDER BY (the sharding key is its hash)")
    at = order.end()
    if rest[at] == "(":
        key = rest[at + 1:_closing(rest, at)].strip()
    else:
        key = re.match(r"[^\s]+", rest[at:]).group(0)
    if not key or key.lower() == "tuple()":
        raise ClusterDDLError(f"CREATE TABLE {table}: an empty ORDER BY cannot be a sharding key")
    engine_args = REPLICA_ARGS + (f", {args}" if args else "")
    local = (f"CREATE TABLE {if_not_exists}{table}{LOCAL} ON CLUSTER {cluster}\n{columns}\n"
             f"ENGINE = Replicated{name}({engine_args}){rest}")
    distributed = (f"CREATE TABLE {if_not_exists}{table} ON CLUSTER {cluster} AS {table}{LOCAL}\n"
                   f"ENGINE = Distributed('{cluster}', '{database}', '{table}{LOCAL}', cityHash64({key}))")
    return [local, distributed]
