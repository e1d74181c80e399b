"""``llmslo demo``, shortened, end to end: real Ray Serve, Prometheus, Locust.

The demo is the README's first command; here it runs with two short steps so
the test stays bounded, and must leave a complete report (every KPI of
slo.yaml in summary.json, the HTML, the per-request data, the server/GPU
snapshot), print the verdict, exit non-zero exactly when an SLO failed, and
leave no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from contract.slo import load_slo

TIMEOUT_S = 300


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_short_demo_leaves_a_complete_report(tmp_path: Path) -> None:
    report = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmslo.cli", "demo", "--step-users", "1,2", "--step-duration", "8",
         "--report-dir", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen: dict[int, psutil.Process] = {}
    try:
        while proc.poll() is None:
            try:
                seen |= {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"left behind: {[(p.pid, p.name()) for p in left]}"

    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["kpis"]) == set(load_slo().kpis), "every KPI of slo.yaml is judged"
    assert [lvl["level"] for lvl in summary["levels"]] == [1, 2], "the demo holds every step (--step-keep-going)"
    assert summary["requests"]["total"] > 0
    for name in ("report.html", "requests.jsonl", "platform.json"):
        assert (report / name).stat().st_size > 0, name
    if shutil.which("prometheus"):
        snapshot = json.loads((report / "server_metrics.json").read_text())
        assert snapshot["series"]["requests_in_flight"]["result"], "Prometheus saw the server during the run"
        serving = {float(v) for series in snapshot["series"]["model_replicas_serving"]["result"]
                   for _, v in series["values"]}
        assert serving == {1.0}, "the demo serves one fixed model replica"
    platform = json.loads((report / "platform.json").read_text())
    assert platform["engine"] == "simulated"

    validity = "VALID" if summary["validity"]["valid"] else "INVALID"
    assert f"SLO verdict: {summary['verdict']}  (run {validity})" in output, output  # never a bare PASS
    assert f"report: {report}" in output.replace("\n", ""), output
    flat = " ".join(output.split())  # rich wraps long lines
    assert " ".join(f"accounting: {summary['accounting_line']}".split()) in flat, output
    # the load test's exit code (docs/loadtest.md): 0 pass, 1 an SLO failed, 3 run invalid, 4 inconclusive
    valid = summary["validity"]["valid"]
    expected = {"FAIL": 1, "INCONCLUSIVE": 4 if valid else 3}.get(summary["verdict"], 0 if valid else 3)
    assert proc.returncode == expected, (proc.returncode, summary["verdict"], output)


def test_without_prometheus_the_snapshot_is_a_final_scrape(serve_app, tmp_path: Path) -> None:
    """The fallback snapshot and platform.json read the real server's exported llmslo series."""
    from llmslo.demo import final_scrape, save_server_metrics

    deadline = time.monotonic() + 60  # Ray exports each replica's series on its report interval
    names: set[str] = set()
    while "ray_llmslo_build_info" not in names and time.monotonic() < deadline:
        time.sleep(1)
        names = {s["name"] for s in final_scrape(serve_app.metrics_url)["samples"]}
    assert {"ray_llmslo_build_info", "ray_llmslo_nvml_available"} <= names, sorted(names)
    assert all(n.startswith("ray_llmslo_") for n in names)

    save_server_metrics(tmp_path, None, serve_app.metrics_url, 0.0, 0.0, engine="configured")
    platform = json.loads((tmp_path / "platform.json").read_text())
    assert platform["engine"] == "simulated" and platform["weights"] == "simulated", platform
    assert json.loads((tmp_path / "server_metrics.json").read_text())["samples"]
