"""The texts of metadata pairs (``metadata_values``, migration 0023).

A metadata group is computed over the pair hashes of generations (``metadata_pairs``,
``metadata_key_hashes``), a users group over ``user_hash``, never their strings; the
values' texts come from this table.
The generations ingest stores a batch's pairs here before the batch (ingest/sink.py).
"""

from __future__ import annotations

import orjson
from clickhouse_connect.driver.client import Client

COLUMNS = ["organisation_id", "workspace_slug", "key", "value", "last_seen"]


def store_metadata_values(client: Client, values: dict[tuple[str, str, str, str], float], settings: dict | None = None) -> None:
    """Store (organisation, workspace, key, value) → latest created_at (epoch seconds).
    A pair stored again keeps its latest ``last_seen`` (ReplacingMergeTree)."""
    if not values:
        return
    lines = b"".join(orjson.dumps([*pair, seen]) + b"\n" for pair, seen in values.items())
    client.raw_insert("metadata_values", column_names=COLUMNS, insert_block=lines, fmt="JSONCompactEachRow",
                      settings=settings)


def store_all_metadata_values(client: Client) -> None:
    """The texts of every pair in ``generations``, as migration 0023's backfill stores them (for
    loaders that insert generations without the ingest, such as benchmarks/analytics.py)."""
    client.command(
        "INSERT INTO metadata_values (organisation_id, workspace_slug, key, value, last_seen) "
        "SELECT organisation_id, workspace_slug, k, v, max(created_at) "
        "FROM generations ARRAY JOIN metadata.key AS k, metadata.value AS v "
        "GROUP BY organisation_id, workspace_slug, k, v"
    )


def texts(one_workspace: bool, user: bool = False) -> str:
    """A SELECT of (hash, value): the texts of key ``{group_metadata_key:String}`` in organisation
    ``{scope_org:String}`` (and workspace ``{scope_ws:String}``) by their pair hash; with ``user``,
    the texts of key ``_user`` by the hash of the value alone (``user_hash``, 0016).

    Only the texts that a request since the window's start ``{t_start:DateTime64(3, 'UTC')}``
    may carry: a pair's request of the window was stored with a ``last_seen`` at or after its
    own time. Without that bound a key with a value per request (an id) would aggregate
    every text of the retention."""
    workspace = " AND workspace_slug = {scope_ws:String}" if one_workspace else ""
    key, hashed = ("'_user'", "cityHash64(value)") if user else ("{group_metadata_key:String}", "pair_hash")
    return (f"SELECT {hashed} AS hash, any(value) AS value FROM metadata_values "
            f"WHERE organisation_id = {{scope_org:String}}{workspace} AND key = {key} "
            "AND last_seen >= {t_start:DateTime64(3, 'UTC')} GROUP BY hash")
