"""Rows per GB of `generations` on disk, with and without request/response bodies (sizing, docs/deploy.md).

    .venv/bin/python benchmarks/storage.py [--events 1000000] [--days 30]

Generates N gateway logs with `tollgate seed`'s generator (realistic OpenAI / Anthropic /
Google chat bodies, headers and metadata, ≈2.4 KB of JSON per event), turns them into rows
with ingest's own codec, and inserts them in 40,000-row batches (as ingest does) into two
fresh databases of an embedded warehouse: one with the events as generated, one with the
request and response bodies and headers emptied (what a gateway that logs metadata only
sends). Then every partition is merged into one part (as the settle job leaves ended days)
and `system.parts` is read: bytes on disk per row and rows per GB (parts are compact, one
file each, so the bodies' share is the difference of the two loads). Prints a table and a
final JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.events import GENERATIONS  # noqa: E402
from ingest.sink import insert_rows  # noqa: E402
from tollgate.seed import generate  # noqa: E402
from warehouse.client import connect  # noqa: E402
from warehouse.migrate import migrate  # noqa: E402

BATCH = 40_000
GB = 1e9


def without_bodies(event: dict) -> dict:
    event["request"] = {k: v for k, v in event["request"].items() if k not in ("headers", "body", "portkeyHeaders")}
    event["response"] = {k: v for k, v in event["response"].items() if k not in ("headers", "body")}
    return event


def load(client, events: int, days: float, bodies: bool) -> dict:
    rows: list[bytes] = []
    json_bytes = 0
    started = time.monotonic()
    end = datetime(2026, 11, 20, tzinfo=UTC)
    for kind, event in generate(events, days, "org-size", "ws-size", seed=7, end=end):
        if kind != "gateway_log":
            continue
        raw = orjson.dumps(event if bodies else without_bodies(event))
        json_bytes += len(raw)
        rows.append(GENERATIONS.encode(raw))
        if len(rows) == BATCH:
            insert_rows(client, GENERATIONS, rows)
            rows = []
    if rows:
        insert_rows(client, GENERATIONS, rows)
    loaded = time.monotonic() - started
    client.command("OPTIMIZE TABLE generations FINAL")
    parts = client.query(
        "SELECT count(), sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes) FROM system.parts "
        "WHERE database = currentDatabase() AND table = 'generations' AND active").result_rows[0]
    n_parts, n_rows, on_disk, uncompressed = (int(x) for x in parts)
    return {"bodies": bodies, "rows": n_rows, "parts": n_parts, "json_bytes_per_event": round(json_bytes / n_rows),
            "bytes_on_disk": on_disk, "bytes_per_row": round(on_disk / n_rows, 1),
            "rows_per_gb": round(GB / (on_disk / n_rows)), "uncompressed_bytes_per_row": round(uncompressed / n_rows),
            "load_seconds": round(loaded, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-storage-"))
    try:
        base = connect(f"chdb://{tmp / 'warehouse'}")
        results = []
        for bodies in (True, False):
            db = "with_bodies" if bodies else "without_bodies"
            base.command(f"CREATE DATABASE IF NOT EXISTS {db}")
            client = connect(f"chdb://{tmp / 'warehouse'}", database=db)
            migrate(client, retention_days=0)
            results.append(load(client, args.events, args.days, bodies))
        print(f"{args.events:,} generated gateway logs over {args.days:g} days, each day merged into one part:")
        print(f"{'':16} {'JSON/event':>10} {'rows':>10} {'bytes/row on disk':>18} {'rows per GB':>12}")
        for r in results:
            label = "with bodies" if r["bodies"] else "without bodies"
            print(f"{label:16} {r['json_bytes_per_event']:>10,} {r['rows']:>10,} {r['bytes_per_row']:>18,.1f} "
                  f"{r['rows_per_gb']:>12,}")
        full, bare = results[0]["bytes_per_row"], results[1]["bytes_per_row"]
        print(f"request/response bodies and headers: {(full - bare) / full:.0%} of the bytes on disk")
        print(json.dumps({"events": args.events, "days": args.days, "results": results}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
