"""``llmslo demo``: the whole job in one command, on any machine.

Brings up the embedded stack (:mod:`llmslo.catalogue`: Ray Serve with the
simulated engine unless told otherwise, Prometheus and Alertmanager when
installed), runs the load test for a bounded time — the seed's benchmark shape
(512 prompt / 256 output tokens, the multimodal mix) stepping through the
concurrency levels of slo.yaml and on to twice the concurrency target — shows
progress and the live KPI table while it runs, then prints the verdict and the
report folder and exits non-zero when an SLO failed.

The load test is the project's Locust file started with ``--autostart``: the
same code as ``locust -f loadtest/``, with its web UI on a loopback port so the
live KPI rows (``/slo.json``) and Locust's own stats can be polled. Every KPI
number comes from the load test's report; this module only adds the server's
and GPUs' metrics over the run (``server_metrics.json``, queried from
Prometheus) and ``platform.json`` (engine, weights, GPUs) for ``llmslo compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llmslo import catalogue, supervisor
from contract.slo import SLOConfig, load_slo

# Ray exports metrics every 10 s by default: too coarse for a 2-minute run's snapshot.
SERVE_DEFAULTS = ["--metrics-interval-ms", "2000"]
# One model replica = one copy of the model = the seed's platform, the same at every step, so the
# levels are comparable (autoscaling added replicas mid-run); --autoscale restores Serve's autoscaling.
FIXED_REPLICAS = ["--replicas", "1"]
# The seed's benchmark is 512 input tokens. Images are prompt tokens too (one per 28 x 28 px,
# serve/tokens.py) and every prompt token costs prefill time, so the demo sends one image of
# 224-448 px (64-256 tokens) per image request: image requests stay near the seed's shape.
# The load test's defaults (up to 2 images of 1344 px, ~4600 tokens) exceed the served
# 2048-token context (max_model_len) and are answered with HTTP 400.
# --step-keep-going: the demo holds every step (up to twice the concurrency target) even after
# one failed, so the report shows where each KPI breaks.
# our own server takes every extension (fixed reply lengths, thinking switches)
LOAD_DEFAULTS = ["--images-max", "1", "--image-min-px", "224", "--image-max-px", "448", "--step-keep-going"]
STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "INCONCLUSIVE": "yellow", "NOT MEASURED": "yellow"}


# A level passes a p95 KPI only when its 95 % upper bound meets the target, which takes
# at least 59 samples (loadtest/_stats.py); short replies are a quarter of the mix, so the
# target level is held long enough for ~60 of them. Twice the target then shows headroom.
# Lower levels (the seed's 1, 2, 4) need minutes each to conclude: --step-users 1,2,4,8,16
# with --step-duration 300,150,90,150,30 judges them too.
TARGET_STEP_S, HEADROOM_STEP_S = 150, 30


def default_steps(slo: SLOConfig) -> list[int]:
    """The concurrency target, then twice the target (headroom)."""
    return [slo.concurrency_target, 2 * slo.concurrency_target]


def step_durations(text: str, steps: int) -> list[float]:
    """--step-duration: one value for every step or one per step (the load test checks the same)."""
    values = [float(v) for v in text.split(",") if v.strip()]
    return values * steps if len(values) == 1 else values


def locust_service(ports: catalogue.Ports, report_dir: Path, steps: list[int], step_s: str,
                   extra: list[str]) -> supervisor.Service:
    """The load test, started at once with its web UI on loopback; it quits when the ramp ends."""
    return catalogue.locust_service(
        ports, "--autostart", "--autoquit", "0",
        "--step-users", ",".join(map(str, steps)), "--step-duration", step_s,
        "--report-dir", str(report_dir), *LOAD_DEFAULTS, *extra)


def _get_json(url: str, **params: Any) -> Any:
    try:
        response = httpx.get(url, params=params or None, timeout=5.0)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def kpi_table(rows: list[dict], title: str) -> Table:
    """The load test's KPI rows (loadtest._report.kpi_rows) as a rich table.

    KPI, value, target and result never wrap or shrink; samples and the note
    take what width is left (cut with an ellipsis on a narrow terminal).
    """
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column, key in (("KPI", "kpi"), ("value", "value"), ("95 % bounds", "bounds"), ("target", "target"),
                        ("result", "status")):
        width = max([len(column), *(len(str(r.get(key, ""))) for r in rows)])
        table.add_column(column, justify="left" if key in ("kpi", "status") else "right",
                         no_wrap=True, min_width=width)
    table.add_column("samples", justify="right", no_wrap=True, min_width=len("samples"))
    table.add_column("note", no_wrap=True, overflow="ellipsis")
    for r in rows:
        status = str(r.get("status", ""))
        table.add_row(*(Text(str(r.get(k, ""))) for k in ("kpi", "value", "bounds", "target")),
                      Text(status, style=STATUS_STYLE.get(status, "")), Text(str(r.get("samples", ""))),
                      Text(str(r.get("note", ""))))
    return table


def level_table(rows: list[dict]) -> Table:
    """Each concurrency level judged on its own (loadtest._report.level_rows: a column per level)."""
    table = Table(title="levels: value [95 % bounds] samples status", title_justify="left", box=box.SIMPLE_HEAD)
    for key in (rows[0] if rows else {"measure": ""}):
        table.add_column(key, no_wrap=key == "measure")
    for r in rows:
        table.add_row(*(Text(str(v), style=STATUS_STYLE.get(str(v).split()[-1], "") if v else "") for v in r.values()))
    return table


def watch(locust: supervisor.Service, the_stack: supervisor.Stack, steps: list[int], durations: list[float],
          console: Console) -> int:
    """Progress bar and live KPI table until the load test exits; returns its exit code.

    The bar counts the steps' time; each level's drain (its last requests ending) comes on top.
    """
    total = sum(durations)
    ends = [sum(durations[:i + 1]) for i in range(len(durations))]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        TextColumn("/ ~"), TimeRemainingColumn(), console=console)
    task = progress.add_task("load test starting", total=total)
    started = time.monotonic()
    rows: list[dict] = []
    with Live(Group(progress), console=console, refresh_per_second=2, transient=False) as live:
        while locust.proc.poll() is None:
            the_stack.watch()
            elapsed = min(time.monotonic() - started, total)
            stats = _get_json(f"{locust.url}/stats/requests") or {}
            rows = _get_json(f"{locust.url}/slo.json") or rows
            step = min(sum(1 for e in ends if elapsed >= e), len(steps) - 1)
            progress.update(task, completed=elapsed, description=(
                f"step {step + 1}/{len(steps)}: {stats.get('user_count', steps[step])} streams, "
                f"{stats.get('total_rps', 0):.1f} req/s, {stats.get('fail_ratio', 0):.0%} failed"))
            live.update(Group(progress, kpi_table(rows, "live KPIs (exact, over the run so far)")))
            time.sleep(1.0)
        progress.update(task, completed=total, description="load test finished")
        live.update(Group(progress))
    return locust.proc.returncode


def _series_queries() -> dict[str, str]:
    """PromQL for the server and GPU snapshot, on the exported names the alerts use."""
    from contract import names as n
    from serve.telemetry import MODEL_DEPLOYMENT

    return {
        "requests_in_flight": f"sum({n.IN_FLIGHT})",
        "requests_per_s_by_status": f"sum by (status) (rate({n.REQUESTS}[30s]))",
        "completion_tokens_per_s": f"sum(rate({n.COMPLETION_TOKENS}[30s]))",
        "server_ttft_p95_s_bucketed": f"histogram_quantile(0.95, sum by (le) (rate({n.TTFT}_bucket[30s])))",
        "queue_wait_p95_s_bucketed": f"histogram_quantile(0.95, sum by (le) (rate({n.QUEUE_WAIT}_bucket[30s])))",
        "kv_cache_usage_ratio": f"max({n.KV_CACHE_USAGE})",
        "oom_events_total": f"sum({n.OOM_EVENTS})",
        "replica_crashes_total": f"sum({n.REPLICA_CRASHES})",
        "model_replicas_serving": f'count({n.SERVE_REPLICA_HEALTHY}{{deployment="{MODEL_DEPLOYMENT}"}} == 1)',
        "process_cpu_percent": f"sum by (component) ({n.PROCESS_CPU})",
        "gpu_memory_used_bytes": f"sum by (gpu) ({n.GPU_MEMORY_USED})",
        "gpu_utilization_ratio": f"max by (gpu) ({n.GPU_UTILIZATION})",
        "gpu_power_watts": f"max by (gpu) ({n.GPU_POWER})",
        "nvml_available": f"max({n.NVML_AVAILABLE})",
    }


def snapshot(prometheus_url: str, start: float, end: float, step_s: float = 5.0) -> dict[str, Any]:
    """Every snapshot series over [start, end] from Prometheus' range API (Unix times)."""
    out: dict[str, Any] = {"source": prometheus_url, "start": start, "end": end, "step_s": step_s,
                           "note": "server-side, from Prometheus; *_bucketed are histogram estimates, "
                                   "not the verdict (see summary.json)", "series": {}}
    for name, query in _series_queries().items():
        data = _get_json(f"{prometheus_url}/api/v1/query_range",
                         query=query, start=start, end=end, step=step_s) or {}
        out["series"][name] = {"query": query, "result": data.get("data", {}).get("result", [])}
    return out


def configured_engine(serve_args: list[str]) -> str:
    """The engine ``llmslo serve`` was told to run (its config file with the flags applied)."""
    from serve.cli import app_config, parse_args

    return str(app_config(parse_args(serve_args))[2].get("engine", "unknown"))


def final_scrape(metrics_url: str) -> dict[str, Any]:
    """Without Prometheus: the llmslo samples of one scrape of the server at the end of the run."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(metrics_url, timeout=5.0)
    samples = [
        {"name": sample.name, "labels": sample.labels, "value": sample.value}
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name.startswith("ray_llmslo_")
    ]
    return {"source": metrics_url, "time": time.time(),
            "note": "Prometheus is not installed: one scrape of the server at the end of the run",
            "samples": samples}


def server_labels(prometheus_url: str | None, scrape: dict[str, Any] | None, name: str) -> list[dict]:
    """Label sets of one exported series: from Prometheus now, or from the final scrape."""
    if prometheus_url:
        data = _get_json(f"{prometheus_url}/api/v1/query", query=name) or {}
        return [r["metric"] for r in data.get("data", {}).get("result", [])]
    return [s["labels"] for s in (scrape or {}).get("samples", []) if s["name"] == name]


def platform(build: list[dict], gpus: list[dict], engine: str) -> dict[str, str]:
    """Engine, weights and GPUs of the server, for ``llmslo compare``'s platform column.

    The server's own ``build_info`` labels win; ``engine`` (what it was
    configured with) stands in when the server has not exported them.
    """
    labels = build[0] if build else {}
    engine = labels.get("engine", engine)
    weights = labels.get("weights", "unknown")
    gpu_names = sorted({g.get("gpu", "") for g in gpus})
    return {
        "platform": f"this machine ({engine} engine, {weights} weights)",
        "engine": engine,
        "weights": weights,
        "gpus": ", ".join(gpu_names) if gpu_names else "none seen (no NVML)",
    }


def _parser(slo: SLOConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmslo demo",
        description="Start the stack, run a bounded load test, print the SLO verdict and the report folder.",
    )
    steps = ",".join(map(str, default_steps(slo)))
    parser.add_argument("--step-users", default=steps,
                        help="concurrent streams of each step (default: %(default)s)")
    parser.add_argument("--step-duration", default=f"{TARGET_STEP_S},{HEADROOM_STEP_S}",
                        help="seconds per step, one for all or one per step (default: %(default)s)")
    parser.add_argument("--report-dir", type=Path, help="report folder (default: reports/demo-<time>)")
    parser.add_argument("--autoscale", action="store_true",
                        help="let Ray Serve autoscale the model replicas (default: one fixed replica)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `llmslo serve` (repeatable)")
    parser.add_argument("--locust-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the load test (repeatable), e.g. --locust-arg=--mix=text=1")
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    steps = [int(s) for s in args.step_users.split(",")]
    report_dir = (args.report_dir or catalogue.default_run_dir("demo")).resolve()
    ports = catalogue.Ports.free()
    the_plan = catalogue.plan(ports, report_dir / "stack", locust_ui=False, grafana=False,
                          serve_args=[*SERVE_DEFAULTS, *([] if args.autoscale else FIXED_REPLICAS), *args.serve_arg])
    for line in the_plan.missing:
        console.print(f"[yellow]llmslo demo: {line}[/]")
    durations = step_durations(args.step_duration, len(steps))
    locust = locust_service(ports, report_dir, steps, args.step_duration, args.locust_arg)
    the_stack = supervisor.Stack([*the_plan.services, locust], report_dir / "stack")
    prometheus = next((s.url for s in the_plan.services if s.name == "prometheus"), None)
    with console.status("starting the model server, Prometheus, Alertmanager and the load test…"):
        the_stack.start()
    try:
        console.print(f"stack up; load test: {', '.join(f'{u} streams for {d:g} s' for u, d in zip(steps, durations))}"
                      f" (watch it live at {locust.url})")
        start = time.time()
        code = watch(locust, the_stack, steps, durations, console)
        end = time.time()
        with console.status("saving the server and GPU metrics of the run…"):
            time.sleep(6.0)  # one more Ray export (and Prometheus scrape) covers the last seconds
            save_server_metrics(report_dir, prometheus, f"http://127.0.0.1:{ports.ray_metrics}/metrics",
                                start, end, configured_engine(args.serve_arg))
    finally:
        with console.status("stopping the stack…"):
            the_stack.stop()
    return verdict(report_dir, code, console)


def save_server_metrics(report_dir: Path, prometheus: str | None, metrics_url: str,
                        start: float, end: float, engine: str) -> None:
    """server_metrics.json (Prometheus range queries, else one final scrape) and platform.json."""
    from contract import names as n

    scrape = None if prometheus else final_scrape(metrics_url)
    server = snapshot(prometheus, start, end) if prometheus else scrape
    (report_dir / "server_metrics.json").write_text(json.dumps(server, indent=1))
    facts = platform(server_labels(prometheus, scrape, n.BUILD_INFO),
                     server_labels(prometheus, scrape, n.GPU_MEMORY_TOTAL), engine)
    (report_dir / "platform.json").write_text(json.dumps(facts, indent=1))


def verdict(report_dir: Path, locust_code: int, console: Console) -> int:
    """Print the final KPI table from summary.json; the exit code is the load test's."""
    from loadtest._hops import lines as hop_lines
    from loadtest._report import headline, kpi_rows, level_rows

    summary_file = report_dir / "summary.json"
    if not summary_file.exists():
        console.print(f"[bold red]llmslo demo: the load test wrote no summary (exit {locust_code}); "
                      f"see {report_dir / 'stack' / 'logs' / 'locust.log'}[/]")
        return locust_code or 2
    summary = json.loads(summary_file.read_text())
    console.print()
    console.print(kpi_table(kpi_rows(summary["kpis"]), headline(summary)))
    console.print(level_table(level_rows(summary["levels"], summary["kpis"])))
    console.print(f"accounting: {summary['accounting_line']}")
    cold = summary["cold_start"]
    ttft = "n/a" if cold["ttft_max_s"] is None else f"{cold['ttft_max_s'] * 1000:.0f} ms"
    console.print(f"cold start: first {cold['requests']} requests, TTFT max {ttft}, {cold['failed']} failed")
    for line in hop_lines(summary.get("ttft_hops") or {}):
        console.print(line)
    if not summary["validity"]["valid"]:
        console.print(f"[yellow]run invalid: {'; '.join(summary['validity']['reasons'])}[/]")
    console.print(f"report: {report_dir}  (report.html, summary.json, requests.jsonl, server_metrics.json)")
    return locust_code


def main(argv: list[str]) -> int:
    console = Console(width=None if sys.stdout.isatty() else 140)
    args = _parser(load_slo()).parse_args(argv)
    supervisor.stop_on_sigterm()
    started = time.monotonic()
    try:
        code = run(args, console)
    except supervisor.StackError as exc:
        console.print(f"[bold red]llmslo demo: {exc}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("llmslo demo: interrupted; stack stopped")
        return 130
    console.print(f"demo wall time: {time.monotonic() - started:.0f} s; exit code {code}")
    return code
