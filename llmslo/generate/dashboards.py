"""The on-call Grafana dashboard, built with grafana-foundation-sdk from slo.yaml.

Thresholds (stat colours, target lines) come from slo.yaml's KPIs and the
queries reuse the alert expressions' building blocks, so what turns a panel red
is what pages. Panels that read NVML (GPU row) have no data on a machine
without a GPU driver; ``NEEDS_GPU`` names them for the end-to-end test.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from contract import names as n
from llmslo.generate.promql import num
from llmslo.generate.rules import events_in
from contract.slo import SLOConfig

DATASOURCE_UID = "llmslo-prometheus"
DASHBOARD_UID = "llmslo-slo"
DASHBOARD_FILE = "dashboards/json/llmslo.json"
DS = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
M = 'model=~"$model"'
R = 'replica=~"$replica"'
RI = "$__rate_interval"
GB = 1e9

# Panels with no data unless NVML reads a GPU (allow-listed in tests/test_monitor_e2e.py).
NEEDS_GPU = {"GPU memory per model copy", "GPU memory used per GPU", "GPU utilization", "GPU power",
             "GPU temperature", "GPU energy per output token"}


def _q(expr: str, legend: str = "__auto", fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend)
    return query.format(fmt) if fmt else query


def _steps(target: float, good_below: bool) -> db.ThresholdsConfig:
    """Green on the passing side of the target, red from the target on."""
    steps = ([dm.Threshold(None, "green"), dm.Threshold(target, "red")] if good_below
             else [dm.Threshold(None, "red"), dm.Threshold(target, "green")])
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def _stat(title: str, expr: str, unit: str, target: float, good_below: bool, desc: str) -> stat.Panel:
    return (stat.Panel().title(title).description(desc).datasource(DS).with_target(_q(expr))
            .unit(unit).thresholds(_steps(target, good_below)).color_mode(cm.BigValueColorMode.BACKGROUND)
            .graph_mode(cm.BigValueGraphMode.AREA).height(5).span(4)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"])))


def _series(title: str, queries: list[prometheus.Dataquery], unit: str, desc: str,
            target: float | None = None, good_below: bool = True, span: int = 8) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(desc).datasource(DS).unit(unit)
             .height(8).span(span).fill_opacity(10))
    for query in queries:
        panel = panel.with_target(query)
    if target is not None:  # the KPI target drawn as a line
        panel = (panel.thresholds(_steps(target, good_below))
                 .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.LINE)))
    return panel


def _quantile(q: float, metric: str, matcher: str = M) -> str:
    return f"histogram_quantile({num(q)}, sum by (le) (rate({metric}_bucket{{{matcher}}}[{RI}])))"


def _events(metric: str, window: str) -> str:
    return events_in(metric, window, by="", matcher=M) + " or vector(0)"


def _overview(cfg: SLOConfig) -> list:
    k = cfg.kpis
    ttft, decode, conc = k["ttft_p95"], k["decode_tokens_per_s_p10"], k["concurrency"]
    gpu, cpu = k["gpu_memory_gb"], k["cpu_percent"]
    q_ttft = float(ttft.stat[1:]) / 100
    q_tpot = 1 - float(decode.stat[1:]) / 100
    capacity = (f'sum({n.REPLICA_CAPACITY}{{{M},component="{n.MODEL_COMPONENT}"}}'
                f" and on (replica) ({n.SERVE_REPLICA_HEALTHY} == 1))")
    return [
        _stat("TTFT over budget (5m)",
              f'(sum(rate({n.TTFT_BUDGET}{{{M},outcome="missed"}}[5m])) or 0 * sum(rate({n.TTFT_BUDGET}{{{M}}}[5m])))'
              f" / sum(rate({n.TTFT_BUDGET}{{{M}}}[5m]))",
              "percentunit", round(1 - q_ttft, 12), True,
              f"{ttft.title}: share of requests whose first token missed its own budget "
              f"({num(ttft.target * 1000)} ms at <= {cfg.benchmark.input_tokens} prompt tokens + the prompt "
              f"allowance; exact per request). The p95 KPI holds while it stays at or below "
              f"{num(round((1 - q_ttft) * 100, 9))}%; TTFTP95High pages above it."),
        _stat(f"Decode tokens/s {decode.stat} (5m)", "1 / " + _quantile(q_tpot, n.TPOT).replace(RI, "5m"),
              "none", decode.target, False, f"{decode.title}; target > {num(decode.target)} tokens/s."),
        _stat("Serving capacity", capacity, "none", conc.target, False,
              f"Healthy replicas x max_ongoing_requests; target >= {num(conc.target)} concurrent requests."),
        _stat("OOM events, last hour", _events(n.OOM_EVENTS, "1h"), "none", 1, True,
              f"{k['oom_per_hour'].title}; target {num(k['oom_per_hour'].target)}."),
        _stat("Replica crashes, last day", _events(n.REPLICA_CRASHES, "1d"), "none",
              k["crashes_per_day"].target, True, f"{k['crashes_per_day'].title}; target < "
              f"{num(k['crashes_per_day'].target)}."),
        (stat.Panel().title("Error budget left").datasource(DS)
         .description("Share of each SLO's error budget not yet spent over its period (slo.yaml slos).")
         .with_target(_q(f"slo:period_error_budget_remaining:ratio{{{M}}}", "{{slo}}"))
         .unit("percentunit").thresholds(
             db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
                 [dm.Threshold(None, "red"), dm.Threshold(0, "orange"), dm.Threshold(0.25, "green")]))
         .color_mode(cm.BigValueColorMode.BACKGROUND).height(5).span(4)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))),
        _stat("GPU memory per model copy", f"max(sum by (replica) ({n.GPU_MEMORY_USED}{{{M}}}))", "bytes",
              gpu.target * GB, True, f"{gpu.title}; target <= {num(gpu.target)} GB (10^9 bytes). Needs NVML."),
        _stat("Server CPU", f"max(sum by (instance) ({n.PROCESS_CPU}))", "percent", cpu.target, True,
              f"{cpu.title}: the whole serving tree per node (ingress, replicas, HTTP proxy, Serve controller, "
              f"raylet, GCS, rest of Ray) as a share of all CPUs; target < {num(cpu.target)}%."),
        _stat("NVML available", f"min({n.NVML_AVAILABLE}{{{M}}})", "bool", 1, False,
              "1 when every replica's telemetry reads NVML; 0 means GPU panels are empty, not zero."),
    ]


def _latency(cfg: SLOConfig) -> list:
    k = cfg.kpis
    ttft, decode, e2e = k["ttft_p95"], k["decode_tokens_per_s_p10"], k["e2e_short_p95"]
    pct = (0.5, 0.95, 0.99)
    return [
        _series("TTFT percentiles", [_q(_quantile(q, n.TTFT), f"p{round(q * 100)}") for q in pct], "s",
                f"Server-side time to first token (histogram estimate); the line is the budget of a prompt of "
                f"<= {cfg.benchmark.input_tokens} tokens (longer prompts get more: see \"TTFT over budget\").",
                ttft.target),
        (heatmap.Panel().title("TTFT distribution").datasource(DS).height(8).span(8)
         .description("Requests per TTFT bucket and interval.")
         .with_target(_q(f"sum by (le) (increase({n.TTFT}_bucket{{{M}}}[{RI}]))", "{{le}}",
                         PromQueryFormat.HEATMAP))),
        _series("Decode tokens/s per stream", [
            _q("1 / " + _quantile(1 - float(decode.stat[1:]) / 100, n.TPOT), decode.stat),
            _q("1 / " + _quantile(0.5, n.TPOT), "p50")], "none",
            "1 / time per output token; the line is the target.", decode.target, good_below=False),
        _series("Inter-token latency percentiles", [_q(_quantile(q, n.ITL), f"p{round(q * 100)}") for q in pct],
                "s", "Gap between token arrivals per token; the line is 1 / decode target.", 1 / decode.target),
        _series("End-to-end percentiles (all replies)", [_q(_quantile(q, n.E2E), f"p{round(q * 100)}")
                                                         for q in pct], "s",
                f"Request received to last token. The KPI line ({num(e2e.target)} s) applies to short replies.",
                e2e.target),
        _series("Queue wait p95", [_q(_quantile(0.95, n.QUEUE_WAIT), "p95")], "s",
                "Wait for an engine slot inside a replica."),
        _series("TTFT by hop", [
            _q(f"histogram_quantile({num(q)}, sum by (le, hop) (rate({n.TTFT_HOP}_bucket{{{M}}}[{RI}])))",
               f"p{round(q * 100)} {{{{hop}}}}") for q in (0.5, 0.95)], "s",
            "Where the server's TTFT goes (usage.llmslo_timing, docs/serve.md): ingress = received to handed to "
            "Ray's router (body, validation, media, tokens), routing = to model replica started, queue = engine queue, prefill = rest to the engine's first token, "
            "relay = to the ingress handing it to the HTTP server."),
    ]


def _load(cfg: SLOConfig) -> list:
    conc = cfg.kpis["concurrency"]
    return [
        _series("Requests/s by status", [_q(f"sum by (status) (rate({n.REQUESTS}{{{M}}}[{RI}]))", "{{status}}")],
                "reqps", "Finished requests per second by outcome."),
        _series("Tokens/s", [
            _q(f"sum(rate({n.COMPLETION_TOKENS}{{{M}}}[{RI}]))", "completion"),
            _q(f"sum(rate({n.PROMPT_TOKENS}{{{M}}}[{RI}]))", "prompt")], "none",
            "Prompt and completion tokens per second, all replicas."),
        _series("In-flight requests", [_q(f"sum({n.IN_FLIGHT}{{{M}}})", "in flight")], "none",
                "Requests inside model replicas; the line is the concurrency target.", conc.target,
                good_below=False),
        _series("KV-cache usage per replica", [_q(f"{n.KV_CACHE_USAGE}{{{M},{R}}}", "{{replica}}")],
                "percentunit", "Engine KV-cache blocks in use."),
    ]


def _serve() -> list:
    return [
        _series("Replicas: target vs running", [
            _q(f"sum by (deployment) ({n.SERVE_TARGET_REPLICAS})", "target {{deployment}}"),
            _q(f"count by (deployment) ({n.SERVE_REPLICA_HEALTHY} == 1)", "running {{deployment}}"),
            _q(f"max({n.DEPLOYMENT_MAX_REPLICAS}{{{M},component=\"{n.MODEL_COMPONENT}\"}})", "max model")],
            "none", "Ray Serve's autoscaling target and healthy replicas per deployment; \"max model\" is the "
            "model deployment's ceiling (ScaleOutExhausted pages when it is reached while an SLO burns)."),
        _series("Replica startup", [
            _q(f"max by (replica) ({n.REPLICA_STARTUP}{{{M},{R}}})", "{{replica}}")], "s",
            "Per model replica: constructor entered -> engine ready (weights, warm-up). A scale-up's whole cold "
            "start (scale decision -> first token) adds Serve's placement and the worker's start; "
            "benchmarks/autoscaling_drill.py measures it (docs/reliability.md)."),
        _series("Requests processing per replica", [
            _q(f"{n.SERVE_REPLICA_PROCESSING}{{{R}}}", "{{deployment}} {{replica}}")], "none",
            "Ray Serve: requests each replica is executing now."),
        _series("Request rate per replica", [
            _q(f"sum by (deployment, replica) (rate({n.SERVE_REPLICA_REQUESTS}{{{R}}}[{RI}]))",
               "{{deployment}} {{replica}}")], "reqps", "Ray Serve: requests handled per replica per second."),
    ]


def _gpu(cfg: SLOConfig) -> list:
    gpu, cpu = cfg.kpis["gpu_memory_gb"], cfg.kpis["cpu_percent"]
    sel = f"{{{M},{R}}}"
    per_gpu = "{{replica}} gpu{{gpu}}"
    return [
        _series("GPU memory used per GPU", [
            _q(f"{n.GPU_MEMORY_USED}{sel}", per_gpu),
            _q(f"{n.GPU_MEMORY_TOTAL}{sel}", "total " + per_gpu)], "bytes", "NVML memory used and total."),
        _series("GPU utilization", [_q(f"{n.GPU_UTILIZATION}{sel}", per_gpu)], "percentunit",
                "Share of time a kernel ran (NVML)."),
        _series("GPU power", [_q(f"{n.GPU_POWER}{sel}", per_gpu),
                              _q(f"{n.GPU_POWER_LIMIT}{sel}", "limit " + per_gpu)], "watt",
                "Board power draw and enforced limit (NVML)."),
        _series("GPU temperature", [_q(f"{n.GPU_TEMPERATURE}{sel}", per_gpu)], "celsius", "GPU die temperature."),
        _series("GPU energy per output token", [
            _q(f"sum(rate({n.GPU_ENERGY}{{{M}}}[{RI}])) / sum(rate({n.COMPLETION_TOKENS}{{{M}}}[{RI}]))",
               "J/token")], "none", "Joules drawn by the model's GPUs per completion token."),
        _series("Serving CPU by role", [_q(f"sum by (instance, component) ({n.PROCESS_CPU}{{{M}}})",
                                            "{{component}} {{instance}}")], "percent",
                "CPU of each role of a node's serving tree (ingress, model replicas, Ray's HTTP proxy, Serve "
                f"controller, raylet, GCS, rest of Ray) as a share of all CPUs; the KPI ({num(cpu.target)}%) is "
                "the per-node sum.", cpu.target),
        _series("GPU memory per model copy", [
            _q(f"sum by (replica) ({n.GPU_MEMORY_USED}{sel})", "{{replica}}")], "bytes",
            f"Summed over a replica's GPUs; the line is {num(gpu.target)} GB.", gpu.target * GB),
    ]


def _client(cfg: SLOConfig) -> list:
    ttft = cfg.kpis["ttft_p95"]
    q = float(ttft.stat[1:]) / 100
    return [
        _series(f"TTFT {ttft.stat}: client vs server", [
            _q(_quantile(q, n.CLIENT_TTFT), "client (load generator)"),
            _q(_quantile(q, n.TTFT), "server")], "s",
            "The load generator measures network and proxy time on top of the server's view.", ttft.target,
            span=12),
        _series("Client requests/s by outcome", [
            _q(f"sum by (outcome) (rate({n.CLIENT_REQUESTS}{{{M}}}[{RI}]))", "{{outcome}}"),
            _q(f"sum({n.CLIENT_USERS})", "users")], "none", "Requests the load generator completed.", span=12),
    ]


def _client_attainment(cfg: SLOConfig) -> list:
    """SLO attainment, goodput and stream smoothness as the load test's judge defines them."""
    met = f'sum by (traffic_class) (rate({n.CLIENT_SLO_REQUESTS}{{{M},outcome="met"}}[{RI}]))'
    every = f"sum by (traffic_class) (rate({n.CLIENT_SLO_REQUESTS}{{{M}}}[{RI}]))"
    objective = cfg.slos["ttft"].objective
    panels = [
        _series("SLO attainment by traffic class (client)", [_q(f"{met} / {every}", "{{traffic_class}}")],
                "percentunit", "Share of finished requests that met every per-request budget (no error; TTFT within "
                "its prompt-aware budget; e2e of short replies, decode speed of long ones); the line is the "
                f"{num(objective * 100)} % objective of the TTFT error budget.", objective, good_below=False),
        _series("Goodput (client)", [
            _q(f"sum(rate({n.CLIENT_GOOD_TOKENS}{{{M}}}[{RI}]))", "output tokens/s of requests meeting every budget"),
            _q(f'sum(rate({n.CLIENT_SLO_REQUESTS}{{{M},outcome="met"}}[{RI}]))', "requests/s meeting every budget")],
                "none", "Throughput that counts only requests meeting every per-request budget (glossary: goodput)."),
    ]
    gap = cfg.kpis.get("stream_max_gap_p99")
    if gap is not None:
        panels.append(_series(f"Longest gap between chunks, {gap.stat} (client)", [
            _q(_quantile(float(gap.stat[1:]) / 100, n.CLIENT_MAX_GAP), "longest gap")], "s",
            "Per request the longest silence between two stream chunks (a frozen stream), over all classes.",
            gap.target))
    return panels


def _alert_list() -> db.Panel:
    return (db.Panel().type("alertlist").title("Alerts").height(8).span(24)
            .description("Firing and pending alerts (Grafana-managed and Prometheus rules).")
            .options({"viewMode": "list", "groupMode": "default", "maxItems": 50, "sortOrder": 1,
                      "dashboardAlerts": False, "alertName": "", "alertInstanceLabelFilter": "",
                      "datasource": DATASOURCE_UID,
                      "stateFilter": {"firing": True, "pending": True, "noData": False, "normal": False,
                                      "error": True}}))


def _variable(name: str, query: str) -> db.QueryVariable:
    return (db.QueryVariable(name).label(name).datasource(DS).query(query).multi(True).include_all(True)
            .all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC))


def build(cfg: SLOConfig) -> dict:
    dash = (db.Dashboard("llmslo: SLOs of " + cfg.service.model).uid(DASHBOARD_UID)
            .tags(["llmslo", "slo"]).refresh("10s").time("now-1h", "now").timezone("browser")
            .with_variable(_variable("model", f"label_values({n.BUILD_INFO}, model)"))
            .with_variable(_variable("replica", f"label_values({n.SERVE_REPLICA_HEALTHY}, replica)")))
    rows = [("SLO overview", _overview(cfg)), ("Latency", _latency(cfg)), ("Throughput and load", _load(cfg)),
            ("Ray Serve", _serve()), ("GPU and CPU", _gpu(cfg)), ("Client vs server", _client(cfg)),
            ("Client SLO attainment and goodput", _client_attainment(cfg)), ("Alerts", [_alert_list()])]
    for title, panels in rows:
        dash = dash.with_row(db.Row(title))
        for panel in panels:
            dash = dash.with_panel(panel)
    data = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    for i, panel in enumerate(data["panels"], start=1):
        panel["id"] = i
        for j, target in enumerate(panel.get("targets", [])):
            target["refId"] = chr(ord("A") + j)
    return data


def files(cfg: SLOConfig) -> dict[str, str]:
    return {DASHBOARD_FILE: json.dumps(build(cfg), indent=2, sort_keys=True) + "\n"}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard (the e2e test runs them)."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
