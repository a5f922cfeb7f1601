"""Export throughput and peak RSS on 10 million generations.

    .venv/bin/python benchmarks/export.py [--rows 10000000] [--keep DIR] [--phases a,b,…] [--part-rows N] [--settle]

1. Load, in a child process: the migrations on an embedded warehouse (chdb) in a temp data
   dir, then ``--rows`` generations generated inside ClickHouse by benchmarks/analytics.py's
   generator (30 days, 40 models, users, metadata, small request/response bodies), every
   row in one workspace (an export reads one workspace, as analytics does).
2. Each phase in a fresh child process, so its peak RSS (VmHWM) is its own:
   - ``baseline``: the same slices the exporter reads, with the same metric columns,
     through ``query_arrow_stream``, and nothing written: how fast ClickHouse hands over
     the rows on this machine right now (the ceiling of the exporter);
   - ``local-metrics``: the real runner (exports/jobs.py ExportRunner.run) exporting the
     metric columns (everything but request/response) of all rows to local Parquet;
   - ``local-bodies``: the same with the request and response bodies;
   - ``s3-metrics`` / ``s3-bodies``: the same to moto's S3 server (server mode, loopback,
     in its own process: the S3 side's memory is not the exporter's) by multipart upload.
   Every phase checks the export holds ``--rows`` rows (manifest, file sizes).
   ``--settle`` first merges each day into one part, as ``tollgate up``'s settle job does
   for ended days (then FINAL has nothing to merge); without it the days are as the
   inserts left them.
3. Prints rows/s, MB/s, files and peak RSS per phase, the targets (≥ 1,000,000 rows/s for
   metric columns to local Parquet; peak RSS < 1 GiB in every phase), the machine's load,
   and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ORG = "bench-org"
WORKSPACE = "default"
CHUNK = 1_000_000
TARGET_ROWS_PER_S, TARGET_RSS_MIB = 1_000_000, 1024
METRICS = ["id", "trace_id", "created_at", "is_success", "ai_org", "ai_model", "req_units", "res_units", "total_units",
           "request_url", "cost", "cost_currency", "response_time", "response_status_code", "mode", "config",
           "prompt_slug", "metadata"]
BODIES = ["id", "trace_id", "created_at", "request", "response", "is_success", "ai_org", "ai_model", "req_units",
          "res_units", "total_units", "request_url", "cost", "cost_currency", "response_time", "response_status_code",
          "mode", "config", "prompt_slug", "metadata"]
WINDOW = {"time_of_generation_min": "2026-10-22T00:00:00Z", "time_of_generation_max": "2026-11-20T23:59:59.999Z"}
PHASES = ["baseline", "local-metrics", "local-bodies", "s3-metrics", "s3-bodies"]
MARKER = "tollgate-export-bench.json"


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds_of_others() -> float:
    """CPU time (s) used by every process but this one and its children, from /proc/stat minus ours."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    ticks = sum(int(x) for x in parts[:3])  # user, nice, system
    return ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- load (child)


def load(data_dir: Path, rows: int) -> dict:
    import analytics as gen  # benchmarks/analytics.py

    from warehouse.client import connect
    from warehouse.migrate import discover, migrate

    client = connect(f"chdb://{(data_dir / 'warehouse').resolve()}")
    migrate(client, retention_days=0)
    marker = data_dir / MARKER
    migrations = [m.path.name for m in discover()]
    have = int(client.command(f"SELECT count() FROM generations WHERE organisation_id = '{ORG}'"))
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("rows") == rows and info.get("migrations") == migrations and have == rows:
            return {**info, "reused": True}
    if have:
        client.command("TRUNCATE TABLE generations")
    t0 = time.perf_counter()
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        sql = gen.generations_sql(start, count, rows, "ordered")
        one_ws = sql.replace("'ws-' || leftPad(toString(ws_i), 2, '0'),", f"'{WORKSPACE}',")
        assert one_ws != sql, "the generator's workspace expression changed"
        client.command(one_ws)
        print(f"  generations {start + count:>12,} / {rows:,}", flush=True)
    info = {"rows": rows, "migrations": migrations, "load_seconds": round(time.perf_counter() - t0, 1), "reused": False}
    marker.write_text(json.dumps(info))
    return info


def settle_days(data_dir: Path) -> dict:
    """What `tollgate up`'s settle job does for ended days (warehouse/settle.py): one part per day."""
    from warehouse.client import connect
    from warehouse.settle import settle

    client = connect(f"chdb://{(data_dir / 'warehouse').resolve()}")
    t0 = time.perf_counter()
    days = settle(client)
    parts = int(client.command("SELECT count() FROM system.parts WHERE table = 'generations' AND active"))
    return {"settled_days": len(days), "seconds": round(time.perf_counter() - t0, 1), "active_parts": parts}


# --------------------------------------------------------------------------- phases (child)


def settings_for(data_dir: Path, s3: dict | None, part_rows: int):
    from tollgate.settings import Settings

    extra = dict(export_destination="s3", **s3) if s3 else dict(export_destination="local")
    return Settings(data_dir=data_dir, export_dir=data_dir / "exports", export_part_rows=part_rows, **extra)


def phase_baseline(data_dir: Path, part_rows: int) -> dict:
    from exports.jobs import parse_filters
    from warehouse.queries import exports as q
    from warehouse.queries.scope import TenantScope

    settings = settings_for(data_dir, None, part_rows)
    client = q.data_client(settings.warehouse_dsn)  # as the exporter's
    sel = parse_filters(WINDOW, TenantScope(ORG, WORKSPACE)).selection
    t0 = time.perf_counter()
    stream = q.Stream(client, sel, METRICS, "parquet")
    rows = nbytes = 0
    for table in stream:
        rows += table.num_rows
        nbytes += table.nbytes
    elapsed = time.perf_counter() - t0
    return {"rows": rows, "seconds": elapsed, "arrow_bytes": nbytes, "slices": stream.stats.slices, "files": 0,
            "file_bytes": 0}


def phase_export(data_dir: Path, columns: list[str], s3: dict | None, part_rows: int) -> dict:
    from datetime import UTC, datetime

    from exports import jobs
    from exports.destinations import destination
    from warehouse.client import ClientPool
    from warehouse.queries import exports as q
    from warehouse.queries.scope import TenantScope

    settings = settings_for(data_dir, s3, part_rows)
    pool = ClientPool(settings.warehouse_dsn, size=1)
    parsed = jobs.parse_filters(WINDOW, TenantScope(ORG, WORKSPACE))
    job = jobs.new_job(organisation_id=ORG, workspace_slug=WORKSPACE, created_by="bench", description="bench",
                       filters=parsed.text(), requested_data=columns, fmt="parquet",
                       dest=settings.export_destination, total=0)
    with pool.borrow() as client:
        q.write_job(client, jobs.next_version(job, "in_progress", started_at=datetime.now(UTC)))
    runner = jobs.ExportRunner(settings, pool)
    t0 = time.perf_counter()
    runner.run(job.id)  # the runner's own code path, on this thread
    elapsed = time.perf_counter() - t0
    with pool.borrow() as client:
        done = q.get_job_by_id(client, job.id)
    files = json.loads(done.files)
    result = {"rows": done.rows_written, "seconds": elapsed, "status": done.status, "error": done.error,
              "files": len(files) - 1, "file_bytes": sum(f["bytes"] for f in files)}
    destination(settings, settings.export_destination).delete_prefix(jobs.job_directory(job.id))  # free the disk
    runner.close()
    return result


def child(args) -> int:
    data_dir = Path(args.data_dir)
    s3 = json.loads(args.s3) if args.s3 else None
    if args.phase == "load":
        out = load(data_dir, args.rows)
    elif args.phase == "settle":
        out = settle_days(data_dir)
    elif args.phase == "baseline":
        out = phase_baseline(data_dir, args.part_rows)
    else:
        where, what = args.phase.split("-")
        out = phase_export(data_dir, METRICS if what == "metrics" else BODIES, s3 if where == "s3" else None,
                           args.part_rows)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)  # of the whole child, load/connect included
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def run_child(phase: str, data_dir: Path, rows: int, part_rows: int, s3: dict | None) -> dict:
    cmd = [sys.executable, __file__, "--_phase", phase, "--_data-dir", str(data_dir), "--rows", str(rows),
           "--part-rows", str(part_rows)]
    if s3:
        cmd += ["--_s3", json.dumps(s3)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sys.stdout.write("".join(line + "\n" for line in p.stdout.splitlines() if not line.startswith("RESULT ")))
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"phase {phase} failed ({p.returncode})")
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def start_moto() -> tuple[subprocess.Popen, dict]:
    from tollgate.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from moto.server import ThreadedMotoServer as S; "
                             f"s = S(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:
            time.sleep(0.1)
    return proc, dict(export_s3_endpoint=endpoint, export_s3_bucket="bench", export_s3_prefix="tg",
                      export_s3_region="us-east-1", export_s3_access_key_id="bench", export_s3_secret_access_key="bench")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--keep", help="load into (or reuse) this data dir and leave it")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--part-rows", type=int, default=1_000_000)
    ap.add_argument("--settle", action="store_true",
                    help="merge each loaded day into one part first, as `tollgate up`'s settle job does for ended days")
    ap.add_argument("--_phase")
    ap.add_argument("--_data-dir")
    ap.add_argument("--_s3")
    args = ap.parse_args()
    if args._phase:
        args.phase, args.data_dir, args.s3 = args._phase, args._data_dir, args._s3
        return child(args)

    data_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tollgate-export-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    moto = None
    try:
        print(f"loading {args.rows:,} generations into {data_dir} …", flush=True)
        loaded = run_child("load", data_dir, args.rows, args.part_rows, None)
        print(f"load: {loaded}", flush=True)
        if args.settle:
            print(f"settle: {run_child('settle', data_dir, args.rows, args.part_rows, None)}", flush=True)
        phases = [p for p in args.phases.split(",") if p]
        s3 = None
        if any(p.startswith("s3") for p in phases):
            moto, s3 = start_moto()
        for phase in phases:
            load_before = os.getloadavg()[0]
            cpu0, t0 = cpu_seconds_of_others(), time.perf_counter()
            r = run_child(phase, data_dir, args.rows, args.part_rows, s3)
            wall = time.perf_counter() - t0
            r["machine_cpu_s"] = round(cpu_seconds_of_others() - cpu0, 1)
            r["wall_s_incl_spawn"] = round(wall, 1)
            r["load_before"] = round(load_before, 2)
            r["rows_per_s"] = round(r["rows"] / r["seconds"])
            results[phase] = r
            ok = r["rows"] == args.rows and r.get("status", "success") == "success"
            print(f"{phase:14s} {r['rows']:>11,} rows in {r['seconds']:6.1f} s = {r['rows_per_s']:>10,} rows/s; "
                  f"{r['files']} files, {r['file_bytes'] / 1e6:,.0f} MB; peak RSS {r['peak_rss_mib']:,.0f} MiB; "
                  f"exporter CPU {r['cpu_s']:.1f} s ({r['rows'] / max(r['cpu_s'], 1e-9):,.0f} rows per CPU-s); "
                  f"machine CPU {r['machine_cpu_s']} s over {wall:.1f} s (load before {load_before:.2f})"
                  + ("" if ok else f"  !! {r.get('status')} {r.get('error')}"), flush=True)
    finally:
        if moto:
            moto.stdin.close()
            moto.terminate()
            moto.wait(10)
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print()
    m = results.get("local-metrics")
    if m:
        print(f"target ≥ {TARGET_ROWS_PER_S:,} rows/s (metric columns → local Parquet): "
              f"{m['rows_per_s']:,} → {'met' if m['rows_per_s'] >= TARGET_ROWS_PER_S else 'NOT met'}")
    worst = max((r["peak_rss_mib"] for r in results.values()), default=0)
    print(f"target peak RSS < {TARGET_RSS_MIB} MiB in every phase: worst {worst:,.0f} MiB → "
          f"{'met' if worst < TARGET_RSS_MIB else 'NOT met'}")
    print(json.dumps({"rows": args.rows, "results": results}))
    bad = [p for p, r in results.items() if r["rows"] != args.rows or r.get("status", "success") != "success"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
