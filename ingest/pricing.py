"""Model prices from the bundled Portkey pricing table.

The data is ``ingest/pricing_data/pricing/<provider>.json`` (Portkey-AI/models,
see ``pricing_data/SOURCE.md``): one file per provider, keyed by model name, with
prices in **cents per token** under ``pricing_config.pay_as_you_go``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import orjson


@dataclass(frozen=True, slots=True)
class Rates:
    """Pay-as-you-go prices of one model, in cents per token.

    ``thinking`` is None when the model has no separate reasoning-token price;
    reasoning tokens then cost as much as response tokens.
    """

    request: float
    response: float
    cache_read: float = 0.0
    cache_write: float = 0.0
    thinking: float | None = None


def _price(table: dict, key: str) -> float:
    return float((table.get(key) or {}).get("price") or 0)


def _parse(entry: dict) -> Rates | None:
    """Rates of one model entry; None when the entry carries no pay-as-you-go prices."""
    payg = (entry.get("pricing_config") or {}).get("pay_as_you_go")
    if payg is None:
        return None
    thinking = (payg.get("additional_units") or {}).get("thinking_token")
    return Rates(
        request=_price(payg, "request_token"),
        response=_price(payg, "response_token"),
        cache_read=_price(payg, "cache_read_input_token"),
        cache_write=_price(payg, "cache_write_input_token"),
        thinking=float(thinking.get("price") or 0) if thinking else None,
    )


class PricingTable:
    """Prices by (provider, model); provider is the file name, e.g. ``openai``, ``mistral-ai``."""

    def __init__(self, rates: dict[tuple[str, str], Rates]):
        self._rates = rates

    @classmethod
    @functools.cache
    def load(cls) -> PricingTable:
        """Read the bundled JSON files (once per process; later calls return the same table)."""
        rates: dict[tuple[str, str], Rates] = {}
        for file in resources.files("ingest").joinpath("pricing_data", "pricing").iterdir():
            if not file.name.endswith(".json"):
                continue
            provider = file.name.removesuffix(".json")
            for model, entry in orjson.loads(file.read_bytes()).items():
                # `default` holds the provider's fallback components and the formula,
                # not a price for models missing from the file.
                if model == "default" or not isinstance(entry, dict):
                    continue
                parsed = _parse(entry)
                if parsed is not None:
                    rates[(provider, model)] = parsed
        return cls(rates)

    def rates(self, provider: str, model: str) -> Rates | None:
        """The model's rates, or None when the table does not price it."""
        return self._rates.get((provider, model))

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
        """Cost of one request in cents, or None for a model the table does not price.

        The token counts are disjoint: ``input_tokens`` excludes the cache-read and
        cache-write tokens, and ``output_tokens`` excludes the reasoning tokens
        (OpenAI, for one, reports them inside ``completion_tokens``; subtract them).
        Reasoning tokens use the model's ``thinking_token`` price when it has one,
        otherwise the response-token price. A component the entry does not list
        costs 0.
        """
        r = self._rates.get((provider, model))
        if r is None:
            return None
        thinking = r.response if r.thinking is None else r.thinking
        return (
            input_tokens * r.request
            + cache_read_tokens * r.cache_read
            + cache_write_tokens * r.cache_write
            + output_tokens * r.response
            + reasoning_tokens * thinking
        )
