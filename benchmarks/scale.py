"""Scale-out and faults: ingest rate with 1 and 2 consumers, poison pills, lag recovery after a warehouse outage.

    .venv/bin/python benchmarks/scale.py [--events 300000] [--poison 30000] [--outage-seconds 30] [--rate 5000]
        [--retry-max-seconds S] [--skip scale,poison,outage]

Everything runs against one embedded broker started here; each phase is a real
`tollgate up` (embedded warehouse in a fresh data directory, TOLLGATE_KAFKA_BOOTSTRAP
pointing at this broker), the same command with another `--ingest-workers`.

1. Scale-out: N gateway logs of ≈1.5 KB (benchmarks/ingest.py's events, live timing) on one
   6-partition topic. `tollgate up --ingest-workers 1`, then `--ingest-workers 2` with another
   consumer group on the same topic: the clock runs until the group committed all N
   (committed = acknowledged by ClickHouse). Steady rate = from the first commit to the last.
2. Poison pills: the same N good events with `--poison` bad ones mixed in (half random byte
   strings, half gateway logs with a wrong field), on a second topic, `--ingest-workers 2`:
   the rate of good events against the clean 2-worker run, and the dead letters counted.
3. Warehouse outage: `tollgate up --ingest-workers 2` consumes a live stream of `--rate`
   events/s; after 10 s of warm-up and 10 s of steady state (its lag is "the lag before")
   TOLLGATE_INGEST_FAULT_FILE is created for `--outage-seconds` (every
   insert fails), then removed. Lag = events acknowledged by the broker − offsets committed,
   sampled every 0.5 s: the lag before, the peak, and the time from the end of the outage
   until the lag is back to its level before the outage. Then the stream stops, ingest
   drains, and the stored rows are counted (FINAL) against the events produced.
Each phase checks the stored count afterwards. Prints the figures and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
from kafka import KafkaAdminClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import committed, cpu_seconds, created_at, event, process_tree  # noqa: E402
from ingest.producer import ensure_topics, make_producer  # noqa: E402
from tollgate.broker import EmbeddedBroker, free_port  # noqa: E402

PARTITIONS = 6
CLI = [sys.executable, "-m", "tollgate.cli"]
ORG = "scale-org"


def topics(prefix: str) -> dict[str, str]:
    return {"TOLLGATE_TOPIC_GATEWAY_LOGS": f"{prefix}.gateway-logs", "TOLLGATE_TOPIC_FEEDBACK": f"{prefix}.feedback",
            "TOLLGATE_TOPIC_AUDIT": f"{prefix}.audit", "TOLLGATE_TOPIC_DEAD_LETTER": f"{prefix}.dead-letter"}


class Stack:
    """`tollgate up --ingest-workers W` in a fresh data directory against the benchmark's broker."""

    def __init__(self, bootstrap: str, prefix: str, group: str, workers: int, **extra: str):
        self.data_dir = Path(tempfile.mkdtemp(prefix="tollgate-scale-"))
        self.topic = f"{prefix}.gateway-logs"
        self.group = f"{group}.{self.topic}"
        self.env = {**os.environ, **topics(prefix), "TOLLGATE_DATA_DIR": str(self.data_dir),
                    "TOLLGATE_KAFKA_BOOTSTRAP": bootstrap, "TOLLGATE_TOPIC_PARTITIONS": str(PARTITIONS),
                    "TOLLGATE_INGEST_CONSUMER_GROUP": group, "TOLLGATE_RETENTION_DAYS": "0",
                    "TOLLGATE_SETTLE_INTERVAL_SECONDS": "0", "TOLLGATE_TOPIC_LIMIT_ALERTS": f"{prefix}.alerts",
                    "TOLLGATE_TOPIC_LIMITS_STATE": f"{prefix}.limits-state", **extra}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*CLI, "up", "--ingest-workers", str(workers), "--port", str(free_port())],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        for line in self.proc.stdout:
            if b"tollgate is ready" in line:
                break
        else:
            raise SystemExit(f"tollgate up exited with {self.proc.wait()}")

    def stop(self) -> tuple[int, float]:
        """SIGTERM (drain, commit), then the stored rows (FINAL) and the CPU seconds the stack used."""
        cpu = cpu_seconds(process_tree(self.proc.pid))
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(120) != 0:
            raise SystemExit(f"tollgate up exited with {self.proc.returncode}")
        stored = subprocess.run(  # a process of its own: one process opens one chdb directory
            [sys.executable, "-c", "import sys; from warehouse.client import connect; "
             "print(connect(sys.argv[1]).command('SELECT count() FROM generations FINAL'))", f"chdb://{self.data_dir}/warehouse"],
            check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return int(stored), cpu


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    producer = make_producer(bootstrap)
    for p in payloads:
        producer.send(topic, p)
    producer.flush()
    producer.close()


def consume_all(admin: KafkaAdminClient, stack: Stack, n: int) -> dict:
    """Wait until the stack's group committed ``n`` offsets; rates from start and steady state."""
    first = None
    while (done := committed(admin, stack.group, stack.topic, PARTITIONS)) < n:
        if first is None and done > 0:
            first = (time.perf_counter(), done)
        if stack.proc.poll() is not None:
            raise SystemExit(f"tollgate up exited with {stack.proc.returncode}")
        time.sleep(0.2)
    end = time.perf_counter()
    steady = (n - first[1]) / (end - first[0]) if first else n / (end - stack.started)
    return {"with_startup_per_s": round(n / (end - stack.started)), "steady_per_s": round(steady),
            "seconds": round(end - stack.started, 1)}


def bad_events(rng: random.Random, n: int) -> list[bytes]:
    """Half random byte strings, half gateway logs with one wrong field (as tests/test_faults.py)."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(rng.randbytes(rng.randrange(1, 400)))
            continue
        ev = event(rng, ORG)
        kind = i % 8
        if kind == 1:
            ev["metrics"]["cost"] = "0.5"
        elif kind == 3:
            ev["response"]["status"] = 600
        elif kind == 5:
            del ev["created_at"]
        else:
            ev["metrics"]["req_units"] = -rng.randrange(1, 100)
        out.append(orjson.dumps(ev))
    return out


def outage_phase(broker: EmbeddedBroker, args, admin: KafkaAdminClient) -> dict:
    fault = Path(tempfile.mkdtemp(prefix="tollgate-fault-")) / "warehouse-down"
    extra = {"TOLLGATE_INGEST_FAULT_FILE": str(fault)}
    if args.retry_max_seconds:
        extra["TOLLGATE_INGEST_RETRY_MAX_SECONDS"] = str(args.retry_max_seconds)
    stack = Stack(broker.bootstrap, "scale-live", "scale-live", 2, **extra)
    acked = 0
    stop = threading.Event()
    lock = threading.Lock()

    def stream() -> None:
        nonlocal acked
        producer = make_producer(broker.bootstrap)
        rng = random.Random(3)
        tick = 0.05
        per_tick = max(1, int(args.rate * tick))
        nxt = time.perf_counter()
        i = 0

        def ack(_):
            nonlocal acked
            with lock:
                acked += 1

        while not stop.is_set():
            for _ in range(per_tick):
                producer.send(stack.topic, orjson.dumps(event(rng, ORG, created_at(rng, i % 100_000, 100_000, "live")))).add_callback(ack)
                i += 1
            nxt += tick
            time.sleep(max(0.0, nxt - time.perf_counter()))
        producer.flush()
        producer.close()

    producer_thread = threading.Thread(target=stream, daemon=True)
    producer_thread.start()
    samples: list[tuple[float, int]] = []  # (seconds since start, lag)
    t0 = time.perf_counter()

    def sample() -> int:
        with lock:
            produced = acked
        lag = produced - committed(admin, stack.group, stack.topic, PARTITIONS)
        samples.append((time.perf_counter() - t0, lag))
        return lag

    def run_for(seconds: float) -> None:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            sample()
            time.sleep(0.5)

    run_for(10)  # start-up and the group join
    warm = len(samples)
    run_for(10)
    before = [lag for _, lag in samples[warm:]]
    baseline = max(before)
    fault.touch()
    down_at = time.perf_counter() - t0
    run_for(args.outage_seconds)
    fault.unlink()
    up_at = time.perf_counter() - t0
    drained_at = None
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        if sample() <= baseline:
            drained_at = samples[-1][0]
            break
        time.sleep(0.5)
    run_for(5)
    peak = max(lag for _, lag in samples)
    stop.set()
    producer_thread.join()
    with lock:
        total = acked
    while committed(admin, stack.group, stack.topic, PARTITIONS) < total:
        time.sleep(0.5)
    stored, _ = stack.stop()
    print("lag over time (s: lag): " + ", ".join(f"{t:.0f}: {lag:,}" for t, lag in samples[::4]))
    return {"rate_per_s": args.rate, "outage_s": args.outage_seconds, "retry_max_s": args.retry_max_seconds or 30, "lag_before_max": baseline,
            "lag_before_mean": round(sum(before) / len(before)), "outage_from_s": round(down_at, 1),
            "outage_to_s": round(up_at, 1), "peak_lag": peak,
            "drain_seconds": None if drained_at is None else round(drained_at - up_at, 1),
            "produced": total, "stored": stored}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--poison", type=int, default=30_000, help="bad events mixed into the poison run")
    ap.add_argument("--outage-seconds", type=float, default=30)
    ap.add_argument("--rate", type=int, default=5_000, help="events/s of the live stream in the outage phase")
    ap.add_argument("--retry-max-seconds", type=float,
                    help="TOLLGATE_INGEST_RETRY_MAX_SECONDS in the outage phase (default: the setting's default, 30)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: scale,poison,outage")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    n = args.events
    result: dict = {"events": n, "load_before": os.getloadavg()[0]}
    with EmbeddedBroker() as broker:
        for prefix in ("scale", "scale-poison", "scale-live"):
            ensure_topics(broker.bootstrap, list(topics(prefix).values()), PARTITIONS)
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        rng = random.Random(1)
        good = [orjson.dumps(event(rng, ORG, created_at(rng, i, n, "live"))) for i in range(n)]

        if "scale" not in skip:
            produce(broker.bootstrap, "scale.gateway-logs", good)
            for workers in (1, 2):
                stack = Stack(broker.bootstrap, "scale", f"scale-w{workers}", workers)
                rates = consume_all(admin, stack, n)
                stored, cpu = stack.stop()
                rates.update(stored=stored, cpu_seconds=round(cpu, 1))
                result[f"workers_{workers}"] = rates
                print(f"--ingest-workers {workers}: steady {rates['steady_per_s']:>8,}/s, with start-up "
                      f"{rates['with_startup_per_s']:>8,}/s ({rates['seconds']} s, {cpu:.0f} CPU-s); stored {stored:,} of {n:,}")
            result["ratio_2_to_1"] = round(result["workers_2"]["steady_per_s"] / result["workers_1"]["steady_per_s"], 2)
            print(f"ratio 2 workers / 1 worker (steady): {result['ratio_2_to_1']}")

        if "poison" not in skip:
            bad = bad_events(random.Random(2), args.poison)
            mixed = good + bad
            random.Random(4).shuffle(mixed)
            produce(broker.bootstrap, "scale-poison.gateway-logs", mixed)
            del mixed
            stack = Stack(broker.bootstrap, "scale-poison", "scale-poison", 2)
            rates = consume_all(admin, stack, n + len(bad))
            stored, _ = stack.stop()
            good_rate = round(rates["steady_per_s"] * n / (n + len(bad)))
            clean = result.get("workers_2", {}).get("steady_per_s")
            result["poison"] = {"bad": len(bad), "good_per_s": good_rate, "clean_per_s": clean, "stored": stored,
                                "good_rate_vs_clean": round(good_rate / clean, 2) if clean else None}
            print(f"poison: {len(bad):,} bad among {n:,} good, 2 workers: good events {good_rate:,}/s "
                  f"(clean run {clean:,}/s, ratio {result['poison']['good_rate_vs_clean']}); stored {stored:,} of {n:,}")
        del good

        if "outage" not in skip:
            out = outage_phase(broker, args, admin)
            result["outage"] = out
            print(f"outage: {out['outage_s']:.0f} s at {out['rate_per_s']:,} events/s, 2 workers, retry back-off capped at "
                  f"{out['retry_max_s']:g} s: lag before ≤ "
                  f"{out['lag_before_max']:,} (mean {out['lag_before_mean']:,}), peak {out['peak_lag']:,}, back to the "
                  f"level before {out['drain_seconds']} s after the outage; stored {out['stored']:,} of {out['produced']:,}")
        admin.close()
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
