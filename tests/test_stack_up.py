"""``llmslo up`` starts the real services on loopback and SIGTERM leaves nothing behind.

One test, bounded: the stack (Ray Serve with the simulated engine, Prometheus,
Alertmanager, the Locust web UI) is started as a user would, every printed URL
must answer, Prometheus must see Ray's metrics port as a healthy target, and
after SIGTERM no process of the stack may be left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import require_binary

START_TIMEOUT_S = 240


def _descendants(pid: int) -> dict[int, psutil.Process]:
    try:
        root = psutil.Process(pid)
        return {p.pid: p for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_up_serves_every_url_and_stops_cleanly(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmslo.cli", "up", "--free-ports", "--run-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen: dict[int, psutil.Process] = {}
    lines: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            seen |= _descendants(proc.pid)
            if line.startswith("llmslo up: running"):
                break
        assert any(l.startswith("llmslo up: running") for l in lines), "\n".join(lines)
        urls = {}
        for line in iter(proc.stdout.readline, ""):
            lines.append(line.rstrip())
            match = re.match(r"\s+(\S+)\s+(http://127\.0\.0\.1:\d+\S*)", line)
            if match:
                urls[match.group(1)] = match.group(2)
            if "locust" in urls:  # printed last (grafana, when installed, comes before it)
                break
        assert {"serve", "alertmanager", "prometheus", "locust"} <= set(urls), "\n".join(lines)
        seen |= _descendants(proc.pid)

        assert httpx.get(urls["serve"].removesuffix("/v1") + "/healthz", timeout=5).status_code == 200
        models = httpx.get(urls["serve"] + "/models", timeout=5).json()
        assert models["data"], models
        assert httpx.get(urls["alertmanager"] + "/-/ready", timeout=5).status_code == 200
        assert "locust" in httpx.get(urls["locust"] + "/", timeout=5).text.lower()
        _wait_for_ray_target_up(urls["prometheus"])
        seen |= _descendants(proc.pid)
        assert len(seen) > 4, "expected Ray, Prometheus, Alertmanager and Locust below llmslo up"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, "\n".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = [p for p in seen.values() if _alive(p)]
        for p in left:
            p.kill()
    assert left == [], f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    assert (tmp_path / "prometheus.yml").exists()
    assert (tmp_path / "logs" / "serve.log").exists()


def _wait_for_ray_target_up(prometheus: str, timeout_s: float = 60) -> None:
    """Prometheus scrapes Ray's metrics export port successfully (job 'ray' is up)."""
    deadline = time.monotonic() + timeout_s
    health = None
    while time.monotonic() < deadline:
        targets = httpx.get(prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if health.get("ray") == "up":
            return
        time.sleep(2)
    raise AssertionError(f"Prometheus targets: {health}")


def test_local_grafana_reads_this_checkouts_dashboards(tmp_path: Path) -> None:
    """grafana-server is not on CI machines; the provisioning copy it would read is checked here."""
    import yaml

    from llmslo.catalogue import ROOT, grafana_provisioning

    target = grafana_provisioning(tmp_path)
    providers = [p for f in (target / "dashboards").glob("*.yml") for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers and all(Path(p["options"]["path"]) == ROOT / "dashboards" / "json" for p in providers)
    assert list((ROOT / "dashboards" / "json").glob("*.json"))
    assert (target / "datasources").is_dir() and (target / "alerting").is_dir()
