"""Event builders for tests: small, explicit gateway logs and feedback with known values."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def gateway_log(org: str, *, workspace: str = "default", created_at: datetime | None = None, rng: random.Random | None = None, **metrics: Any) -> dict:
    rng = rng or random.Random()
    log_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    created = created_at or datetime(2026, 11, 20, 10, 0, tzinfo=UTC) + timedelta(milliseconds=rng.randrange(86_400_000))
    req, res = rng.randrange(1, 4000), rng.randrange(0, 2000)
    status = metrics.pop("status", 200)
    m = {
        "id": log_id,
        "organisation_id": org,
        "workspace_slug": workspace,
        "created_at": iso(created),
        "ai_org": "openai",
        "ai_model": rng.choice(["gpt-4o", "gpt-4o-mini"]),
        "req_units": req,
        "res_units": res,
        "total_units": req + res,
        "cost": round(req * 0.00025 + res * 0.001, 6),
        "cost_currency": "USD",
        "request_url": "https://api.openai.com/v1/chat/completions",
        "request_method": "POST",
        "response_status_code": status,
        "response_time": rng.randrange(50, 5000),
        "is_success": 200 <= status < 300,
        "cache_status": "MISS",
        "trace_id": f"trace-{rng.randrange(10**9)}",
        "span_id": f"span-{rng.randrange(10**9)}",
        "metadata.key": ["_user", "env"],
        "metadata.value": [f"user-{rng.randrange(50)}", "prod"],
    }
    m.update(metrics)
    return {
        "_id": log_id,
        "created_at": m["created_at"],
        "organisation_id": org,
        "request": {
            "url": m["request_url"],
            "method": "POST",
            "headers": {"content-type": "application/json"},
            "body": {"model": m["ai_model"], "messages": [{"role": "user", "content": "hello"}]},
            "portkeyHeaders": {"x-portkey-trace-id": m["trace_id"]},
        },
        "response": {
            "status": status,
            "headers": {"content-type": "application/json"},
            "body": {"id": "chatcmpl-1", "usage": {"prompt_tokens": req, "completion_tokens": res}},
            "responseTime": m["response_time"],
            "lastUsedOptionJsonPath": "$.config",
        },
        "metrics": m,
    }
