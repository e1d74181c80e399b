"""Small PromQL and promtool helpers shared by the rule and dashboard generators."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# KPI "passes when value <op> target" -> PromQL comparison that selects a breach.
BREACH = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}


def seconds(duration: str) -> int:
    """Prometheus duration ("5m", "1d") in seconds."""
    match = re.fullmatch(r"(\d+)([smhdw])", duration)
    if not match:
        raise ValueError(f"unsupported duration {duration!r}")
    return int(match[1]) * _UNITS[match[2]]


def num(value: float) -> str:
    """A float as PromQL reads it back exactly (repr, minus a trailing .0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def selector(metric: str, labels: dict[str, str] | None = None) -> str:
    """``metric{a="b",...}`` (labels in the given order)."""
    if not labels:
        return metric
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def piecewise(segments: list[tuple[float, int]], interval_s: int) -> str:
    """A counter whose rate changes: [(per_second, intervals), ...] joined in promtool notation."""
    parts, value = [], 0.0
    for i, (per_second, count) in enumerate(segments):
        step = per_second * interval_s
        start = value if i == 0 else value + step
        parts.append(f"{num(start)}+{num(step)}x{count}")
        value = start + step * count
    return " ".join(parts)


def histogram_series(metric: str, labels: dict[str, str], buckets: tuple[float, ...],
                     segments: list[tuple[dict[float, float], int]], interval_s: int) -> dict[str, str]:
    """Cumulative ``_bucket``/``_count`` series for observations arriving at given rates.

    ``segments`` is [({observed value: observations per second}, intervals), ...].
    """
    edges = [num(b) for b in buckets] + ["+Inf"]
    limits = list(buckets) + [float("inf")]
    series = {}
    for edge, limit in zip(edges, limits):
        rates = [(sum(n for v, n in obs.items() if v <= limit), count) for obs, count in segments]
        series[selector(metric + "_bucket", {**labels, "le": edge})] = piecewise(rates, interval_s)
    totals = [(sum(obs.values()), count) for obs, count in segments]
    series[selector(metric + "_count", labels)] = piecewise(totals, interval_s)
    return series
