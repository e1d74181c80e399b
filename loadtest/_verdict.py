"""Exact statistics over per-request records and the SLO verdict.

Percentiles are numpy's default (linear interpolation between closest ranks,
Hyndman-Fan type 7) over every sample, never Locust's bucketed ones. Targets
are read from slo.yaml through llmslo.slo; nothing here repeats a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from contract.slo import SLOConfig

# record field -> metric name used in summary.json and the glossary
SAMPLE_METRICS = {
    "ttft_s": "ttft_seconds",
    "ttfo_s": "ttfo_seconds",
    "tpot_s": "tpot_seconds",
    "e2e_s": "e2e_seconds",
    "decode_tokens_per_s": "decode_tokens_per_second",
    "output_tokens_per_s": "output_tokens_per_second",
    "output_tokens": "output_tokens",
    "schedule_lag_s": "schedule_lag_seconds",
}
PERCENTILES = (10, 50, 90, 95, 99)


def describe(values: Iterable[float]) -> dict:
    """count, mean, sd, min, max and exact p10/p50/p90/p95/p99 of the samples.

    sd is the sample standard deviation (n - 1 denominator; None for one sample):
    the seed's platform table reports TTFT and ms/token as mean ± sd.
    """
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"count": 0}
    pct = np.percentile(arr, PERCENTILES)
    out = {"count": int(arr.size), "mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
           "min": float(arr.min()), "max": float(arr.max())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)})
    return out


def metric_table(records: list[dict]) -> dict:
    """Per metric, per traffic class (and 'all'): describe() of the successful requests."""
    ok = [r for r in records if r["ok"]]
    classes = sorted({r["cls"] for r in records})
    table: dict[str, dict] = {}
    for key, name in SAMPLE_METRICS.items():
        source = records if key == "schedule_lag_s" else ok
        table[name] = {c: describe(r[key] for r in source if r["cls"] == c) for c in classes}
        table[name]["all"] = describe(r[key] for r in source)
    table["itl_seconds"] = {c: describe(g for r in ok if r["cls"] == c for g in r["itl_s"]) for c in classes}
    table["itl_seconds"]["all"] = describe(g for r in ok for g in r["itl_s"])
    return table


@dataclass
class ServerFacts:
    """What the server's own metrics said over the run (None = not measured, with why)."""

    oom_events: float | None = None
    replica_crashes: float | None = None
    gpu_memory_gb_per_copy: float | None = None
    cpu_percent_max: float | None = None
    note: str = "server metrics not configured (--server-metrics-url)"
    notes: dict[str, str] = field(default_factory=dict)  # per-field reason, overrides ``note``

    def why(self, name: str) -> str:
        return self.notes.get(name, self.note)


def client_kpi_values(records: list[dict], slo: SLOConfig) -> dict[str, tuple[float | None, int]]:
    """KPI name -> (value, sample count) for the KPIs measured by the client alone."""
    ok = [r for r in records if r["ok"]]
    short_max = slo.benchmark.short_reply_max_tokens
    ttft = [r["ttft_s"] for r in ok]
    short_e2e = [r["e2e_s"] for r in ok if r["output_tokens"] is not None and r["output_tokens"] <= short_max]
    decode = [r["decode_tokens_per_s"] for r in ok if r["decode_tokens_per_s"] is not None]
    # The seed measured tokens/s on its benchmark shape; short replies (kept for
    # the e2e KPI) would drag the mean down with prefill time they cannot amortise.
    seed_tps = [
        r["output_tokens_per_s"]
        for r in ok
        if r["output_tokens_per_s"] is not None and r["output_tokens"] > short_max
    ]
    return {
        "ttft_p95": (_pct(ttft, 95), len(ttft)),
        "e2e_short_p95": (_pct(short_e2e, 95), len(short_e2e)),
        "decode_tokens_per_s_p10": (_pct(decode, 10), len(decode)),
        "output_tokens_per_s_mean": (float(np.mean(seed_tps)) if seed_tps else None, len(seed_tps)),
        "error_rate": ((len(records) - len(ok)) / len(records) if records else None, len(records)),
    }


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def level_table(records: list[dict], slo: SLOConfig, windows: dict[int, float]) -> list[dict]:
    """One row per concurrency level: client KPIs at that level and whether all held.

    ``windows`` maps level -> seconds the load generator held that level; the
    achieved concurrency is the time-average number of requests in flight, from
    every request started in the level. The KPIs use only the requests that ran
    wholly at the level (``held``): one still streaming when the next step began
    shared the GPU with that step's load, which is not this level's.
    """
    rows = []
    for level in sorted({r["level"] for r in records if r["level"] > 0}):
        recs = [r for r in records if r["level"] == level]
        held = [r for r in recs if r["held"]]
        values = client_kpi_values(held, slo)
        checks = {k: slo.kpis[k].passes(v) for k, (v, _) in values.items() if v is not None}
        busy = sum(r["e2e_s"] or 0.0 for r in recs)
        window = windows.get(level, 0.0)
        completed = sum(1 for r in recs if r["ok"])
        rows.append(
            {
                "level": level,
                "requests": len(recs),
                "held_requests": len(held),
                "achieved_concurrency": busy / window if window > 0 else None,
                "output_tokens_per_s": sum(r["output_tokens"] or 0 for r in recs if r["ok"]) / window if window else None,
                "requests_per_s": completed / window if window else None,
                "kpis": {k: v for k, (v, _) in values.items()},
                "passes": bool(checks) and all(checks.values()),
            }
        )
    return rows


def judged_records(records: list[dict], slo: SLOConfig) -> tuple[list[dict], str]:
    """The requests the client-side KPIs are judged on, and that scope in words.

    The SLO promises its latency and speed targets up to the concurrency target;
    levels above it (the demo holds twice the target) probe headroom, where a
    time-shared GPU is slower by design, so they show in the level table and the
    ``concurrency`` KPI but do not fail the promise. Requests sent while ramping
    (level 0) or still running when the level changed are left out as well. A
    run that never held a level within the target (a fixed load above it) is
    judged on every request.
    """
    target = slo.concurrency_target
    inside = [r for r in records if r["held"] and r["level"] <= target]  # held implies level > 0
    if inside:
        held = sorted({r["level"] for r in inside})
        return inside, f"{len(inside)} requests at {', '.join(map(str, held))} streams (<= target {target})"
    return records, f"all {len(records)} requests (none at a held level <= target {target})"


def verdict(
    records: list[dict], slo: SLOConfig, levels: list[dict], server: ServerFacts, duration_s: float
) -> dict[str, dict]:
    """KPI name -> {title, value, target, op, unit, pass, samples, note} for every KPI in slo.yaml."""
    scoped, _ = judged_records(records, slo)
    values: dict[str, tuple[float | None, int | None, str]] = {
        k: (v, n, "" if v is not None else "no samples") for k, (v, n) in client_kpi_values(scoped, slo).items()
    }
    passing = [row["level"] for row in levels if row["passes"]]
    values["concurrency"] = (
        float(max(passing)) if passing else (0.0 if levels else None),
        len(levels),
        "highest level at which every client-side KPI held" if levels else "no complete concurrency level",
    )
    hours = duration_s / 3600 if duration_s > 0 else math.nan
    values["oom_per_hour"] = _rate(server.oom_events, hours, server.why("oom_events"))
    values["crashes_per_day"] = _rate(server.replica_crashes, hours / 24, server.why("replica_crashes"))
    values["gpu_memory_gb"] = _gauge(server.gpu_memory_gb_per_copy, server.why("gpu_memory_gb_per_copy"))
    values["cpu_percent"] = _gauge(server.cpu_percent_max, server.why("cpu_percent_max"))
    out = {}
    for name, kpi in slo.kpis.items():
        value, samples, note = values.get(name, (None, None, f"no implementation for metric {kpi.metric}"))
        out[name] = {
            "title": kpi.title,
            "value": value,
            "target": kpi.target,
            "op": kpi.op,
            "unit": kpi.unit,
            "pass": None if value is None else kpi.passes(value),
            "samples": samples,
            "note": note,
        }
    return out


def _rate(count: float | None, period: float, note: str) -> tuple[float | None, None, str]:
    if count is None or not period or math.isnan(period):
        return None, None, note
    return count / period, None, f"{count:g} event(s) during the run"


def _gauge(value: float | None, note: str) -> tuple[float | None, None, str]:
    return (value, None, "max over server scrapes") if value is not None else (None, None, note)


def overall(kpis: dict[str, dict]) -> str:
    """'PASS', 'FAIL' or 'PASS (k not measured)'."""
    if any(k["pass"] is False for k in kpis.values()):
        return "FAIL"
    missing = sum(1 for k in kpis.values() if k["pass"] is None)
    return f"PASS ({missing} not measured)" if missing else "PASS"
