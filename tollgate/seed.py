"""Deterministic synthetic gateway traffic for ``tollgate seed``.

:func:`generate` yields ``("gateway_log", LogObject)`` and ``("feedback", FeedbackEvent)``
pairs in the wire format of docs/events.md; :func:`publish` sends them to Kafka.

What the traffic looks like:

* Traces of 1..6 generations (spans of one app run) from a few hundred users with a
  Zipf-like activity, in five teams, each with its own app, prompts and API key.
  Traffic peaks on weekday afternoons (UTC).
* Five providers and 13 models priced from the bundled table (:mod:`ingest.pricing`).
  ``request.body`` is the OpenAI-style chat request the client sent to the gateway;
  ``response.body`` is shaped like the provider's own API (OpenAI-compatible,
  Anthropic messages, Gemini generateContent) with its usage block, and the token
  counts in the metrics agree with it.
* About 3 % 4xx and 2 % 5xx errors (no tokens, no cost), simple and semantic cache
  hits (a few milliseconds, no cost), prompt-cache reads/writes, retries, fallbacks
  and load-balanced configs.
* Feedback on about 5 % of traces, shortly after the trace ends.

Same arguments (including ``end``) give byte-identical output: every random choice,
id and timestamp comes from one ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from random import Random
from typing import TYPE_CHECKING, Iterator

import orjson
from tqdm import tqdm

from ingest.pricing import PricingTable

if TYPE_CHECKING:
    from kafka import KafkaProducer

    from tollgate.settings import Settings

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_NAIVE_EPOCH = datetime(1970, 1, 1)


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, slots=True)
class _Model:
    provider: str  # Portkey provider slug = pricing file name
    name: str
    weight: float  # share of requests that are not routed by a config
    first_token_ms: float  # median latency before the first token
    ms_per_token: float  # median generation time per output token
    reasoning: bool = False  # reports reasoning tokens
    prompt_cache: bool = False  # reports prompt-cache reads (and, for Anthropic, writes)

    @property
    def url(self) -> str:
        return _PROVIDER_URLS[self.provider].format(model=self.name)


_PROVIDER_URLS = {
    "openai": "https://api.openai.com/v1/chat/completions",
    "anthropic": "https://api.anthropic.com/v1/messages",
    "google": "https://generativelanguage.googleapis.com/v1beta/models/{model}:generateContent",
    "mistral-ai": "https://api.mistral.ai/v1/chat/completions",
    "groq": "https://api.groq.com/openai/v1/chat/completions",
}

_MODELS = [
    _Model("openai", "gpt-4o", 16, 450, 12, prompt_cache=True),
    _Model("openai", "gpt-4o-mini", 24, 350, 8, prompt_cache=True),
    _Model("openai", "o3-mini", 5, 900, 9, reasoning=True, prompt_cache=True),
    _Model("openai", "gpt-4.1-mini", 6, 380, 9, prompt_cache=True),
    _Model("anthropic", "claude-3-5-sonnet-20241022", 12, 700, 14, prompt_cache=True),
    _Model("anthropic", "claude-3-5-haiku-20241022", 8, 450, 9, prompt_cache=True),
    _Model("anthropic", "claude-sonnet-4-20250514", 5, 800, 15, prompt_cache=True),
    _Model("google", "gemini-2.0-flash-001", 8, 300, 5),
    _Model("google", "gemini-2.5-flash-lite", 3, 250, 4),
    _Model("mistral-ai", "mistral-large-latest", 4, 500, 14),
    _Model("mistral-ai", "mistral-small-latest", 3, 300, 8),
    _Model("groq", "llama-3.3-70b-versatile", 4, 150, 3),
    _Model("groq", "llama-3.1-8b-instant", 2, 80, 1.5),
]
_MODEL_BY_NAME = {m.name: m for m in _MODELS}
_MODEL_CUM = list(accumulate(m.weight for m in _MODELS))


@dataclass(frozen=True, slots=True)
class _Config:
    slug: str
    mode: str  # single | fallback | loadbalance
    targets: tuple[_Model, ...]
    target_cum: tuple[float, ...]  # loadbalance weights (cumulative); fallback: how often each target ends up used
    cache: str | None  # None | "simple" | "semantic"


def _config(slug: str, mode: str, targets: list[tuple[str, float]], cache: str | None = None) -> _Config:
    return _Config(
        slug, mode, tuple(_MODEL_BY_NAME[t] for t, _ in targets), tuple(accumulate(w for _, w in targets)), cache
    )


# A trace is routed by one of these configs with probability _CONFIG_SHARE.
_CONFIGS = [
    _config("pc-prod-fallback-3f9a2c", "fallback", [("gpt-4o", 0.92), ("claude-3-5-sonnet-20241022", 0.08)]),
    _config("pc-fast-chain-41c0de", "fallback",
            [("llama-3.3-70b-versatile", 0.85), ("mistral-large-latest", 0.11), ("gpt-4o-mini", 0.04)]),
    _config("pc-lb-mini-7d21e0", "loadbalance", [("gpt-4o-mini", 0.7), ("gemini-2.0-flash-001", 0.3)], "simple"),
    _config("pc-faq-semantic-b812aa", "single", [("gpt-4o-mini", 1)], "semantic"),
    _config("pc-haiku-cache-0c55f1", "single", [("claude-3-5-haiku-20241022", 1)], "simple"),
]
_CONFIG_SHARE = 0.4
# Traces without a config still enable the simple or semantic cache through a header this often.
_HEADER_SIMPLE_CACHE = 0.25
_HEADER_SEMANTIC_CACHE = 0.05

# (status, share of all requests, median latency ms, error type, message)
_ERRORS = [
    (429, 0.015, 120, "rate_limit_error", "Rate limit reached for requests per minute. Please try again in 20s."),
    (400, 0.009, 90, "invalid_request_error",
     "This model's maximum context length is 128000 tokens. Please reduce the length of the messages."),
    (401, 0.003, 60, "authentication_error", "Incorrect API key provided for this virtual key."),
    (404, 0.002, 70, "not_found_error", "The model does not exist or you do not have access to it."),
    (413, 0.001, 80, "invalid_request_error", "Request payload too large."),
    (500, 0.007, 900, "server_error", "The server had an error while processing your request."),
    (502, 0.004, 2500, "server_error", "Bad gateway: upstream provider returned an invalid response."),
    (503, 0.006, 300, "overloaded_error", "The engine is currently overloaded, please try again later."),
    (504, 0.003, 45000, "timeout_error", "Request timed out waiting for the upstream provider."),
]
_ERROR_CUM = list(accumulate(e[1] for e in _ERRORS))

_TRACE_SIZES = (1, 2, 3, 4, 5, 6)
_TRACE_SIZE_CUM = list(accumulate((0.5, 0.2, 0.18, 0.08, 0.025, 0.015)))
_ENVS = ("prod", "staging", "dev")
_ENV_CUM = (0.8, 0.94, 1.0)
_USERS = 400
_METADATA_KEYS = ("_user", "env", "team")
_FEEDBACK_SHARE = 0.05
_RETRY_SHARE = 0.05
_MAX_TOKENS = 4096


# --------------------------------------------------------------------------- content


@dataclass(frozen=True, slots=True)
class _App:
    team: str
    spans: tuple[str, ...]  # span names of a trace's generations, in order (at least max(_TRACE_SIZES))
    system: str
    exchanges: tuple[tuple[str, str], ...]  # (user message, assistant answer)
    prompt_slug: str | None = None  # requests of this app render a saved prompt


_APPS = [
    _App(
        "support",
        ("triage", "retrieve_answer", "draft_reply", "tone_check", "summarize_ticket", "suggest_macro"),
        "You are the support assistant for Acme Cloud. Answer only from the knowledge-base excerpts; "
        "if the answer is not there, offer to open a ticket.",
        (
            ("My October invoice shows the Pro plan twice. Can you refund the duplicate?",
             "Sorry about that! I've flagged the duplicate Pro charge for a refund; it reaches your card "
             "within 5-7 business days."),
            ("How do I rotate the production API key without downtime?",
             "Create a second key, deploy it, then revoke the old one. Both work meanwhile, so nothing breaks."),
            ("Our webhooks fail since this morning with a 410. What changed?",
             "A 410 means the endpoint was unsubscribed. Re-enable it under Developers > Webhooks and we will "
             "replay the missed events."),
            ("Can I move a workspace from the EU region to the US?",
             "Not directly: create a workspace in the US region and copy projects over with the migration tool."),
        ),
        prompt_slug="support-reply-v3",
    ),
    _App(
        "search",
        ("rewrite_query", "rerank", "answer", "follow_up", "cite_check", "answer"),
        "Answer questions about the employee handbook from the numbered passages and cite them like [2].",
        (
            ("How many vacation days do I get in my first year?",
             "25 days, pro-rated from your start date [1]. Up to 5 unused days roll over until 31 March [3]."),
            ("Can I expense a home office chair?",
             "Yes, furniture is reimbursed up to 400 EUR every three years; submit the receipt within 30 days [2]."),
            ("Can I work from another country for a month?",
             "Yes, up to 30 days a year with your manager's approval, if the country is on the allowed list [5]."),
        ),
    ),
    _App(
        "growth",
        ("brief", "generate_copy", "critique", "revise", "translate", "subject_lines"),
        "You are a copywriter for a B2B SaaS brand. Clear, confident, no buzzwords. Keep to the length asked.",
        (
            ("Three subject lines for our webinar on cutting LLM costs with caching.",
             "1. Your LLM bill, halved\n2. Stop paying twice for the same prompt\n3. Caching that pays for itself"),
            ("Announce usage-based alerts in 40 words.",
             "New: usage alerts. Set a monthly budget per team or API key and hear about it in Slack at 50%, "
             "80% and 100%, not from the invoice."),
            ("Make this hero concrete: 'Unlock the power of AI observability.'",
             "See the cost, latency and errors of every LLM request, per team and model, two minutes after setup."),
        ),
    ),
    _App(
        "platform",
        ("plan", "review_diff", "tool_call", "tool_call", "summarize", "label_pr"),
        "Review the diff for correctness, security and performance. Quote the line and suggest a fix.",
        (
            ("Review: the retry loop in fetch_batch() sleeps 2**attempt seconds with no cap.",
             "**Unbounded back-off:** after 10 attempts it sleeps 17 minutes. Use `min(2**attempt, 30)` plus "
             "jitter."),
            ("Review: query built with f\"SELECT * FROM users WHERE id = {user_id}\".",
             "**SQL injection.** Pass `user_id` as a bound parameter and select only the columns you need."),
            ("Review lru.go: eviction scans the whole map on every insert.",
             "**O(n) eviction.** Keep a doubly linked list beside the map so eviction and promotion are O(1)."),
        ),
    ),
    _App(
        "data-science",
        ("plan", "write_sql", "explain", "fix_sql", "chart_spec", "summarize"),
        "Translate the question into one ClickHouse SQL query over the described tables. Return only SQL.",
        (
            ("Weekly active users by plan for the last 12 weeks.",
             "```sql\nSELECT toStartOfWeek(ts) AS week, plan, uniqExact(user_id) FROM events\n"
             "WHERE ts >= now() - INTERVAL 12 WEEK GROUP BY week, plan ORDER BY week\n```"),
            ("Median and p95 checkout latency per region yesterday.",
             "```sql\nSELECT region, quantiles(0.5, 0.95)(latency_ms) FROM checkouts\n"
             "WHERE toDate(ts) = yesterday() GROUP BY region\n```"),
        ),
    ),
]


# --------------------------------------------------------------------------- helpers


def _iso(ms: int) -> str:
    """Epoch milliseconds → ``2026-11-20T10:30:00.123Z``."""
    return (_NAIVE_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds") + "Z"


def _traffic_shape(ms: int) -> float:
    """Relative request rate at a moment: busiest around 15:00 UTC, quieter at weekends."""
    hour = (ms // _HOUR_MS) % 24 + 0.5
    weekday = (ms // _DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    rate = 0.3 + math.exp(-(((hour - 15) / 4.5) ** 2))
    return rate * (0.55 if weekday >= 5 else 1.0)


class _Timeline:
    """Maps a fraction ``u`` in [0, 1) of the traffic to a timestamp in [start, end), following _traffic_shape."""

    def __init__(self, start_ms: int, end_ms: int):
        self.edges = list(range(start_ms, end_ms, _HOUR_MS))
        self.lengths = [min(e + _HOUR_MS, end_ms) - e for e in self.edges]
        self.cum = list(accumulate(_traffic_shape(e) * n for e, n in zip(self.edges, self.lengths)))
        self.end_ms = end_ms

    def at(self, u: float) -> int:
        target = u * self.cum[-1]
        i = min(bisect_right(self.cum, target), len(self.cum) - 1)
        below = self.cum[i - 1] if i else 0.0
        frac = (target - below) / (self.cum[i] - below)
        return min(self.edges[i] + int(frac * self.lengths[i]), self.end_ms - 1)


@dataclass(slots=True)
class _Trace:
    trace_id: str
    app: _App
    user: str
    config: _Config | None
    cache: str | None
    api_key_id: str
    virtual_keys: dict[str, str]
    metadata_values: tuple[str, str, str]  # values of _METADATA_KEYS
    metadata_header: str
    root_span_id: str = ""


# --------------------------------------------------------------------------- generator


def generate(
    events: int, days: float, org: str, workspace: str, seed: int = 0, end: datetime | None = None
) -> Iterator[tuple[str, dict]]:
    """``events`` gateway logs spread over ``[end - days, end)``, plus feedback on some traces.

    ``end`` defaults to the current UTC time floored to the hour; a naive ``end`` is UTC.
    """
    if events < 0:
        raise ValueError("events must be >= 0")
    if days <= 0:
        raise ValueError("days must be > 0")
    if end is None:
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    elif end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    end_ms = int(end.timestamp() * 1000)
    start_ms = end_ms - int(days * _DAY_MS)
    if start_ms == end_ms:
        raise ValueError("days must cover at least a millisecond")
    return _Generator(seed, org, workspace, _Timeline(start_ms, end_ms)).run(events)


class _Generator:
    def __init__(self, seed: int, org: str, workspace: str, timeline: _Timeline):
        self.rng = rng = Random(seed)
        self.org = org
        self.workspace = workspace
        self.timeline = timeline
        self.pricing = PricingTable.load()
        missing = [m.name for m in _MODELS if self.pricing.rates(m.provider, m.name) is None]
        if missing:
            raise RuntimeError(f"models missing from the pricing table: {missing}")
        # A user belongs to one team; user k is active in proportion to 1/k^1.1 (Zipf-like).
        self.users = [(f"usr_{rng.getrandbits(40):010x}", rng.choice(_APPS)) for _ in range(_USERS)]
        self.user_cum = list(accumulate(1 / k**1.1 for k in range(1, _USERS + 1)))
        self.api_keys = {app.team: self.uuid() for app in _APPS}
        self.virtual_keys = {
            env: {p: f"{p}-{env}-{rng.getrandbits(24):06x}" for p in _PROVIDER_URLS} for env in _ENVS
        }

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def span_id(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"

    def run(self, events: int) -> Iterator[tuple[str, dict]]:
        rng = self.rng
        done = 0
        while done < events:
            size = min(rng.choices(_TRACE_SIZES, cum_weights=_TRACE_SIZE_CUM)[0], events - done)
            # The trace's place in the window follows its position in the stream,
            # so output is roughly in time order.
            t = self.timeline.at((done + rng.random()) / events)
            trace = self.trace()
            for i in range(size):
                log, response_time = self.gateway_log(trace, i, t)
                yield "gateway_log", log
                # the app does some work between two generations
                t = min(t + response_time + int(rng.lognormvariate(5.5, 0.8)), self.timeline.end_ms - 1)
            if rng.random() < _FEEDBACK_SHARE:
                yield "feedback", self.feedback(trace, t)
            done += size

    def trace(self) -> _Trace:
        rng = self.rng
        user, app = rng.choices(self.users, cum_weights=self.user_cum)[0]
        env = _ENVS[bisect_right(_ENV_CUM, rng.random())]
        config = rng.choice(_CONFIGS) if rng.random() < _CONFIG_SHARE else None
        if config is not None:
            cache = config.cache
        else:
            r = rng.random()
            if r < _HEADER_SIMPLE_CACHE:
                cache = "simple"
            elif r < _HEADER_SIMPLE_CACHE + _HEADER_SEMANTIC_CACHE:
                cache = "semantic"
            else:
                cache = None
        values = (user, env, app.team)
        return _Trace(
            trace_id=self.uuid(),
            app=app,
            user=user,
            config=config,
            cache=cache,
            api_key_id=self.api_keys[app.team],
            virtual_keys=self.virtual_keys[env],
            metadata_values=values,
            metadata_header=orjson.dumps(dict(zip(_METADATA_KEYS, values))).decode(),
        )

    def gateway_log(self, trace: _Trace, index: int, t: int) -> tuple[dict, int]:
        """Generation ``index`` of ``trace``, starting at ``t``; returns the event and its response time."""
        rng = self.rng
        app = trace.app
        config = trace.config

        # -- routing: which model served the request
        option = 0
        if config is None:
            model = rng.choices(_MODELS, cum_weights=_MODEL_CUM)[0]
        else:
            option = rng.choices(range(len(config.targets)), cum_weights=config.target_cum)[0]
            model = config.targets[option]
        provider = model.provider

        # -- outcome: an error, a cache hit or a normal completion
        r = rng.random()
        error = _ERRORS[bisect_right(_ERROR_CUM, r)] if r < _ERROR_CUM[-1] else None
        cache_status = "DISABLED" if trace.cache is None else "MISS"
        if error is None and trace.cache is not None:
            r = rng.random()
            if trace.cache == "semantic":  # a semantic cache tries an exact match first
                cache_status = "HIT" if r < 0.05 else "SEMANTIC HIT" if r < 0.2 else "MISS"
            elif r < 0.15:
                cache_status = "HIT"
        cache_hit = cache_status in ("HIT", "SEMANTIC HIT")
        retries = 0
        if error is None and not cache_hit and rng.random() < _RETRY_SHARE:
            retries = 1 + bisect_right((0.7, 0.92), rng.random())

        # -- tokens, as the provider reports them in the response body's usage
        prompt = min(int(rng.lognormvariate(6.4, 1.0)) + 20, 120_000)
        visible = min(int(rng.lognormvariate(5.2, 0.8)) + 1, _MAX_TOKENS)
        reasoning = int(rng.lognormvariate(6.2, 0.7)) if model.reasoning else 0
        cache_read = cache_write = 0
        if model.prompt_cache and prompt >= 1024:  # providers cache prompts of 1024+ tokens
            r = rng.random()
            if r < 0.35:
                cache_read = int(prompt * (0.5 + 0.45 * rng.random())) // 128 * 128
            elif r < 0.45 and provider == "anthropic":  # only Anthropic bills cache writes
                cache_write = prompt // 2

        # -- latency (ms): gateway overhead (including the cache lookup) plus the upstream call
        cache_ms = 0
        if trace.cache == "semantic":  # embedding lookup
            cache_ms = int(rng.lognormvariate(3.4, 0.4))
        elif trace.cache == "simple":
            cache_ms = 1 + int(rng.random() * 4)
        gateway_ms = cache_ms + 2 + int(rng.random() * 8)
        if error is not None:
            upstream = int(error[2] * rng.lognormvariate(0, 0.4))
        elif cache_hit:
            upstream = 0
        else:
            median = model.first_token_ms + (visible + reasoning) * model.ms_per_token
            upstream = int(median * rng.lognormvariate(0, 0.35))
            upstream += sum(300 + 500 * 2**k for k in range(retries))  # failed attempts and back-off
            upstream += option * int(rng.lognormvariate(6.6, 0.5))  # fallback targets that failed first
        response_time = upstream + gateway_ms

        # -- units and cost (cents): an error has no tokens, a cache hit costs nothing
        if error is not None:
            req_units = res_units = 0
            cost = 0.0
        else:
            req_units = prompt
            res_units = visible + reasoning
            cost = 0.0 if cache_hit else self.pricing.cost_cents(
                provider, model.name, prompt - cache_read - cache_write, visible, cache_read, cache_write, reasoning
            )

        # -- bodies and headers
        question, answer = rng.choice(app.exchanges)
        stream = rng.random() < 0.3
        request_body = {
            "model": model.name,
            "messages": [{"role": "system", "content": app.system}, {"role": "user", "content": question}],
            "max_tokens": _MAX_TOKENS,
            "stream": stream,
        }
        response_headers = {"content-type": "application/json", "x-portkey-cache-status": cache_status}
        if error is None:
            status = 200
            usage = _Usage(prompt, visible, reasoning, cache_read, cache_write)
            response_body = _RESPONSE_BODIES[provider](rng, model, answer, t, usage)
        else:
            status = error[0]
            response_body = {"error": {"message": error[4], "type": error[3], "param": None}, "provider": provider}
            if status == 429:
                response_headers["retry-after"] = "20"

        log_id = self.uuid()
        span_id = self.span_id()
        span_name = app.spans[index]
        created = _iso(t)
        virtual_key = trace.virtual_keys[provider] if rng.random() < 0.7 else None
        portkey_headers = {
            "x-portkey-trace-id": trace.trace_id,
            "x-portkey-span-id": span_id,
            "x-portkey-span-name": span_name,
            "x-portkey-metadata": trace.metadata_header,
        }
        if config is not None:
            portkey_headers["x-portkey-config"] = config.slug
        else:
            portkey_headers["x-portkey-provider"] = provider
            if trace.cache is not None:
                portkey_headers["x-portkey-cache"] = trace.cache
        if virtual_key:
            portkey_headers["x-portkey-virtual-key"] = virtual_key

        metrics = {
            "id": log_id,
            "organisation_id": self.org,
            "workspace_slug": self.workspace,
            "created_at": created,
            "is_success": error is None,
            "ai_org": provider,
            "ai_model": model.name,
            "req_units": req_units,
            "res_units": res_units,
            "total_units": req_units + res_units,
            "cost": cost,
            "cost_currency": "USD",
            "request_url": model.url,
            "request_method": "POST",
            "response_status_code": status,
            "response_time": response_time,
            "cache_status": cache_status,
            "stream_mode": int(stream),
            "retry_success_count": retries,
            "trace_id": trace.trace_id,
            "span_id": span_id,
            "span_name": span_name,
            "mode": config.mode if config is not None else "single",
            "last_used_option_index": option,
            "metadata.key": _METADATA_KEYS,
            "metadata.value": trace.metadata_values,
            "api_key_id": trace.api_key_id,
            "cache_processing_time": cache_ms,
            "gateway_processing_time": gateway_ms,
            "upstream_response_time": upstream,
        }
        # Tracing: the trace's first generation is the root span, the others are its children.
        if index == 0:
            trace.root_span_id = span_id
        else:
            metrics["parent_span_id"] = portkey_headers["x-portkey-parent-span-id"] = trace.root_span_id
        if trace.cache is not None:
            metrics["cache_type"] = trace.cache
        if config is not None:
            metrics["config"] = config.slug
        if virtual_key:
            metrics["virtual_key"] = virtual_key
        if app.prompt_slug:
            metrics["prompt_slug"] = app.prompt_slug

        log = {
            "_id": log_id,
            "created_at": created,
            "organisation_id": self.org,
            "request": {
                "url": model.url,
                "method": "POST",
                "headers": {"content-type": "application/json"},
                "body": request_body,
                "portkeyHeaders": portkey_headers,
            },
            "response": {
                "status": status,
                "responseTime": response_time,
                "lastUsedOptionJsonPath": f"config.targets[{option}]" if config is not None else "",
                "headers": response_headers,
                "body": response_body,
            },
            "metrics": metrics,
        }
        return log, response_time

    def feedback(self, trace: _Trace, trace_end: int) -> dict:
        rng = self.rng
        if rng.random() < 0.75:  # thumbs up/down
            value = 1 if rng.random() < 0.7 else -1
        else:  # a 0..10 rating
            value = rng.randint(0, 10)
        created = _iso(min(trace_end + int(rng.lognormvariate(9.9, 1.2)), self.timeline.end_ms - 1))
        return {
            "id": self.uuid(),
            "organisation_id": self.org,
            "workspace_slug": self.workspace,
            "created_at": created,
            "trace_id": trace.trace_id,
            "value": value,
            "weight": 1.0 if rng.random() < 0.8 else round(rng.uniform(0.1, 1.0), 2),
            "metadata": {"_user": trace.user},
        }


# --------------------------------------------------------------------------- provider-shaped responses


@dataclass(frozen=True, slots=True)
class _Usage:
    prompt: int  # all prompt tokens, cached ones included
    visible: int  # output tokens the user sees
    reasoning: int
    cache_read: int
    cache_write: int


def _openai_body(rng: Random, model: _Model, text: str, t: int, u: _Usage) -> dict:
    completion = u.visible + u.reasoning  # OpenAI counts reasoning inside completion_tokens
    usage = {"prompt_tokens": u.prompt, "completion_tokens": completion, "total_tokens": u.prompt + completion}
    if model.provider == "openai":
        usage["prompt_tokens_details"] = {"cached_tokens": u.cache_read}
        usage["completion_tokens_details"] = {"reasoning_tokens": u.reasoning}
    return {
        "id": f"chatcmpl-{rng.getrandbits(96):024x}",
        "object": "chat.completion",
        "created": t // 1000,
        "model": model.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }


def _anthropic_body(rng: Random, model: _Model, text: str, t: int, u: _Usage) -> dict:
    return {
        "id": f"msg_01{rng.getrandbits(96):024x}",
        "type": "message",
        "role": "assistant",
        "model": model.name,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {  # Anthropic's input_tokens excludes the cached ones
            "input_tokens": u.prompt - u.cache_read - u.cache_write,
            "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cache_read,
            "output_tokens": u.visible + u.reasoning,
        },
    }


def _google_body(rng: Random, model: _Model, text: str, t: int, u: _Usage) -> dict:
    return {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": u.prompt,
            "candidatesTokenCount": u.visible + u.reasoning,
            "totalTokenCount": u.prompt + u.visible + u.reasoning,
        },
        "modelVersion": model.name,
    }


_RESPONSE_BODIES = {
    "openai": _openai_body,
    "anthropic": _anthropic_body,
    "google": _google_body,
    "mistral-ai": _openai_body,
    "groq": _openai_body,
}


# --------------------------------------------------------------------------- publishing


def publish(
    producer: KafkaProducer,
    settings: Settings,
    events: int,
    days: float,
    org: str,
    workspace: str,
    seed: int = 0,
    end: datetime | None = None,
    progress: bool = True,
) -> dict:
    """Send :func:`generate`'s output to Kafka (key = event id) and flush.

    Returns ``{"gateway_logs": n, "feedback": m, "last_log_id": id}``. Raises the first
    delivery error, if any.
    """
    topics = {"gateway_log": settings.topic_gateway_logs, "feedback": settings.topic_feedback}
    counts = {"gateway_log": 0, "feedback": 0}
    last_log_id = None
    failures: list[BaseException] = []
    with tqdm(total=events, unit="ev", desc="seeding", disable=not progress) as bar:
        for kind, event in generate(events, days, org, workspace, seed, end):
            key = (event["_id"] if kind == "gateway_log" else event["id"]).encode()
            producer.send(topics[kind], key=key, value=orjson.dumps(event)).add_errback(failures.append)
            counts[kind] += 1
            if kind == "gateway_log":
                last_log_id = event["_id"]
                bar.update()
        producer.flush()
    if failures:
        raise failures[0]
    return {"gateway_logs": counts["gateway_log"], "feedback": counts["feedback"], "last_log_id": last_log_id}
