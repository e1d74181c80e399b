"""The service catalogue: which processes make up the stack and how each is started.

The same services as docker-compose.yml — the model server (Ray Serve),
Prometheus with the generated rules, Alertmanager, the Locust master with its
web UI, and Grafana when ``grafana-server`` is installed — as
:class:`llmslo.supervisor.Service` entries on loopback ports. ``llmslo up``
(:mod:`llmslo.stack`) and ``llmslo demo`` start them with the supervisor.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from llmslo.supervisor import ROOT, Service, free_port
from loadtest._headless import locust_argv

APT_HINT = {
    "prometheus": "sudo apt-get install prometheus",
    "alertmanager": "sudo apt-get install prometheus-alertmanager",
}
ALERTMANAGER_CONFIG = ROOT / "alerts" / "alertmanager.yml"


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

    Job names are the ones the generated alert rules select on (llmslo.generate.names).
    """
    from llmslo.generate.names import CLIENT_JOB, SERVER_JOB

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
    services = [serve_service(ports, serve_args or [])]
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
        services.append(locust_service(ports))
    return Plan(services, missing)


def serve_service(ports: Ports, serve_args: list[str]) -> Service:
    """``llmslo serve`` on loopback with Ray's metrics export on ``ports.ray_metrics``."""
    return Service(
        "serve",
        [sys.executable, "-m", "llmslo.cli", "serve", "--host", "127.0.0.1", "--port", str(ports.serve),
         "--metrics-port", str(ports.ray_metrics), *serve_args],
        ready_url=f"http://127.0.0.1:{ports.serve}/healthz",
        url=f"http://127.0.0.1:{ports.serve}/v1",
        ready_timeout_s=240.0,
    )


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


def locust_service(ports: Ports, *args: str) -> Service:
    """The Locust master with its web UI on loopback, aimed at the stack's server; ``args`` add flags."""
    return Service(
        "locust",
        locust_argv("--host", f"http://127.0.0.1:{ports.serve}",
                    "--web-host", "127.0.0.1", "--web-port", str(ports.locust),
                    "--server-metrics-url", f"http://127.0.0.1:{ports.ray_metrics}/metrics", *args),
        ready_url=f"http://127.0.0.1:{ports.locust}/",
        url=f"http://127.0.0.1:{ports.locust}",
    )


def default_run_dir(kind: str) -> Path:
    """reports/<kind>-<UTC time> under the current folder, like the load test's own default."""
    return (Path("reports") / f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}").resolve()
