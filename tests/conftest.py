"""Shared test helpers: free loopback ports, system binaries, and one real Serve app.

Tests that drive a real Prometheus, Alertmanager or Chromium skip on a laptop
that lacks them, but CI sets LLMSLO_REQUIRE_SYSTEM_DEPS=1 so a missing binary
fails there instead of silently skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from loadtest._truth_server import self_signed_cert
from serve.processes import free_port  # noqa: F401  (re-exported: tests import it from here)

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_binary(name: str) -> str:
    """Path of a system binary; skip (or fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (apt-get install the package that provides it)"
    if os.environ.get("LLMSLO_REQUIRE_SYSTEM_DEPS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1, made here with Debian's openssl."""
    return self_signed_cert(tmp_path_factory.mktemp("tls"), require_binary("openssl"))


# ---------------------------------------------------------------------------
# One real Ray Serve app for the whole test session (BRIEF contract 3).
# ---------------------------------------------------------------------------

SERVE_ADMIN_TOKEN = "test-admin-token"
SERVE_TIME_SCALE = 0.1  # simulated engine 10x faster than calibrated: TTFT ~32 ms, ITL ~1.8 ms
SERVE_START_TIMEOUT_S = 180


@dataclass(frozen=True)
class ServeApp:
    """What the ``serve_app`` fixture yields.

    url          http://127.0.0.1:PORT (API root; /healthz, /admin/faults live here)
    api_base     url + "/v1" (give this to openai / langchain clients)
    metrics_url  http://127.0.0.1:MPORT/metrics, Ray's metrics export (Prometheus target)
    metrics_port MPORT (Ray reports metrics every second in this app)
    admin_token  bearer token of /admin/faults
    model        served model id ("autoglm-phone-9b")
    replicas     number of model replicas (2)
    time_scale   the simulated engine's latency multiplier (0.1)
    log_path     file with the server's stdout+stderr (Ray and JSON request logs)
    """

    url: str
    api_base: str
    metrics_url: str
    metrics_port: int
    admin_token: str
    model: str
    replicas: int
    time_scale: float
    log_path: Path

    def admin(self, method: str, body: dict | None = None) -> httpx.Response:
        """Call /admin/faults (GET, POST with a FaultSpec body, DELETE)."""
        return httpx.request(
            method,
            f"{self.url}/admin/faults",
            json=body,
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )

    def serving_replicas(self, body: dict | None = None, attempts: int = 40) -> set[str]:
        """Replica ids that answered sequential requests, stopping once all ``replicas`` are seen.

        Ray's router picks between two random replicas by queue length, so a fixed handful of
        sequential requests can all land on one replica by chance (CI saw 10 in a row);
        ``attempts`` bounds the search instead. Every answer must be a 200.
        """
        body = body or {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        seen: set[str] = set()
        for _ in range(attempts):
            resp = httpx.post(f"{self.api_base}/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            seen.add(resp.headers["x-llmslo-replica"])
            if len(seen) == self.replicas:
                break
        return seen


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, path: str = "/healthz",
                  name: str = "llmslo serve") -> None:
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{name} not healthy after {SERVE_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    """A real ``llmslo serve`` (local Ray, Serve, simulated engine, 2 model replicas,
    admin API on) on free loopback ports; shut down (Serve, then Ray) at session end."""
    with serving_app(tmp_path_factory.mktemp("serve"), replicas=2) as app:
        yield app


@contextmanager
def serving_app(log_dir: Path, replicas: int, extra_args: tuple[str, ...] = ()) -> Iterator[ServeApp]:
    """``llmslo serve EXTRA_ARGS`` as the test apps run it (simulated engine at SERVE_TIME_SCALE,
    admin API on, Ray metrics every second, 2 CPUs), logging to ``log_dir/serve.log``."""
    metrics_port = free_port()
    log_path = log_dir / "serve.log"
    args = [
        *extra_args, "--metrics-port", str(metrics_port), "--metrics-interval-ms", "1000",
        "--replicas", str(replicas), "--time-scale", str(SERVE_TIME_SCALE),
        "--admin-token", SERVE_ADMIN_TOKEN, "--num-cpus", "2",
    ]  # fmt: skip
    with _serve_process(args, {}, log_path) as url:
        yield ServeApp(
            url=url,
            api_base=f"{url}/v1",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            metrics_port=metrics_port,
            admin_token=SERVE_ADMIN_TOKEN,
            model="autoglm-phone-9b",
            replicas=replicas,
            time_scale=SERVE_TIME_SCALE,
            log_path=log_path,
        )


@contextmanager
def _serve_process(args: list[str], env: dict[str, str | None], log_path: Path) -> Iterator[str]:
    """``llmslo serve ARGS`` on a free loopback port, logging to ``log_path``; yields its URL once
    healthy and stops it (Serve, then Ray) on exit. ``env`` entries override os.environ (None unsets)."""
    port = free_port()
    merged = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **env}
    merged = {k: v for k, v in merged.items() if v is not None}
    cmd = [sys.executable, "-m", "serve.cli", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=merged, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT lets the CLI shut Serve and Ray down; SIGKILL the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture
def serve_faults(serve_app: ServeApp) -> Iterator[ServeApp]:
    """The shared app, with every injected fault cleared after the test."""
    serve_app.admin("DELETE")
    yield serve_app
    serve_app.admin("DELETE")


# ---------------------------------------------------------------------------
# A second, locked-down app (engineer F's security tests and upstream drill).
# ---------------------------------------------------------------------------

LOCKED_API_KEY = "test-api-key-0123456789"
LOCKED_LIMITS = {"max_body_bytes": 2**20, "body_timeout_s": 3.0, "rate_limit_per_s": 20.0, "rate_limit_burst": 40}


@dataclass
class Upstream:
    """A ground-truth OpenAI SSE server (loadtest._truth_server) that a drill can stop and restart."""

    port: int
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Listen on ``port`` (again); a no-op while it runs. Retried: a killed server's port can take a moment to free."""
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [sys.executable, "-m", "loadtest._truth_server", "--port", str(self.port), "--ttft", "0.02", "--itl", "0.002"]
        for _ in range(20):
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if "listening" in self.proc.stdout.readline():
                return
            output = self.proc.stdout.read()
            self.proc.wait(10)
            time.sleep(0.5)
        sockets = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
        held = "\n".join(line for line in sockets.splitlines() if f":{self.port}" in line)
        raise RuntimeError(f"truth server did not start on {self.port}: {output[-300:]}\n{held}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass(frozen=True)
class LockedApp:
    """``llmslo serve`` with the upstream engine (-> ``upstream``), API key ``api_key`` from
    $LLMSLO_API_KEY, admin API off, and the limits of LOCKED_LIMITS."""

    url: str
    api_base: str
    api_key: str
    model: str
    log_path: Path
    upstream: Upstream

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def locked_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedApp]:
    """One model replica forwarding to a truth server, behind an API key and tight limits."""
    tmp = tmp_path_factory.mktemp("locked")
    upstream = Upstream(free_port())
    upstream.start()
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    config["applications"][0]["args"] = {
        "engine": "upstream", "num_replicas": 1, "cpus_per_replica": 0.5, "gpus_per_replica": 0,
        "engine_options": {"base_url": f"http://127.0.0.1:{upstream.port}/v1", "connect_timeout_s": 1.0,
                           "read_timeout_s": 10.0},
        **LOCKED_LIMITS,
    }  # fmt: skip
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp / "serve.log"
    args = ["--config", str(tmp / "config.yaml"), "--metrics-port", str(free_port()), "--num-cpus", "1"]
    env = {"LLMSLO_API_KEY": LOCKED_API_KEY, "LLMSLO_ADMIN_TOKEN": None}
    try:
        with _serve_process(args, env, log_path) as url:
            yield LockedApp(url, f"{url}/v1", LOCKED_API_KEY, "autoglm-phone-9b", log_path, upstream)
    finally:
        upstream.stop()
