"""Formatting helpers of the study report (numbers, intervals, decisions, tables)."""

from __future__ import annotations

import math
from typing import Any

from lorablocks.study.resample import Interval

PREDICTOR_NAMES = {
    "weight_rms": "RMS cosine (weights)",
    "weight_mean": "signed mean cosine (weights)",
    "function_mean": "mean I(other -> domain)",
    "function_cosine": "mean functional cosine",
    "foreign_energy": "foreign energy |sum_others dW X|^2 / |dW_d X|^2",
    "foreign_cosine": "foreign functional cosine",
}


def f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def p(v: Any) -> str:
    """A p-value; very small ones read ``< 0.001``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def ci(iv: Interval | None) -> str:
    """``+4.3 % [+1.2, +7.5]``, with `` *`` when the (adjusted) decision says it is real."""
    if iv is None or math.isnan(iv.value):
        return "-"
    if math.isnan(iv.low):
        return f"{iv.value:+.1f} % (no interval)"
    return iv.format_pct() + (" *" if iv.significant else "")


def ci_num(iv: Interval | None, digits: int = 3) -> str:
    if iv is None or math.isnan(iv.value):
        return "-"
    if math.isnan(iv.low):
        return f"{iv.value:+.{digits}f}"
    return f"{iv.value:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def verdict(iv: Interval) -> str:
    if iv.better:
        return "better"
    if iv.worse:
        return "worse"
    return "no different"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def name(predictor: str) -> str:
    return PREDICTOR_NAMES.get(predictor, predictor)


def mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def share_interval(interval: tuple[float, float] | None) -> str:
    """``[40, 130]`` (percent) for a share's interval; an infinite side is written as unbounded; "" if none."""
    if interval is None or any(math.isnan(x) for x in interval):
        return ""
    low, high = (f"{100 * x:.0f}" if math.isfinite(x) else ("-inf" if x < 0 else "+inf") for x in interval)
    return f"[{low}, {high}]"
