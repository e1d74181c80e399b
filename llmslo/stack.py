"""``llmslo up``: the compose stack as local processes on loopback, no Docker.

The same services as docker-compose.yml — the model server (Ray Serve),
Prometheus with the generated rules, Alertmanager, the Locust master with its
web UI, and Grafana when ``grafana-server`` is installed — each started in its
own process group and watched until its URL answers. Ctrl-C or SIGTERM stops
them all in reverse order; every descendant (Ray starts many) is recorded
while it runs and killed if it outlives its grace period, so nothing is left.

``llmslo demo`` brings up the same :class:`Stack` without the Locust web UI.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
APT_HINT = {
    "prometheus": "sudo apt-get install prometheus",
    "alertmanager": "sudo apt-get install prometheus-alertmanager",
}


ALERTMANAGER_CONFIG = ROOT / "alerts" / "alertmanager.yml"


class StackError(RuntimeError):
    """A service did not come up; the message names it and ends with its log's last lines."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    """Where each service listens; defaults are the compose stack's ports."""

    serve: int = 8000
    ray_metrics: int = 8080
    prometheus: int = 9090
    alertmanager: int = 9093
    locust: int = 8089
    grafana: int = 3000

    @classmethod
    def free(cls) -> Ports:
        """Any free ports: for tests and the demo, which must not collide with anything."""
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})


def prometheus_config(
    *, ray: str, prometheus: str, rule_files: list[str], alertmanager: str | None, locust: str | None
) -> dict[str, Any]:
    """The one Prometheus configuration, for compose (deploy/prometheus.yml) and ``llmslo up``.

    Job names are the ones the generated alert rules select on (contract/names.py).
    """
    from contract.names import CLIENT_JOB, SERVER_JOB

    jobs = {SERVER_JOB: ray, CLIENT_JOB: locust, "prometheus": prometheus, "alertmanager": alertmanager}
    config: dict[str, Any] = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": rule_files,
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    config["scrape_configs"] = [
        {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in jobs.items() if target
    ]
    return config


@dataclass
class Service:
    """One process of the stack: how to start it and which URL says it is ready."""

    name: str
    argv: list[str]
    ready_url: str
    url: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 90.0
    proc: subprocess.Popen | None = None
    family: dict[int, psutil.Process] = field(default_factory=dict)

    def remember_descendants(self) -> None:
        """Record every descendant now, so ones that outlive their parent are still found."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.family.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass


class Stack:
    """Start services in order, wait for each, stop all in reverse; a context manager."""

    def __init__(self, services: list[Service], run_dir: Path, grace_s: float = 20.0) -> None:
        self.services = services
        self.run_dir = run_dir
        self.grace_s = grace_s
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def start(self) -> None:
        """Start every service in order; if one fails (or Ctrl-C), stop those started."""
        try:
            for service in self.services:
                self._start(service)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_path(self, service: Service) -> Path:
        return self.run_dir / "logs" / f"{service.name}.log"

    def _start(self, service: Service) -> None:
        log = self.log_path(service).open("ab")
        service.proc = subprocess.Popen(
            service.argv,
            cwd=ROOT,
            env={**os.environ, **service.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a terminal Ctrl-C reaches us only
        )
        log.close()
        self._wait_ready(service)

    def _wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + service.ready_timeout_s
        while time.monotonic() < deadline:
            service.remember_descendants()
            if service.proc.poll() is not None:
                raise StackError(f"{service.name} exited with {service.proc.returncode}\n{self.tail(service)}")
            try:
                if httpx.get(service.ready_url, timeout=2.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(
            f"{service.name} did not answer {service.ready_url} within {service.ready_timeout_s:.0f} s\n"
            f"{self.tail(service)}"
        )

    def tail(self, service: Service, lines: int = 20) -> str:
        text = self.log_path(service).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {service.name}| {line}" for line in text)

    def watch(self) -> Service | None:
        """Refresh the descendant records; return the first service that has died."""
        for service in self.services:
            service.remember_descendants()
            if service.proc is not None and service.proc.poll() is not None:
                return service
        return None

    def stop(self) -> None:
        """SIGTERM each leader (reverse order), then its group and leftovers; SIGKILL stragglers."""
        for service in reversed(self.services):
            if service.proc is None:
                continue
            service.remember_descendants()
            _signal(service.proc.pid, signal.SIGTERM)
            try:
                service.proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
            left = [p for p in service.family.values() if _alive(p)]
            for p in left:
                _quietly(p.terminate)  # psutil checks the pid was not reused
            _, stragglers = psutil.wait_procs(left, timeout=5)
            for p in stragglers:
                _quietly(p.kill)
            psutil.wait_procs(stragglers, timeout=5)
            _signal_group(service.proc.pid, signal.SIGKILL)  # the unreaped leader keeps its pgid ours
            service.proc.wait()
            service.proc = None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _quietly(action: Any) -> None:
    try:
        action()
    except psutil.NoSuchProcess:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _which(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@dataclass
class Plan:
    """The services to start and what was left out (with the command that installs it)."""

    services: list[Service]
    missing: list[str]


def plan(
    ports: Ports,
    run_dir: Path,
    *,
    locust_ui: bool = True,
    grafana: bool = True,
    serve_args: list[str] | None = None,
    grafana_password: str | None = None,
) -> Plan:
    """Which services ``llmslo up`` (or the demo) starts here, in start order."""
    run_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    services = [
        Service(
            "serve",
            [py, "-m", "llmslo.cli", "serve", "--host", "127.0.0.1", "--port", str(ports.serve),
             "--metrics-port", str(ports.ray_metrics), *(serve_args or [])],
            ready_url=f"http://127.0.0.1:{ports.serve}/healthz",
            url=f"http://127.0.0.1:{ports.serve}/v1",
            ready_timeout_s=240.0,
        )
    ]
    missing = []
    alertmanager_bin = _which("prometheus-alertmanager", "alertmanager")
    if not ALERTMANAGER_CONFIG.exists():
        missing.append(f"{ALERTMANAGER_CONFIG} is missing (run `llmslo generate`): Alertmanager is skipped")
        alertmanager_bin = None
    elif alertmanager_bin:
        services.append(_alertmanager(alertmanager_bin, ports, run_dir))
    else:
        missing.append(f"Alertmanager is not installed: {APT_HINT['alertmanager']}")
    prometheus_bin = _which("prometheus")
    if prometheus_bin:
        services.append(_prometheus(prometheus_bin, ports, run_dir, with_alertmanager=bool(alertmanager_bin)))
    else:
        missing.append(f"Prometheus is not installed: {APT_HINT['prometheus']}")
    grafana_bin = _which("grafana-server") if grafana else None
    if grafana_bin and prometheus_bin:
        services.append(_grafana(grafana_bin, ports, run_dir, grafana_password or secrets.token_urlsafe(12)))
    elif grafana:
        missing.append("Grafana is not installed (grafana-server not on PATH): dashboards are skipped")
    if locust_ui:
        services.append(_locust_master(ports))
    return Plan(services, missing)


def _prometheus(binary: str, ports: Ports, run_dir: Path, *, with_alertmanager: bool) -> Service:
    config = prometheus_config(
        ray=f"127.0.0.1:{ports.ray_metrics}",
        prometheus=f"127.0.0.1:{ports.prometheus}",
        rule_files=[str(ROOT / "alerts" / "rules" / "*.yml")],
        alertmanager=f"127.0.0.1:{ports.alertmanager}" if with_alertmanager else None,
        locust=f"127.0.0.1:{ports.locust}",
    )
    path = run_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Service(
        "prometheus",
        [binary, f"--config.file={path}", f"--storage.tsdb.path={run_dir / 'prometheus-data'}",
         f"--web.listen-address=127.0.0.1:{ports.prometheus}", "--web.enable-lifecycle"],
        ready_url=f"http://127.0.0.1:{ports.prometheus}/-/ready",
        url=f"http://127.0.0.1:{ports.prometheus}",
    )


def _alertmanager(binary: str, ports: Ports, run_dir: Path) -> Service:
    return Service(
        "alertmanager",
        [binary, f"--config.file={ALERTMANAGER_CONFIG}",
         f"--storage.path={run_dir / 'alertmanager-data'}",
         f"--web.listen-address=127.0.0.1:{ports.alertmanager}",
         "--cluster.listen-address="],  # no gossip port: one local instance
        ready_url=f"http://127.0.0.1:{ports.alertmanager}/-/ready",
        url=f"http://127.0.0.1:{ports.alertmanager}",
    )


def grafana_provisioning(run_dir: Path) -> Path:
    """The generated provisioning, with the dashboards provider pointed at dashboards/json here.

    The generated provider path is the compose container's mount point; a local
    Grafana reads a copy whose path is this checkout's folder.
    """
    target = run_dir / "grafana-provisioning"
    shutil.copytree(ROOT / "dashboards" / "provisioning", target, dirs_exist_ok=True)
    for path in (target / "dashboards").glob("*.y*ml"):
        config = yaml.safe_load(path.read_text())
        for provider in config.get("providers", []):
            provider.setdefault("options", {})["path"] = str(ROOT / "dashboards" / "json")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def _grafana(binary: str, ports: Ports, run_dir: Path, password: str) -> Service:
    home = next((p for p in (Path("/usr/share/grafana"), Path(binary).resolve().parent.parent) if
                 (p / "conf" / "defaults.ini").exists()), Path("/usr/share/grafana"))
    return Service(
        "grafana",
        [binary, f"--homepath={home}"],
        ready_url=f"http://127.0.0.1:{ports.grafana}/api/health",
        url=f"http://127.0.0.1:{ports.grafana}  (admin / {password})",
        env={
            "GF_SERVER_HTTP_ADDR": "127.0.0.1",
            "GF_SERVER_HTTP_PORT": str(ports.grafana),
            "GF_PATHS_DATA": str(run_dir / "grafana-data"),
            "GF_PATHS_LOGS": str(run_dir / "logs"),
            "GF_PATHS_PROVISIONING": str(grafana_provisioning(run_dir)),
            "GF_SECURITY_ADMIN_PASSWORD": password,
            "PROMETHEUS_URL": f"http://127.0.0.1:{ports.prometheus}",
        },
    )


def _locust_master(ports: Ports) -> Service:
    return Service(
        "locust",
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest"),
         "--host", f"http://127.0.0.1:{ports.serve}",
         "--web-host", "127.0.0.1", "--web-port", str(ports.locust), "--server-dialect", "llmslo",
         "--server-metrics-url", f"http://127.0.0.1:{ports.ray_metrics}/metrics"],
        ready_url=f"http://127.0.0.1:{ports.locust}/",
        url=f"http://127.0.0.1:{ports.locust}",
    )


def default_run_dir(kind: str) -> Path:
    """reports/<kind>-<UTC time> under the current folder, like the load test's own default."""
    return (Path("reports") / f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}").resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmslo up",
        description="Run the stack (serve, Prometheus, Alertmanager, Locust UI, Grafana) as local processes.",
    )
    parser.add_argument("--run-dir", type=Path, help="logs, generated configs, data (default: reports/up-<time>)")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports instead of the compose ports 8000/8080/9090/9093/8089/3000")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `llmslo serve` (repeatable), e.g. --serve-arg=--config=my.yaml")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``with Stack`` stops every process."""
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run_dir = args.run_dir or default_run_dir("up")
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports.free() if args.free_ports else Ports()
    the_plan = plan(ports, run_dir, serve_args=args.serve_arg,
                    grafana_password=os.environ.get("GF_ADMIN_PASSWORD"))
    for line in the_plan.missing:
        print(f"llmslo up: {line}", flush=True)
    stop_on_sigterm()
    stack = Stack(the_plan.services, run_dir)
    try:
        with stack:
            print(f"llmslo up: running (logs in {run_dir / 'logs'}); Ctrl-C stops everything", flush=True)
            for service in stack.services:
                print(f"  {service.name:<13} {service.url}", flush=True)
            while (dead := stack.watch()) is None:
                time.sleep(1.0)
            print(f"llmslo up: {dead.name} exited with {dead.proc.returncode}; stopping\n{stack.tail(dead)}",
                  file=sys.stderr, flush=True)
            return 1
    except StackError as exc:
        print(f"llmslo up: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("llmslo up: stopped", flush=True)
        return 0
