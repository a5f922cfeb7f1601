"""POST /v1/logs against the embedded stack: single-log requests/s with latency, and logs/s in arrays.

    .venv/bin/python benchmarks/api_ingest.py [--seconds 20] [--connections 8] [--batch 100]

1. Starts `tollgate up` on a temporary data directory (embedded Tansu broker, ingest
   worker process, warehouse, API under uvicorn) and reads the admin key it prints.
2. A separate load process (this file with ``load``: a minimal asyncio HTTP/1.1
   keep-alive client, ``--connections`` requests in flight) posts an OpenAI chat completion custom log
   of ≈1.6 KB, one per request, for ``--seconds`` after a 3 s warm-up: requests/s and
   client-side p50/p99 latency (every answer is 200 or the run fails).
3. The same with arrays of ``--batch`` logs per request: logs/s.
4. Waits until ingest has stored every accepted log (graphs/requests total), so the
   figures are for logs that reached ClickHouse, not only Kafka.
Prints the figures, the CPU seconds each process used, the load average, and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

LOG = {
    "request": {
        "url": "https://api.openai.com/v1/chat/completions",
        "method": "POST",
        "headers": {"content-type": "application/json", "authorization": "Bearer sk-bench"},
        "body": {"model": "gpt-4o-mini", "max_tokens": 512, "messages": [
            {"role": "system", "content": "You are the support assistant for Acme Cloud. Answer only from the "
                                          "knowledge-base excerpts; if the answer is not there, offer to open a ticket."},
            {"role": "user", "content": "My October invoice shows the Pro plan twice. Can you refund the duplicate?"}]},
    },
    "response": {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {"id": "chatcmpl-AbC123", "object": "chat.completion", "created": 1764100000,
                 "model": "gpt-4o-mini-2024-07-18",
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {
                     "role": "assistant", "content": "Sorry about that! I've flagged the duplicate Pro charge for a "
                                                    "refund; it reaches your card within 5-7 business days."}}],
                 "usage": {"prompt_tokens": 1450, "completion_tokens": 120, "total_tokens": 1570,
                           "prompt_tokens_details": {"cached_tokens": 1024},
                           "completion_tokens_details": {"reasoning_tokens": 0}}},
        "response_time": 812,
    },
    "metadata": {"trace_id": "trace-bench", "span_id": "span-1", "span_name": "draft_reply", "_user": "usr_42",
                 "env": "prod", "team": "support"},
}


# --------------------------------------------------------------------------- the load process


class _Connection:
    """A minimal keep-alive HTTP/1.1 client: the load process must leave the CPU to the server
    (httpx costs ≈0.6 ms of CPU per request, more than half a core at 1,000 requests/s)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def _load(url: str, key: str, body: bytes, seconds: float, connections: int, warmup: float) -> dict:
    parts = urlsplit(url)
    request = (f"POST {parts.path}/logs HTTP/1.1\r\nHost: {parts.netloc}\r\nx-portkey-api-key: {key}\r\n"
               f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    failures: dict[str, int] = {}
    accepted = [0]  # every 200, warm-up included: what ingest should store
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker() -> None:
        conn = _Connection(parts.hostname, parts.port)
        await conn.open()
        while (t := time.perf_counter()) < stop_at:
            status, answer = await conn.post(request)
            done = time.perf_counter()
            if status != 200 or not answer.startswith(b'{"status":"success"'):
                reason = f"{status} {answer[:200]!r}"
                failures[reason] = failures.get(reason, 0) + 1
                continue
            accepted[0] += 1
            if t >= measure_from:
                latencies.append(done - t)
        conn.writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return {"latencies": latencies, "failures": failures, "seconds": seconds, "accepted": accepted[0]}


def load_main(args) -> None:
    items = [LOG] * args.batch if args.batch > 1 else LOG
    body = json.dumps(items).encode()
    result = asyncio.run(_load(args.url, args.key, body, args.seconds, args.connections, args.warmup))
    lat = sorted(result["latencies"])
    n = len(lat)
    q = lambda p: lat[min(int(p * n), n - 1)] * 1000 if n else float("nan")  # noqa: E731
    print(json.dumps({"requests": n, "rps": n / result["seconds"], "p50_ms": q(0.5), "p99_ms": q(0.99),
                      "max_ms": lat[-1] * 1000 if n else None, "body_bytes": len(body), "failures": result["failures"],
                      "accepted_requests": result["accepted"]}))


# --------------------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _name(pid: int, root: int) -> str:
    if pid == root:
        return "tollgate up (API, inserts)"
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "multiprocessing" in text:
        return "ingest worker"
    return "broker" if "tansu" in text.lower() else Path(text.split(" ")[0]).name


def _cpu_by_process(root: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in _tree(root):
        name = _name(p, root)
        out[name] = out.get(name, 0.0) + _cpu(p)
    return out


def _phase(url: str, key: str, batch: int, seconds: float, connections: int, stack_pid: int) -> dict:
    cmd = [sys.executable, __file__, "load", "--url", url, "--key", key, "--batch", str(batch),
           "--seconds", str(seconds), "--connections", str(connections), "--warmup", "3"]
    before = _cpu_by_process(stack_pid)
    t0 = time.perf_counter()
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    load_cpu = 0.0
    while load.poll() is None:
        load_cpu = max(load_cpu, _cpu(load.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out = json.loads(load.stdout.read())
    after = _cpu_by_process(stack_pid)
    out["cpu_s"] = {k: round(after.get(k, 0) - before.get(k, 0), 1) for k in after}
    out["cpu_s"]["load process"] = round(load_cpu, 1)
    out["wall_s"] = round(wall, 1)
    if out["failures"]:
        raise SystemExit(f"failed requests: {out['failures']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode")
    ld = sub.add_parser("load")
    ld.add_argument("--url", required=True)
    ld.add_argument("--key", required=True)
    ld.add_argument("--batch", type=int, default=1)
    ld.add_argument("--seconds", type=float, default=20)
    ld.add_argument("--connections", type=int, default=8)
    ld.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--batch-connections", type=int, default=4)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    if args.mode == "load":
        return load_main(args)

    command = " ".join([".venv/bin/python", "benchmarks/api_ingest.py", *sys.argv[1:]])
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-api-bench-"))
    port = _free_port()
    env = {**os.environ, "TOLLGATE_DATA_DIR": str(tmp), "TOLLGATE_RETENTION_DAYS": "0", "TOLLGATE_TOPIC_PARTITIONS": "3"}
    env.pop("TOLLGATE_KAFKA_BOOTSTRAP", None)
    stack = subprocess.Popen([sys.executable, "-m", "tollgate.cli", "up", "--port", str(port)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    key = None
    try:
        for line in stack.stdout:
            if line.strip().startswith("tg-"):
                key = line.strip()
            if "tollgate is ready" in line:
                break
        if key is None:
            raise SystemExit("tollgate up did not print an admin key")
        url = f"http://127.0.0.1:{port}/v1"
        started = datetime.now(UTC)
        single = _phase(url, key, 1, args.seconds, args.connections, stack.pid)
        arrays = _phase(url, key, args.batch, args.seconds, args.batch_connections, stack.pid)
        # the warm-up requests were accepted too; count what ingest stored
        stored = _stored(url, key, started)
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(120)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    logs_per_s = arrays["rps"] * args.batch
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} cores, load average before the run {load_before[0]:.2f} / {load_before[1]:.2f} / "
          f"{load_before[2]:.2f} (1/5/15 min), after {os.getloadavg()[0]:.2f}")
    print(f"single-log requests ({args.connections} connections, {single['body_bytes']:,} B body): "
          f"{single['rps']:,.0f} requests/s, p50 {single['p50_ms']:.1f} ms, p99 {single['p99_ms']:.1f} ms, "
          f"max {single['max_ms']:.1f} ms  [targets ≥ 1,000/s, p99 ≤ 50 ms]")
    print(f"  CPU seconds over {single['wall_s']} s: {single['cpu_s']}")
    print(f"arrays of {args.batch} ({args.batch_connections} connections, {arrays['body_bytes']:,} B body): "
          f"{arrays['rps']:,.1f} requests/s = {logs_per_s:,.0f} logs/s, p50 {arrays['p50_ms']:.1f} ms, "
          f"p99 {arrays['p99_ms']:.1f} ms  [target ≥ 10,000 logs/s]")
    print(f"  CPU seconds over {arrays['wall_s']} s: {arrays['cpu_s']}")
    accepted = single["accepted_requests"] + arrays["accepted_requests"] * args.batch
    print(f"logs accepted (warm-ups included): {accepted:,}; stored by ingest (graphs/requests): {stored:,}")
    print(json.dumps({"single_rps": round(single["rps"]), "single_p50_ms": round(single["p50_ms"], 2),
                      "single_p99_ms": round(single["p99_ms"], 2), "array_logs_per_s": round(logs_per_s),
                      "array_p99_ms": round(arrays["p99_ms"], 2), "accepted": accepted, "stored": stored}))


def _stored(url: str, key: str, since: datetime, timeout: float = 120) -> int:
    """Logs ingest stored since ``since``, once the count stops growing (or the timeout)."""
    import httpx

    params = {"time_of_generation_min": (since - timedelta(minutes=1)).isoformat(),
              "time_of_generation_max": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/analytics/graphs/requests", params=params, headers={"x-portkey-api-key": key}, timeout=60)
        total = r.json()["summary"]["total"]
        if total == last:
            return total
        last = total
        time.sleep(3)
    return last


if __name__ == "__main__":
    main()
