"""The judge: per-level KPIs with confidence bounds, the request accounting, and the verdict.

Rules (docs/loadtest.md#the-judge has them in words):

- Every request the generator sent is a record; a failed one is never left
  out. It counts in ``error_rate`` (whole run, every level, above the target
  too) and as a miss in every latency KPI of its level: its TTFT and e2e are
  +inf, its speeds 0.
- Each level is judged on its own, never pooled with another. A request's
  latency is judged at its level when it started during the level's ramp or
  steady time (the generator then holds the level until every such request
  has finished: ``drain``), is not a ``--warmup-s`` request, and the level is
  at most the concurrency target. Levels above the target show headroom:
  their latency is reported, their errors fail the verdict.
- A percentile passes only when its 95 % bound on the failing side meets the
  target (loadtest/_stats.py); too few samples make it INCONCLUSIVE, never PASS.
- ``concurrency`` is the highest level L such that every level <= L passed.
- Budgets are per request where slo.yaml says so (a target per traffic class, a
  TTFT/e2e budget that grows with the prompt): a sample is shifted by its own
  request's allowance, so one percentile against one target judges them all.
- SLO attainment (DistServe) is the share of a level's judged requests that met
  every per-request budget; goodput counts only those requests.
- KPIs with ``enforced: false`` are judged and shown but leave the verdict alone.

Targets are read from slo.yaml through contract.slo; nothing here repeats a number.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from contract.record import RequestRecord
from contract.slo import SLOConfig
from loadtest._hops import overhead
from loadtest._stats import Estimate, Status, judge

MISS = math.inf
STATUS_ORDER = {"FAIL": 0, "INCONCLUSIVE": 1, "PASS": 2}

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


def describe(values: Iterable[float | None]) -> dict:
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


def metric_table(records: list[RequestRecord]) -> dict:
    """Per metric, per traffic class (and 'all'): describe() of the successful requests."""
    ok = [r for r in records if r.ok]
    classes = sorted({r.cls for r in records})
    table: dict[str, dict] = {}
    for key, name in SAMPLE_METRICS.items():
        source = records if key == "schedule_lag_s" else ok
        table[name] = {c: describe(getattr(r, key) for r in source if r.cls == c) for c in classes}
        table[name]["all"] = describe(getattr(r, key) for r in source)
    table["itl_seconds"] = {c: describe(g for r in ok if r.cls == c for g in r.itl_s) for c in classes}
    table["itl_seconds"]["all"] = describe(g for r in ok for g in r.itl_s)
    for name, stat in STREAM_METRICS.items():
        table[name] = {c: describe(stat(r) for r in ok if r.cls == c) for c in classes}
        table[name]["all"] = describe(stat(r) for r in ok)
    return table


# --- per-request stream shape (computed from the record's ttft_s and itl_s) -------------
def ttst(r: RequestRecord) -> float | None:
    """Time to second token: a first chunk carrying several tokens shows up as a late second one."""
    return r.ttft_s + r.itl_s[0] if r.ttft_s is not None and r.itl_s else None


def max_gap(r: RequestRecord) -> float | None:
    """The longest silence between two chunks of the stream (None with fewer than two chunks)."""
    return max(r.itl_s, default=None)


def stalls(r: RequestRecord, stall_gap_s: float) -> int:
    """Gaps between chunks longer than slo.yaml's streaming.stall_gap_s."""
    return sum(1 for gap in r.itl_s if gap > stall_gap_s)


STREAM_METRICS: dict[str, Callable[[RequestRecord], float | None]] = {
    "ttst_seconds": ttst,
    "max_gap_seconds": max_gap,
}


def stream_summary(records: list[RequestRecord], slo: SLOConfig) -> dict:
    """A level's stream shape beside TTFT/TPOT: time to second token, per-user speed, stalls."""
    ok = [r for r in records if r.ok]
    pick = lambda d, *keys: {k: d.get(k) for k in keys}  # noqa: E731
    return {
        "ttst_seconds": pick(describe(ttst(r) for r in ok), "count", "p50", "p95"),
        "per_user_tokens_per_s": pick(describe(r.output_tokens_per_s for r in ok), "count", "p10", "p50"),
        "max_gap_seconds": pick(describe(max_gap(r) for r in ok), "count", "p50", "p99", "max"),
        "stalls": sum(stalls(r, slo.streaming.stall_gap_s) for r in ok),
        "stalled_requests": sum(1 for r in ok if stalls(r, slo.streaming.stall_gap_s)),
    }


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


# --- per-request samples of the client KPIs ----------------------------------------
def _is_short(r: RequestRecord, short_max: int) -> bool:
    """Short reply: asked for one when it failed, else judged by what it produced."""
    return r.short if not r.ok else r.output_tokens is not None and r.output_tokens <= short_max


def _allowance(name: str, r: RequestRecord, slo: SLOConfig) -> float:
    """How much the request's own budget exceeds the KPI's target (class target, prompt allowance)."""
    return slo.target_for(name, r.cls, r.prompt_tokens) - slo.kpis[name].target


def _samples(records: list[RequestRecord], slo: SLOConfig) -> dict[str, list[float]]:
    """KPI name -> samples; a failed request is a miss (+inf latency, 0 speed) where it applies.

    Latencies and speeds are shifted by the request's own allowance (``_allowance``), so
    "p95 of shifted TTFT < target" is "95 % of requests within their own budget".
    """
    short_max = slo.benchmark.short_reply_max_tokens
    longs = [r for r in records if not _is_short(r, short_max)]
    out = {
        "ttft_p95": [r.ttft_s - _allowance("ttft_p95", r, slo) if r.ok else MISS for r in records],
        "e2e_short_p95": [r.e2e_s - _allowance("e2e_short_p95", r, slo) if r.ok else MISS
                          for r in records if _is_short(r, short_max)],
        # The seed measured tokens/s on its benchmark shape; short replies (judged by e2e)
        # would drag speeds down with prefill time they cannot amortise.
        "decode_tokens_per_s_p10": [r.decode_tokens_per_s - _allowance("decode_tokens_per_s_p10", r, slo)
                                    if r.ok else 0.0 for r in longs if not r.ok or r.decode_tokens_per_s is not None],
        "output_tokens_per_s_mean": [r.output_tokens_per_s if r.ok else 0.0 for r in longs
                                     if not r.ok or r.output_tokens_per_s is not None],
    }
    if "stream_max_gap_p99" in slo.kpis:  # streams of at least two chunks; a failed stream froze for good
        out["stream_max_gap_p99"] = [max_gap(r) if r.ok else MISS for r in records if not r.ok or r.itl_s]
    if "ttft_overhead_p50" in slo.kpis:
        out["ttft_overhead_p50"] = _overheads(records)
    return out


def _overheads(records: list[RequestRecord]) -> list[float]:
    """Each request's serving-path TTFT overhead (loadtest/_hops.py), a failed one a miss.

    Only a server that reports per-hop timing (an llmslo server) has one: without any, no
    samples (NOT MEASURED), and the failures alone are not judged as overhead.
    """
    measured = [o for r in records if r.ok and (o := overhead(r)) is not None]
    return measured + [MISS for r in records if not r.ok] if measured else []


def meets_slo(r: RequestRecord, slo: SLOConfig) -> bool:
    """Did this request meet every per-request budget? (DistServe's SLO attainment counts these.)

    No error; TTFT within its budget; a short reply's e2e within its budget, a long
    reply's decode speed (1/TPOT) at its target (a one-token reply has none to judge).
    """
    if not r.ok or r.ttft_s is None:
        return False
    k = slo.kpis
    if not k["ttft_p95"].passes(r.ttft_s, slo.target_for("ttft_p95", r.cls, r.prompt_tokens)):
        return False
    if _is_short(r, slo.benchmark.short_reply_max_tokens):
        return r.e2e_s is not None and k["e2e_short_p95"].passes(
            r.e2e_s, slo.target_for("e2e_short_p95", r.cls, r.prompt_tokens))
    return r.decode_tokens_per_s is None or k["decode_tokens_per_s_p10"].passes(
        r.decode_tokens_per_s, slo.target_for("decode_tokens_per_s_p10", r.cls, r.prompt_tokens))


def attainment(records: list[RequestRecord], slo: SLOConfig, window_s: float) -> dict:
    """SLO attainment and goodput of one level's judged requests, overall and per traffic class.

    goodput: requests that met every budget and ended inside the window / window_s, and
    their output tokens that arrived inside it / window_s (like ``requests_per_s`` and
    ``output_tokens_per_s``, which count every successful request).
    """
    def one(recs: list[RequestRecord]) -> dict:
        good = [r for r in recs if meets_slo(r, slo)]
        per_s = (lambda x: x / window_s) if window_s > 0 else (lambda x: None)
        return {"requests": len(recs), "met": len(good),
                "attainment": len(good) / len(recs) if recs else None,
                "goodput_requests_per_s": per_s(sum(1 for r in good if r.level_end_s is None)),
                "goodput_tokens_per_s": per_s(sum(r.tokens_within_level() for r in good))}

    out = one(records)
    out["classes"] = {c: one([r for r in records if r.cls == c]) for c in sorted({r.cls for r in records})}
    return out


def _estimate(stat: str, values: list[float]) -> Estimate:
    if stat == "mean":
        return Estimate.of_mean(values)
    if not stat.startswith("p"):
        raise ValueError(f"slo.yaml: unsupported stat {stat!r} for a client KPI")
    return Estimate.of_percentile(values, float(stat[1:]))


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) else x


def judge_kpi(name: str, values: list[float], slo: SLOConfig) -> dict:
    """One KPI at one level: value, 95 % bounds, samples and PASS / FAIL / INCONCLUSIVE / None."""
    kpi = slo.kpis[name]
    est = _estimate(kpi.stat, values)
    status, note = judge(est, kpi.passes, higher_is_better=kpi.op in (">", ">="))
    if est.value is not None and math.isinf(est.value):
        note = (note + "; " if note else "") + "the percentile falls on failed requests"
    return {"value": _finite(est.value), "low": _finite(est.low), "high": _finite(est.high),
            "samples": est.samples, "status": status, "note": note}


def judge_errors(records: list[RequestRecord], slo: SLOConfig) -> dict:
    """Observed failure ratio (every failed request, none excluded) against the target."""
    kpi = slo.kpis["error_rate"]
    if not records:
        return {"value": None, "low": None, "high": None, "samples": 0, "status": None, "note": "no requests"}
    failed = sum(1 for r in records if not r.ok)
    ratio = failed / len(records)
    return {"value": ratio, "low": None, "high": None, "samples": len(records),
            "status": "PASS" if kpi.passes(ratio) else "FAIL", "note": f"{failed} of {len(records)} failed"}


CLIENT_KPIS = ("ttft_p95", "e2e_short_p95", "decode_tokens_per_s_p10", "output_tokens_per_s_mean", "stream_max_gap_p99",
               "ttft_overhead_p50")


def client_kpis(slo: SLOConfig) -> tuple[str, ...]:
    """The client KPIs this slo.yaml defines (stream_max_gap_p99 and ttft_overhead_p50 are optional)."""
    return tuple(name for name in CLIENT_KPIS if name in slo.kpis)


def _worst(statuses: Iterable[Status | None]) -> Status | None:
    known = [s for s in statuses if s is not None]
    return min(known, key=STATUS_ORDER.__getitem__) if known else None


# --- judgement of each record -------------------------------------------------------
def assign(records: list[RequestRecord], slo: SLOConfig) -> None:
    """Set each record's ``judgement``: judged, headroom, drain or warmup (latency scope only)."""
    target = slo.concurrency_target
    for r in records:
        if r.warmup:
            r.judgement = "warmup"
        elif r.phase == "drain":
            r.judgement = "drain"
        elif r.level > target:
            r.judgement = "headroom"
        else:
            r.judgement = "judged"


def accounting(records: list[RequestRecord]) -> dict:
    """sent = judged + headroom + drain + warmup; failures of every kind counted in error_rate."""
    kinds = Counter(r.judgement for r in records)
    return {"sent": len(records), "judged": kinds["judged"], "headroom": kinds["headroom"],
            "drain": kinds["drain"], "warmup": kinds["warmup"], "failed": sum(1 for r in records if not r.ok)}


def accounting_line(acc: dict, warmup_s: float) -> str:
    """The accounting in one sentence (console, report, SLO tab)."""
    warm = f" + {acc['warmup']} warm-up (--warmup-s {warmup_s:g})" if warmup_s else ""
    return (f"{acc['sent']} sent = {acc['judged']} judged + {acc['headroom']} headroom (above the target)"
            f" + {acc['drain']} drain (started after their level's time){warm}; "
            f"{acc['failed']} failed, every one counted in error_rate")


# --- levels -------------------------------------------------------------------------
HOLD_SHARE = 0.9  # a closed-loop level whose requests in flight averaged less than this share of its users is not judged


def _carry_in(records: list[RequestRecord]) -> dict[int, float]:
    """Level -> seconds that requests of the epoch before it spent in flight after their own level
    ended: load the server carried during this level's window too (durations, so any clock will do)."""
    level_of_epoch = {r.epoch: r.level for r in records}
    carry: dict[int, float] = {}
    for r in records:
        if r.level_end_s is not None and r.epoch + 1 in level_of_epoch:
            nxt = level_of_epoch[r.epoch + 1]
            carry[nxt] = carry.get(nxt, 0.0) + max(0.0, (r.duration_s or 0.0) - r.level_end_s)
    return carry


def _held(level: int, in_flight: float | None, closed_loop: bool) -> str:
    """Why a closed-loop level cannot be judged as ``level`` streams ("" when it can): its users
    were not all sending (a stuck user, a slow spawn rate), so its numbers describe a lighter load."""
    if not closed_loop or in_flight is None or in_flight >= HOLD_SHARE * level:
        return ""
    return (f"only {in_flight:.2f} of {level} requests in flight on average (< {HOLD_SHARE:.0%}): "
            f"the load test did not hold {level} streams")


def level_table(records: list[RequestRecord], slo: SLOConfig, windows: dict[int, float],
                closed_loop: bool = True) -> list[dict]:
    """One row per concurrency level: its own KPIs with bounds, accounting and status.

    ``windows`` maps level -> seconds the generator held it (ramp to the next level, or to the stop).
    Throughput and achieved concurrency count only what happened inside that
    window (a request running past its level's end is clipped there). ``in_flight``
    also counts the previous level's requests still running in it: the load the
    server saw. A closed-loop level (users send back to back; not ``--arrival-rate``)
    where that stayed under ``HOLD_SHARE`` of its users cannot PASS (INCONCLUSIVE,
    ``note`` says why); a FAIL at a lighter load still fails.
    """
    target = slo.concurrency_target
    carry = _carry_in(records)
    rows = []
    for level in sorted({r.level for r in records}):
        recs = [r for r in records if r.level == level]
        scoped = [r for r in recs if r.judgement in ("judged", "headroom")]
        samples = _samples(scoped, slo)
        kpis = {name: judge_kpi(name, samples[name], slo) for name in client_kpis(slo)}
        kpis["error_rate"] = judge_errors(recs, slo)
        latency = _worst(k["status"] for name, k in kpis.items() if name != "error_rate" and slo.kpis[name].enforced)
        errors = kpis["error_rate"]["status"]
        window = windows.get(level, 0.0)
        busy = sum(r.busy_s for r in recs)
        in_flight = (busy + carry.get(level, 0.0)) / window if window > 0 else None
        note = _held(level, in_flight, closed_loop)
        status = _worst([latency, errors])
        rows.append({
            "level": level,
            "scope": "judged" if level <= target else "headroom",
            "window_s": window,
            "requests": len(recs),
            "judged_requests": len(scoped),
            "drain_requests": sum(1 for r in recs if r.judgement == "drain"),
            "warmup_requests": sum(1 for r in recs if r.judgement == "warmup"),
            "failed": sum(1 for r in recs if not r.ok),
            "achieved_concurrency": busy / window if window > 0 else None,
            "in_flight": in_flight,
            "output_tokens_per_s": sum(r.tokens_within_level() for r in recs) / window if window > 0 else None,
            "requests_per_s": sum(1 for r in recs if r.ok and r.level_end_s is None) / window if window > 0 else None,
            "slo_attainment": attainment(scoped, slo, window),
            "stream": stream_summary(scoped, slo),
            "kpis": kpis,
            "status": "INCONCLUSIVE" if note and status == "PASS" else status,
            "note": note,
        })
    return rows


def concurrency_sustained(levels: list[dict], target: int) -> tuple[float | None, Status | None, str]:
    """Highest level L such that every level <= L passed, and its status against the target."""
    if not levels:
        return None, None, "no concurrency level was held"
    best, broke = 0, None
    for row in levels:
        if row["status"] != "PASS":
            broke = row
            break
        best = row["level"]
    if best >= target:
        return float(best), "PASS", f"every level up to {best} passed"
    if broke is not None:
        status = "FAIL" if broke["status"] == "FAIL" else "INCONCLUSIVE"
        why = f" ({broke['note']})" if broke.get("note") else ""
        return float(best), status, f"level {broke['level']} is {broke['status'] or 'NOT MEASURED'}{why}"
    return float(best), "INCONCLUSIVE", f"no level >= {target} was held"


# --- capacity search (driven by loadtest/_shape.py) ----------------------------------
@dataclass
class CapacitySearch:
    """Bracketing then bisection over concurrency; ``after`` names the next probe or None (done)."""

    start: int
    maximum: int
    max_probes: int
    probes: list[tuple[int, str]] = field(default_factory=list)  # (level, status) in probe order
    passed: int = 0  # highest level that passed (0: none)
    failed: int | None = None  # lowest level that did not pass

    def after(self, level: int, status: str | None) -> int | None:
        """Record a judged probe; the next level to hold, or None when the answer is known."""
        self.probes.append((level, status or "NOT MEASURED"))
        if status == "PASS":
            self.passed = max(self.passed, level)
        else:
            self.failed = level if self.failed is None else min(self.failed, level)
        if len(self.probes) >= self.max_probes:
            return None
        if self.failed is None:  # bracketing
            return None if level >= self.maximum else min(2 * level, self.maximum)
        if self.failed - self.passed <= 1:
            return None
        return (self.passed + self.failed) // 2

    def result(self) -> dict:
        """The search as summary.json reports it (capacity_search)."""
        done = self.failed is not None and self.failed - self.passed <= 1
        return {"max_passing": self.passed, "lowest_not_passing": self.failed, "probes": len(self.probes),
                "probe_levels": [{"level": lvl, "status": st} for lvl, st in self.probes],
                "converged": done, "limit": self.maximum}


# --- the verdict --------------------------------------------------------------------
def verdict(
    records: list[RequestRecord], slo: SLOConfig, levels: list[dict], server: ServerFacts, duration_s: float
) -> dict[str, dict]:
    """KPI name -> {title, value, low, high, target, op, unit, status, pass, samples, note, levels}."""
    target = slo.concurrency_target
    judged_levels = [row for row in levels if row["level"] <= target]
    rows: dict[str, dict] = {name: _across_levels(name, judged_levels) for name in client_kpis(slo)}
    rows["error_rate"] = judge_errors(records, slo)
    rows["error_rate"]["levels"] = {row["level"]: row["kpis"]["error_rate"]["status"] for row in levels}
    if any(row["kpis"]["error_rate"]["status"] == "FAIL" for row in levels):  # headroom levels too
        worst = max(levels, key=lambda row: row["kpis"]["error_rate"]["value"] or 0.0)
        rows["error_rate"]["status"] = "FAIL"
        rows["error_rate"]["note"] += f"; level {worst['level']}: {worst['kpis']['error_rate']['note']}"
    value, status, note = concurrency_sustained(levels, target)
    rows["concurrency"] = {"value": value, "status": status, "samples": len(levels), "note": note}
    hours = duration_s / 3600 if duration_s > 0 else math.nan
    rows["oom_per_hour"] = _rate(server.oom_events, hours, server.why("oom_events"), slo.kpis["oom_per_hour"].passes)
    rows["crashes_per_day"] = _rate(server.replica_crashes, hours / 24, server.why("replica_crashes"),
                                    slo.kpis["crashes_per_day"].passes)
    rows["gpu_memory_gb"] = _gauge(server.gpu_memory_gb_per_copy, server.why("gpu_memory_gb_per_copy"),
                                   slo.kpis["gpu_memory_gb"].passes)
    rows["cpu_percent"] = _gauge(server.cpu_percent_max, server.why("cpu_percent_max"), slo.kpis["cpu_percent"].passes)
    out = {}
    for name, kpi in slo.kpis.items():
        row = rows.get(name, {"value": None, "status": None, "note": f"no implementation for metric {kpi.metric}"})
        out[name] = {"title": kpi.title, "target": kpi.target, "op": kpi.op, "unit": kpi.unit,
                     "low": None, "high": None, "samples": None, "levels": {}, **row,
                     "pass": {"PASS": True, "FAIL": False}.get(row["status"]), "enforced": kpi.enforced}
    return out


def _across_levels(name: str, levels: list[dict]) -> dict:
    """A client KPI over the judged levels: the worst level's status, that level's value and bounds."""
    measured = [row for row in levels if row["kpis"][name]["status"] is not None]
    per_level = {row["level"]: row["kpis"][name]["status"] for row in levels}
    if not measured:
        return {"value": None, "status": None, "samples": 0, "levels": per_level,
                "note": "no samples at a judged level" if levels else "no level at or below the target was held"}
    row = min(measured, key=lambda r: STATUS_ORDER[r["kpis"][name]["status"]])
    k = row["kpis"][name]
    note = f"at {row['level']} streams (worst of {len(measured)} judged level(s))" + (f"; {k['note']}" if k["note"] else "")
    return {**k, "levels": per_level, "note": note}


def _rate(count: float | None, period: float, note: str, passes: Callable[[float], bool]) -> dict:
    if count is None or not period or math.isnan(period):
        return {"value": None, "status": None, "note": note}
    value = count / period
    return {"value": value, "status": "PASS" if passes(value) else "FAIL", "note": f"{count:g} event(s) during the run"}


def _gauge(value: float | None, note: str, passes: Callable[[float], bool]) -> dict:
    if value is None:
        return {"value": None, "status": None, "note": note}
    return {"value": value, "status": "PASS" if passes(value) else "FAIL", "note": note or "max over server scrapes"}


def overall(kpis: dict[str, dict]) -> str:
    """'FAIL', 'INCONCLUSIVE', 'PASS' or 'PASS (k not measured)' over the enforced KPIs."""
    statuses = [k["status"] for k in kpis.values() if k.get("enforced", True)]
    if "FAIL" in statuses:
        return "FAIL"
    if "INCONCLUSIVE" in statuses:
        return "INCONCLUSIVE"
    missing = statuses.count(None)
    return f"PASS ({missing} not measured)" if missing else "PASS"


def cold_start(records: list[RequestRecord], first_users: int) -> dict:
    """The run's first requests (one per user of the first level): a cold server shows here."""
    first = sorted(records, key=lambda r: r.start_wall)[:max(1, first_users)]
    ttfts = [r.ttft_s for r in first if r.ok and r.ttft_s is not None]
    return {"requests": len(first), "failed": sum(1 for r in first if not r.ok),
            "ttft_max_s": max(ttfts, default=None), "ttft_s": ttfts,
            "judged": all(r.judgement in ("judged", "headroom") for r in first)}
