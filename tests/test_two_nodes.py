"""Two Ray nodes on this host, for real: ``llmslo up --nodes 2``.

A ``ray start`` head and a worker joined with ``ray start --address`` (separate
raylets, 2 CPUs each). Two model replicas of 1 CPU each are spread over both
nodes; Prometheus finds both nodes through Ray's own service-discovery file and
sees a replica on each; then the worker's raylet is killed under load: streams
on it must fail visibly (never end quietly without ``[DONE]``), the stack goes
on, and Serve brings a replacement replica up on the head. The recovery time is
printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import REPO_ROOT, require_binary
from llmslo.supervisor import descendants
from loadtest._server_metrics import ServerWatch, parse

MODEL = "autoglm-phone-9b"
START_TIMEOUT_S = 300


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    config["applications"][0]["args"].update(num_replicas=2, cpus_per_replica=1.0, ingress_cpus=0.0,
                                             engine_options={"time_scale": 1.0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _read_urls(proc: subprocess.Popen, lines: list[str]) -> dict[str, str]:
    """The service URLs ``llmslo up`` prints once everything answers."""
    urls: dict[str, str] = {}
    for line in iter(proc.stdout.readline, ""):
        lines.append(line.rstrip())
        if match := re.match(r"\s+(\S+)\s+(http://127\.0\.0\.1:\d+\S*)", line):
            urls[match.group(1)] = match.group(2)
        if "locust" in urls:
            return urls
    raise AssertionError("\n".join(lines))


def _replica(api: str, timeout: float = 10) -> str | None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        resp = httpx.post(f"{api}/chat/completions", json=body, timeout=timeout)
    except httpx.HTTPError:
        return None
    return resp.headers.get("x-llmslo-replica") if resp.status_code == 200 else None


def _replicas_answering(api: str, want: int, attempts: int = 60) -> set[str]:
    seen: set[str] = set()
    for _ in range(attempts):
        if replica := _replica(api):
            seen.add(replica)
        if len(seen) >= want:
            break
    return seen


def _prom(prometheus: str, query: str) -> list[dict]:
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]


def _replicas_by_node(prometheus: str, timeout_s: float = 120) -> dict[str, str]:
    """replica id suffix -> the node (Prometheus instance) exporting its series."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    while time.monotonic() < deadline and len(set(found.values())) < 2:
        found = {r["metric"]["replica"].rsplit("#", 1)[-1]: r["metric"]["instance"]
                 for r in _prom(prometheus, "ray_llmslo_replica_starts_total")}
        time.sleep(2)
    return found


def _stream(api: str, outcomes: list[str]) -> None:
    """One long stream; appends how it ended: done, error_event, http_NNN, exception, or truncated."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{api}/chat/completions", json=body, timeout=120) as resp:
            if resp.status_code != 200:
                outcomes.append(f"http_{resp.status_code}")
                return
            for line in resp.iter_lines():
                if line.startswith("data:") and '"error"' in line:
                    outcomes.append("error_event")
                    return
                if line.strip() == "data: [DONE]":
                    outcomes.append("done")
                    return
    except httpx.HTTPError:
        outcomes.append("exception")
        return
    outcomes.append("truncated")


def _raylet(service_pid: int) -> psutil.Process:
    return next(p for p in descendants(service_pid) if p.name() == "raylet")


def test_federated_scrape_judges_cpu_per_node() -> None:
    text = ('ray_llmslo_process_cpu_percent{component="replica",instance="a:1"} 60\n'
            'ray_llmslo_process_cpu_percent{component="proxy",instance="a:1"} 20\n'
            'ray_llmslo_process_cpu_percent{component="replica",instance="b:2"} 50\n')
    watch = ServerWatch("http://prometheus/federate", gpus_per_replica=0)
    watch.observe(parse(text))
    assert watch.facts(8).cpu_percent_max == 80.0, "the busiest node (a: 60 + 20), not all nodes added up (130)"


@pytest.mark.timeout(START_TIMEOUT_S + 300)
def test_two_nodes_serve_are_scraped_and_survive_losing_the_worker(tmp_path: Path) -> None:
    require_binary("prometheus")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmslo.cli", "up", "--nodes", "2", "--node-cpus", "2", "--free-ports",
         "--run-dir", str(tmp_path / "up"), f"--serve-arg=--config={_config(tmp_path)}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    seen: dict[int, psutil.Process] = {}
    try:
        urls = _read_urls(proc, lines)
        seen |= {p.pid: p for p in descendants(proc.pid)}
        api, prometheus = urls["serve"], urls["prometheus"]
        assert {"ray-head", "ray-worker-1"} <= set(urls), "\n".join(lines)

        before = _replicas_answering(api, want=2)
        assert len(before) == 2, f"requests reached {before}"
        placement = _replicas_by_node(prometheus)
        assert set(placement) >= before and len(set(placement.values())) == 2, \
            f"replica -> node: {placement}; Prometheus must see one replica on each node"
        ray_targets = _prom(prometheus, 'up{job="ray"}')
        assert len({t["metric"]["instance"] for t in ray_targets}) >= 2, ray_targets
        assert all(t["value"][1] == "1" for t in ray_targets), f"a Ray target is down: {ray_targets}"

        outcomes: list[str] = []
        streams = [threading.Thread(target=_stream, args=(api, outcomes)) for _ in range(4)]
        for t in streams:
            t.start()
        time.sleep(2.0)  # every stream is past its first token
        worker_pid = next(p.pid for p in descendants(proc.pid) if "--address" in " ".join(p.cmdline()))
        _raylet(worker_pid).kill()
        lost_at = time.monotonic()
        for t in streams:
            t.join(timeout=150)
        assert "truncated" not in outcomes, f"a stream ended without [DONE] and without an error: {outcomes}"
        assert len(outcomes) == 4 and set(outcomes) - {"done"}, f"no stream was on the lost node: {outcomes}"

        after: set[str] = set()
        while time.monotonic() - lost_at < 180 and not (len(after) == 2 and after - before):
            after = _replicas_answering(api, want=2, attempts=20)
        recovery_s = time.monotonic() - lost_at
        assert len(after) == 2 and after - before, f"no replacement replica: before {before}, after {after}"
        assert proc.poll() is None, "llmslo up must go on without the worker node"
        print(f"\nnode loss: streams {sorted(outcomes)}; 2 replicas serving again "
              f"{recovery_s:.1f} s after the worker's raylet was killed (new: {sorted(after - before)})")

        seen |= {p.pid: p for p in descendants(proc.pid)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in left:
            p.kill()
    assert left == [], f"processes left behind: {[(p.pid, p.name()) for p in left]}"
