"""Fault drills with real processes on loopback, all measured, nothing silently lost.

A real Prometheus (generated rules, every ``for:`` shortened to FOR, scrape and
evaluation every second) watches the shared ``serve_app`` and the load generator.

1. A model replica is killed in the middle of a Locust run, and Prometheus is stopped
   and restarted during the same run: in-flight streams end as counted failures (every
   stream recorded as a success carries all its tokens), Ray Serve starts a replacement,
   the crash counter and ``ReplicaCrashed`` fire, the run writes its report, and
   Prometheus still answers for samples taken before its restart (TSDB on disk).
2. An OOM storm: every injected OOM is one 500 ``out_of_memory`` and one count,
   ``OOMInLastHour`` fires, and the next requests succeed on both replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, require_binary
from contract import names
from llmslo.generate import rules, to_yaml
from contract.slo import load_slo
from loadtest import run_headless
from serve import metrics as M
from test_serve_metrics import quiet_scrape, scrape, total

SCRAPE_S = 1  # Prometheus scrape and rule interval, seconds (its scrape timeout is the same)
FOR = "2s"
OUTPUT_TOKENS = 200
# The fixture's engine runs 10x faster than calibrated, faster than one ingress on 2 shared
# cores can relay 8 streams: the replica would finish generating long before the ingress has
# forwarded the tokens (Ray buffers them), and a kill would cut nothing. SLOWDOWN brings the
# engine back to its calibrated speed (~19 ms/token: ~6 s per stream), so a kill lands
# mid-generation. Lengths are spread so the users do not move in lock-step.
SLOWDOWN = 100


def until(what: str, check: Callable[[], object], timeout: float, every: float = 0.25) -> float:
    """Poll ``check`` until truthy; return the seconds it took (monotonic)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Prometheus:
    """A real Prometheus that a drill may stop and start again on the same port and TSDB."""

    cmd: list[str]
    url: str
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        until("Prometheus ready", self._ready, 60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": at} if at is not None else {})}
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def firing(self, alert: str) -> bool:
        return bool(self.query(f'ALERTS{{alertname="{alert}", alertstate="firing"}}'))


@pytest.fixture(scope="module")
def prometheus(serve_app, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("drill-prometheus")
    (tmp / "rules.yml").write_text(to_yaml(rules.rule_file(load_slo(), for_override=FOR)))
    client_port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [
            {"job_name": names.SERVER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{serve_app.metrics_port}"]}]},
            {"job_name": names.CLIENT_JOB, "static_configs": [{"targets": [f"127.0.0.1:{client_port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = Prometheus(
        [require_binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        f"http://127.0.0.1:{port}", tmp / "prometheus.log",
    )
    prom.client_port = client_port  # type: ignore[attr-defined]
    prom.start()
    try:
        until("the server scraped", lambda: prom.query(f'up{{job="{names.SERVER_JOB}"}} == 1'), 60)
        yield prom
    finally:
        prom.stop()


def _chat(app, max_tokens: int = 1) -> httpx.Response:
    body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return httpx.post(f"{app.api_base}/chat/completions", json=body, timeout=30)


def test_replica_kill_and_prometheus_restart_during_a_load_test(serve_faults, prometheus, tmp_path):
    app, prom = serve_faults, prometheus
    assert not prom.firing("ReplicaCrashed")
    crashes_before = total(quiet_scrape(app, (M.REPLICA_CRASHES,)), M.REPLICA_CRASHES)
    app.admin("POST", {"slowdown": SLOWDOWN})
    load = ThreadPoolExecutor(1).submit(
        run_headless, app.url, tmp_path / "load", 8, "25s", "--mix", "text=1", "--thinking-share", "0",
        "--short-share", "0", "--input-tokens", "32", "--output-tokens", str(OUTPUT_TOKENS), "--length-spread", "0.3",
        "--server-dialect", "llmslo", "--client-metrics-port", str(prom.client_port), "--server-metrics-url", app.metrics_url, timeout=240)
    try:
        until("8 streams in flight", lambda: total(scrape(app), M.IN_FLIGHT) >= 6, 60)
        time.sleep(2)
        killed = app.admin("POST", {"kill": True}).json()["killed_replica"]
        t_kill = time.monotonic()
        first_ok = until("a new request to succeed", lambda: _chat(app).status_code == 200, 60, every=0.1)

        # Prometheus drill, still during the load: stop it, keep the load going, start it again.
        before = time.time()
        # Prometheus stamps a scrape's samples with its start and writes them when it ends (its timeout
        # is the interval): wait that out, or a scrape running at `before` that then fails adds an
        # up=0 at or before `before` after the query below (seen once on a slow VM)
        time.sleep(1.5 * SCRAPE_S)
        up_before = prom.query(f'up{{job="{names.SERVER_JOB}"}}', at=before)
        assert up_before, "nothing scraped before the stop"
        prom.stop()
        stopped = time.monotonic()
        time.sleep(3)
        prom.start()
        prom_down = time.monotonic() - stopped

        replaced = until("a replacement replica to answer", lambda: _new_replica(app, killed), 120, every=0.5)
        replaced_at = time.monotonic() - t_kill
        until("the crash counter", lambda: total(scrape(app), M.REPLICA_CRASHES) == crashes_before + 1, 30)
        until("ReplicaCrashed firing", lambda: prom.firing("ReplicaCrashed"), 60, every=0.5)
        print(f"kill -> first 200 in {first_ok:.2f} s; replacement replica answering {replaced_at:.1f} s after the kill "
              f"(last poll {replaced:.1f} s); ReplicaCrashed firing {time.monotonic() - t_kill:.1f} s after the kill; "
              f"Prometheus down {prom_down:.1f} s (stop -> ready)")
    finally:
        outcome = load.result(timeout=240)

    # the load test finished and wrote its report in spite of both faults
    assert outcome.summary is not None, outcome.output[-3000:]
    assert (tmp_path / "load" / "report.html").exists()
    records = [json.loads(line) for line in (tmp_path / "load" / "requests.jsonl").read_text().splitlines()]
    failed = [r for r in records if not r["ok"]]
    truncated = [r for r in records if r["ok"] and r["output_tokens"] != r["max_tokens"]]
    assert failed, "the killed replica's in-flight streams should be failures"
    assert not truncated, truncated[:3]  # no silent truncation counted as a success
    assert all(r["error"] for r in failed)
    # each failure is the kill's: before the first token an HTTP 503, after it an SSE error event
    assert all("the model replica serving this request died" in r["error"] for r in failed), outcome.summary["errors"]
    assert outcome.summary["requests"]["failed"] == len(failed)
    print(f"load: {len(records)} requests, {len(failed)} failed: {outcome.summary['errors']}")
    # Prometheus kept what it had before the restart, and scrapes again after it
    assert prom.query(f'up{{job="{names.SERVER_JOB}"}}', at=before) == up_before
    until("scrapes after the restart", lambda: prom.query(f'up{{job="{names.SERVER_JOB}"}} == 1'), 30)
    assert prom.query(f"count_over_time(up{{job='{names.SERVER_JOB}'}}[10m])")


def _new_replica(app, killed: str) -> bool:
    seen = {_chat(app).headers.get("x-llmslo-replica") for _ in range(6)}
    return len(seen - {killed, None}) == app.replicas


def test_oom_storm_every_oom_counted_alert_fires_engine_keeps_serving(serve_faults, prometheus):
    app, prom = serve_faults, prometheus
    storm = 20
    before = total(quiet_scrape(app, (M.OOM_EVENTS,)), M.OOM_EVENTS, source="simulated")
    assert app.admin("POST", {"oom": storm}).json()["oom_pending"] == storm
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _chat(app, 8), range(storm + 10)))
    codes = [r.status_code for r in answers]
    ooms = [r for r in answers if r.status_code == 500]
    assert len(ooms) == storm and codes.count(200) == 10, codes
    assert all(r.json()["error"]["code"] == "out_of_memory" for r in ooms)
    counted = until("every OOM counted", lambda: total(scrape(app), M.OOM_EVENTS, source="simulated") == before + storm, 30)
    alert = until("OOMInLastHour firing", lambda: prom.firing("OOMInLastHour"), 60, every=0.5)
    print(f"OOM storm of {storm}: all counted after {counted:.1f} s, OOMInLastHour firing {alert:.1f} s later")
    assert len(app.serving_replicas()) == app.replicas
