"""Soak: N minutes of 8 concurrent streams through Ray Serve (simulated engine), watching for leaks.

Starts ``llmslo serve`` (2 model replicas, calibrated engine, Ray metrics every 5 s), a real
Prometheus with the generated rules (real ``for:`` durations) scraping it and the load
generator, and ``locust -f loadtest/`` headless with 8 users for the duration. Every
``--sample-s`` seconds it records, per Serve process (model replicas, ingress, proxy), the
resident set size and the number of open file descriptors (psutil). At the end it reports:

- requests and failed requests (the load test's summary.json),
- RSS per process: mean over the first and the last 10 % of the samples after the warm-up
  (``--warmup-s``) and the change between them in percent,
- open fds per process: first and last sample after the warm-up, and the maximum,
- RSS per process at the end of every minute (to tell a warm-up plateau from a leak),
- alerts: every alert that was firing at any evaluation during the run
  (``max_over_time(ALERTS{alertstate="firing"}[run])`` after the run).

Run: ``.venv/bin/python benchmarks/soak.py --minutes 30 --out benchmarks/results/soak.json``
(on a shared 2-core machine the load generator and Serve compete for the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract import names  # noqa: E402
from contract.slo import load_slo  # noqa: E402
from llmslo.generate import rules, to_yaml  # noqa: E402
from serve.processes import free_port  # noqa: E402
from loadtest import run_headless  # noqa: E402

ROLES = {"ServeReplica:llmslo:Model": "model", "ServeReplica:llmslo:Ingress": "ingress", "ProxyActor": "proxy"}


def serve_processes(root: int) -> dict[int, str]:
    """pid -> role of the Ray Serve processes under ``llmslo serve`` (Ray sets their titles;
    other Ray clusters on a shared host are not descendants of it)."""
    out = {}
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for marker, role in ROLES.items():
            if marker in cmd:
                out[proc.pid] = role
    return out


def sample(pids: dict[int, str]) -> dict[str, dict]:
    out = {}
    for pid, role in pids.items():
        try:
            proc = psutil.Process(pid)
            out[f"{role}:{pid}"] = {"rss": proc.memory_info().rss, "fds": proc.num_fds()}
        except psutil.Error:
            continue
    return out


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def summarise(samples: list[tuple[float, dict]], warmup_s: float) -> dict[str, dict]:
    """Per process: RSS mean of the first/last 10 % after warm-up and its change; fds first/last/max."""
    steady = [(t, s) for t, s in samples if t >= warmup_s]
    keys = sorted({k for _, s in steady for k in s})
    out = {}
    for key in keys:
        series = [(t, s[key]) for t, s in steady if key in s]
        if len(series) < 10:
            out[key] = {"samples": len(series), "note": "too few samples (process replaced?)"}
            continue
        tenth = max(1, len(series) // 10)
        first = sum(v["rss"] for _, v in series[:tenth]) / tenth
        last = sum(v["rss"] for _, v in series[-tenth:]) / tenth
        out[key] = {
            "samples": len(series),
            "rss_first_mib": round(first / 2**20, 1),
            "rss_last_mib": round(last / 2**20, 1),
            "rss_change_pct": round(100 * (last - first) / first, 2),
            "rss_max_mib": round(max(v["rss"] for _, v in series) / 2**20, 1),
            "fds_first": series[0][1]["fds"],
            "fds_last": series[-1][1]["fds"],
            "fds_max": max(v["fds"] for _, v in series),
            "rss_mib_per_minute": _per_minute(series),
        }
    return out


def _per_minute(series: list[tuple[float, dict]]) -> dict[int, float]:
    """RSS (MiB) of the last sample of each minute since the start: the shape of any growth."""
    out: dict[int, float] = {}
    for t, v in series:
        out[int(t // 60)] = round(v["rss"] / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--warmup-s", type=float, default=60)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslo-soak"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    port, mport, prom_port, client_port = free_port(), free_port(), free_port(), free_port()
    serve_log = open(args.work / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport),
         "--metrics-interval-ms", "5000", "--replicas", "2", "--num-cpus", "2"],
        cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    prom = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", 240)
        (args.work / "rules.yml").write_text(to_yaml(rules.rule_file(load_slo())))
        (args.work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "rule_files": [str(args.work / "rules.yml")],
            "scrape_configs": [
                {"job_name": names.SERVER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{mport}"]}]},
                {"job_name": names.CLIENT_JOB, "static_configs": [{"targets": [f"127.0.0.1:{client_port}"]}]},
            ],
        }))
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={args.work / 'prometheus.yml'}", f"--storage.tsdb.path={args.work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=open(args.work / "prometheus.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", 60)
        duration = args.minutes * 60
        report = args.work / "load"
        started = time.monotonic()
        load = ThreadPoolExecutor(1).submit(
            run_headless, url, report, args.users, f"{int(duration)}s", "--server-dialect", "llmslo", "--client-metrics-port", str(client_port),
            "--server-metrics-url", f"http://127.0.0.1:{mport}/metrics", timeout=duration + 600)
        samples: list[tuple[float, dict]] = []
        while not load.done():
            samples.append((time.monotonic() - started, sample(serve_processes(serve.pid))))
            time.sleep(args.sample_s)
        outcome = load.result()
        window = int(time.monotonic() - started) + 30
        alerts = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", timeout=30,
                           params={"query": f'max_over_time(ALERTS{{alertstate="firing"}}[{window}s])'}).json()
        fired = sorted({r["metric"]["alertname"] for r in alerts["data"]["result"]})
        summary = outcome.summary or {}
        result = {
            "command": " ".join(["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
            "minutes": args.minutes, "users": args.users, "load_exit_code": outcome.returncode,
            "requests": summary.get("requests"), "errors": summary.get("errors"), "verdict": summary.get("verdict"),
            "validity": summary.get("validity"), "alerts_fired": fired, "processes": summarise(samples, args.warmup_s),
            "samples": len(samples), "host": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for proc in (prom, serve):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if proc is serve else signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
