"""Clean restarts of ``llmslo serve``: a taken port is refused, SIGTERM returns only when Ray is gone.

Once a server started right after another was stopped answered ``/healthz``
from the old one (whose Ray processes outlived SIGTERM by seconds) and every
request then failed. Both halves of that are checked against a real server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from conftest import REPO_ROOT, _wait_healthy, free_port
from serve.processes import descendants, port_taken

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def serve_cmd(port: int, metrics_port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "serve.cli", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--replicas", "1", "--num-cpus", "1", *args]


@pytest.mark.parametrize("which", ["http", "metrics"])
def test_a_taken_port_is_refused_before_ray_starts(which: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = (taken, free_port()) if which == "http" else (free_port(), taken)
        done = subprocess.run(serve_cmd(*ports), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port already in use: 127.0.0.1:{taken}" in done.stderr
    assert "serve_ready" not in done.stdout


def test_port_taken_ignores_a_closed_port() -> None:
    port = free_port()
    assert not port_taken("127.0.0.1", port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert port_taken("127.0.0.1", port)


@pytest.mark.timeout(300)
def test_sigterm_returns_only_after_every_ray_process_is_gone(tmp_path) -> None:
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_cmd(port, metrics_port), cwd=REPO_ROOT, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log_path)
        ray_procs = descendants(proc.pid)
        assert len(ray_procs) >= 3, ray_procs  # GCS, raylet, workers (the HTTP proxy among them)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        left = [p for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"still running after llmslo serve returned: {left}"
        assert not port_taken("127.0.0.1", port) and not port_taken("127.0.0.1", metrics_port)
        assert '"event": "ray_stopped"' in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
