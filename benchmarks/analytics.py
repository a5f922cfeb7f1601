"""Latency of every analytics endpoint on 10 million generations, and the API's peak RSS.

    .venv/bin/python benchmarks/analytics.py [--rows 10000000] [--runs 20] [--keep DIR]
        [--layout ordered|shuffled] [--filters none,filtered,feedback] [--workspace ws-00] [--optimize]
        [--uncompressed-cache-mb N]

1. Load, in a child process (so the loader's memory is not counted as the API's):
   the migrations on an embedded warehouse (chdb) in a fresh temp data dir, then the
   generations generated INSIDE ClickHouse (`INSERT … SELECT … FROM numbers()`, 1M rows
   per INSERT, every field a deterministic function of `number`): 30 days ending
   2026-11-20 (UTC, afternoon peak), 20 workspaces (skewed: `ws-00` is the largest,
   ≈15 %), 40 models of 5 providers, 10,000 users in metadata `_user` (90 % of requests)
   plus `env` and `feature`, ≈4 % errors (429, 5xx, 4xx), a HIT / SEMANTIC HIT / MISS / …
   cache mix, retries and fallbacks, virtual keys, configs, API keys, prompts, traces
   (requests come in triples: 60 % share one trace, 30 % have one each, 10 % none), small
   request/response bodies. By default time grows with the insert order, as ingest
   writes a live stream (`--layout shuffled`: every INSERT spans the whole window, like a
   backfill, the worst case for FINAL). Feedback for 5 % of the generations (value
   −10..10, weight 0..1, by trace), 5 % of it updated once (a second version); the
   per-trace sums (trace_feedback) rewritten after each, as the feedback ingest does. The
   newest 1M rows (the last 3 days) arrive in 40,000-row inserts, as ingest writes
   them. Then one settle pass, as `tollgate up` runs it (warehouse/settle.py), with "now"
   30 minutes after the last day ended: every earlier day becomes one merged part, the
   last day stays as the inserts and background merges left it (deduplicated at read
   time). Nothing else is optimized (the number of active parts is printed).
2. Query: an organisation API key, `create_app(Settings(data_dir=…), pool_size=2)`,
   called in-process with FastAPI's TestClient. Every endpoint of docs/analytics.md
   (17 graphs, summary/cache, groups users / ai-models / metadata/_user / metadata/env /
   workspaces, groups/{group_by} for all 8 values, plus groups/model with every column
   and include_total), for the largest workspace and the whole 30-day window, with three
   filter sets: `none`; `filtered` (status_code + ai_org_model + metadata env=prod);
   `feedback` (weighted_feedback_min=3). Also groups/workspaces and groups/workspace
   organisation-wide (no workspace_slug: all 10M rows). 1 warm-up + N timed runs each;
   every response must be 200.
3. Prints p50 / p95 (nearest rank), the warm-up call ('first') and the peak RSS per endpoint
   and filter set. The API process opens the warehouse as `tollgate up` does, with the
   uncompressed cache of TOLLGATE_UNCOMPRESSED_CACHE_MB (`--uncompressed-cache-mb 0`: without
   it); the timed runs read what the earlier calls left in it, as a dashboard's queries do. Rows over
   a target (p50 ≤ 100 ms, p95 ≤ 300 ms, RSS ≤ 1.5 GiB) are marked. The process's peak
   RSS over the query phase (VmHWM, reset through /proc/self/clear_refs just before it),
   the load time, the CPU other processes used meanwhile, and a final JSON line with all
   figures. `--optimize` adds a second table after `OPTIMIZE TABLE … FINAL`. Exits 1
   when a response is not 200.

`--keep DIR` loads into DIR, or reuses it when it already holds `--rows` rows of that
layout loaded under the current migrations, and leaves it in place; without it a temp
dir is used and removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.events import GENERATION_COLUMNS as EVENT_COLUMNS  # noqa: E402

ORG = "bench-org"
START_MS = 1792627200000  # 2026-10-22T00:00:00Z: 30 days up to the end of 2026-11-20
DAYS = 30
WINDOW = {"time_of_generation_min": "2026-10-22T00:00:00+00:00", "time_of_generation_max": "2026-11-20T23:59:59.999+00:00"}
CHUNK = 1_000_000
INGEST_CHUNK = 40_000  # the newest CHUNK rows arrive in inserts of ingest's batch size (its default until 0023; 30,000 since)
# "now" for the settle pass: 2026-11-21 00:30 UTC. The last day ended 30 minutes ago, inside
# the 1-hour grace, so it stays as ingest and background merges left it (several parts,
# deduplicated at read time); every earlier day is settled, as `tollgate up` would have done.
SETTLE_NOW_MS = START_MS + DAYS * 86_400_000 + 30 * 60_000
TARGET_P50_MS, TARGET_P95_MS, TARGET_RSS_MIB = 100.0, 300.0, 1536.0
MARKER = "tollgate-analytics-bench.json"

# 40 models, most popular first: (provider, model, USD per 1M input tokens, per 1M output tokens)
MODELS = [
    ("openai", "gpt-4o-mini", 0.15, 0.6), ("openai", "gpt-4o", 2.5, 10), ("anthropic", "claude-3-5-sonnet-20241022", 3, 15),
    ("google", "gemini-2.0-flash", 0.1, 0.4), ("openai", "gpt-4.1-mini", 0.4, 1.6), ("anthropic", "claude-3-5-haiku-20241022", 0.8, 4),
    ("groq", "llama-3.3-70b-versatile", 0.59, 0.79), ("openai", "text-embedding-3-small", 0.02, 0), ("google", "gemini-1.5-flash", 0.075, 0.3),
    ("mistral-ai", "mistral-small-latest", 0.1, 0.3), ("openai", "gpt-4.1", 2, 8), ("anthropic", "claude-sonnet-4-20250514", 3, 15),
    ("google", "gemini-2.5-pro", 1.25, 10), ("openai", "o4-mini", 1.1, 4.4), ("groq", "llama-3.1-8b-instant", 0.05, 0.08),
    ("mistral-ai", "mistral-large-latest", 2, 6), ("google", "gemini-2.5-flash", 0.3, 2.5), ("anthropic", "claude-3-7-sonnet-20250219", 3, 15),
    ("openai", "o3-mini", 1.1, 4.4), ("mistral-ai", "codestral-latest", 0.3, 0.9), ("google", "text-embedding-004", 0.02, 0),
    ("groq", "mixtral-8x7b-32768", 0.24, 0.24), ("openai", "gpt-4.1-nano", 0.1, 0.4), ("anthropic", "claude-3-haiku-20240307", 0.25, 1.25),
    ("google", "gemini-1.5-pro", 1.25, 5), ("mistral-ai", "open-mistral-nemo", 0.15, 0.15), ("groq", "gemma2-9b-it", 0.2, 0.2),
    ("openai", "gpt-3.5-turbo", 0.5, 1.5), ("anthropic", "claude-opus-4-20250514", 15, 75), ("mistral-ai", "mistral-embed", 0.1, 0),
    ("groq", "deepseek-r1-distill-llama-70b", 0.75, 0.99), ("google", "gemini-2.0-flash-lite", 0.075, 0.3), ("openai", "o1", 15, 60),
    ("anthropic", "claude-3-opus-20240229", 15, 75), ("mistral-ai", "pixtral-large-latest", 2, 6), ("groq", "qwen-qwq-32b", 0.29, 0.39),
    ("google", "gemini-1.0-pro", 0.5, 1.5), ("anthropic", "claude-haiku-4-5", 1, 5), ("mistral-ai", "ministral-8b-latest", 0.1, 0.1),
    ("groq", "llama-guard-3-8b", 0.2, 0.2),
]
assert len(MODELS) == 40 and len({p for p, *_ in MODELS}) == 5
PROVIDER_URL = {
    "openai": "https://api.openai.com/v1/chat/completions", "anthropic": "https://api.anthropic.com/v1/messages",
    "google": "https://generativelanguage.googleapis.com/v1beta/models", "mistral-ai": "https://api.mistral.ai/v1/chat/completions",
    "groq": "https://api.groq.com/openai/v1/chat/completions",
}
FEATURES = ["chat", "search", "summarize", "classify", "extract", "translate", "code-review", "autocomplete", "support-bot",
            "rag-answer", "email-draft", "moderation"]
WORDS = ["the", "model", "answered", "with", "a", "long", "and", "careful", "explanation", "of", "question", "about",
         "tokens", "latency", "cost", "please", "summarize", "this", "document", "for", "our", "weekly", "report", "list",
         "open", "issues"]
# (status, cumulative probability): ≈95.9 % 200, then rate limits, server errors, client errors
STATUSES = [(200, 0.959), (429, 0.975), (500, 0.983), (503, 0.988), (400, 0.994), (502, 0.997), (504, 0.999), (401, 0.9995), (408, 1.0)]
# cache_status of a request that reached the cache, cumulative: None = no cache configured (NULL)
CACHE = [("MISS", 0.70), ("HIT", 0.82), ("SEMANTIC HIT", 0.87), ("SEMANTIC MISS", 0.91), ("DISABLED", 0.95), ("REFRESH", 0.96), (None, 1.0)]

# Every column ingest writes except pricing_status (left at its default): the SELECT
# of generations_sql() yields exactly these, in this order.
GENERATION_COLUMNS = [c for c in EVENT_COLUMNS if c != "pricing_status"]


def _arr(values) -> str:
    """A ClickHouse array literal of strings / numbers / NULLs."""
    def lit(v):
        if v is None:
            return "NULL"
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return repr(float(v)) if isinstance(v, float) else str(v)
    return "[" + ", ".join(lit(v) for v in values) + "]"


def _pick(thresholds_and_values: list[tuple], u: str) -> str:
    """multiIf picking a value by cumulative probability for the uniform ``u``."""
    parts = []
    for value, cum in thresholds_and_values[:-1]:
        parts.append(f"{u} < {cum}, {value}")
    return f"multiIf({', '.join(parts)}, {thresholds_and_values[-1][0]})"


def generations_sql(start: int, count: int, rows: int, layout: str = "ordered") -> str:
    """INSERT of rows number ∈ [start, start+count) of ``rows``: every value a function of ``number``.

    ``ordered``: time grows with ``number`` (plus up to 2 minutes of jitter), as a gateway's
    stream arrives, so each INSERT covers a few days, like ingest's batches. ``shuffled``:
    every row at a random time of the window, so every part overlaps every other (a backfill;
    the worst case for FINAL)."""
    if layout == "ordered":
        position = f"((t + tu_day) / {math.ceil(rows / 3)}) * {DAYS}"  # in days from the start, monotone in t
        day, frac = f"floor({position})", f"({position} - floor({position}))"
        jitter = "floor(tu_jitter * 120000)"
    elif layout == "shuffled":
        day, frac, jitter = f"floor(tu_day * {DAYS})", "tu_tod", "0"
    else:
        raise ValueError(layout)
    def q(s):
        return "NULL" if s is None else f"'{s}'"
    status_expr = _pick([(s, c) for s, c in STATUSES], "u_status")
    cache_expr = _pick([(q(s), c) for s, c in CACHE], "u_cache")
    # u(k): per-request uniform in [0,1); tu(k): per-triple (requests 3t, 3t+1, 3t+2 share a trace, workspace, user)
    inner = f"""
    WITH
        {_arr([p for p, *_ in MODELS])} AS m_provider,
        {_arr([m for _, m, *_ in MODELS])} AS m_model,
        {_arr([float(i) / 1e4 for _, _, i, _ in MODELS])} AS m_in,   -- cents per input token
        {_arr([float(o) / 1e4 for _, _, _, o in MODELS])} AS m_out,  -- cents per output token
        {_arr([PROVIDER_URL[p] for p, *_ in MODELS])} AS m_url,
        {_arr(FEATURES)} AS features,
        {_arr(WORDS)} AS words,
        ['prod', 'dev', 'team-a', 'team-b', 'batch'] AS vk_suffix
    SELECT
        number AS n,
        intDiv(number, 3) AS t,
        number % 3 AS pos,
        cityHash64(number, 1) / 18446744073709551616.0 AS u_status,
        cityHash64(number, 2) / 18446744073709551616.0 AS u_cache,
        cityHash64(number, 3) / 18446744073709551616.0 AS u_model,
        cityHash64(number, 4) / 18446744073709551616.0 AS u_retry,
        cityHash64(number, 5) / 18446744073709551616.0 AS u_mode,
        cityHash64(number, 6) / 18446744073709551616.0 AS u_opt,
        cityHash64(number, 7) / 18446744073709551616.0 AS u_cfg,
        cityHash64(number, 8) / 18446744073709551616.0 AS u_key,
        cityHash64(number, 9) / 18446744073709551616.0 AS u_prompt,
        cityHash64(number, 10) / 18446744073709551616.0 AS u_vk,
        cityHash64(number, 11) / 18446744073709551616.0 AS u_cost_null,
        cityHash64(number, 12) / 18446744073709551616.0 AS u_misc,
        greatest(cityHash64(number, 13) / 18446744073709551616.0, 1e-12) AS z1a,
        cityHash64(number, 14) / 18446744073709551616.0 AS z1b,
        greatest(cityHash64(number, 15) / 18446744073709551616.0, 1e-12) AS z2a,
        cityHash64(number, 16) / 18446744073709551616.0 AS z2b,
        sqrt(-2 * ln(z1a)) * cos(2 * pi() * z1b) AS z_lat,
        sqrt(-2 * ln(z1a)) * sin(2 * pi() * z1b) AS z_req,
        sqrt(-2 * ln(z2a)) * cos(2 * pi() * z2b) AS z_res,
        cityHash64(t, 101) / 18446744073709551616.0 AS tu_ws,
        cityHash64(t, 102) / 18446744073709551616.0 AS tu_day,
        cityHash64(t, 103) / 18446744073709551616.0 AS tu_tod,
        cityHash64(t, 104) / 18446744073709551616.0 AS tu_trace,
        cityHash64(t, 105) / 18446744073709551616.0 AS tu_user,
        cityHash64(t, 106) / 18446744073709551616.0 AS tu_user_id,
        cityHash64(t, 107) / 18446744073709551616.0 AS tu_env,
        cityHash64(t, 108) / 18446744073709551616.0 AS tu_feature,
        cityHash64(t, 109) / 18446744073709551616.0 AS tu_gap,
        cityHash64(t, 110) / 18446744073709551616.0 AS tu_jitter,
        -- 20 workspaces, skewed: P(ws-00) ≈ 15 %
        toUInt32(floor(20 * pow(tu_ws, 1.6))) AS ws_i,
        -- time: a day of 30, then a time of day with a UTC-afternoon peak (density ∝ 1/(1+0.6·cos 2πv));
        -- 86,200 s of a day + 120 s jitter + ≤ 10.6 s within a triple stays inside the day
        {frac} AS day_frac,
        toInt64({START_MS} + toInt64({day}) * 86400000
                + toInt64(floor(86200000 * (day_frac + 0.6 * sin(2 * pi() * day_frac) / (2 * pi()))))
                + toInt64({jitter}) + toInt64(pos * (300 + floor(tu_gap * 5000)))) AS ts_ms,
        1 + toUInt32(floor(40 * pow(u_model, 2.2))) AS mi,
        m_provider[mi] AS provider,
        m_model[mi] AS model,
        m_url[mi] AS url,
        {status_expr} AS status,
        status >= 400 AS is_error,
        if(is_error, NULL, {cache_expr}) AS cache,
        cache IN ('HIT', 'SEMANTIC HIT') AS is_hit,
        position(model, 'embed') > 0 AS is_embedding,
        toUInt32(least(120000, greatest(1, floor(exp(ln(if(is_embedding, 60, 700)) + 1.1 * z_req))))) AS req,
        toUInt32(if(is_error OR is_embedding, 0, least(16000, greatest(1, floor(exp(ln(260) + 0.9 * z_res)))))) AS res,
        toUInt32(multiIf(
            is_hit, 8 + floor(u_misc * 140),
            status = 504, 30000 + floor(u_misc * 30000),
            is_error, 40 + floor(u_misc * 1500),
            is_embedding, greatest(20, floor(exp(ln(120) + 0.5 * z_lat))),
            least(180000, greatest(60, floor(exp(ln(700 + 1.2 * res) + 0.55 * z_lat)))))) AS latency,
        multiIf(u_cost_null < 0.01, NULL, status IN (429, 401, 400, 408), 0.,
                round(req * m_in[mi] + res * m_out[mi], 6)) AS cost_cents,
        multiIf(u_retry < 0.97, 0, u_retry < 0.99, 1, u_retry < 0.997, 2, 3) AS retries,
        multiIf(u_mode < 0.65, 'single', u_mode < 0.85, 'fallback', 'loadbalance') AS mode_,
        multiIf(mode_ = 'fallback', multiIf(u_opt < 0.85, 0, u_opt < 0.97, 1, 2),
                mode_ = 'loadbalance', toUInt32(floor(u_opt * 3)), 0) AS option_index,
        if(mode_ = 'single' AND u_cfg < 0.5, '',
           'pc-' || lower(hex(toUInt16(cityHash64('config', toUInt32(floor(15 * pow(u_cfg, 1.5))))))))  AS cfg,
        'ak-' || lower(hex(toUInt32(cityHash64('key', toUInt32(floor(60 * pow(u_key, 1.8))))))) AS api_key,
        if(u_prompt < 0.55, '', 'prompt-' || toString(toUInt32(floor(30 * pow(u_prompt, 2))))) AS prompt,
        provider || '-' || vk_suffix[1 + toUInt32(floor(5 * pow(u_vk, 1.5)))] AS vk,
        multiIf(tu_trace < 0.6, 'tr-' || lower(hex(cityHash64(t, 201))),
                tu_trace < 0.9, 'tr-' || lower(hex(cityHash64(n, 202))), '') AS trace,
        tu_user < 0.9 AS has_user,
        'user-' || toString(toUInt32(floor(10000 * pow(tu_user_id, 1.5)))) AS user_,
        multiIf(tu_env < 0.7, 'prod', tu_env < 0.9, 'staging', 'dev') AS env,
        features[1 + toUInt32(floor(12 * pow(tu_feature, 1.3)))] AS feature,
        arrayStringConcat(arrayMap(i -> words[1 + cityHash64(n, 300 + i) % length(words)], range(6 + n % 12)), ' ') AS content
    FROM numbers({int(start)}, {int(count)})
    """
    outer = f"""
    SELECT
        lower(hex(cityHash64(n, 0))) || leftPad(lower(hex(n)), 16, '0'),
        '{ORG}',
        'ws-' || leftPad(toString(ws_i), 2, '0'),
        fromUnixTimestamp64Milli(ts_ms, 'UTC'),
        'Bench Org',
        if(prompt = '', '', 'pid-' || lower(hex(cityHash64(prompt)))),
        if(prompt = '', '', 'pv-' || lower(hex(cityHash64(prompt, 1)))),
        prompt,
        if(cfg = '', '', 'cid-' || lower(hex(cityHash64(cfg)))),
        cfg,
        if(cfg = '', '', 'cv-' || lower(hex(cityHash64(cfg, 1)))),
        status < 300,
        provider,
        model,
        req,
        res,
        req + res,
        cost_cents,
        'USD',
        url,
        'POST',
        status,
        latency,
        u_misc < 0.2,
        cache,
        multiIf(cache IS NULL, NULL, startsWith(cache, 'SEMANTIC'), 'semantic', 'simple'),
        if(u_misc < 0.35, 1, 0),
        retries,
        trace,
        lower(hex(cityHash64(n, 203))),
        ['llm', 'chat', 'rag.answer', 'classify'][1 + n % 4],
        if(trace != '' AND pos > 0, lower(hex(cityHash64(t * 3, 203))), ''),
        mode_,
        vk,
        ['REST', 'SDK'][1 + (cityHash64(n, 17) % 2)],
        'node',
        'v20.11.1',
        '1.9.0',
        lower(hex(cityHash64(n, 204))),
        option_index,
        '',
        arrayConcat(if(has_user, ['_user'], []), ['env', 'feature']),
        arrayConcat(if(has_user, [user_], []), [env, feature]),
        api_key,
        toUInt32(u_misc * 3),
        toUInt32(u_misc * 6),
        toUInt32(if(cache IS NULL, 0, 1 + u_misc * 12)),
        toUInt32(u_misc * 4),
        toUInt32(4 + u_misc * 20),
        toUInt32(if(is_hit, 0, greatest(0, toInt64(latency) - 10))),
        '{{"content-type":"application/json","x-portkey-provider":"' || provider || '"}}',
        '{{"model":"' || model || '","messages":[{{"role":"user","content":"' || content || '"}}]}}',
        '{{"x-portkey-trace-id":"' || trace || '","x-portkey-virtual-key":"' || vk || '"}}',
        '{{"content-type":"application/json"}}',
        if(is_error, '{{"error":{{"message":"upstream error","code":' || toString(status) || '}}}}',
           '{{"id":"chatcmpl-' || lower(hex(cityHash64(n, 205))) || '","choices":[{{"index":0,"message":{{"role":"assistant","content":"'
           || reverse(content) || '"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":' || toString(req)
           || ',"completion_tokens":' || toString(res) || '}}}}'),
        '',
        ''
    FROM ({inner})
    """
    return f"INSERT INTO generations ({', '.join(GENERATION_COLUMNS)}) {outer}"


# Feedback on 5 % of the generations (of those with a trace: 5.56 % of 90 %), attached to their trace; value
# skewed positive, weight 0..1 in steps of 0.01. 5 % of the feedback ids get a second, later version.
FEEDBACK_SQL = """
INSERT INTO feedback (id, organisation_id, workspace_slug, trace_id, value, weight, metadata.key, metadata.value, created_at, updated_at)
SELECT
    'fb-' || id,
    organisation_id,
    workspace_slug,
    trace_id,
    toInt8(least(10, greatest(-10, round(3 + 5 * sqrt(-2 * ln(greatest(cityHash64(id, 'v1') / 18446744073709551616.0, 1e-12)))
                                          * cos(2 * pi() * (cityHash64(id, 'v2') / 18446744073709551616.0)))))),
    round(cityHash64(id, 'w') / 18446744073709551616.0, 2),
    ['source'], [if(cityHash64(id, 's') % 3 = 0, 'thumbs', 'rating')],
    created_at + toIntervalSecond(30 + cityHash64(id, 'd') % 3600),
    created_at + toIntervalSecond(30 + cityHash64(id, 'd') % 3600)
FROM generations
WHERE organisation_id = '{org}' AND trace_id != '' AND cityHash64(id, 'fb') % 10000 < 556
"""
FEEDBACK_UPDATE_SQL = """
INSERT INTO feedback (id, organisation_id, workspace_slug, trace_id, value, weight, metadata.key, metadata.value, created_at, updated_at)
SELECT id, organisation_id, workspace_slug, trace_id,
       toInt8(least(10, greatest(-10, value + if(cityHash64(id, 'u') % 2 = 0, 3, -3)))),
       weight, metadata.key, metadata.value, created_at, updated_at + toIntervalHour(2)
FROM feedback
WHERE organisation_id = '{org}' AND cityHash64(id, 'upd') % 100 < 5
"""


# --------------------------------------------------------------------------- loading (child process)


def load(data_dir: Path, rows: int, layout: str) -> dict:
    """Migrate and load ``rows`` generations (+ feedback) unless ``data_dir`` already holds exactly that."""
    from warehouse.client import connect
    from warehouse.migrate import discover, migrate

    dsn = f"chdb://{(data_dir / 'warehouse').resolve()}"
    client = connect(dsn)
    migrate(client, retention_days=0)
    marker = data_dir / MARKER
    # A migration added after the load (e.g. a MATERIALIZED column) would only be computed on
    # the fly for the old parts: such a data dir is reloaded, not reused.
    migrations = [m.path.name for m in discover()]
    have = int(client.command(f"SELECT count() FROM generations WHERE organisation_id = '{ORG}'"))
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("rows") == rows and info.get("layout") == layout and info.get("migrations") == migrations and have == rows:
            info["reused"] = True
            return info
    if have:
        print(f"{data_dir} holds {have:,} rows, not {rows:,} {layout} loaded under the current migrations: reloading", flush=True)
        client.command("TRUNCATE TABLE generations")
        client.command("TRUNCATE TABLE feedback")
        client.command("TRUNCATE TABLE trace_feedback")
        client.command("TRUNCATE TABLE metadata_values")
        client.command("TRUNCATE TABLE feedback_generations")
    t0 = time.perf_counter()
    live = max(rows - CHUNK, 0)
    inserts = [(s, min(CHUNK, live - s)) for s in range(0, live, CHUNK)]
    inserts += [(s, min(INGEST_CHUNK, rows - s)) for s in range(live, rows, INGEST_CHUNK)]
    for start, count in inserts:
        c0 = time.perf_counter()
        client.command(generations_sql(start, count, rows, layout))
        if count == CHUNK or start + count == rows:
            print(f"  generations {start + count:>12,} / {rows:,}  ({time.perf_counter() - c0:.1f} s)", flush=True)
    from warehouse.queries.metadata import store_all_metadata_values

    store_all_metadata_values(client)  # what the ingest stores before each batch (0023)
    gen_s = time.perf_counter() - t0
    from warehouse.queries.feedback import refresh_traces

    # The per-trace feedback sums (trace_feedback), as the feedback ingest keeps them: all the
    # traces after the first feedback, then the updated ones after the updates (a second part,
    # as live feedback leaves some: FINAL then has parts to merge).
    client.command(FEEDBACK_SQL.format(org=ORG))
    refresh_traces(client, None, orgs=[ORG])
    client.command(FEEDBACK_UPDATE_SQL.format(org=ORG))
    updated = client.query(f"SELECT DISTINCT trace_id FROM feedback WHERE organisation_id = '{ORG}' AND updated_at != created_at")
    refresh_traces(client, [(ORG, t) for (t,) in updated.result_rows])
    load_s = time.perf_counter() - t0
    from warehouse.settle import settle

    s0 = time.perf_counter()
    settled = settle(client, now=datetime.fromtimestamp(SETTLE_NOW_MS / 1000, UTC), max_days=DAYS + 1)
    settle_s = time.perf_counter() - s0
    info = {"rows": rows, "layout": layout, "migrations": migrations, "load_seconds": round(load_s, 1),
            "generations_seconds": round(gen_s, 1), "settle_seconds": round(settle_s, 1), "settled_days": len(settled),
            "reused": False}
    marker.write_text(json.dumps(info))
    print(f"loaded in {load_s:.1f} s (generations {gen_s:.1f} s, feedback {load_s - gen_s:.1f} s); "
          f"settled {len(settled)} ended days in {settle_s:.1f} s (the last day stays open)", flush=True)
    print_distribution(client)
    return info


def print_distribution(client) -> None:
    """What was loaded: counts, FINAL counts, and the shape of the main dimensions."""
    def one(sql):
        return client.query(sql).result_rows
    where = f"organisation_id = '{ORG}'"
    total, = one(f"SELECT count() FROM generations WHERE {where}")[0]
    final, = one(f"SELECT count() FROM generations FINAL WHERE {where}")[0]
    fb, fb_final, fb_traces = one(f"SELECT (SELECT count() FROM feedback WHERE {where}), count(), uniqExact(trace_id) FROM feedback FINAL WHERE {where}")[0]
    print(f"generations: {total:,} rows, {final:,} with FINAL;  feedback: {fb:,} rows, {fb_final:,} with FINAL "
          f"({100 * fb_final / max(final, 1):.2f} % of generations, {fb_traces:,} traces)")
    lo, hi = one(f"SELECT min(created_at), max(created_at) FROM generations WHERE {where}")[0]
    print(f"  created_at {lo} … {hi}")
    ws = one(f"SELECT workspace_slug, count() c FROM generations WHERE {where} GROUP BY 1 ORDER BY c DESC")
    print(f"  workspaces {len(ws)}: " + ", ".join(f"{w} {c / total:.1%}" for w, c in ws[:5]) + ", …, " + f"{ws[-1][0]} {ws[-1][1] / total:.1%}")
    r = one(f"""SELECT uniqExact(ai_model), uniqExact(ai_org), countIf(response_status_code >= 400) / count(),
                       countIf(cache_status = 'HIT') / count(), countIf(cache_status = 'SEMANTIC HIT') / count(),
                       countIf(cache_status = 'MISS') / count(), countIf(cache_status IS NULL) / count(),
                       countIf(retry_success_count > 0) / count(), countIf(mode = 'fallback' AND last_used_option_index > 0) / count(),
                       uniqExact(virtual_key), uniqExact(config), uniqExact(api_key_id), uniqExact(prompt_slug),
                       countIf(trace_id != '') / count(), uniqExact(trace_id), countIf(cost IS NULL) / count(),
                       avg(response_time), quantileExact(0.5)(response_time), sum(cost) / 100
                FROM generations WHERE {where}""")[0]
    print(f"  {r[0]} models / {r[1]} providers; errors {r[2]:.2%}; cache HIT {r[3]:.1%}, SEMANTIC HIT {r[4]:.1%}, MISS {r[5]:.1%}, "
          f"NULL {r[6]:.1%}; retried {r[7]:.2%}, fallback rescued-candidates {r[8]:.2%}")
    print(f"  {r[9]} virtual keys, {r[10]} configs (incl. ''), {r[11]} API keys, {r[12]} prompt slugs (incl. ''); "
          f"{r[13]:.0%} with a trace, {r[14]:,} traces; cost NULL {r[15]:.1%}; latency avg {r[16]:.0f} ms, p50 {r[17]} ms; "
          f"total cost ${r[18]:,.0f}")
    codes = one(f"SELECT response_status_code, count() FROM generations WHERE {where} GROUP BY 1 ORDER BY 1")
    print("  status codes: " + ", ".join(f"{s} {c / total:.2%}" for s, c in codes))
    md = one(f"""SELECT countIf(has(metadata.key, '_user')) / count(), uniqExact(metadata.value[indexOf(metadata.key, '_user')]) - 1,
                        countIf(metadata.value[indexOf(metadata.key, 'env')] = 'prod') / count()
                 FROM generations WHERE {where}""")[0]
    print(f"  metadata: _user on {md[0]:.1%} ({md[1]:,} users), env=prod {md[2]:.1%}, feature on 100 %")
    top = one(f"SELECT ai_org || '__' || ai_model, count() c FROM generations WHERE {where} GROUP BY 1 ORDER BY c DESC LIMIT 3")
    print("  top models: " + ", ".join(f"{m} {c / total:.1%}" for m, c in top))
    fv = one(f"SELECT min(value), max(value), avg(value), min(weight), max(weight) FROM feedback FINAL WHERE {where}")[0]
    print(f"  feedback value {fv[0]}..{fv[1]} (avg {fv[2]:.2f}), weight {fv[3]}..{fv[4]}")


# --------------------------------------------------------------------------- querying (this process)

GRAPHS = [
    "requests", "cost", "latency", "tokens", "users", "users/requests", "errors", "errors/rate", "errors/stacks",
    "errors/status-codes", "requests/rescued", "cache/hit-rate", "cache/latency", "feedbacks", "feedbacks/scores",
    "feedbacks/weighted", "feedbacks/ai-models",
]
GROUP_BY = ["ai_service", "model", "status_code", "api_key", "config", "workspace", "provider", "prompt"]
ALL_COLUMNS = ("requests,errors,cache_hits,users,requests_with_feedback,tokens,prompt_tokens,completion_tokens,avg_tokens,"
               "avg_latency,p50_latency,p90_latency,p99_latency,cost,avg_cost,error_rate,cache_hit_rate,avg_weighted_feedback,last_seen")


def endpoints() -> list[tuple[str, str, dict]]:
    """(label, path, extra params) of every endpoint in docs/analytics.md."""
    eps = [(f"graphs/{g}", f"/v1/analytics/graphs/{g}", {}) for g in GRAPHS]
    eps.append(("summary/cache", "/v1/analytics/summary/cache", {}))
    for g in ["users", "ai-models", "metadata/_user", "metadata/env", "workspaces"]:
        eps.append((f"groups/{g}", f"/v1/analytics/groups/{g}", {}))
    eps += [(f"groups/{g}", f"/v1/analytics/groups/{g}", {}) for g in GROUP_BY]
    eps.append(("groups/model +all cols+total", "/v1/analytics/groups/model", {"columns": ALL_COLUMNS, "include_total": "true"}))
    return eps


# Organisation-wide variants (no workspace_slug): the only routes that span every workspace.
ORG_WIDE = [("groups/workspaces", "/v1/analytics/groups/workspaces"), ("groups/workspace", "/v1/analytics/groups/workspace")]

FILTER_SETS = {
    "none": {},
    "filtered": {
        "status_code": "200,429,500,503",
        "ai_org_model": "openai__gpt-4o,openai__gpt-4o-mini,anthropic__claude-3-5-sonnet-20241022,google__gemini-2.0-flash",
        "metadata": json.dumps({"env": "prod"}),
    },
    "feedback": {"weighted_feedback_min": "3"},
}


def vm_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process), to see whether others competed for the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy / tick, (int(own[11]) + int(own[12])) / tick


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def wait_for_merges(client, timeout: float) -> float:
    t0 = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t0 < timeout:
        running = int(client.command("SELECT count() FROM system.merges WHERE database = currentDatabase()"))
        quiet = quiet + 1 if running == 0 else 0
        if quiet >= 3:
            break
        time.sleep(1)
    return time.perf_counter() - t0


def active_parts(client) -> dict[str, int]:
    rows = client.query("SELECT table, count() FROM system.parts WHERE active AND database = currentDatabase() "
                        "AND table IN ('generations', 'feedback', 'trace_feedback') GROUP BY table").result_rows
    return {t: int(c) for t, c in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="data dir to load into, or to reuse when it already holds --rows rows; kept afterwards")
    ap.add_argument("--layout", choices=["ordered", "shuffled"], default="ordered",
                    help="ordered: time grows with the insert order, as ingest writes (default); shuffled: every INSERT "
                         "spans the whole window, so all parts overlap (a backfill; worst case for FINAL)")
    ap.add_argument("--workspace", help="workspace to query (default: the largest, ws-00)")
    ap.add_argument("--filters", default=",".join(FILTER_SETS), help="filter sets to run (default: all)")
    ap.add_argument("--optimize", action="store_true",
                    help="afterwards, OPTIMIZE TABLE … FINAL and run every endpoint again (a second table)")
    ap.add_argument("--merge-wait", type=float, default=900, help="seconds to wait for background merges before querying")
    ap.add_argument("--uncompressed-cache-mb", type=int, default=None,
                    help="the API process's uncompressed cache (TOLLGATE_UNCOMPRESSED_CACHE_MB; default: the setting's default; 0 = off)")
    ap.add_argument("--_load", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._load:  # child: load and report
        info = load(args._load, args.rows, args.layout)
        print("LOADED " + json.dumps(info), flush=True)
        return

    data_dir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="tollgate-analytics-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, data_dir)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def code_version() -> str:
    """The commit measured, plus a fingerprint of uncommitted changes outside benchmarks/."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", ".", ":!benchmarks"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" + uncommitted changes (diff sha256 {hashlib.sha256(diff).hexdigest()[:10]})" if diff else "")


def run(args, data_dir: Path) -> None:
    version = code_version()
    print(f"code {version}; data dir {data_dir}; {args.rows:,} generations, {args.layout} layout", flush=True)
    child = subprocess.run([sys.executable, __file__, "--_load", str(data_dir), "--rows", str(args.rows), "--layout", args.layout],
                           check=False, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = child.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("LOADED ")), flush=True)
    if child.returncode != 0:
        raise SystemExit(f"loading failed (exit {child.returncode})")
    info = json.loads(next(line for line in lines if line.startswith("LOADED "))[7:])

    version = code_version()  # the code imported now is the code measured
    from fastapi.testclient import TestClient

    from analytics_api.app import create_app
    from analytics_api.auth import SCOPES, hash_key, new_key
    from tollgate.settings import Settings
    from warehouse.client import connect
    from warehouse.queries import api_keys

    settings = Settings(data_dir=data_dir, kafka_bootstrap="127.0.0.1:1",
                        **({} if args.uncompressed_cache_mb is None else {"uncompressed_cache_mb": args.uncompressed_cache_mb}))
    client = connect(settings.warehouse_dsn)
    merge_s = wait_for_merges(client, args.merge_wait)
    parts_before = active_parts(client)
    workspace = args.workspace or client.command(
        f"SELECT workspace_slug FROM generations WHERE organisation_id = '{ORG}' GROUP BY 1 ORDER BY count() DESC, 1 LIMIT 1")
    ws_rows = int(client.command(f"SELECT count() FROM generations FINAL WHERE organisation_id = '{ORG}' AND workspace_slug = '{workspace}'"))
    print(f"load {info['load_seconds']} s{' (reused data dir; time of the original load)' if info['reused'] else ''}; "
          f"waited {merge_s:.0f} s for background merges; active parts: generations {parts_before.get('generations', 0)}, "
          f"feedback {parts_before.get('feedback', 0)}, trace_feedback {parts_before.get('trace_feedback', 0)}; querying workspace {workspace} ({ws_rows:,} generations in the window)", flush=True)

    key = new_key()
    api_keys.insert(client, key_hash=hash_key(key), organisation_id=ORG, workspace_slug="", scopes=list(SCOPES), name="bench")
    app = create_app(settings, pool_size=2)
    paths = set(app.openapi().get("paths", {}))  # (app.routes holds lazily included routers in recent FastAPI)
    missing = [p for p in dict.fromkeys(p for _, p, _ in endpoints()) if p not in paths
               and not (p.startswith("/v1/analytics/groups/metadata/") and "/v1/analytics/groups/metadata/{metadataKey}" in paths)
               and not (p.rsplit("/", 1)[1] in GROUP_BY and "/v1/analytics/groups/{group_by}" in paths)]
    if missing:
        print("not in the app's OpenAPI paths (not implemented yet?): " + ", ".join(missing), flush=True)

    filter_names = [f for f in args.filters.split(",") if f]
    plan = [(label, path, {**WINDOW, "workspace_slug": workspace, **extra, **FILTER_SETS[f]}, f)
            for f in filter_names for label, path, extra in endpoints()]
    plan += [(label, path, {**WINDOW, **FILTER_SETS["none"]}, "none, org-wide") for label, path in ORG_WIDE]

    headers = {"x-portkey-api-key": key}
    with TestClient(app) as http:
        # Sanity check (not timed): the requests graph agrees with a direct count.
        r = http.get("/v1/analytics/graphs/requests", params={**WINDOW, "workspace_slug": workspace}, headers=headers)
        if r.status_code == 200 and r.json().get("summary", {}).get("total") != ws_rows:
            print(f"WARNING: graphs/requests summary.total {r.json()['summary'].get('total')} != {ws_rows} rows counted directly")
        main_phase = query_phase(http, plan, headers, args.runs)
        parts_after = active_parts(client)
        optimized_phase = None
        if args.optimize:
            (data_dir / MARKER).unlink(missing_ok=True)  # an optimized data dir is not the table ingest leaves: never reuse it
            t0 = time.perf_counter()
            client.command("OPTIMIZE TABLE generations FINAL")
            client.command("OPTIMIZE TABLE feedback FINAL")
            optimize_s = time.perf_counter() - t0
            parts_optimized = active_parts(client)
            print(f"OPTIMIZE … FINAL took {optimize_s:.0f} s; active parts: generations {parts_optimized.get('generations', 0)}, "
                  f"feedback {parts_optimized.get('feedback', 0)}", flush=True)
            optimized_phase = query_phase(http, plan, headers, args.runs)
            optimized_phase.update(optimize_seconds=round(optimize_s, 1), parts=parts_optimized)

    print()
    print(f"== as loaded and settled (last day open): active parts generations {parts_before.get('generations', 0)}, "
          f"feedback {parts_before.get('feedback', 0)}")
    print_table(main_phase)
    if optimized_phase:
        print()
        print(f"== after OPTIMIZE TABLE … FINAL: active parts generations {optimized_phase['parts'].get('generations', 0)}, "
              f"feedback {optimized_phase['parts'].get('feedback', 0)}")
        print_table(optimized_phase)
    print()
    print(f"code {version}; {args.layout} layout; {args.runs} timed runs per row (+1 warm-up: 'first'); p95 = nearest rank; "
          f"uncompressed cache {settings.uncompressed_cache_mb} MiB")
    print(f"workspace {workspace}: {ws_rows:,} of {args.rows:,} generations; window {WINDOW['time_of_generation_min']} … "
          f"{WINDOW['time_of_generation_max']}")
    print(f"load time: {info['load_seconds']} s for {args.rows:,} generations + feedback"
          f"{' (reused data dir; time of the original load)' if info['reused'] else ''}")
    print(f"active parts: generations {parts_before.get('generations', 0)} → {parts_after.get('generations', 0)}, "
          f"feedback {parts_before.get('feedback', 0)} → {parts_after.get('feedback', 0)} (before → after the query phase; not optimized)")
    m = main_phase
    print(f"peak RSS during the query phase: {m['peak_rss_mib']:,} MiB (RSS at its start {m['rss_start_mib']:,} MiB; target ≤ "
          f"{TARGET_RSS_MIB:,.0f} MiB: {'OK' if m['peak_rss_mib'] <= TARGET_RSS_MIB else 'OVER'})")
    print(f"query phase: {m['query_seconds']} s wall; CPU {m['cpu_seconds']['this_process']} s by this process, "
          f"{m['cpu_seconds']['other_processes']} s by other processes ({os.cpu_count()} cores)"
          f"{'  <-- other load on the machine: timings are pessimistic' if m['cpu_seconds']['other_processes'] > 0.1 * m['query_seconds'] else ''}")
    if code_version() != version:
        print(f"WARNING: the code changed during the run (now {code_version()}); the figures are of {version} as imported at the start")
    failures = m["failures"] + (optimized_phase["failures"] if optimized_phase else [])
    print(json.dumps({
        "code": version, "rows": args.rows, "layout": args.layout, "runs": args.runs, "workspace": workspace, "workspace_rows": ws_rows,
        "uncompressed_cache_mb": settings.uncompressed_cache_mb,
        "load_seconds": info["load_seconds"], "load_reused": info["reused"],
        "parts": {"before": parts_before, "after": parts_after},
        "targets": {"p50_ms": TARGET_P50_MS, "p95_ms": TARGET_P95_MS, "rss_mib": TARGET_RSS_MIB},
        **main_phase,
        **({"after_optimize": optimized_phase} if optimized_phase else {}),
    }))
    if failures:
        raise SystemExit(1)


def query_phase(http, plan, headers: dict, runs: int) -> dict:
    """Every (endpoint, filter set) of ``plan``: 1 warm-up + ``runs`` timed calls; p50/p95 and peak RSS."""
    results, failures = [], []
    # Peak RSS: VmHWM is reset before every endpoint (so each row gets its own peak); the
    # query phase's peak is the largest of them (the segments cover the whole phase).
    Path("/proc/self/clear_refs").write_text("5")
    rss_start = vm_kib("VmRSS") / 1024
    peak_rss = rss_start
    cpu0 = cpu_seconds()
    q0 = time.perf_counter()
    for label, path, params, fset in plan:
        Path("/proc/self/clear_refs").write_text("5")
        times = []
        for i in range(runs + 1):
            t0 = time.perf_counter()
            resp = http.get(path, params=params, headers=headers)
            elapsed = (time.perf_counter() - t0) * 1000
            if resp.status_code != 200:
                failures.append({"endpoint": label, "filters": fset, "status": resp.status_code, "body": resp.text[:300]})
                print(f"FAIL {label} [{fset}]: HTTP {resp.status_code} {resp.text[:300]}", flush=True)
                break
            if i:  # run 0 is the warm-up
                times.append(elapsed)
            else:
                first = elapsed
        rss = vm_kib("VmHWM") / 1024
        peak_rss = max(peak_rss, rss)
        if len(times) == runs:
            s = sorted(times)
            r = {"endpoint": label, "filters": fset, "first_ms": round(first, 1), "p50_ms": round(percentile(s, 0.5), 1),
                 "p95_ms": round(percentile(s, 0.95), 1), "max_ms": round(s[-1], 1), "peak_rss_mib": round(rss)}
            r["over_target"] = [name for name, bad in (("p50", r["p50_ms"] > TARGET_P50_MS), ("p95", r["p95_ms"] > TARGET_P95_MS),
                                                       ("RSS", r["peak_rss_mib"] > TARGET_RSS_MIB)) if bad]
            results.append(r)
            print(f"  {label:<32} {fset:<16} p50 {r['p50_ms']:>8.1f}  p95 {r['p95_ms']:>8.1f}  first {first:>8.1f}  "
                  f"RSS {rss:>6,.0f} MiB", flush=True)
    query_s = time.perf_counter() - q0
    cpu1 = cpu_seconds()
    return {
        "peak_rss_mib": round(peak_rss), "rss_start_mib": round(rss_start), "query_seconds": round(query_s),
        "cpu_seconds": {"this_process": round(cpu1[1] - cpu0[1]), "other_processes": round(max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])))},
        "over_target": [f"{r['endpoint']} [{r['filters']}]" for r in results if r["over_target"]],
        "failures": failures, "results": results,
    }


def print_table(phase: dict) -> None:
    print(f"{'endpoint':<32} {'filters':<16} {'p50 ms':>8} {'p95 ms':>8} {'first':>8} {'RSS MiB':>8}  over target (p50 ≤ {TARGET_P50_MS:.0f}, "
          f"p95 ≤ {TARGET_P95_MS:.0f}, RSS ≤ {TARGET_RSS_MIB:.0f})")
    print("-" * 110)
    for r in phase["results"]:
        print(f"{r['endpoint']:<32} {r['filters']:<16} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['first_ms']:>8.1f} {r['peak_rss_mib']:>8,}  "
              f"{'<-- ' + ' & '.join(r['over_target']) if r['over_target'] else ''}")
    print("-" * 110)
    cpu = phase["cpu_seconds"]
    print(f"{len(phase['results'])} endpoint × filter rows; {len(phase['over_target'])} over a target; {len(phase['failures'])} failed; "
          f"peak RSS {phase['peak_rss_mib']:,} MiB; {phase['query_seconds']} s wall, CPU {cpu['this_process']} s this process, "
          f"{cpu['other_processes']} s other processes"
          f"{'  <-- other load on the machine: timings are pessimistic' if cpu['other_processes'] > 0.1 * phase['query_seconds'] else ''}")

if __name__ == "__main__":
    main()
