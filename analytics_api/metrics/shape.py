"""Polars helpers shared by graphs and groups: rounding, ratios, the total row."""

from __future__ import annotations

import math

import pyarrow as pa
import polars as pl
import polars.selectors as cs


def iround(expr: pl.Expr) -> pl.Expr:
    """Nearest integer, halves away from zero (docs/analytics.md)."""
    return ((expr.abs() + 0.5).floor() * expr.sign()).cast(pl.Int64)


def round_half_away(value: float) -> int:
    """:func:`iround` for one Python number."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def ratio(num: pl.Expr | str, den: pl.Expr | str, scale: float = 1.0) -> pl.Expr:
    """num·scale/den, 0 where den is 0."""
    num = pl.col(num) if isinstance(num, str) else num
    den = pl.col(den) if isinstance(den, str) else den
    return pl.when(den > 0).then(num.cast(pl.Float64) * scale / den).otherwise(0.0)


def split_total(table: pa.Table, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows with a key, the one-row total) from a ``GROUPING SETS ((key), ())`` result.

    An empty selection still has its total row in ClickHouse; if a server ever omits
    it, the total is all zeros.
    """
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    rows = df.filter(pl.col(key).is_not_null())
    total = df.filter(pl.col(key).is_null())
    if total.height == 0:
        total = zero_row(df.schema)
    return rows, total.head(1)


def zero_row(schema) -> pl.DataFrame:
    return pl.DataFrame([pl.Series(name, [None], dtype) for name, dtype in schema.items()]).pipe(fill_zeros)


def fill_zeros(df: pl.DataFrame) -> pl.DataFrame:
    """Nulls of numeric columns → 0 (empty buckets, absent feedback)."""
    return df.with_columns(cs.numeric().fill_null(0))


def map_entries(value: dict | None, key_name: str, value_name: str) -> list[dict]:
    """A ClickHouse ``sumMap`` result (a struct of key and value arrays) → sorted entries."""
    if not value:
        return []
    keys, counts = value["1"], value["2"]
    return [{key_name: int(k), value_name: int(c)} for k, c in sorted(zip(keys, counts)) if c]
