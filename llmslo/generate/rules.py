"""Prometheus recording rules and alerts from slo.yaml, each alert with its promtool scenarios.

Why alerts carry their scenarios: the promtool unit tests in alerts/tests/ are
rendered from the same numbers as the rules (targets, budgets, burn factors),
so changing slo.yaml moves rule and test together and the test still proves
the expression fires on a breaking series, stays silent on a healthy one and
does what slo.yaml's comparison says exactly at the target.

Conventions:
- SLO rules follow Sloth's names: ``slo:sli_error:ratio_rate<window>{slo=...}``,
  ``slo:objective:ratio``, ``slo:error_budget:ratio``,
  ``slo:period_error_budget_remaining:ratio``; burn alerts pair a long and a
  short window per slo.yaml's ``burn_rate_windows`` (SRE workbook ch. 5).
- Threshold alerts breach when the KPI's ``value <op> target`` stops holding
  (``<`` becomes ``>=``), except quantiles estimated from histogram buckets:
  those breach only strictly beyond the target, because an estimate that lands
  exactly on a bucket edge means "somewhere at or below the edge".
- Counts of rare events (OOM, crashes) also count a series that first appears
  inside the window: Ray creates a counter series at its first increment, which
  ``increase()`` alone would miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract import names as n
from llmslo.generate.promql import BREACH, histogram_series, num, piecewise, seconds, selector
from contract.slo import KPI, SLOConfig

RUNBOOK = "README.md#runbook-"
KPI_FOR = "5m"            # sustained breach before a latency/capacity/resource alert fires
LATENCY_WINDOW = "5m"     # rate window of the quantile alerts
TICKET_FOR = "10m"        # telemetry health alerts
GB = 1e9                  # slo.yaml's GPU memory unit "GB" is SI (10^9 bytes)
REQUESTS_PER_S = 10_000   # synthetic traffic in the burn-rate scenarios: keeps every ratio exact


@dataclass(frozen=True)
class Scenario:
    """One promtool case: input series and whether the alert fires at ``eval_time``."""

    name: str
    series: dict[str, str]
    eval_minutes: int
    fires: bool
    labels: dict[str, str] = field(default_factory=dict)
    interval_s: int = 60


@dataclass(frozen=True)
class Threshold:
    """``value <cmp> limit``: how the Grafana-managed copy re-states the alert."""

    value: str
    cmp: str
    limit: float


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    severity: str
    summary: str
    description: str
    runbook: str
    scenarios: tuple[Scenario, ...]
    for_: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    threshold: Threshold | None = None

    @property
    def runbook_url(self) -> str:
        return RUNBOOK + self.runbook

    def annotations(self, labels: dict[str, str] | None = None) -> dict[str, str]:
        """Annotations; with ``labels``, the text Prometheus renders for that alert."""
        out = {"summary": self.summary, "description": self.description, "runbook_url": self.runbook_url}
        for key, value in (labels or {}).items():
            out = {k: v.replace("{{ $labels.%s }}" % key, value) for k, v in out.items()}
        return out

    def rule(self, for_override: str | None = None) -> dict:
        rule: dict = {"alert": self.name, "expr": self.expr}
        duration = for_override if (for_override is not None and self.for_) else self.for_
        if duration:
            rule["for"] = duration
        rule["labels"] = {"severity": self.severity, **self.labels}
        rule["annotations"] = self.annotations()
        return rule


def _threshold_alert(name: str, value: str, cmp: str, limit: float, **kw) -> Alert:
    return Alert(name=name, expr=f"{value} {cmp} {num(limit)}", threshold=Threshold(value, cmp, limit), **kw)


def _quantile(stat: str) -> float:
    """'p95' -> 0.95."""
    return float(stat.removeprefix("p")) / 100


def _histogram_quantile(q: float, metric: str, window: str = LATENCY_WINDOW) -> str:
    return f"histogram_quantile({num(q)}, sum by (model, le) (rate({metric}_bucket[{window}])))"


def events_in(metric: str, window: str, by: str = "model", matcher: str = "") -> str:
    """Events in the last ``window``, summed ``by``, counting counter series born inside it.

    Ray creates a counter series at its first event, which ``increase()`` alone
    would miss. A series is "born inside" the window when it is younger than the
    window and Prometheus scraped its target successfully more often in the
    window than it saw the series; such a series counts with its whole value.
    Any other series counts its ``increase``. After a Prometheus restart an old
    counter has exactly as many samples as ``up`` has, so it is not mistaken for
    new events, while its later increments still count.
    """
    m = f"{metric}{{{matcher}}}" if matcher else metric
    born = (f"(({m} unless {m} offset {window})"
            f" and (count_over_time({m}[{window}]) < on (instance, job) group_left ()"
            f" sum_over_time(up[{window}])))")
    return f"sum by ({by}) ((increase({m}[{window}]) unless {born}) or {born})"


# --- SLO recording rules and burn-rate alerts -------------------------------------------------

def _sli_error(slo_key: str, cfg: SLOConfig, window: str) -> str:
    if slo_key == "availability":
        bad = f'sum by (model) (rate({n.REQUESTS}{{status="server_error"}}[{window}]))'
        total = f'sum by (model) (rate({n.REQUESTS}{{status!="cancelled"}}[{window}]))'
        return f"({bad} or 0 * {total}) / {total}"
    if cfg.slos[slo_key].budget_kpi:
        return _over_budget(window)
    threshold = cfg.slos[slo_key].threshold_s
    total = f"sum by (model) (rate({n.TTFT}_count[{window}]))"
    good = f'sum by (model) (rate({n.TTFT}_bucket{{le="{num(threshold)}"}}[{window}]))'
    return f"({total} - {good}) / {total}"


def _over_budget(window: str) -> str:
    """Share of requests whose first token missed its own slo.yaml budget (exact per request, no buckets)."""
    missed = f'sum by (model) (rate({n.TTFT_BUDGET}{{outcome="missed"}}[{window}]))'
    total = f"sum by (model) (rate({n.TTFT_BUDGET}[{window}]))"
    return f"({missed} or 0 * {total}) / {total}"


def _windows(cfg: SLOConfig) -> list[str]:
    found = {w for b in cfg.burn_rate_windows for w in (b.long, b.short)}
    return sorted(found, key=seconds)


def recording_groups(cfg: SLOConfig) -> list[dict]:
    sli, meta = [], []
    for key, slo in cfg.slos.items():
        labels, period = {"slo": key}, slo.period
        for window in _windows(cfg):
            sli.append({"record": f"slo:sli_error:ratio_rate{window}", "expr": _sli_error(key, cfg, window),
                        "labels": labels})
        short = _windows(cfg)[0]
        meta += [
            {"record": "slo:objective:ratio", "expr": f"vector({num(slo.objective)})", "labels": labels},
            {"record": "slo:error_budget:ratio", "expr": f"vector({num(round(slo.error_budget, 12))})",
             "labels": labels},
            {"record": f"slo:sli_error:ratio_rate{period}",
             "expr": (f'sum_over_time(slo:sli_error:ratio_rate{short}{{slo="{key}"}}[{period}])'
                      f' / count_over_time(slo:sli_error:ratio_rate{short}{{slo="{key}"}}[{period}])'),
             "labels": labels},
            {"record": "slo:period_error_budget_remaining:ratio",
             "expr": f'1 - slo:sli_error:ratio_rate{period}{{slo="{key}"}} / {num(round(slo.error_budget, 12))}',
             "labels": labels},
        ]
    return [{"name": "llmslo-slo-sli", "rules": sli}, {"name": "llmslo-slo-meta", "rules": meta}]


def _camel(key: str) -> str:
    return "".join(part.capitalize() for part in key.split("_"))


def _slo_traffic(key: str, cfg: SLOConfig, model: str, segments: list[tuple[float, int]],
                 interval_s: int) -> dict[str, str]:
    """Series where ``bad`` of REQUESTS_PER_S requests per second break the SLO, segment by segment."""
    if key == "availability":
        ok = [(REQUESTS_PER_S - bad, k) for bad, k in segments]
        err = [(bad, k) for bad, k in segments]
        return {
            selector(n.REQUESTS, {"model": model, "status": "ok", "code": "200"}): piecewise(ok, interval_s),
            selector(n.REQUESTS, {"model": model, "status": "server_error", "code": "500"}): piecewise(err, interval_s),
        }
    if cfg.slos[key].budget_kpi:
        return _budget_traffic(model, segments, interval_s)
    threshold = cfg.slos[key].threshold_s
    fast, slow = threshold / 2, threshold * 2
    obs = [({fast: REQUESTS_PER_S - bad, slow: bad}, k) for bad, k in segments]
    return histogram_series(n.TTFT, {"model": model, "modality": "text"}, n.TTFT_BUCKETS, obs, interval_s)


def _budget_traffic(model: str, segments: list[tuple[float, int]], interval_s: int) -> dict[str, str]:
    """TTFT budget counters where ``bad`` of REQUESTS_PER_S requests per second miss their budget."""
    return {
        selector(n.TTFT_BUDGET, {"model": model, "outcome": "met"}):
            piecewise([(REQUESTS_PER_S - bad, k) for bad, k in segments], interval_s),
        selector(n.TTFT_BUDGET, {"model": model, "outcome": "missed"}): piecewise(segments, interval_s),
    }


def _burn_alert(key: str, cfg: SLOConfig, severity: str) -> Alert:
    slo = cfg.slos[key]
    budget = slo.error_budget
    pairs = [w for w in cfg.burn_rate_windows if w.severity == severity]
    terms = []
    for w in pairs:
        limit = num(round(w.factor * budget, 12))
        terms.append(f'(slo:sli_error:ratio_rate{w.long}{{slo="{key}"}} > {limit}'
                     f' and slo:sli_error:ratio_rate{w.short}{{slo="{key}"}} > {limit})')
    windows = ", ".join(f"{w.long}/{w.short} at {num(w.factor)}x" for w in pairs)
    return Alert(
        name=f"{_camel(key)}ErrorBudgetBurn{severity.capitalize()}",
        expr=" or ".join(terms),
        severity=severity,
        labels={"slo": key},
        summary=f"{slo.title}: error budget burning too fast on {{{{ $labels.model }}}}",
        description=(f"SLO {key} (objective {num(slo.objective)}) is spending its error budget faster than "
                     f"allowed over {windows} (burn = error ratio / {num(round(budget, 12))})."),
        runbook=f"{key.replace('_', '-')}-error-budget-burn",
        scenarios=_burn_scenarios(key, cfg, severity),
    )


def _burn_scenarios(key: str, cfg: SLOConfig, severity: str) -> tuple[Scenario, ...]:
    """Steady burns above, below and exactly at the slowest factor; for pages also a short-only outage."""
    budget = cfg.slos[key].error_budget
    pairs = [w for w in cfg.burn_rate_windows if w.severity == severity]
    factors = sorted(w.factor for w in pairs)
    pages = [w.factor for w in cfg.burn_rate_windows if w.severity == "page"]
    # breaking: above the fastest pair; for a ticket, between its fastest factor and the slowest page
    above = (factors[-1] + min(pages)) / 2 if severity == "ticket" and pages else factors[-1] * 1.25
    model = cfg.service.model
    interval = 60 if max(seconds(w.long) for w in pairs) <= 6 * 3600 else 300
    span = max(seconds(w.long) for w in pairs) // interval + 2   # every window fully covered: rates stay exact

    def case(name: str, bad_per_s: list[tuple[float, int]], fires: bool) -> Scenario:
        return Scenario(name, _slo_traffic(key, cfg, model, bad_per_s, interval), span * interval // 60, fires,
                        {"model": model, "slo": key} if fires else {}, interval)

    def bad(factor: float) -> float:
        return min(round(factor * budget * REQUESTS_PER_S), REQUESTS_PER_S)

    cases = [
        case(f"burning at {num(above)}x fires", [(bad(above), span)], True),
        case("burning at half the budget is silent", [(bad(0.5), span)], False),
        case(f"burning exactly at {num(factors[0])}x is silent", [(bad(factors[0]), span)], False),
    ]
    if severity == "page":
        shortest = min(seconds(w.short) for w in pairs) // interval
        cases.append(case("an outage only in the short window is silent",
                          [(0, span - shortest), (REQUESTS_PER_S, shortest)], False))
    return tuple(cases)


# --- KPI threshold alerts --------------------------------------------------------------------

def _fires_at_target(kpi: KPI) -> bool:
    return not kpi.passes(kpi.target)


def _ttft_alert(cfg: SLOConfig) -> Alert:
    """p95 TTFT under budget <=> at most 5 % of requests over their own budget: exact per request, so
    an image prompt is judged on its prompt-aware budget, as the load test's judge does."""
    kpi = cfg.kpis["ttft_p95"]
    q, model = _quantile(kpi.stat), cfg.service.model
    share = 1 - q
    per_s = REQUESTS_PER_S // 100

    def traffic(pct_missed: int) -> dict[str, str]:
        return _budget_traffic(model, [(pct_missed * per_s, 30)], 60)

    pct = round(share * 100)
    return _threshold_alert(
        "TTFTP95High", _over_budget(LATENCY_WINDOW), ">", share,
        severity="page", for_=KPI_FOR,
        summary=f"TTFT {kpi.stat} over budget on {{{{ $labels.model }}}}",
        description=(f"{kpi.title}: more than {num(pct)}% of requests over {LATENCY_WINDOW} missed their own "
                     f"TTFT budget ({num(kpi.target * 1000)} ms at <= {cfg.benchmark.input_tokens} prompt tokens, "
                     f"+ {num(cfg.benchmark.prefill_s_per_token * 1000)} ms per prompt token above; counted "
                     f"per request by the server, {n.TTFT_BUDGET}) for {KPI_FOR}."),
        runbook="ttft-p95-high",
        scenarios=(
            Scenario(f"{2 * pct}% of requests over budget fires", traffic(2 * pct), 25, True, {"model": model}),
            Scenario("every request within budget is silent", traffic(0), 25, False),
            Scenario(f"exactly {pct}% over budget is silent (p{round(q * 100)} on the budget)", traffic(pct),
                     25, False),
        ),
    )


def _decode_alert(cfg: SLOConfig) -> Alert:
    kpi = cfg.kpis["decode_tokens_per_s_p10"]
    q = 1 - _quantile(kpi.stat)              # p10 of tokens/s is p90 of time per token
    limit = 1 / kpi.target
    model = cfg.service.model
    edge = max(b for b in n.TOKEN_BUCKETS if b < limit)
    above = min(b for b in n.TOKEN_BUCKETS if b > limit)
    fast = min(n.TOKEN_BUCKETS)

    def traffic(obs: dict[float, float]) -> dict[str, str]:
        return histogram_series(n.TPOT, {"model": model}, n.TOKEN_BUCKETS, [(obs, 30)], 60)

    share = round(q * 100)
    return _threshold_alert(
        "DecodeSpeedLow", _histogram_quantile(q, n.TPOT), ">", limit,
        severity="page", for_=KPI_FOR,
        summary=f"Decode speed {kpi.stat} below {num(kpi.target)} tokens/s on {{{{ $labels.model }}}}",
        description=(f"{kpi.title}: the {num(q * 100)}th percentile of time per output token has been above "
                     f"1/{num(kpi.target)} s for {KPI_FOR}, so one stream in ten decodes slower than "
                     f"{num(kpi.target)} tokens/s."),
        runbook="decode-speed-low",
        scenarios=(
            Scenario("30% of streams slower than target fires", traffic({fast: 70, above: 30}), 25, True,
                     {"model": model}),
            Scenario("all streams fast is silent", traffic({fast: 100}), 25, False),
            Scenario(f"p{share} exactly on 1/{num(kpi.target)} s is silent",
                     traffic({(edge + limit) / 2: share, above: 100 - share}), 25, False),
        ),
    )


def _healthy_model_replicas(aggregation: str) -> str:
    """``aggregation`` by model over the model replicas Serve reports healthy (their capacity series)."""
    return (f'{aggregation} by (model) ({n.REPLICA_CAPACITY}{{component="{n.MODEL_COMPONENT}"}} and on (replica) '
            f"({n.SERVE_REPLICA_HEALTHY} == 1))")


def _capacity_alert(cfg: SLOConfig) -> Alert:
    kpi = cfg.kpis["concurrency"]
    model = cfg.service.model
    value = _healthy_model_replicas("sum")

    def replicas(per_replica: float, healthy: tuple[int, int]) -> dict[str, str]:
        series = {}
        for i, up in enumerate(healthy):
            rep = f"r{i}"
            series[selector(n.REPLICA_CAPACITY, {"model": model, "component": n.MODEL_COMPONENT,
                                                 "replica": rep})] = f"{num(per_replica)}x30"
            series[selector(n.SERVE_REPLICA_HEALTHY, {"deployment": "model", "replica": rep})] = f"{up}x30"
        # the ingress is a Serve replica too; its max_ongoing_requests is no model capacity
        series[selector(n.REPLICA_CAPACITY, {"model": model, "component": "ingress", "replica": "i0"})] = "1000x30"
        series[selector(n.SERVE_REPLICA_HEALTHY, {"deployment": "ingress", "replica": "i0"})] = "1x30"
        return series

    half = kpi.target / 2
    return _threshold_alert(
        "ServingCapacityLow", value, BREACH[kpi.op], kpi.target,
        severity="page", for_=KPI_FOR,
        summary=f"Serving capacity below {num(kpi.target)} concurrent requests on {{{{ $labels.model }}}}",
        description=("Healthy replicas x max_ongoing_requests has been below the "
                     f"{num(kpi.target)} concurrent requests target for {KPI_FOR}."),
        runbook="serving-capacity-low",
        scenarios=(
            Scenario("one of two replicas unhealthy fires", replicas(half, (1, 0)), 20, True, {"model": model}),
            Scenario("two replicas at full target each is silent", replicas(kpi.target, (1, 1)), 20, False),
            Scenario("capacity exactly at target", replicas(half, (1, 1)), 20, _fires_at_target(kpi),
                     {"model": model} if _fires_at_target(kpi) else {}),
        ),
    )


def _scale_out_alert(cfg: SLOConfig) -> Alert:
    """The autoscaler has nothing left to add while users already feel it: only a human can help."""
    model = cfg.service.model
    short = _windows(cfg)[0]
    healthy = _healthy_model_replicas("count")
    ceiling = f'max by (model) ({n.DEPLOYMENT_MAX_REPLICAS}{{component="{n.MODEL_COMPONENT}"}})'
    burn = f"max by (model) (slo:sli_error:ratio_rate{short} / on (slo) group_left () slo:error_budget:ratio)"
    budget = cfg.slos["ttft"].error_budget

    def case(name: str, healthy_of: tuple[int, ...], ceiling_n: int, burn_factor: float, fires: bool) -> Scenario:
        series = {}
        for i, up in enumerate(healthy_of):
            rep = f"r{i}"
            series[selector(n.REPLICA_CAPACITY, {"model": model, "component": n.MODEL_COMPONENT,
                                                 "replica": rep})] = "8x40"
            series[selector(n.DEPLOYMENT_MAX_REPLICAS, {"model": model, "component": n.MODEL_COMPONENT,
                                                        "replica": rep})] = f"{ceiling_n}x40"
            series[selector(n.SERVE_REPLICA_HEALTHY, {"deployment": "model", "replica": rep})] = f"{up}x40"
        bad = round(burn_factor * budget * REQUESTS_PER_S)
        series.update(_slo_traffic("ttft", cfg, model, [(bad, 40)], 60))
        return Scenario(name, series, 25, fires, {"model": model} if fires else {})

    at_ceiling_burn = f"(({burn}) and on (model) ({healthy} >= on (model) {ceiling}))"  # the burn, only at max
    return _threshold_alert(
        "ScaleOutExhausted", at_ceiling_burn, ">", 1,
        severity="page", for_=KPI_FOR,
        summary="{{ $labels.model }} runs at its max replicas while an SLO burns",
        description=(f"Every replica the deployment may run is up and healthy, and an SLO's error ratio over "
                     f"{short} has been above its error budget for {KPI_FOR}: the autoscaler cannot add "
                     "capacity. Raise max_replicas (and the cluster's GPUs) or shed load."),
        runbook="scale-out-exhausted",
        scenarios=(
            case("2 of max 2 replicas healthy, TTFT burning 2x fires", (1, 1), 2, 2, True),
            case("at max 2 replicas without a burn is silent", (1, 1), 2, 0.5, False),
            case("1 of max 2 healthy while burning is silent (Serve can still add one)", (1, 0), 2, 2, False),
            case("a fixed deployment of 1 replica burning fires", (1,), 1, 2, True),
        ),
    )


def _event_alert(name: str, kpi: KPI, metric: str, window: str, model: str, extra: dict[str, str], *,
                 severity: str, summary: str, description: str, runbook: str) -> Alert:
    """Zero-tolerance count of rare events in a window; no ``for``: one event is the breach."""
    step = 60 if seconds(window) <= 3600 else 600
    per_window = seconds(window) // step
    target = {"instance": "serve:8080", "job": n.SERVER_JOB}
    sel = selector(metric, {"model": model, **extra, **target})
    up = {selector("up", target): f"1x{3 * per_window}"}
    fired = {"model": model}
    after = per_window + 10           # event at this sample index

    def case(name: str, values: str, at: int, fires: bool) -> Scenario:
        return Scenario(name, {**up, sel: values}, at * step // 60, fires, fired if fires else {}, step)

    return _threshold_alert(
        name, f"({events_in(metric, window)})", BREACH[kpi.op], kpi.target,
        severity=severity, summary=summary, description=description, runbook=runbook,
        scenarios=(
            case("first event of a process (series appears at 1) fires", f"_x10 1x{per_window}", 20, True),
            case("an existing counter incrementing fires", f"1x{after} 2x{per_window}", after + 5, True),
            case("no event for longer than the window is silent", f"1x{2 * per_window + 10}", 2 * per_window + 5,
                 False),
            case(f"last event one step less than {window} ago fires", f"1x{after - 1} 2x{2 * per_window}",
                 after + per_window - 1, True),
            case(f"last event exactly {window} ago is silent", f"1x{after - 1} 2x{2 * per_window}",
                 after + per_window, False),
            Scenario("an old counter seen by a freshly started Prometheus is silent",
                     {selector("up", target): f"_x20 1x{per_window}", sel: f"_x20 3x{per_window}"},
                     30 * step // 60, False, {}, step),
            Scenario("that old counter incrementing after the restart fires",
                     {selector("up", target): f"_x20 1x{per_window}", sel: f"_x20 3x5 4x{per_window}"},
                     30 * step // 60, True, fired, step),
        ),
    )


def _gpu_memory_alert(cfg: SLOConfig) -> Alert:
    kpi = cfg.kpis["gpu_memory_gb"]
    model = cfg.service.model
    limit = kpi.target * GB
    gpus = max(cfg.service.gpus_per_replica, 1)

    def copy(per_gpu: float) -> dict[str, str]:
        return {selector(n.GPU_MEMORY_USED, {"gpu": str(i), "uuid": f"GPU-{i}", "model": model, "replica": "r0"}):
                f"{num(per_gpu)}x30" for i in range(gpus)}

    return _threshold_alert(
        "GPUMemoryPerCopyHigh", f"sum by (model, replica) ({n.GPU_MEMORY_USED})", BREACH[kpi.op], limit,
        severity="ticket", for_=KPI_FOR,
        summary=f"GPU memory of a model copy above {num(kpi.target)} GB on {{{{ $labels.model }}}}",
        description=(f"{kpi.title}: NVML memory used, summed over the {gpus} GPU(s) of replica "
                     f"{{{{ $labels.replica }}}}, has been above {num(kpi.target)} GB (10^9 bytes) for {KPI_FOR}."),
        runbook="gpu-memory-high",
        scenarios=(
            Scenario("a copy using 4% over the limit fires", copy(limit * 1.04 / gpus), 20, True,
                     {"model": model, "replica": "r0"}),
            Scenario("a copy at 60% of the limit is silent", copy(limit * 0.6 / gpus), 20, False),
            Scenario("exactly at the limit", copy(limit / gpus), 20, _fires_at_target(kpi),
                     {"model": model, "replica": "r0"} if _fires_at_target(kpi) else {}),
        ),
    )


def _cpu_alert(cfg: SLOConfig) -> Alert:
    kpi = cfg.kpis["cpu_percent"]
    model = cfg.service.model

    def roles(each: float, components: tuple[str, ...] = ("ingress", "http_proxy")) -> dict[str, str]:
        return {selector(n.PROCESS_CPU, {"model": model, "component": c, "instance": "node:8080"}):
                f"{num(each)}x30" for c in components}

    fired = {"instance": "node:8080"}
    return _threshold_alert(
        "CPUHigh", f"sum by (instance) ({n.PROCESS_CPU})", BREACH[kpi.op], kpi.target,
        severity="ticket", for_=KPI_FOR,
        summary=f"The serving processes use {num(kpi.target)}% or more of {{{{ $labels.instance }}}}'s CPU",
        description=(f"{kpi.title}: the node's serving tree (ingress, model replicas, Ray's HTTP proxy, "
                     f"Serve controller, raylet, GCS, rest of Ray) together used at least "
                     f"{num(kpi.target)}% of all its logical CPUs for {KPI_FOR}."),
        runbook="cpu-high",
        scenarios=(
            Scenario("ingress and HTTP proxy at 45% each fire", roles(45), 20, True, fired),
            Scenario("ingress and HTTP proxy at 20% each are silent", roles(20), 20, False),
            Scenario("exactly at the target", roles(kpi.target / 2), 20, _fires_at_target(kpi),
                     fired if _fires_at_target(kpi) else {}),
            Scenario("Ray's own processes count: 6 roles at 12% fire",
                     roles(12, ("ingress", "replica", "http_proxy", "serve_controller", "raylet", "gcs")), 20,
                     True, fired),
        ),
    )


def kpi_alerts(cfg: SLOConfig) -> list[Alert]:
    model = cfg.service.model
    oom, crashes = cfg.kpis["oom_per_hour"], cfg.kpis["crashes_per_day"]
    return [
        _ttft_alert(cfg),
        _decode_alert(cfg),
        _capacity_alert(cfg),
        _scale_out_alert(cfg),
        _event_alert(
            "OOMInLastHour", oom, n.OOM_EVENTS, "1h", model, {"source": "simulated"},
            severity="page",
            summary="Out-of-memory event on {{ $labels.model }} in the last hour",
            description=(f"{oom.title}: target {num(oom.target)}. A replica hit an out-of-memory error "
                         "(CUDA, upstream engine or injected) within the last hour."),
            runbook="oom",
        ),
        _event_alert(
            "ReplicaCrashed", crashes, n.REPLICA_CRASHES, "1d", model, {},
            severity="ticket",
            summary="A model replica of {{ $labels.model }} crashed in the last day",
            description=(f"{crashes.title}: target below {num(crashes.target)} per day. A model replica "
                         "exited without a graceful stop; Ray Serve replaces it, this alert asks why it died."),
            runbook="replica-crashed",
        ),
        _gpu_memory_alert(cfg),
        _cpu_alert(cfg),
    ]


# --- scrape / dead-man alerts ----------------------------------------------------------------

def health_alerts(cfg: SLOConfig) -> list[Alert]:
    model = cfg.service.model
    up = selector("up", {"job": n.SERVER_JOB, "instance": "serve:8080"})
    build = selector(n.BUILD_INFO, {"model": model, "engine": "transformers", "version": "0", "weights": "real"})
    sim_build = selector(n.BUILD_INFO, {"model": model, "engine": "simulated", "version": "0",
                                        "weights": "simulated"})
    nvml = selector(n.NVML_AVAILABLE, {"model": model, "component": "replica", "replica": "r0"})
    return [
        Alert(
            name="ServerScrapeDown", expr=f'up{{job="{n.SERVER_JOB}"}} == 0', for_="1m", severity="page",
            summary="Prometheus cannot scrape the model server's metrics at {{ $labels.instance }}",
            description=(f"The '{n.SERVER_JOB}' scrape target (Ray's metrics export port) has been down for 1m: "
                         "the server is down or every KPI on the dashboard is blind."),
            runbook="scrape-down",
            scenarios=(
                Scenario("target down for 3m fires", {up: "1x10 0x20"}, 15, True,
                         {"job": n.SERVER_JOB, "instance": "serve:8080"}),
                Scenario("target up is silent", {up: "1x30"}, 15, False),
                Scenario("one failed scrape is silent", {up: "1x10 0 1x20"}, 12, False),
            ),
        ),
        Alert(
            name="ServerMetricsAbsent", expr=f"absent({n.BUILD_INFO})", for_="5m", severity="page",
            summary="No llmslo server metrics reach Prometheus",
            description=(f"{n.BUILD_INFO} has been absent for 5m: the Serve app is not deployed, its replicas "
                         "never became ready, or the scrape configuration lost the Ray target (dead-man switch)."),
            runbook="metrics-absent",
            scenarios=(
                Scenario("no server metrics for 10m fires", {up: "1x30"}, 10, True),
                Scenario("build info present is silent", {up: "1x30", build: "1x30"}, 10, False),
                Scenario("gone for less than 5m is silent", {up: "1x30", build: "1x10"}, 18, False),
                Scenario("gone for more than 5m fires", {up: "1x30", build: "1x10"}, 22, True),
            ),
        ),
        Alert(
            name="GPUTelemetryAbsent", expr=f"absent({n.NVML_AVAILABLE})", for_=TICKET_FOR, severity="ticket",
            summary="The replicas' telemetry sampler reports nothing",
            description=(f"{n.NVML_AVAILABLE} has been absent for {TICKET_FOR}: serve/telemetry.py is not "
                         "running in the model replicas, so GPU memory and CPU KPIs are unguarded."),
            runbook="telemetry-absent",
            scenarios=(
                Scenario("no telemetry for 15m fires", {up: "1x30"}, 15, True),
                Scenario("telemetry present is silent", {up: "1x30", nvml: "0x30"}, 15, False),
            ),
        ),
        Alert(
            name="NVMLUnavailable",
            expr=(f"min by (model) ({n.NVML_AVAILABLE}) == 0"
                  f' unless on (model) {n.BUILD_INFO}{{weights!="real"}}'),
            for_=TICKET_FOR, severity="ticket",
            summary="A GPU replica of {{ $labels.model }} cannot read NVML",
            description=("A replica serving real weights reports llmslo_nvml_available 0: no driver or no "
                         "permission, so its GPU series are absent (never faked) and the GPU memory KPI is unguarded."),
            runbook="nvml-unavailable",
            scenarios=(
                Scenario("real weights without NVML fires", {nvml: "0x30", build: "1x30"}, 15, True,
                         {"model": model}),
                Scenario("simulated or synthetic weights without NVML is silent", {nvml: "0x30", sim_build: "1x30"},
                         15, False),
                Scenario("NVML available is silent", {nvml: "1x30", build: "1x30"}, 15, False),
            ),
        ),
    ]


def burn_alerts(cfg: SLOConfig) -> list[Alert]:
    severities = sorted({w.severity for w in cfg.burn_rate_windows})
    return [_burn_alert(key, cfg, sev) for key in cfg.slos for sev in severities]


def all_alerts(cfg: SLOConfig) -> list[Alert]:
    return burn_alerts(cfg) + kpi_alerts(cfg) + health_alerts(cfg)


def rule_file(cfg: SLOConfig, for_override: str | None = None) -> dict:
    """The whole Prometheus rule file; ``for_override`` shortens every ``for`` (tests only)."""
    groups = recording_groups(cfg)
    groups += [
        {"name": "llmslo-slo-burn", "rules": [a.rule(for_override) for a in burn_alerts(cfg)]},
        {"name": "llmslo-kpi", "rules": [a.rule(for_override) for a in kpi_alerts(cfg)]},
        {"name": "llmslo-health", "rules": [a.rule(for_override) for a in health_alerts(cfg)]},
    ]
    return {"groups": groups}


def promtool_test(alert: Alert, rules_path: str) -> dict:
    """promtool unit-test file for one alert: one test per scenario."""
    tests = []
    for case in alert.scenarios:
        exp = []
        if case.fires:
            labels = {**case.labels, "severity": alert.severity, **alert.labels}
            exp = [{"exp_labels": labels, "exp_annotations": alert.annotations(labels)}]
        tests.append({
            "name": case.name,
            "interval": f"{case.interval_s}s",
            "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
            "alert_rule_test": [{"eval_time": f"{case.eval_minutes}m", "alertname": alert.name, "exp_alerts": exp}],
        })
    step = max(case.interval_s for case in alert.scenarios)
    return {"rule_files": [rules_path], "evaluation_interval": f"{step}s", "tests": tests}


def catalogue(cfg: SLOConfig) -> str:
    """alerts/README.md: every alert with severity, ``for``, test file and runbook anchor."""
    lines = ["# Alerts", "", "Generated by `llmslo generate` from slo.yaml; do not edit. Rules: "
             "[rules/llmslo.yml](rules/llmslo.yml), routing: [alertmanager.yml](alertmanager.yml).", "",
             "| Alert | Severity | For | What breaks it | promtool test | Runbook |",
             "|---|---|---|---|---|---|"]
    for alert in all_alerts(cfg):
        summary = alert.annotations({k: "{" + k + "}" for k in ("model", "instance", "replica")})["summary"]
        lines.append(f"| {alert.name} | {alert.severity} | {alert.for_ or '-'} | {summary}"
                     f" | [tests/{alert.name}.yml](tests/{alert.name}.yml) ({len(alert.scenarios)} cases)"
                     f" | [{alert.runbook_url}](../{alert.runbook_url}) |")
    return "\n".join(lines) + "\n"
