"""Autoscaling and GPU reservation of model copies, on a CPU machine with Ray-declared GPUs.

Ray is told the node has 2 GPUs (``--num-gpus 2``; nothing touches a real GPU: the
simulated engine runs and NVML is absent). The app autoscales 1..2 replicas of 1 GPU
each with the SLO-derived ``target_ongoing_requests`` (6); 12 concurrent streams must
make Serve add the second replica, placed in its own placement-group bundle, so the
two replicas get different GPU ids. When the streams stop, Serve scales back to one replica,
and that graceful stop is not counted as a crash by the node's crash witness
(serve/crash_witness.py). Also checks that the admin API is off without a token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, _stop, _wait_healthy, free_port
from serve import metrics as M
from serve.settings import AppSettings
from serve.telemetry import node_key
from test_serve_metrics import wait_for

CONCURRENT = 12


def _replica_starts(log_path) -> list[dict]:
    return [json.loads(line[line.index("{"):]) for line in log_path.read_text().splitlines()
            if '"replica_started"' in line]


def _config(tmp_path) -> str:
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    config["applications"][0]["args"].update(
        gpus_per_replica=1, min_replicas=1, max_replicas=2, engine_options={"time_scale": 1.0},
        autoscaling_options={"upscale_delay_s": 1, "look_back_period_s": 2, "downscale_delay_s": 3},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _witnessed_replicas(server: subprocess.Popen) -> list:
    """The model replicas the node's crash witness last recorded (its ledger file)."""
    ledgers = [p for p in Path(tempfile.gettempdir()).glob("llmslo-replicas-*/seen.json")
               if _raylet_of(server) and p.parent.name == f"llmslo-replicas-{_raylet_of(server)}"]
    return json.loads(ledgers[0].read_text()) if ledgers else []


def _raylet_of(server: subprocess.Popen) -> str | None:
    for child in psutil.Process(server.pid).children(recursive=True):
        if child.name() == "raylet":
            return node_key(child)
    return None


def test_autoscaling_adds_a_replica_on_its_own_gpu_and_admin_is_off(tmp_path):
    assert AppSettings().target_ongoing_requests() * 2 == CONCURRENT
    port = free_port()
    log_path = tmp_path / "serve.log"
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "serve.cli", "--config", _config(tmp_path), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--metrics-interval-ms", "1000",
           "--num-gpus", "2", "--num-cpus", "2"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("LLMSLO_ADMIN_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def stream_until_stopped():
        body = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1500, "ignore_eos": True, "stream": True}
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
                    for _ in resp.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError:  # the server is being stopped
                return

    threads = [threading.Thread(target=stream_until_stopped, daemon=True) for _ in range(CONCURRENT)]
    try:
        _wait_healthy(url, proc, log_path)
        time.sleep(3)
        assert len(_replica_starts(log_path)) == 1  # min_replicas
        resp = httpx.get(f"{url}/admin/faults", headers={"authorization": "Bearer x"}, timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "admin_disabled"
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(starts := _replica_starts(log_path)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(starts) == 2, log_path.read_text()[-3000:]
        assert sorted(s["gpus"] for s in starts) == [["0"], ["1"]]
        assert wait_for(lambda: len(_witnessed_replicas(proc)) == 2, timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert wait_for(lambda: len(_witnessed_replicas(proc)) == 1, timeout=120), "Serve did not scale down"
        time.sleep(3)  # Ray reports metrics every second here
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        crashes = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == M.REPLICA_CRASHES]
        assert sum(crashes) == 0, "a graceful scale-down was counted as a crash"
    finally:
        stop.set()
        _stop(proc)
        for t in threads:
            t.join(timeout=10)
