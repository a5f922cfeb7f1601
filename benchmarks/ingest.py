"""End-to-end ingest rate vs the raw kafka-python consume rate, in one run.

    .venv/bin/python benchmarks/ingest.py [--events 1000000] [--partitions 3] [--batch-size 30000]
        [--timing live|random]

1. Starts the embedded broker and produces N gateway logs of ≈1.5 KB. By default their
   created_at follows the production order over 24 days (±2 minutes), as a gateway's
   live stream does, so a batch touches one or two daily partitions of generations;
   `--timing random` spreads them over all 24 days (every batch writes 24 parts).
2. Baseline: a bare kafka-python consumer (same fetch settings as ingest) reads
   all N and does nothing else → raw consume rate.
3. End to end: a real `tollgate ingest` process (own embedded warehouse, one worker
   process decoding, the main process inserting) consumes the same topic; the clock runs from its start until its consumer group has
   committed all N offsets (ingest commits only after ClickHouse acknowledged the
   insert, so committed = queryable). Its peak RSS is read from /proc.
4. The stored rows are counted afterwards (FINAL) to check nothing was lost.
Prints both rates and their ratio. Targets: ≥ 30,000 events/s and ≥ 0.4 × raw.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.consumer import CONSUMER_DEFAULTS  # noqa: E402
from ingest.producer import ensure_topics, make_producer  # noqa: E402
from tollgate.broker import EmbeddedBroker  # noqa: E402

WORDS = "the model answered with a long and careful explanation of the question about tokens latency cost".split()


SPAN_MS = 24 * 86_400_000  # the produced stream covers 2026-11-01 … 2026-11-24
START = datetime(2026, 11, 1, tzinfo=UTC)


def created_at(rng: random.Random, i: int, n: int, timing: str) -> str:
    """``live``: the i-th of n events of a gateway's stream, in order of production, ±2 minutes
    (a request's duration and the gateway's buffering); ``random``: anywhere in the span (a
    shuffled backfill: every batch touches every day, the worst case for daily partitions)."""
    if timing == "live":
        ms = i * SPAN_MS // n + rng.randrange(-120_000, 120_000)
    else:
        ms = rng.randrange(SPAN_MS)
    ts = START + timedelta(milliseconds=min(max(ms, 0), SPAN_MS - 1))
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def event(rng: random.Random, org: str, ts: str | None = None) -> dict:
    log_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    req, res = rng.randrange(10, 4000), rng.randrange(1, 1500)
    ts = ts or created_at(rng, rng.randrange(1000), 1000, "random")
    text = " ".join(rng.choice(WORDS) for _ in range(44))
    model = rng.choice(["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "gemini-1.5-pro"])
    status = rng.choice([200] * 30 + [429, 500])
    return {
        "_id": log_id, "created_at": ts, "organisation_id": org,
        "request": {"url": "https://api.openai.com/v1/chat/completions", "method": "POST",
                    "headers": {"content-type": "application/json"},
                    "body": {"model": model, "messages": [{"role": "user", "content": text}]},
                    "portkeyHeaders": {"x-portkey-trace-id": f"trace-{rng.randrange(10**8)}"}},
        "response": {"status": status, "responseTime": rng.randrange(100, 9000), "lastUsedOptionJsonPath": "",
                     "body": {"id": "chatcmpl-x", "choices": [{"message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": req, "completion_tokens": res}}},
        "metrics": {"id": log_id, "organisation_id": org, "workspace_slug": f"ws-{rng.randrange(20)}",
                    "ai_org": "openai", "ai_model": model, "req_units": req, "res_units": res, "total_units": req + res,
                    "cost": round(req * 0.00025 + res * 0.001, 6), "response_status_code": status,
                    "response_time": rng.randrange(100, 9000), "is_success": status == 200, "cache_status": "MISS",
                    "trace_id": f"trace-{rng.randrange(10**8)}", "mode": "single", "api_key_id": f"key-{rng.randrange(50)}",
                    "metadata.key": ["_user", "env"], "metadata.value": [f"user-{rng.randrange(10_000)}", "prod"]},
    }


def raw_consume_rate(bootstrap: str, topic: str, n: int) -> float:
    config = {k: v for k, v in CONSUMER_DEFAULTS.items() if k not in ("enable_auto_commit", "max_poll_interval_ms", "session_timeout_ms", "heartbeat_interval_ms")}
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, **config)
    seen = 0
    start = time.perf_counter()
    while seen < n:
        for records in consumer.poll(timeout_ms=500).values():
            seen += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return n / elapsed


def committed(admin: KafkaAdminClient, group: str, topic: str, partitions: int) -> int:
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    offsets = admin.list_group_offsets({group: parts}).get(group, {})
    return sum(max(o.offset, 0) for o in offsets.values())


def _hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def peak_rss_mib(pid: int, seen: dict[int, float]) -> float:
    """Peak RSS of the ingest process and its worker processes (sum of each one's peak)."""
    for p in process_tree(pid):
        seen[p] = max(seen.get(p, 0.0), _hwm_mib(p))
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=30_000)
    ap.add_argument("--timing", choices=["live", "random"], default="live",
                    help="created_at of the events: a live stream in order (default) or random over 24 days")
    args = ap.parse_args()
    n = args.events
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    topic, org = "bench.gateway-logs", "bench-org"
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, [topic, "bench.feedback", "bench.audit", "bench.dead-letter"], args.partitions)
        rng = random.Random(1)
        payloads = [orjson.dumps(event(rng, org, created_at(rng, i, n, args.timing))) for i in range(n)]
        avg = sum(map(len, payloads)) / n
        producer = make_producer(broker.bootstrap)
        t0 = time.perf_counter()
        for p in payloads:
            producer.send(topic, p)
        producer.flush()
        produce_rate = n / (time.perf_counter() - t0)
        producer.close()
        del payloads
        print(f"produced {n:,} events of {avg:,.0f} bytes on average at {produce_rate:,.0f}/s ({args.partitions} partitions, "
              f"{args.timing} timing)")

        raw = raw_consume_rate(broker.bootstrap, topic, n)
        print(f"raw kafka-python consume:      {raw:>10,.0f} events/s")

        env = {**os.environ, "TOLLGATE_DATA_DIR": str(tmp), "TOLLGATE_KAFKA_BOOTSTRAP": broker.bootstrap,
               "TOLLGATE_TOPIC_GATEWAY_LOGS": topic, "TOLLGATE_TOPIC_FEEDBACK": "bench.feedback",
               "TOLLGATE_TOPIC_AUDIT": "bench.audit", "TOLLGATE_TOPIC_DEAD_LETTER": "bench.dead-letter",
               "TOLLGATE_INGEST_BATCH_SIZE": str(args.batch_size), "TOLLGATE_RETENTION_DAYS": "0"}
        cli = [sys.executable, "-m", "tollgate.cli"]
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
        group = f"tollgate-ingest.{topic}"
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        worker = subprocess.Popen([*cli, "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        rss, peaks = 0.0, {}
        first = None  # (time, offsets) of the first commit: steady state is measured from there
        while (done := committed(admin, group, topic, args.partitions)) < n:
            if first is None and done > 0:
                first = (time.perf_counter(), done)
            rss = max(rss, peak_rss_mib(worker.pid, peaks))
            if worker.poll() is not None:
                raise SystemExit(f"ingest exited with {worker.returncode}")
            time.sleep(0.2)
        t1 = time.perf_counter()
        cpu = cpu_seconds(process_tree(worker.pid))
        cpu_parts = [round(cpu_seconds([p]), 1) for p in process_tree(worker.pid)]
        broker_cpu = cpu_seconds([broker.process.pid])
        admin.close()
        total_rate = n / (t1 - t0)
        e2e = (n - first[1]) / (t1 - first[0]) if first else total_rate
        rss = max(rss, peak_rss_mib(worker.pid, peaks))
        worker.terminate()
        worker.wait(60)
        print(f"end to end, from process start: {total_rate:>10,.0f} events/s  (includes start-up and the group join)")
        print(f"end to end, steady state:       {e2e:>10,.0f} events/s  (from the first commit to the last)")
        print(f"CPU used: ingest {cpu:.1f}s {cpu_parts}, broker {broker_cpu:.1f}s over {t1 - t0:.1f}s wall (2 cores = {2 * (t1 - t0):.1f}s)")
        print(f"ratio end-to-end / raw:         {e2e / raw:>10.2f}")
        print(f"peak RSS of the ingest process: {rss:>10,.0f} MiB  (with its worker processes: "
              + ", ".join(f"{v:,.0f}" for v in peaks.values()) + ")")

    count = subprocess.run(
        [sys.executable, "-c",
         "import sys; from warehouse.client import connect; "
         "print(connect(sys.argv[1]).command('SELECT count() FROM generations FINAL'))", f"chdb://{tmp}/warehouse"],
        check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"rows stored: {int(count):,} of {n:,}")
    print(json.dumps({"events": n, "avg_bytes": round(avg), "raw_consume_per_s": round(raw), "end_to_end_per_s": round(e2e), "end_to_end_with_startup_per_s": round(total_rate),
                      "ratio": round(e2e / raw, 3), "peak_rss_mib": round(rss), "stored": int(count)}))


if __name__ == "__main__":
    main()
