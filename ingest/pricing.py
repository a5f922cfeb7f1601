"""Model prices from the bundled Portkey pricing table.

The data is ``ingest/pricing_data/pricing/<provider>.json`` (Portkey-AI/models,
see ``pricing_data/SOURCE.md``; ``tollgate pricing refresh`` replaces it): one file
per provider, keyed by model name, with prices in **cents per token** under
``pricing_config.pay_as_you_go``:

==========================  =====================================================
``request_token``           uncached input tokens
``response_token``          output tokens
``cache_read_input_token``  input tokens read from the prompt cache
``cache_write_input_token`` input tokens written to the prompt cache (Anthropic: 5-minute cache)
``additional_units.cache_write_1h``  Anthropic 1-hour cache writes
``reasoning_token``         reasoning ("thinking") tokens, where the provider prices them apart
==========================  =====================================================

Some models are priced in tiers by prompt length: Google's files key them
``<model>-lte-128k`` and ``<model>-gt-128k`` (or ``200k``), see :meth:`PricingTable.find`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import orjson

BUNDLED_DIR = Path(str(resources.files("ingest").joinpath("pricing_data")))


@dataclass(frozen=True, slots=True)
class Rates:
    """Pay-as-you-go prices of one model, in cents per token.

    A price the entry does not list is None, and :meth:`cost` never turns it into 0:
    a cache read or write without its own price costs the input price (no discount we
    know of), a reasoning token without its own price the output price (how
    OpenAI, Google and Anthropic bill them), a 1-hour cache write without its own
    price the cache-write price. A price listed as 0 is 0.
    """

    request: float
    response: float
    cache_read: float | None = None
    cache_write: float | None = None
    thinking: float | None = None  # `reasoning_token`
    cache_write_1h: float | None = None

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
    ) -> float:
        """Cents for disjoint token counts (``input_tokens`` excludes cache reads and
        writes, ``output_tokens`` excludes reasoning tokens)."""
        cache_read = self.request if self.cache_read is None else self.cache_read
        cache_write = self.request if self.cache_write is None else self.cache_write
        cache_write_1h = cache_write if self.cache_write_1h is None else self.cache_write_1h
        thinking = self.response if self.thinking is None else self.thinking
        return (
            input_tokens * self.request
            + cache_read_tokens * cache_read
            + cache_write_tokens * cache_write
            + cache_write_1h_tokens * cache_write_1h
            + output_tokens * self.response
            + reasoning_tokens * thinking
        )


def _price(table: dict, key: str) -> float | None:
    item = table.get(key)
    if not isinstance(item, dict) or "price" not in item:
        return None
    return float(item["price"] or 0)


def _parse(entry: dict) -> Rates | None:
    """Rates of one model entry; None when the entry carries no pay-as-you-go prices."""
    payg = (entry.get("pricing_config") or {}).get("pay_as_you_go")
    if not isinstance(payg, dict):
        return None
    extra = payg.get("additional_units") or {}
    return Rates(
        request=_price(payg, "request_token") or 0.0,
        response=_price(payg, "response_token") or 0.0,
        cache_read=_price(payg, "cache_read_input_token"),
        cache_write=_price(payg, "cache_write_input_token"),
        # `reasoning_token` is the name the data uses; `thinking_token` an older spelling
        thinking=_price(payg, "reasoning_token") if "reasoning_token" in payg else _price(extra, "thinking_token"),
        cache_write_1h=_price(extra, "cache_write_1h"),
    )


def read_dir(pricing_dir: Path) -> dict[tuple[str, str], Rates]:
    """Every priced model of ``<provider>.json`` files in ``pricing_dir``; raises ValueError on bad JSON."""
    rates: dict[tuple[str, str], Rates] = {}
    for file in sorted(pricing_dir.glob("*.json")):
        try:
            data = orjson.loads(file.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{file.name}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file.name}: not a JSON object of models")
        provider = file.name.removesuffix(".json")
        for model, entry in data.items():
            # `default` holds the provider's fallback components and the formula,
            # not a price for models missing from the file.
            if model == "default" or not isinstance(entry, dict):
                continue
            parsed = _parse(entry)
            if parsed is not None:
                rates[(provider, model)] = parsed
    return rates


_TIER = re.compile(r"^(?P<base>.+)-(?P<op>lte|gt)-(?P<k>\d+)k$")
# Bedrock cross-region inference profiles prefix a model id with its geography.
_GEO_PREFIX = re.compile(r"^(?:us|eu|apac|ap|jp|au|ca|us-gov|global)\.")


def _candidates(model: str) -> Iterable[str]:
    """Names to try for ``model``, most specific first."""
    yield model
    bare = model.removeprefix("models/")  # Gemini `modelVersion` / resource names
    yield bare
    yield _GEO_PREFIX.sub("", bare)
    if bare.startswith("ft:"):  # ft:gpt-4o-mini-2024-07-18:org:name:id → ft:gpt-4o-mini-2024-07-18
        yield ":".join(bare.split(":")[:2])
    if "/" in bare:  # publisher/model on OpenAI-compatible endpoints (google/gemini-2.0-flash-001)
        yield bare.rsplit("/", 1)[1]


class PricingTable:
    """Prices by (provider, model); provider is the file name, e.g. ``openai``, ``mistral-ai``."""

    def __init__(self, rates: dict[tuple[str, str], Rates]):
        self._rates = rates
        self._lower = {(p, m.lower()): m for p, m in rates}
        # (provider, base model) → [(threshold tokens, lte rates, gt rates)]
        tiers: dict[tuple[str, str], dict[int, dict[str, Rates]]] = {}
        for (provider, model), r in rates.items():
            if match := _TIER.match(model):
                key = (provider, match["base"].lower())
                tiers.setdefault(key, {}).setdefault(int(match["k"]) * 1000, {})[match["op"]] = r
        self._tiers = {
            key: [(k, ops["lte"], ops["gt"]) for k, ops in sorted(by_k.items()) if {"lte", "gt"} <= ops.keys()]
            for key, by_k in tiers.items()
        }

    @classmethod
    def from_dir(cls, pricing_dir: Path) -> PricingTable:
        return cls(read_dir(pricing_dir))

    @classmethod
    @functools.cache
    def load(cls) -> PricingTable:
        """Read the bundled JSON files (once per process; later calls return the same table)."""
        return cls.from_dir(BUNDLED_DIR / "pricing")

    def rates(self, provider: str, model: str) -> Rates | None:
        """The exact entry's rates, or None when the table does not price it."""
        return self._rates.get((provider, model))

    def find(self, provider: str, model: str, prompt_tokens: int = 0) -> Rates | None:
        """Rates for ``model`` as a provider reports it, or None when the table has no price.

        Tries the name as given, then without a ``models/`` prefix, a Bedrock
        geography prefix (``us.``), a fine-tune suffix and a ``publisher/`` prefix;
        each exactly, then ignoring case, then as a prompt-length tier: with both
        ``<model>-lte-<N>k`` and ``<model>-gt-<N>k`` entries, ``prompt_tokens`` ≤ N×1000
        takes the ``lte`` one. When a model has tiers at several N (the data has 128k
        and 200k for a few), the largest N is used.
        """
        if not model:
            return None
        for name in _candidates(model):
            exact = self._rates.get((provider, name)) or self._rates.get(
                (provider, self._lower.get((provider, name.lower()), ""))
            )
            if exact is not None:
                return exact
            tiers = self._tiers.get((provider, name.lower()))
            if tiers:
                limit, lte, gt = tiers[-1]
                return lte if prompt_tokens <= limit else gt
        return None

    def cost_cents(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> float | None:
        """Cost of one request in cents (:meth:`Rates.cost`), or None for a model the table does not price.

        The token counts are disjoint: ``input_tokens`` excludes the cache-read and
        cache-write tokens, and ``output_tokens`` excludes the reasoning tokens
        (OpenAI, for one, reports them inside ``completion_tokens``; subtract them).
        """
        r = self._rates.get((provider, model))
        if r is None:
            return None
        return r.cost(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens)
