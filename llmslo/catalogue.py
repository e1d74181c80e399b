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
import tempfile
from urllib.parse import quote
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from llmslo.supervisor import ROOT, Service
from loadtest._headless import locust_argv
from serve.processes import free_port

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
    ray_gcs: int = 6379
    ray_dashboard: int = 8265

    @classmethod
    def free(cls) -> Ports:
        """Any free ports: for tests and the demo, which must not collide with anything."""
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})


def prometheus_config(
    *, ray: str | None = None, ray_sd_file: str | None = None, prometheus: str, rule_files: list[str],
    alertmanager: str | None, locust: str | None, sd_on_loopback: bool = False,
) -> dict[str, Any]:
    """The one Prometheus configuration, for compose (deploy/prometheus.yml) and ``llmslo up``.

    Ray's nodes are one static target (``ray``), or, with ``ray_sd_file``, every node
    listed in Ray's own service-discovery file (``prom_metrics_service_discovery.json``,
    which the head rewrites as nodes join and leave). ``sd_on_loopback``: every node runs
    on this host, so its listed address (Ray registers the host's IP, not 127.0.0.1) is
    scraped on 127.0.0.1 at the same port. Job names are the ones the generated alert
    rules select on (contract/names.py).
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
    if ray_sd_file:
        job: dict[str, Any] = {"job_name": SERVER_JOB, "file_sd_configs": [{"files": [ray_sd_file]}]}
        if sd_on_loopback:
            job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": r".*:(\d+)",
                                       "target_label": "__address__", "replacement": "127.0.0.1:${1}"}]
        config["scrape_configs"].insert(0, job)
    return config


def federate_url(prometheus: str) -> str:
    """Prometheus' /federate URL for every Ray node's series: one scrape that spans the cluster."""
    from contract.names import SERVER_JOB

    selector = quote('{job="%s"}' % SERVER_JOB)
    return f"{prometheus}/federate?match[]={selector}"


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
    nodes: int = 1,
    node_cpus: float | None = None,
) -> Plan:
    """Which services ``llmslo up`` (or the demo) starts here, in start order.

    ``nodes`` > 1: a Ray cluster of that many nodes on this host (``ray start`` head and
    workers, each with ``node_cpus`` CPUs and its own metrics port), Serve deployed onto
    it, and Prometheus finding every node through Ray's service-discovery file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    serve_args = serve_args or []
    cluster = RayCluster.on_this_host(ports, nodes, node_cpus, serve_args) if nodes > 1 else None
    services = [*(cluster.services() if cluster else []), serve_service(ports, serve_args, cluster)]
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
        services.append(_prometheus(prometheus_bin, ports, run_dir, with_alertmanager=bool(alertmanager_bin),
                                    ray_sd_file=cluster.service_discovery_file if cluster else None))
    else:
        missing.append(f"Prometheus is not installed: {APT_HINT['prometheus']}")
    grafana_bin = _which("grafana-server") if grafana else None
    if grafana_bin and prometheus_bin:
        services.append(_grafana(grafana_bin, ports, run_dir, grafana_password or secrets.token_urlsafe(12)))
    elif grafana:
        missing.append("Grafana is not installed (grafana-server not on PATH): dashboards are skipped")
    if locust_ui:
        every_node = cluster and prometheus_bin
        services.append(locust_service(
            ports, server_metrics_url=federate_url(f"http://127.0.0.1:{ports.prometheus}") if every_node else None))
    return Plan(services, missing)


@dataclass
class RayCluster:
    """A multi-node Ray cluster on this host: one ``ray start`` per node.

    Ray registers every node under the host's own IP address (it replaces 127.0.0.1),
    so that is the address Prometheus scrapes. Each node gets its own ports (metrics
    export, dashboard agent), so several
    raylets (and other people's Ray clusters) share the host without colliding;
    the temp dir is short (Ray's socket paths must fit in 107 bytes) and private
    (its discovery file lists only this cluster's nodes).
    """

    ports: Ports
    node_cpus: float | None
    temp_dir: Path
    worker_metrics_ports: list[int]
    env: dict[str, str]

    @classmethod
    def on_this_host(cls, ports: Ports, nodes: int, node_cpus: float | None, serve_args: list[str]) -> RayCluster:
        from serve.cli import app_config, export_env_vars, parse_args

        env: dict[str, str] = {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_metrics_report_interval_ms": "2000",
            "RAY_AUTH_MODE": "token",  # every node and the Serve driver must present this cluster's token
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # the head's autoscaler and dashboard export metrics on fixed ports (44217, 44227) that a
            # second cluster on the host cannot bind; Ray's discovery file lists them either way
            "AUTOSCALER_METRIC_PORT": str(free_port()),
            "DASHBOARD_METRIC_PORT": str(free_port()),
        }
        export_env_vars(app_config(parse_args(serve_args))[1], env)  # Serve's settings reach every node's processes
        temp_dir = Path(tempfile.mkdtemp(prefix="llmslo-ray-"))
        return cls(ports, node_cpus, temp_dir, [free_port() for _ in range(nodes - 1)], env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.ray_gcs}"

    @property
    def service_discovery_file(self) -> str:
        """Ray's file_sd target list (the head rewrites it every few seconds)."""
        return str(self.temp_dir / "prom_metrics_service_discovery.json")

    def _node_args(self, metrics_port: int) -> list[str]:
        cpus = ["--num-cpus", f"{self.node_cpus:g}"] if self.node_cpus is not None else []
        return ["--block", "--metrics-export-port", str(metrics_port),
                "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *cpus]

    def services(self) -> list[Service]:
        ray = str(Path(sys.executable).with_name("ray"))
        head = Service(
            "ray-head",
            [ray, "start", "--head", "--port", str(self.ports.ray_gcs), "--temp-dir", str(self.temp_dir),
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.ports.ray_dashboard),
             "--ray-client-server-port", str(free_port()),
             *self._node_args(self.ports.ray_metrics)],
            ready_url=f"http://127.0.0.1:{self.ports.ray_dashboard}/api/gcs_healthz",
            url=f"http://127.0.0.1:{self.ports.ray_dashboard}  (Ray dashboard; GCS {self.address})",
            env=self.env, ready_timeout_s=120.0,
        )
        workers = [
            Service(
                f"ray-worker-{i}",
                [ray, "start", "--address", self.address, *self._node_args(port)],
                ready_url=f"http://127.0.0.1:{port}/metrics",
                url=f"http://127.0.0.1:{port}/metrics  (node metrics)",
                env=self.env, ready_timeout_s=120.0, required=False,  # Serve reschedules a lost node's replicas
            )
            for i, port in enumerate(self.worker_metrics_ports, start=1)
        ]
        return [head, *workers]


def serve_service(ports: Ports, serve_args: list[str], cluster: RayCluster | None = None) -> Service:
    """``llmslo serve`` on loopback: its own Ray with metrics on ``ports.ray_metrics``, or onto ``cluster``.

    On a cluster the HTTP proxy runs on the head only: every node of this host would
    otherwise try to bind the same port.
    """
    where = (["--address", cluster.address, "--proxy-location", "HeadOnly"] if cluster
             else ["--metrics-port", str(ports.ray_metrics)])
    return Service(
        "serve",
        [sys.executable, "-m", "llmslo.cli", "serve", "--host", "127.0.0.1", "--port", str(ports.serve),
         *where, *serve_args],
        ready_url=f"http://127.0.0.1:{ports.serve}/healthz",
        url=f"http://127.0.0.1:{ports.serve}/v1",
        env=cluster.env if cluster else {},
        ready_timeout_s=240.0,
    )


def _prometheus(binary: str, ports: Ports, run_dir: Path, *, with_alertmanager: bool,
                ray_sd_file: str | None) -> Service:
    config = prometheus_config(
        ray=None if ray_sd_file else f"127.0.0.1:{ports.ray_metrics}",
        ray_sd_file=ray_sd_file,
        prometheus=f"127.0.0.1:{ports.prometheus}",
        rule_files=[str(ROOT / "alerts" / "rules" / "*.yml")],
        alertmanager=f"127.0.0.1:{ports.alertmanager}" if with_alertmanager else None,
        locust=f"127.0.0.1:{ports.locust}",
        sd_on_loopback=True,
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


def locust_service(ports: Ports, *args: str, server_metrics_url: str | None = None) -> Service:
    """The Locust master with its web UI on loopback, aimed at the stack's server; ``args`` add flags.

    Server KPIs come from ``server_metrics_url``: by default the (head) node's metrics port,
    on a cluster Prometheus' federation of every node.
    """
    metrics = server_metrics_url or f"http://127.0.0.1:{ports.ray_metrics}/metrics"
    return Service(
        "locust",
        locust_argv("--host", f"http://127.0.0.1:{ports.serve}", "--server-dialect", "llmslo",  # our own server
                    "--web-host", "127.0.0.1", "--web-port", str(ports.locust),
                    "--server-metrics-url", metrics, *args),
        ready_url=f"http://127.0.0.1:{ports.locust}/",
        url=f"http://127.0.0.1:{ports.locust}",
    )


def default_run_dir(kind: str) -> Path:
    """reports/<kind>-<UTC time> under the current folder, like the load test's own default."""
    return (Path("reports") / f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}").resolve()
