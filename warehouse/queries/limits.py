"""Usage per value key for limit policies: the aggregate queries behind the counters.

One query answers every policy at once. The input is a list of *slots*: a policy's
counting rule (organisation, conditions, group_by, measure) over a time range
``[start, end)``. The live refresh has a slot per range a policy's closed segments
leave (its current hour; a sliding window's two edge hours); the closed segments have
one slot per (policy, day or hour). ClickHouse does the work in two steps, never
returning rows; it reads only the union of the slot ranges:

1. **Per shape.** A policy's *shape* is the sorted set of dimension keys it reads
   (its condition keys and group_by keys). Each generation of an organisation with
   policies is aggregated once per shape used in its organisation: the dimension
   values of the shape, the *segment* of its ``created_at`` (how many cut points are
   at or before it; the cut points are every slot start and end and every reset
   instant, so a segment lies entirely inside or outside any slot), and the sums of
   cost (cents), total_units and requests. ``FINAL``: a redelivered event counts once.
2. **Per slot.** Those groups are joined to the slots on (organisation, shape,
   segment); a slot keeps the groups whose dimension values satisfy its conditions
   and which have a non-empty value for each group_by key, builds the value key and
   sums its measure. A value key reset inside the slot's range only counts segments
   from the reset instant on; one reset at or after the slot's end excludes it.

Everything the user chose is either an allow-listed identifier (the dimension keys
below; metadata keys are bound parameters) or a bound parameter. Timestamps are
epoch milliseconds (UTC).

Value keys: ``key:value`` per group_by key, in the policy's order, joined by ``|``;
in values ``\\`` and ``|`` are escaped with a backslash (``metadata.team:a\\|b``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from warehouse.client import with_settings
from warehouse.cluster import layout
from warehouse.queries.final import FINAL_READ

# Condition and group_by keys → their expression over `generations` (metadata keys: see _dimension).
DIMENSIONS: dict[str, str] = {
    "api_key": "CAST(api_key_id AS String)",
    "workspace_id": "CAST(workspace_slug AS String)",
    "organisation_id": "CAST(organisation_id AS String)",
    "metadata._user": "CAST(metadata_user AS String)",  # materialized column (0004): cheaper than the arrays
}
METADATA_PREFIX = "metadata."
MEASURES = ("cost", "tokens", "requests")
# A segment index beyond every real one: "this value key was reset after the slot ended".
EXCLUDED = 4_294_967_295

SETTINGS = dict(FINAL_READ)  # warehouse/queries/final.py


def is_dimension(key: str) -> bool:
    return key in DIMENSIONS or (key.startswith(METADATA_PREFIX) and len(key) > len(METADATA_PREFIX))


@dataclass(frozen=True)
class Slot:
    """One policy's counting rule over ``[start_ms, end_ms)`` (``end_ms`` None: no end)."""

    organisation_id: str
    conditions: tuple[tuple[str, str], ...]
    group_by: tuple[str, ...]
    measure: str
    start_ms: int
    end_ms: int | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(sorted({k for k, _ in self.conditions} | set(self.group_by)))


@dataclass(frozen=True)
class Reset:
    """Value key ``value_key`` of slot ``slot`` counts from ``at_ms`` on."""

    slot: int
    value_key: str
    at_ms: int


@dataclass
class Plan:
    """The SQL (a SELECT producing ``slot, value_key, usage``) and its parameters."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    empty: bool = False


def escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|")


def value_key(pairs: Iterable[tuple[str, str]]) -> str:
    """The value key of group_by ``(key, value)`` pairs (the same text the SQL builds)."""
    return "|".join(f"{k}:{escape_value(v)}" for k, v in pairs)


def split_value_key(text: str) -> list[tuple[str, str]]:
    """Inverse of :func:`value_key`; ValueError when ``text`` is not one."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in "\\|":
                raise ValueError("a backslash in a value key escapes only `\\` or `|`")
            current.append(text[i + 1])
            i += 2
            continue
        if ch == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    out = []
    for part in parts:
        key, sep, value = part.partition(":")
        if not sep:
            raise ValueError(f"`{part}` is not `key:value`")
        out.append((key, value))
    return out


def _sql_escape(expr: str) -> str:
    return f"replaceAll(replaceAll({expr}, '\\\\', '\\\\\\\\'), '|', '\\\\|')"


def plan(slots: list[Slot], resets: list[Reset] = ()) -> Plan:
    """The query counting every slot; its rows are ``(slot UInt32, value_key String, usage Float64)``."""
    if not slots:
        return Plan("", empty=True)
    params: dict[str, Any] = {}

    # dimension columns: allow-listed expressions, metadata keys as bound parameters
    dim_col: dict[str, str] = {}
    dim_sql: list[str] = []

    def dimension(key: str) -> str:
        if key not in dim_col:
            col = f"d{len(dim_col)}"
            if key in DIMENSIONS:
                expr = DIMENSIONS[key]
            elif is_dimension(key):
                params[f"{col}_key"] = key[len(METADATA_PREFIX):]
                expr = f"metadata.value[indexOf(metadata.key, {{{col}_key:String}})]"
            else:
                raise ValueError(f"not a policy key: {key!r}")
            dim_col[key] = col
            dim_sql.append(f"{expr} AS {col}")
        return dim_col[key]

    # shape: (condition keys, group_by keys); slots of one shape are joined on their condition values
    shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}
    shape_orgs: list[set[str]] = []
    for s in slots:
        if s.measure not in MEASURES:
            raise ValueError(f"unknown measure {s.measure!r}")
        if len({k for k, _ in s.conditions}) != len(s.conditions) or len(set(s.group_by)) != len(s.group_by) or not s.group_by:
            raise ValueError("condition keys and group_by keys must be distinct; group_by must not be empty")
        shape = _shape(s)
        if shape not in shapes:
            shapes[shape] = len(shapes)
            shape_orgs.append(set())
        shape_orgs[shapes[shape]].add(s.organisation_id)
        for k in (*shape[0], *shape[1]):
            dimension(k)
    n_cond = max(len(c) for c, _ in shapes)

    # cut points: every slot boundary and reset instant; segment = number of cut points <= created_at
    cuts = sorted({s.start_ms for s in slots} | {s.end_ms for s in slots if s.end_ms is not None}
                  | {r.at_ms for r in resets})
    top = len(cuts) + 1  # one past the last segment

    def seg(ms: int) -> int:
        return bisect.bisect_right(cuts, ms)

    # one row per (slot, segment it covers): slot, organisation, shape, segment, condition values, measure
    pairs: dict[str, list] = {name: [] for name in ("slot", "org", "shape", "seg", "measure", *(f"c{j}" for j in range(n_cond)))}
    for i, s in enumerate(slots):
        shape = _shape(s)
        values = [v for _, v in sorted(s.conditions)] + [""] * (n_cond - len(s.conditions))
        for g in range(seg(s.start_ms), seg(s.end_ms) if s.end_ms is not None else top):
            pairs["slot"].append(i)
            pairs["org"].append(s.organisation_id)
            pairs["shape"].append(shapes[shape])
            pairs["seg"].append(g)
            pairs["measure"].append(MEASURES.index(s.measure))
            for j in range(n_cond):
                pairs[f"c{j}"].append(values[j])

    reset_keys, reset_segs = [], []
    for r in resets:
        s = slots[r.slot]
        if r.at_ms <= s.start_ms:
            continue
        reset_keys.append(f"{r.slot}:{r.value_key}")
        reset_segs.append(EXCLUDED if s.end_ms is not None and r.at_ms >= s.end_ms else seg(r.at_ms))

    # a row is only expanded into the shapes that have a slot covering its segment (in the live query,
    # usage shapes start at the current hour, a sliding window's a day earlier)
    shape_first = [top] * len(shapes)
    for i, s in enumerate(slots):
        k = shapes[_shape(s)]
        shape_first[k] = min(shape_first[k], seg(s.start_ms))
    params.update(cuts=cuts, orgs=sorted({s.organisation_id for s in slots}),
                  shape_orgs=[sorted(o) for o in shape_orgs], shape_first=shape_first,
                  reset_keys=reset_keys, reset_segs=reset_segs)
    # read only the rows some slot counts: the union of the slot ranges (a sliding window's closed
    # hours in the middle, say, are not read at all)
    ranges: list[list] = []
    for lo, hi in sorted(((s.start_ms, s.end_ms) for s in slots), key=lambda r: (r[0], r[1] is None, r[1] or 0)):
        if ranges and (ranges[-1][1] is None or lo <= ranges[-1][1]):
            ranges[-1][1] = None if hi is None or ranges[-1][1] is None else max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    terms = []
    for i, (lo, hi) in enumerate(ranges):
        params[f"lo{i}"] = lo
        term = f"created_at >= fromUnixTimestamp64Milli({{lo{i}:Int64}}, 'UTC')"
        if hi is not None:
            params[f"hi{i}"] = hi
            term += f" AND created_at < fromUnixTimestamp64Milli({{hi{i}:Int64}}, 'UTC')"
        terms.append(f"({term})")
    time_filter = f"({' OR '.join(terms)})"

    def per_shape(render) -> str:
        branches = [(idx, render(shape)) for shape, idx in shapes.items()]
        if len(branches) == 1:
            return branches[0][1]
        return "multiIf(" + ", ".join(f"shape = {idx}, {expr}" for idx, expr in branches[:-1]) + f", {branches[-1][1]})"

    n_group = max(len(g) for _, g in shapes)
    cond_cols = [
        per_shape(lambda shape, j=j: dim_col[shape[0][j]] if j < len(shape[0]) else "''") + f" AS c{j}"
        for j in range(n_cond)
    ]
    group_cols = [
        per_shape(lambda shape, j=j: dim_col[shape[1][j]] if j < len(shape[1]) else "''") + f" AS g{j}"
        for j in range(n_group)
    ]
    grouped = per_shape(lambda shape: " AND ".join(f"{dim_col[k]} != ''" for k in shape[1]))
    rows = (
        f"SELECT organisation_id AS org, {', '.join(dim_sql)}, "
        "toUInt32(arrayCount(x -> x <= toUnixTimestamp64Milli(created_at), {cuts:Array(Int64)})) AS seg, "
        "ifNull(cost, 0) AS cost_c, total_units AS tokens_c "
        f"FROM generations FINAL WHERE organisation_id IN {{orgs:Array(String)}} AND {time_filter}"
    )
    keys = ", ".join([*(f"c{j}" for j in range(n_cond)), *(f"g{j}" for j in range(n_group))])
    stage1 = (
        f"SELECT org, shape, seg, {', '.join(cond_cols + group_cols)}, "
        "sum(cost_c) AS cost, sum(tokens_c) AS tokens, count() AS requests "
        f"FROM ({rows}) "
        "ARRAY JOIN arrayFilter(i -> seg >= {shape_first:Array(UInt32)}[i + 1] "
        "AND has({shape_orgs:Array(Array(String))}[i + 1], org), "
        f"range(toUInt32({len(shapes)}))) AS shape "
        f"WHERE {grouped} "
        f"GROUP BY org, shape, seg, {keys}"
    )
    # the value key is built per (slot, group), after the join: far fewer rows than generations
    # Key names (a metadata name is user text) are bound parameters, never SQL literals.
    key_params: dict[str, str] = {}

    def key_label(k: str) -> str:
        name = key_params.setdefault(f"{k}:", f"vk{len(key_params)}")
        params[name] = f"{k}:"
        return f"{{{name}:String}}"

    vkey = per_shape(lambda shape: "concat(" + ", '|', ".join(
        f"{key_label(k)}, {_sql_escape(f'g.g{j}')}" for j, k in enumerate(shape[1])) + ")").replace("shape =", "g.shape =")
    types = {"slot": "UInt32", "org": "String", "shape": "UInt32", "seg": "UInt32", "measure": "UInt8",
             **{f"c{j}": "String" for j in range(n_cond)}}
    names = list(pairs)
    for name in names:
        params[f"p_{name}"] = pairs[name]
    zipped = ", ".join(f"{{p_{n}:Array({types[n]})}}" for n in names)
    slot_table = (
        "SELECT " + ", ".join(f"tupleElement(t, {k + 1}) AS {n}" for k, n in enumerate(names))
        + f" FROM (SELECT arrayJoin(arrayZip({zipped})) AS t)"
    )
    on = " AND ".join(f"g.{n} = s.{n}" for n in ("org", "shape", "seg", *(f"c{j}" for j in range(n_cond))))
    sql = (
        f"SELECT s.slot AS slot, {vkey} AS value_key, "
        "sum(multiIf(s.measure = 0, g.cost, s.measure = 1, toFloat64(g.tokens), toFloat64(g.requests))) AS usage "
        f"FROM ({stage1}) AS g INNER JOIN ({slot_table}) AS s ON {on} "
        "WHERE g.seg >= transform(concat(toString(s.slot), ':', value_key), {reset_keys:Array(String)}, "
        "{reset_segs:Array(UInt32)}, toUInt32(0)) "
        "GROUP BY slot, value_key"
    )
    return Plan(sql, params)


def _shape(s: Slot) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(k for k, _ in s.conditions)), tuple(s.group_by)


def usage(client: Client, slots: list[Slot], resets: list[Reset] = ()) -> pa.Table:
    """``slot, value_key, usage`` of every slot (value keys without usage are absent)."""
    p = plan(slots, resets)
    if p.empty:
        return pa.table({"slot": pa.array([], pa.uint32()), "value_key": pa.array([], pa.string()),
                         "usage": pa.array([], pa.float64())})
    return client.query_arrow(with_settings(p.sql, SETTINGS), parameters=p.params)


# --------------------------------------------------------------------------- the parts of `generations`


@dataclass(frozen=True)
class Part:
    partition: str
    min_block: int
    max_block: int
    data_version: int
    min_ms: int  # the part's earliest created_at, whole seconds (system.parts.min_time)
    max_ms: int  # one second past its latest created_at
    level: int = 0  # 0: written by an insert; > 0: by a merge
    written: int = 0  # modification time (seconds): with the name, tells a part from an earlier one of the same name


def generations_identity(client: Client) -> str:
    """What identifies the storage of ``generations`` (its local tables in cluster mode): its UUID, or (no
    UUID, as in chdb) its data paths. A rebuild (``EXCHANGE TABLES``, a drop and create) changes it; block
    numbers then start again."""
    rows = client.query(
        "SELECT toString(uuid), arrayStringConcat(data_paths, ',') FROM system.tables "
        "WHERE database = currentDatabase() AND name = {t:String}", parameters={"t": layout(client).local("generations")}
    ).result_rows
    if not rows:
        return ""
    uuid_, paths = rows[0]
    return uuid_ if uuid_ != "00000000-0000-0000-0000-000000000000" else paths


def generation_parts(client: Client) -> dict[str, Part]:
    """The active parts of ``generations`` (by ``name@modification time``): what closed segments are computed from.
    In cluster mode those of ``generations_local`` on every replica, name and partition prefixed by its host
    (each shard numbers its blocks itself)."""
    where = layout(client)
    host = "concat(hostName(), '/')" if where.cluster else "''"
    rows = client.query(
        f"SELECT {host} AS host, name, partition_id, min_block_number, max_block_number, data_version, "
        "toUnixTimestamp(min_time), toUnixTimestamp(max_time), level, toUnixTimestamp(modification_time) "
        f"FROM {where.parts} WHERE database = {{db:String}} AND table = {{t:String}} AND active",
        parameters={"db": client.command("SELECT currentDatabase()"), "t": where.local("generations")},
    ).result_rows
    return {f"{h}{name}@{int(at)}": Part(h + part, int(lo), int(hi), int(dv), int(t0) * 1000, (int(t1) + 1) * 1000,
                                         int(lv), int(at))
            for h, name, part, lo, hi, dv, t0, t1, lv, at in rows}


# --------------------------------------------------------------------------- closed segments


def insert_segment_usage(client: Client, slots: list[Slot], resets: list[Reset], policy_ids: list[str], version: int) -> None:
    """Count ``slots`` (slot i: policy ``policy_ids[i]`` over the segment [start, end)) into ``limit_segment_usage``."""
    p = plan(slots, resets)
    if p.empty:
        return
    p.params.update(m_pid=policy_ids, m_start=[s.start_ms for s in slots], m_end=[s.end_ms for s in slots],
                    m_version=version)
    client.command(
        "INSERT INTO limit_segment_usage (policy_id, start, end, version, value_key, usage) "
        "SELECT {m_pid:Array(String)}[slot + 1], fromUnixTimestamp64Milli({m_start:Array(Int64)}[slot + 1], 'UTC'), "
        "fromUnixTimestamp64Milli({m_end:Array(Int64)}[slot + 1], 'UTC'), "
        f"{{m_version:UInt64}}, value_key, usage FROM ({p.sql})",
        parameters=p.params, settings=SETTINGS,
    )


def _rows(prefix: str, columns: dict[str, tuple[str, list]], params: dict[str, Any]) -> str:
    """A subquery with one row per element of ``columns`` (name → (ClickHouse type, values), all of one length),
    bound as one parameter per column: numbers as one comma-separated String (a long array literal takes
    ClickHouse far longer to parse), strings as their distinct values plus each row's position among them."""
    arrays = []
    for i, (type_, values) in enumerate(columns.values()):
        key = f"{prefix}{i}"
        if type_ == "String":
            pos: dict[str, int] = {}
            params[key] = ",".join(str(pos.setdefault(v, len(pos) + 1)) for v in values)
            params[f"{key}_d"] = list(pos)
            arrays.append(f"arrayMap(x -> {{{key}_d:Array(String)}}[toUInt32(x)], splitByChar(',', {{{key}:String}}))")
        else:
            params[key] = ",".join(map(str, values))
            arrays.append(f"arrayMap(x -> to{type_}(x), splitByChar(',', {{{key}:String}}))")
    names = list(columns)
    return ("SELECT " + ", ".join(f"tupleElement(t, {j + 1}) AS {n}" for j, n in enumerate(names))
            + f" FROM (SELECT arrayJoin(arrayZip({', '.join(arrays)})) AS t)")


def insert_segment_index(client: Client, rows: list[tuple[str, int, int, int, int]], computed_at_ms: int) -> None:
    """Index rows ``(policy_id, start_ms, end_ms, version, cuts_hash)``."""
    if not rows:
        return
    params: dict[str, Any] = {"at": computed_at_ms}
    types = {"p": "String", "a": "Int64", "b": "Int64", "v": "UInt64", "h": "UInt64"}
    listed = _rows("r", {n: (t, [r[i] for r in rows]) for i, (n, t) in enumerate(types.items())}, params)
    client.command(
        "INSERT INTO limit_segments (policy_id, start, end, version, cuts_hash, computed_at) "
        "SELECT p, fromUnixTimestamp64Milli(a, 'UTC'), fromUnixTimestamp64Milli(b, 'UTC'), v, h, "
        f"fromUnixTimestamp64Milli({{at:Int64}}, 'UTC') FROM ({listed})",
        parameters=params,
    )


def load_segment_index(client: Client) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(policy_id, start_ms, end_ms) → (version, cuts_hash) of the current version of every closed segment."""
    rows = client.query(
        "SELECT policy_id, toUnixTimestamp64Milli(start), toUnixTimestamp64Milli(end), version, cuts_hash "
        "FROM limit_segments FINAL"
    ).result_rows
    return {(p, int(a), int(b)): (int(v), int(h)) for p, a, b, v, h in rows}


def _segments_sql(prefix: str, segments: list[tuple], params: dict[str, Any], sign: bool = False) -> str:
    """A subquery of segment versions ``(policy_id, start_ms, end_ms, version[, sign])``: policy_id, start, end,
    version (and sign, ±1)."""
    columns = {"policy_id": ("String", [x[0] for x in segments]), "a": ("Int64", [x[1] for x in segments]),
               "b": ("Int64", [x[2] for x in segments]), "version": ("UInt64", [x[3] for x in segments])}
    if sign:
        columns["sign"] = ("Int8", [1 if x[4] > 0 else -1 for x in segments])
    return ("SELECT policy_id, fromUnixTimestamp64Milli(a, 'UTC') AS start, fromUnixTimestamp64Milli(b, 'UTC') AS end, "
            f"version{', sign' if sign else ''} FROM ({_rows(prefix, columns, params)})")


def segment_sums(client: Client, entries: list[tuple[str, int, int, int, int]], resets: list[tuple[str, str, int]]) -> pa.Table:
    """Σ sign × usage per (policy_id, value_key) over segment versions ``(policy_id, start, end, version, sign)``,
    and ``n``, Σ sign × (rows): a key whose ``n`` nets to 0 has no segment row left.

    ``resets`` ``(policy_id, value_key, at_ms)``: that key only counts segments ending after ``at_ms`` (the
    segment holding the reset was itself computed from the reset instant)."""
    if not entries:
        return pa.table({"policy_id": pa.array([], pa.string()), "value_key": pa.array([], pa.string()),
                         "usage": pa.array([], pa.float64()), "n": pa.array([], pa.int64())})
    params: dict[str, Any] = {"rk": [f"{p}:{v}" for p, v, _ in resets], "rat": [a for _, _, a in resets]}
    listed = _segments_sql("e", entries, params, sign=True)
    # the IN reads only the listed segments (primary key); the join (a hash table) brings each one's sign
    return client.query_arrow(
        "SELECT u.policy_id AS policy_id, u.value_key AS value_key, sum(e.sign * u.usage) AS usage, "
        "sum(toInt64(e.sign)) AS n "
        "FROM (SELECT policy_id, start, end, version, value_key, usage FROM limit_segment_usage "
        f"      WHERE (policy_id, start, end, version) IN (SELECT policy_id, start, end, version FROM ({listed}))) AS u "
        f"INNER JOIN ({listed}) AS e "
        "ON u.policy_id = e.policy_id AND u.start = e.start AND u.end = e.end AND u.version = e.version "
        "WHERE toUnixTimestamp64Milli(u.end) > transform(concat(u.policy_id, ':', u.value_key), {rk:Array(String)}, "
        "{rat:Array(Int64)}, toInt64(-1)) "
        "GROUP BY policy_id, value_key",
        parameters=params,
    )


def delete_stale_segments(client: Client, keep: list[tuple[str, int, int, int]], cutoff: int,
                          organisations: list[str] | None = None) -> None:
    """Drop segment rows (of policies of ``organisations``, or of all) older than version ``cutoff`` that are not
    a current version in ``keep`` ``(policy_id, start_ms, end_ms, version)``: superseded versions, segments
    outside every window, archived policies. A lightweight delete (waited for: the job runs it on a thread of its own).
    Rows of a version ≥ ``cutoff`` (computed after ``keep`` was taken) are never touched."""
    scope = "version < {cutoff:UInt64} AND " + ("" if organisations is None else (
        "policy_id IN (SELECT id FROM limit_policies WHERE organisation_id IN {orgs:Array(String)}) AND "))
    params: dict[str, Any] = {"cutoff": cutoff}
    if organisations is not None:
        params["orgs"] = organisations
    kept = _segments_sql("k", keep, params) if keep else None
    # cluster mode: the delete runs on the local tables ON CLUSTER; its subquery reads the Distributed
    # limit_policies, which ClickHouse calls nondeterministic for a replicated table (policies only grow).
    layout_ = layout(client)
    settings = {"mutations_sync": 1, **({"allow_nondeterministic_mutations": 1} if layout_.cluster else {})}
    for table, columns in (("limit_segment_usage", "policy_id, start, end, version"), ("limit_segments", "policy_id, start, end")):
        where = f"{scope}({columns}) NOT IN (SELECT {columns} FROM ({kept}))" if kept else scope.removesuffix(" AND ")
        # a lightweight delete only masks the rows (a mutation would rewrite every part of the table: seconds of
        # CPU next to the refreshes); merges drop them later
        client.command(f"DELETE FROM {layout_.local(table)}{layout_.on_cluster} WHERE {where}",
                       parameters=params, settings=settings)


# --------------------------------------------------------------------------- job state

def get_job_state(client: Client, name: str) -> str | None:
    rows = client.query("SELECT value FROM limit_job_state FINAL WHERE name = {n:String}", parameters={"n": name}).result_rows
    return rows[0][0] if rows else None


def put_job_state(client: Client, name: str, value: str, version: int) -> None:
    client.insert("limit_job_state", [[name, value, version]], column_names=["name", "value", "version"])


# --------------------------------------------------------------------------- counters

COUNTER_COLUMNS = ["policy_id", "kind", "organisation_id", "value_key", "entity_id", "window_start", "window_end",
                   "current_usage", "status", "threshold_alert_sent", "exhausted_alert_sent", "updated_at", "version"]


def write_counters(client: Client, table: pa.Table) -> None:
    """Insert counter rows (``COUNTER_COLUMNS``; times as epoch ms, ``window_end`` null when open)."""
    if table.num_rows == 0:
        return
    ts = pa.timestamp("ms", tz="UTC")
    client.insert_arrow("limit_counters", pa.table({
        "policy_id": table["policy_id"], "kind": table["kind"], "organisation_id": table["organisation_id"],
        "value_key": table["value_key"], "entity_id": table["entity_id"],
        "window_start": table["window_start"].cast(pa.int64()).cast(ts),
        "window_end": table["window_end"].cast(pa.int64()).cast(ts),
        "current_usage": table["current_usage"].cast(pa.float64()), "status": table["status"],
        "threshold_alert_sent": table["threshold_alert_sent"], "exhausted_alert_sent": table["exhausted_alert_sent"],
        "updated_at": table["updated_at"].cast(pa.int64()).cast(ts), "version": table["version"].cast(pa.uint64()),
    }))


def _org_scope(organisations: list[str] | None) -> tuple[str, dict | None]:
    if organisations is None:
        return "", None
    return "WHERE organisation_id IN {orgs:Array(String)}", {"orgs": organisations}


def load_counters(client: Client, organisations: list[str] | None = None) -> pa.Table:
    """The latest counter of every value key (of policies of ``organisations``, or of all); times as epoch ms."""
    where, params = _org_scope(organisations)
    return client.query_arrow(
        "SELECT policy_id, kind, organisation_id, value_key, entity_id, toUnixTimestamp64Milli(window_start) AS window_start, "
        "toUnixTimestamp64Milli(window_end) AS window_end, current_usage, status, threshold_alert_sent, "
        f"exhausted_alert_sent FROM limit_counters FINAL {where}",
        parameters=params,
    )


# --------------------------------------------------------------------------- alerts and the state feed


def _rows_table(rows: list[dict], columns: list[str], types: dict[str, pa.DataType], ms_columns: tuple[str, ...]) -> pa.Table:
    """Dict rows → an Arrow table of ``columns``: ``ms_columns`` (epoch ms) as UTC timestamps, the others
    typed by ``types`` (default string)."""
    ts = pa.timestamp("ms", tz="UTC")
    return pa.table({
        c: (pa.array([r[c] for r in rows], pa.int64()).cast(ts) if c in ms_columns
            else pa.array([r[c] for r in rows], types.get(c, pa.string())))
        for c in columns
    })

ALERT_COLUMNS = ["policy_id", "value_key", "alert_window", "kind", "alert_id", "organisation_id", "payload", "state",
                 "topic_offsets", "created_at", "version"]


def write_alerts(client: Client, rows: list[dict]) -> None:
    """Alert rows (``ALERT_COLUMNS``; ``alert_window``/``created_at`` as epoch ms)."""
    if not rows:
        return
    client.insert_arrow("limit_alerts", _rows_table(rows, ALERT_COLUMNS, {"version": pa.uint64()},
                                                    ms_columns=("alert_window", "created_at")))


def load_alerts(client: Client, organisations: list[str] | None = None) -> list[dict]:
    """The latest state of every decided alert (times as epoch ms)."""
    where, params = _org_scope(organisations)
    rows = client.query(
        "SELECT policy_id, value_key, toUnixTimestamp64Milli(alert_window), kind, alert_id, organisation_id, payload, "
        f"state, topic_offsets, toUnixTimestamp64Milli(created_at), version FROM limit_alerts FINAL {where}",
        parameters=params,
    ).result_rows
    return [dict(zip(ALERT_COLUMNS, r)) for r in rows]


STATE_COLUMNS = ["policy_id", "value_key", "organisation_id", "record", "signature", "published", "updated_at", "version"]


def write_state(client: Client, rows: list[dict]) -> None:
    """State-feed rows (``STATE_COLUMNS``; ``updated_at`` as epoch ms; ``record`` '' = tombstone)."""
    if not rows:
        return
    client.insert_arrow("limit_state", _rows_table(rows, STATE_COLUMNS, {"published": pa.bool_(), "version": pa.uint64()},
                                                   ms_columns=("updated_at",)))


def load_state(client: Client, organisations: list[str] | None = None) -> list[dict]:
    """The latest state-feed row of every (policy, value key)."""
    where, params = _org_scope(organisations)
    rows = client.query(
        "SELECT policy_id, value_key, organisation_id, record, signature, published, toUnixTimestamp64Milli(updated_at), "
        f"version FROM limit_state FINAL {where}",
        parameters=params,
    ).result_rows
    return [dict(zip(STATE_COLUMNS, r)) for r in rows]


# --------------------------------------------------------------------------- reads for the API

_ENTITY = ("entity_id, value_key, current_usage, status, threshold_alert_sent, exhausted_alert_sent, "
           "window_start, window_end, updated_at")


def usage_map(client: Client, policy_id: str) -> list[dict]:
    """The latest counter of every value key of a policy."""
    result = client.query(
        f"SELECT {_ENTITY} FROM limit_counters FINAL WHERE policy_id = {{p:String}} ORDER BY value_key",
        parameters={"p": policy_id},
    )
    return [dict(zip(result.column_names, r)) for r in result.result_rows]


def entities(client: Client, policy_id: str, *, status: str | None, search: str | None, limit: int, offset: int,
             only_used: bool = False) -> tuple[int, list[dict]]:
    """A page of a policy's value keys (by value key) and their number; ``search``: a case-insensitive substring."""
    where = ["policy_id = {p:String}"]
    params: dict[str, Any] = {"p": policy_id}
    if status is not None:
        where.append("status = {status:String}")
        params["status"] = status
    if search is not None:
        where.append("positionCaseInsensitiveUTF8(value_key, {search:String}) > 0")
        params["search"] = search
    if only_used:
        where.append("current_usage > 0")
    base = f"FROM limit_counters FINAL WHERE {' AND '.join(where)}"
    total = int(client.command(f"SELECT count() {base}", parameters=params))
    result = client.query(f"SELECT {_ENTITY} {base} ORDER BY value_key LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}",
                          parameters={**params, "limit": limit, "offset": offset})
    return total, [dict(zip(result.column_names, r)) for r in result.result_rows]


def find_entity(client: Client, policy_id: str, entity: str) -> str | None:
    """The value key of a policy's entity, by its id or by its value key."""
    rows = client.query(
        "SELECT value_key FROM limit_counters FINAL WHERE policy_id = {p:String} "
        "AND (entity_id = {e:String} OR value_key = {e:String}) LIMIT 1",
        parameters={"p": policy_id, "e": entity},
    ).result_rows
    return rows[0][0] if rows else None


def derive_days(client: Client, days: list[tuple[str, int, int]], resets: list[tuple[str, str, int]], version: int) -> None:
    """Write each day segment ``(policy_id, start_ms, end_ms)`` as the sum of the current versions of its hour
    segments (which must cover it), instead of counting ``generations`` again. ``resets`` ``(policy_id, value_key,
    at_ms)`` inside those days: a key only counts hours ending after its reset (as ``segment_sums``)."""
    if not days:
        return
    client.command(
        "INSERT INTO limit_segment_usage (policy_id, start, end, version, value_key, usage) "
        "SELECT policy_id, fromUnixTimestamp64Milli(transform(policy_id, {pids:Array(String)}, {starts:Array(Int64)}, toInt64(0)), 'UTC'), "
        "fromUnixTimestamp64Milli(transform(policy_id, {pids:Array(String)}, {ends:Array(Int64)}, toInt64(0)), 'UTC'), "
        "{version:UInt64}, value_key, sum(usage) FROM limit_segment_usage "
        "WHERE policy_id IN {pids:Array(String)} AND (policy_id, start, end, version) IN ("
        " SELECT policy_id, start, end, version FROM limit_segments FINAL WHERE policy_id IN {pids:Array(String)} "
        " AND toUnixTimestamp64Milli(end) - toUnixTimestamp64Milli(start) <= 3600000 "
        " AND toUnixTimestamp64Milli(start) >= transform(policy_id, {pids:Array(String)}, {starts:Array(Int64)}, toInt64(0)) "
        " AND toUnixTimestamp64Milli(end) <= transform(policy_id, {pids:Array(String)}, {ends:Array(Int64)}, toInt64(0))) "
        "AND toUnixTimestamp64Milli(end) > transform(concat(policy_id, ':', value_key), {rk:Array(String)}, "
        "{rat:Array(Int64)}, toInt64(-1)) "
        "GROUP BY policy_id, value_key",
        parameters={"pids": [p for p, _, _ in days], "starts": [a for _, a, _ in days], "ends": [b for _, _, b in days],
                    "version": version, "rk": [f"{p}:{v}" for p, v, _ in resets], "rat": [a for _, _, a in resets]},
    )
