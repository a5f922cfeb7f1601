"""Shared by the export tests: a dataset published through Kafka, moto's S3 server, and the
independent expectation (Polars over the generated events; nothing from exports/ or warehouse/)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import boto3
import polars as pl
from moto.server import ThreadedMotoServer

from analytics_reference import Reference, Window, feedback_frame, generations_frame
from conftest import count_generations, publish, wait_until
from factories import gateway_log, iso
from ingest.producer import ensure_topics, make_producer
from ingest.workers import IngestWorkers
from tollgate.broker import free_port

DAY = datetime(2026, 11, 20, tzinfo=UTC)
WINDOW = {"time_of_generation_min": "2026-11-20T00:00:00Z", "time_of_generation_max": "2026-11-20T23:59:59.999Z"}
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-sonnet"), ("google", "gemini-2.0-flash")]
ALL_COLUMNS = ["id", "trace_id", "created_at", "request", "response", "is_success", "ai_org", "ai_model", "req_units",
               "res_units", "total_units", "request_url", "cost", "cost_currency", "response_time",
               "response_status_code", "mode", "config", "prompt_slug", "metadata"]
METRIC_COLUMNS = [c for c in ALL_COLUMNS if c not in ("request", "response")]


def make_events(org: str, n: int, seed: int, start: datetime, span: timedelta, workspaces=("default", "other")) -> list[dict]:
    """Gateway logs with known, varied values: models, statuses, null costs, metadata, configs, prompts."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        provider, model = rng.choice(MODELS)
        status = rng.choice([200] * 8 + [429, 500])
        created = start + timedelta(milliseconds=rng.randrange(int(span.total_seconds() * 1000)))
        meta_k = ["_user", "env"] + (["team"] if i % 3 == 0 else [])
        meta_v = [f"user-{rng.randrange(20)}", rng.choice(["prod", "dev"])] + (["a\"b,c\nd"] if i % 3 == 0 else [])
        ev = gateway_log(org, workspace=workspaces[i % len(workspaces)] if i % 5 == 0 else workspaces[0],
                         created_at=created, rng=rng, status=status, ai_org=provider, ai_model=model,
                         mode=rng.choice(["single", "fallback"]), config=rng.choice(["", "pc-1", "pc-2"]),
                         prompt_slug=rng.choice(["", "welcome"]), trace_id=f"trace-{rng.randrange(400)}",
                         **{"metadata.key": meta_k, "metadata.value": meta_v})
        ev["metrics"]["cost"] = None if i % 11 == 0 else rng.randrange(0, 40_000) / 1024
        ev["metrics"]["request_url"] = ev["request"]["url"] = f"https://{provider}.example/v1/chat"
        ev["request"]["body"]["messages"][0]["content"] = f"hello {i} ünïcode \u2028 \"quoted\""
        events.append(ev)
    return events


def feedback_events(org: str, events: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    traces = sorted({e["metrics"]["trace_id"] for e in events})
    out = []
    for i, t in enumerate(rng.sample(traces, len(traces) // 3)):
        # Traces span both workspaces; a feedback counts for its own workspace's requests only.
        out.append({"id": str(uuid.uuid4()), "organisation_id": org, "workspace_slug": "other" if i % 4 == 0 else "default",
                    "created_at": iso(DAY), "trace_id": t, "value": rng.randrange(-10, 11), "weight": rng.randrange(1, 9) / 8})
    return out


def ingest(settings, broker, warehouse, org: str, events: list[dict], feedback: list[dict] = (), redeliver: int = 0,
           expected: int | None = None) -> None:
    """Publish through Kafka (some events twice: redeliveries) and wait until ingest stored them."""
    ensure_topics(broker.bootstrap, settings.all_topics, settings.topic_partitions)
    pool = IngestWorkers(settings, broker.bootstrap)
    pool.start()
    producer = make_producer(broker.bootstrap)
    try:
        publish(producer, settings.topic_gateway_logs, events + events[:redeliver])
        if feedback:
            publish(producer, settings.topic_feedback, list(feedback))
        want = expected if expected is not None else len({e["_id"] for e in events})
        assert wait_until(lambda: count_generations(warehouse, org) >= want, timeout=60)
        if feedback:
            assert wait_until(lambda: int(warehouse.command(
                "SELECT count() FROM feedback FINAL WHERE organisation_id = {o:String}", parameters={"o": org})) == len(feedback),
                timeout=60)
    finally:
        producer.close()
        pool.stop()


class S3Server:
    """moto in server mode on loopback, with one bucket."""

    def __init__(self):
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"lake-{uuid.uuid4().hex[:8]}"

    def __enter__(self):
        self.server.start()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def settings(self) -> dict:
        return dict(export_destination="s3", export_s3_endpoint=self.endpoint, export_s3_bucket=self.bucket,
                    export_s3_prefix="tg", export_s3_region="us-east-1", export_s3_access_key_id="testing",
                    export_s3_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


# --------------------------------------------------------------------------- the expectation


def _json_or_none(value):
    return value


def expected_rows(events: list[dict]) -> dict[str, dict]:
    """id → every exportable column, from the events as produced (docs/events.md decides what is stored)."""
    rows = {}
    for ev in events:
        m = ev["metrics"]
        if ev["_id"] in rows:
            continue
        created = datetime.fromisoformat(ev["created_at"].replace("Z", "+00:00"))
        req, res = ev["request"], ev["response"]
        rows[ev["_id"]] = {
            "id": ev["_id"],
            "trace_id": m.get("trace_id", ""),
            "created_at": created,
            "request": {"url": req["url"], "method": req.get("method", ""), "headers": req["headers"], "body": req["body"],
                        "portkeyHeaders": req.get("portkeyHeaders", {})},
            "response": {"status": res["status"], "headers": res["headers"], "body": res["body"],
                         "responseTime": res["responseTime"], "lastUsedOptionJsonPath": res["lastUsedOptionJsonPath"]},
            "is_success": m["is_success"],
            "ai_org": m["ai_org"],
            "ai_model": m["ai_model"],
            "req_units": m["req_units"],
            "res_units": m["res_units"],
            "total_units": m["total_units"],
            "request_url": m["request_url"],
            "cost": m["cost"],
            "cost_currency": m["cost_currency"],
            "response_time": m["response_time"],
            "response_status_code": m["response_status_code"],
            "mode": m.get("mode", ""),
            "config": m.get("config", ""),
            "prompt_slug": m.get("prompt_slug", ""),
            "metadata": dict(zip(m["metadata.key"], m["metadata.value"])),
        }
    return rows


def selected_ids(events: list[dict], feedback: list[dict], org: str, filters: dict, workspace: str = "default") -> list[str]:
    """Ids the analytics reference (Polars) selects for these filters, in export order (created_at, id)."""
    params = {k: (json.dumps(v) if k == "metadata" else ",".join(map(str, v)) if isinstance(v, list) else str(v))
              for k, v in filters.items() if k not in ("page_size", "current_page", "ai_model")}
    params["workspace_slug"] = workspace
    ref = Reference(generations_frame(events, org), feedback_frame(feedback, org))
    sel = ref.select("graphs/requests", params, None, Window(params))
    if "ai_model" in filters:
        sel = sel.filter(pl.col("ai_model").is_in(str(filters["ai_model"]).split(",")))
    return sel.sort("ts", "id")["id"].to_list()


def normalize_exported(row: dict, fmt: str) -> dict:
    """An exported row in the expectation's terms (JSON text → values, timestamps → datetimes)."""
    out = dict(row)
    if "created_at" in out:
        v = out["created_at"]
        if isinstance(v, str):
            v = datetime.fromisoformat(v.replace("Z", "+00:00"))
        out["created_at"] = v.astimezone(UTC) if v.tzinfo else v.replace(tzinfo=UTC)
    for k in ("request", "response"):
        if k in out and isinstance(out[k], str):
            out[k] = json.loads(out[k])
    if "metadata" in out:
        v = out["metadata"]
        if isinstance(v, str):
            v = json.loads(v)
        elif isinstance(v, list):  # pyarrow/polars map: a list of (key, value)
            v = {(e["key"] if isinstance(e, dict) else e[0]): (e["value"] if isinstance(e, dict) else e[1]) for e in v}
        out["metadata"] = v
    if fmt == "csv":
        for k in ("req_units", "res_units", "total_units", "response_time", "response_status_code"):
            if k in out:
                out[k] = int(out[k])
        if "cost" in out:
            out["cost"] = None if out["cost"] in ("", None) else float(out["cost"])
        if "is_success" in out and isinstance(out["is_success"], str):
            out["is_success"] = out["is_success"] == "true"
        for k in ("trace_id", "mode", "config", "prompt_slug"):
            if k in out and out[k] is None:
                out[k] = ""
    return out
