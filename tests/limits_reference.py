"""An independent computation of limit counters from the generated events (Polars).

It shares no code with Tollgate's: it reads the event dicts the tests published,
keeps one copy of each event id (redelivery), applies a policy's conditions, its
window (and a value key's reset) and sums per value key. The value key format is
re-implemented from docs/limits.md.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(milliseconds=1)


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def events_frame(events: list[dict]) -> pl.DataFrame:
    rows = []
    for ev in events:
        m = ev["metrics"]
        meta = dict(zip(m.get("metadata.key", []), m.get("metadata.value", [])))
        rows.append({
            "id": ev["_id"], "organisation_id": ev["organisation_id"], "workspace_id": m.get("workspace_slug") or "",
            "api_key": m.get("api_key_id", ""), "created_ms": ms(parse(ev["created_at"])),
            "cost": float(m["cost"]) if m.get("cost") is not None else 0.0,
            "tokens": int(m.get("total_units", 0)), "meta": meta,
        })
    df = pl.DataFrame(rows, schema={"id": pl.String, "organisation_id": pl.String, "workspace_id": pl.String,
                                    "api_key": pl.String, "created_ms": pl.Int64, "cost": pl.Float64,
                                    "tokens": pl.Int64, "meta": pl.Object})
    return df.unique(subset=["id", "created_ms"], keep="first", maintain_order=True)


def _value(row: dict, key: str) -> str:
    if key.startswith("metadata."):
        return row["meta"].get(key[len("metadata."):], "")
    return row[key]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("|", "\\|")


def usage(events: pl.DataFrame, *, org: str, conditions: list[tuple[str, str]], group_by: list[str], measure: str,
          start_ms: int, end_ms: int | None, resets: dict[str, int] | None = None) -> dict[str, float]:
    """Usage per value key of a policy over ``[start_ms, end_ms)``; ``resets``: value key → instant."""
    out: dict[str, float] = {}
    resets = resets or {}
    for row in events.iter_rows(named=True):
        if row["organisation_id"] != org:
            continue
        if any(_value(row, k) != v for k, v in conditions):
            continue
        values = [_value(row, k) for k in group_by]
        if any(v == "" for v in values):
            continue
        vk = "|".join(f"{k}:{_escape(v)}" for k, v in zip(group_by, values))
        lo = max(start_ms, resets.get(vk, start_ms))
        if row["created_ms"] < lo or (end_ms is not None and row["created_ms"] >= end_ms):
            continue
        amount = {"cost": row["cost"], "tokens": float(row["tokens"]), "requests": 1.0}[measure]
        out[vk] = out.get(vk, 0.0) + amount
    return out
