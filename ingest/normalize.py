"""Custom logs (the spec's ``CustomLog``, ``POST /v1/logs``) → gateway-log events.

A custom log is a request an application sent to an LLM provider and the response
it got, logged without a gateway in between. :func:`to_gateway_log` turns one into
the gateway-log event of docs/events.md, filling what a gateway would have measured:

* **provider** (``metrics.ai_org``, a Portkey provider slug = pricing file name):
  ``request.provider`` or a ``x-portkey-provider`` request header when given (kept
  as given when it is no known slug), else the URL's host (:data:`PROVIDERS`), else
  ``unknown``;
* **model** (``metrics.ai_model``): from the request body, the URL or the response,
  in the provider's order;
* **tokens** from the response body's usage block, whatever its provider's shape
  (:func:`usage_of`);
* **cost** in cents from the bundled pricing table, each kind of token at its own
  price; ``metrics.pricing_status`` says how the cost came about (``priced``,
  ``unknown_model`` or ``no_usage``; cost is null for the last two, never 0);
* **metadata**: ``trace_id``, ``span_id``, ``span_name``, ``parent_span_id`` (or their
  camelCase spellings) become those fields, every other pair a metadata pair;
  non-string values are stored as their JSON text (as for feedback);
* **response time** from ``response.response_time`` (ms).

Credentials in the logged request and response (``Authorization``, ``x-api-key``,
``api-key``, ``x-goog-api-key``, cookies, … headers and a ``key`` URL parameter) are
masked before anything is stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import msgspec
import orjson

from ingest.events import json_text
from ingest.pricing import PricingTable

_UINT32_MAX = 4_294_967_295
Short = Annotated[str, msgspec.Meta(max_length=1024)]


class InvalidLog(ValueError):
    """A custom log that cannot be accepted; the message names the field."""


# --------------------------------------------------------------------------- wire format (spec CustomLog)


class CustomRequest(msgspec.Struct):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    body: msgspec.Raw
    method: Short = "POST"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    provider: Short | None = None  # Portkey's docs accept it; overrides detection


class CustomResponse(msgspec.Struct):
    body: msgspec.Raw
    status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    response_time: Annotated[int, msgspec.Meta(ge=0, le=_UINT32_MAX)] | None = None


class CustomLog(msgspec.Struct):
    request: CustomRequest
    response: CustomResponse
    metadata: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(CustomLog | list[CustomLog])


def decode(body: bytes) -> list[CustomLog]:
    """One CustomLog or an array of them; InvalidLog names the field (``$[2].response.status``)."""
    try:
        parsed = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        where = "" if " - at `" in str(exc) else " - at `$`"  # msgspec names no path for the top level
        raise InvalidLog(f"invalid custom log: {exc}{where}") from None
    except msgspec.DecodeError as exc:
        raise InvalidLog(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec recurses into nested arrays and objects, raw bodies included
        raise InvalidLog("malformed JSON: nested too deeply") from None
    return parsed if isinstance(parsed, list) else [parsed]


# --------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    slug: str  # Portkey provider slug = pricing file name
    host: re.Pattern  # matched against the URL's host name
    url_model: re.Pattern | None = None  # group 1 = model (URL-encoded) in the URL path
    model_from: tuple[str, ...] = ("request", "response", "url")  # where to look, in order


def _p(slug: str, host: str, url_model: str | None = None, model_from: tuple[str, ...] | None = None) -> Provider:
    return Provider(slug, re.compile(host), re.compile(url_model) if url_model else None,
                    model_from or (("url", "request", "response") if url_model else ("request", "response", "url")))


PROVIDERS: tuple[Provider, ...] = (
    _p("openai", r"^api\.openai\.com$"),
    # the deployment name in the URL is the customer's; the response names the model
    _p("azure-openai", r"\.(openai\.azure\.com|cognitiveservices\.azure\.com)$", r"/deployments/([^/]+)",
       ("response", "request", "url")),
    _p("anthropic", r"^api\.anthropic\.com$"),
    _p("google", r"^generativelanguage\.googleapis\.com$", r"/models/([^/:]+)"),
    _p("vertex-ai", r"aiplatform\.googleapis\.com$", r"/models/([^/:]+)"),
    _p("bedrock", r"^bedrock-runtime(-fips)?\.[a-z0-9-]+\.amazonaws\.com$", r"/model/([^/]+)"),
    _p("mistral-ai", r"^(api|codestral)\.mistral\.ai$"),
    _p("cohere", r"^api\.cohere\.(ai|com)$"),
    _p("groq", r"^api\.groq\.com$"),
    _p("together-ai", r"^api\.together\.(xyz|ai)$"),
    _p("deepseek", r"^api\.deepseek\.com$"),
    _p("x-ai", r"^api\.x\.ai$"),
    _p("fireworks-ai", r"^api\.fireworks\.ai$"),
    _p("perplexity-ai", r"^api\.perplexity\.ai$"),
    _p("openrouter", r"^openrouter\.ai$"),
)
_BY_SLUG = {p.slug: p for p in PROVIDERS}
_ALIASES = {
    "azure": "azure-openai", "gemini": "google", "vertex": "vertex-ai", "aws-bedrock": "bedrock",
    "mistral": "mistral-ai", "together": "together-ai", "xai": "x-ai", "fireworks": "fireworks-ai",
    "perplexity": "perplexity-ai",
}
UNKNOWN = "unknown"


def detect_provider(url: str, headers: dict[str, str], given: str | None = None) -> tuple[str, Provider | None]:
    """(slug, table entry or None): the given provider, else the one whose host matches."""
    given = given or next((v for k, v in headers.items() if k.lower() == "x-portkey-provider"), None)
    if given and given.strip():
        slug = given.strip().lower()
        slug = _ALIASES.get(slug, slug)
        return slug, _BY_SLUG.get(slug)
    host = (urlsplit(url).hostname or "").lower()
    for provider in PROVIDERS:
        if provider.host.search(host):
            return provider.slug, provider
    return UNKNOWN, None


def _url_model(provider: Provider | None, url: str) -> str:
    if provider is None or provider.url_model is None:
        return ""
    match = provider.url_model.search(urlsplit(url).path)
    if not match:
        return ""
    model = unquote(match.group(1))
    if model.startswith("arn:"):  # Bedrock inference profile or provisioned model ARN
        model = model.rsplit("/", 1)[-1]
    return model


def detect_model(provider: Provider | None, url: str, request_body: Any, response_body: Any) -> str:
    """The model, from the places the provider puts it, in its order; "" when none names it."""
    def from_body(body: Any, *keys: str) -> str:
        if isinstance(body, dict):
            for key in keys:
                if isinstance(body.get(key), str) and body[key]:
                    return body[key]
        return ""

    sources = {
        "request": lambda: from_body(request_body, "model", "modelId"),
        "response": lambda: from_body(response_body, "model", "modelVersion", "modelId"),
        "url": lambda: _url_model(provider, url),
    }
    for source in provider.model_from if provider else ("request", "response"):
        if model := sources[source]():
            return model
    return ""


# --------------------------------------------------------------------------- usage


@dataclass(frozen=True, slots=True)
class Usage:
    """Disjoint token counts: each kind has its own price."""

    input: int = 0  # prompt tokens at the full input price
    cache_read: int = 0
    cache_write: int = 0  # 5-minute (default) cache writes
    cache_write_1h: int = 0  # Anthropic 1-hour cache writes
    output: int = 0  # completion tokens other than reasoning
    reasoning: int = 0

    @property
    def prompt(self) -> int:
        """Every prompt token the model read (``req_units``)."""
        return self.input + self.cache_read + self.cache_write + self.cache_write_1h

    @property
    def completion(self) -> int:
        """Every token the model generated, reasoning included (``res_units``)."""
        return self.output + self.reasoning


def _n(obj: Any, *path: str) -> int:
    """A token count at ``path`` (0 when absent or not a number; floats, as Cohere sends, truncated)."""
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    if isinstance(obj, bool) or not isinstance(obj, (int, float)) or obj != obj or obj < 0:
        return 0
    return int(min(obj, _UINT32_MAX))


def _openai_chat(u: dict) -> Usage:
    # prompt_tokens includes the cached ones, completion_tokens the reasoning ones
    cached = _n(u, "prompt_tokens_details", "cached_tokens") or _n(u, "prompt_cache_hit_tokens")  # DeepSeek
    reasoning = _n(u, "completion_tokens_details", "reasoning_tokens")
    return Usage(input=max(_n(u, "prompt_tokens") - cached, 0), cache_read=cached,
                 output=max(_n(u, "completion_tokens") - reasoning, 0), reasoning=reasoning)


def _openai_responses(u: dict) -> Usage:
    cached = _n(u, "input_tokens_details", "cached_tokens")
    reasoning = _n(u, "output_tokens_details", "reasoning_tokens")
    return Usage(input=max(_n(u, "input_tokens") - cached, 0), cache_read=cached,
                 output=max(_n(u, "output_tokens") - reasoning, 0), reasoning=reasoning)


def _anthropic(u: dict) -> Usage:
    # input_tokens excludes cache reads and writes; output_tokens includes thinking
    written = _n(u, "cache_creation_input_tokens")
    one_hour = min(_n(u, "cache_creation", "ephemeral_1h_input_tokens"), written)
    return Usage(input=_n(u, "input_tokens"), cache_read=_n(u, "cache_read_input_tokens"),
                 cache_write=written - one_hour, cache_write_1h=one_hour, output=_n(u, "output_tokens"))


def _gemini(m: dict) -> Usage:
    # promptTokenCount includes the cached tokens; candidatesTokenCount excludes the thoughts
    cached = _n(m, "cachedContentTokenCount")
    return Usage(input=max(_n(m, "promptTokenCount") - cached, 0) + _n(m, "toolUsePromptTokenCount"),
                 cache_read=cached, output=_n(m, "candidatesTokenCount"), reasoning=_n(m, "thoughtsTokenCount"))


def _bedrock_converse(u: dict) -> Usage:
    return Usage(input=_n(u, "inputTokens"), cache_read=_n(u, "cacheReadInputTokens"),
                 cache_write=_n(u, "cacheWriteInputTokens"), output=_n(u, "outputTokens"))


def _cohere(u: dict) -> Usage:
    units = u.get("billed_units") if isinstance(u.get("billed_units"), dict) else u.get("tokens")
    return Usage(input=_n(units, "input_tokens"), output=_n(units, "output_tokens"))


def usage_of(body: Any, headers: dict[str, str]) -> Usage | None:
    """Token usage from a response, by the shape of its usage block; None when there is none.

    ============================  ===============================================
    shape                         providers
    ============================  ===============================================
    ``usageMetadata``             Google Gemini, Vertex AI Gemini
    ``usage.prompt_tokens``       OpenAI chat/completions/embeddings, Azure OpenAI, Mistral, Groq, Together, DeepSeek, …
    ``usage.input_tokens_details``  OpenAI Responses API
    ``usage.input_tokens``        Anthropic (also on Vertex AI and Bedrock InvokeModel)
    ``usage.inputTokens``         Bedrock Converse
    ``usage|meta.billed_units``   Cohere v2 / v1 (billed units before raw ``tokens``)
    ``prompt_token_count``        Bedrock InvokeModel, Llama and Mistral models
    ``inputTextTokenCount``       Bedrock InvokeModel, Titan
    ``x-amzn-bedrock-*`` headers  Bedrock InvokeModel, any model
    ============================  ===============================================
    """
    if isinstance(body, dict):
        if isinstance(meta := body.get("usageMetadata"), dict):
            return _gemini(meta)
        if isinstance(u := body.get("usage"), dict):
            if "billed_units" in u or "tokens" in u:
                return _cohere(u)
            if "inputTokens" in u or "outputTokens" in u:
                return _bedrock_converse(u)
            if "prompt_tokens" in u or "completion_tokens" in u:
                return _openai_chat(u)
            if "input_tokens_details" in u or "output_tokens_details" in u:
                return _openai_responses(u)
            if "input_tokens" in u or "output_tokens" in u:
                return _anthropic(u)
        if isinstance(meta := body.get("meta"), dict) and ("billed_units" in meta or "tokens" in meta):
            return _cohere(meta)
        if "prompt_token_count" in body or "generation_token_count" in body:
            return Usage(input=_n(body, "prompt_token_count"), output=_n(body, "generation_token_count"))
        if "inputTextTokenCount" in body:
            results = body.get("results") if isinstance(body.get("results"), list) else []
            return Usage(input=_n(body, "inputTextTokenCount"), output=sum(_n(r, "tokenCount") for r in results))
    lower = {k.lower(): v for k, v in headers.items()}
    names = ("x-amzn-bedrock-input-token-count", "x-amzn-bedrock-output-token-count")
    if any(name in lower for name in names):
        prompt, completion = (int(lower[n]) if lower.get(n, "").isdigit() else 0 for n in names)
        return Usage(input=prompt, output=completion)
    return None


# --------------------------------------------------------------------------- cost


PRICED, UNKNOWN_MODEL, NO_USAGE = "priced", "unknown_model", "no_usage"


def price(pricing: PricingTable, provider: str, model: str, usage: Usage | None, status: int) -> tuple[float | None, str]:
    """(cost in cents or None, pricing_status). A failed request without usage costs 0
    (providers do not bill errors); a successful one without usage has no known cost."""
    rates = pricing.find(provider, model, usage.prompt if usage else 0)
    if rates is None:
        return None, UNKNOWN_MODEL
    if usage is None:
        return (None, NO_USAGE) if 200 <= status < 300 else (0.0, PRICED)
    return rates.cost(usage.input, usage.output, usage.cache_read, usage.cache_write, usage.reasoning,
                      usage.cache_write_1h), PRICED


# --------------------------------------------------------------------------- secrets, metadata, bodies

SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "x-portkey-api-key",
    "cookie", "set-cookie", "x-amz-security-token", "ocp-apim-subscription-key",
})
SECRET_PARAMS = frozenset({"key", "api_key", "api-key", "access_token"})
MASK = "********"


def mask_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: MASK if k.lower() in SECRET_HEADERS else v for k, v in headers.items()}


def mask_url(url: str) -> str:
    """The URL as sent, with the value of every credential parameter replaced: the other parameters
    keep their exact text (re-encoding them would turn `a%20b` into `a+b` and `flag` into `flag=`)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    fields = parts.query.split("&")
    masked = [f"{field.partition('=')[0]}={MASK}" if unquote_plus(field.partition("=")[0]).lower() in SECRET_PARAMS else field
              for field in fields]
    return url if masked == fields else urlunsplit(parts._replace(query="&".join(masked)))


_TRACE_FIELDS = {
    "trace_id": "trace_id", "traceId": "trace_id", "span_id": "span_id", "spanId": "span_id",
    "span_name": "span_name", "spanName": "span_name", "parent_span_id": "parent_span_id",
    "parentSpanId": "parent_span_id",
}


def split_metadata(metadata: dict[str, Any] | None, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """(trace fields, other pairs); non-string values become their JSON text."""
    trace: dict[str, str] = {}
    pairs: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not key:
            raise InvalidLog(f"`{where}.metadata` has an empty key")
        text = json_text(value)
        if key in _TRACE_FIELDS:
            if len(text) > 1024:
                raise InvalidLog(f"`{where}.metadata.{key}` is longer than 1024 characters")
            trace[_TRACE_FIELDS[key]] = text
        else:
            pairs[key] = text
    return trace, pairs


def _body(raw: msgspec.Raw, field: str, text_ok: bool) -> tuple[msgspec.Raw, Any]:
    """(the body to store, its parsed value). An object, or a string holding one (Portkey's own
    examples send ``JSON.stringify(body)``), stored as that object; with ``text_ok`` (a response:
    a streamed one is text) any other string too, stored as it is."""
    view = memoryview(raw)
    first = bytes(view[:1])
    if first == b"{":
        return raw, orjson.loads(view)
    if first == b'"':
        text = orjson.loads(view).strip()
        if text.startswith("{"):
            try:
                return msgspec.Raw(text.encode()), orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        if text_ok:
            return raw, text
    raise InvalidLog(f"`{field}` must be a JSON object" + (" or a string" if text_ok else " (or a string holding one)"))


# --------------------------------------------------------------------------- the event


def to_gateway_log(
    log: CustomLog,
    *,
    log_id: str,
    created_at: datetime,
    organisation_id: str,
    workspace_slug: str,
    api_key_id: str,
    pricing: PricingTable,
    where: str = "$",
) -> dict:
    """The gateway-log event (docs/events.md) for one custom log. Bodies stay raw JSON:
    encode the result with ``msgspec.json.encode``. ``where`` prefixes field names in errors."""
    req, res = log.request, log.response
    try:
        urlsplit(req.url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket; everything else parses
        raise InvalidLog(f"`{where}.request.url` is not a URL: {exc}") from None
    request_raw, request_body = _body(req.body, f"{where}.request.body", text_ok=False)
    response_raw, response_body = _body(res.body, f"{where}.response.body", text_ok=True)
    slug, provider = detect_provider(req.url, req.headers, req.provider)
    if len(slug) > 1024:
        raise InvalidLog(f"`{where}.request.provider` is longer than 1024 characters")
    model = detect_model(provider, req.url, request_body, response_body)[:1024]
    usage = usage_of(response_body, res.headers)
    cost, pricing_status = price(pricing, slug, model, usage, res.status)
    prompt, completion = (usage.prompt, usage.completion) if usage else (0, 0)
    if prompt + completion > _UINT32_MAX:
        raise InvalidLog(f"`{where}.response.body` reports more than {_UINT32_MAX} tokens")
    trace, pairs = split_metadata(log.metadata, where)

    response: dict[str, Any] = {"status": res.status, "headers": mask_headers(res.headers), "body": response_raw}
    if res.response_time is not None:
        response["responseTime"] = res.response_time
    return {
        "_id": log_id,
        "created_at": created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "organisation_id": organisation_id,
        "request": {"url": mask_url(req.url), "method": req.method.upper(), "headers": mask_headers(req.headers),
                    "body": request_raw},
        "response": response,
        "metrics": {
            "workspace_slug": workspace_slug,
            "api_key_id": api_key_id,
            "ai_org": slug,
            "ai_model": model,
            "req_units": prompt,
            "res_units": completion,
            "total_units": prompt + completion,
            "cost": cost,
            "cost_currency": "USD",
            "pricing_status": pricing_status,
            **trace,
            "metadata": pairs,
        },
    }
