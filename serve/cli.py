"""``llmslo serve``: start a local Ray and deploy serve/config.yaml, then wait.

The same config file ``serve run`` uses; flags override its ``http_options`` and
``applications[0].args``, and its ``runtime_env.env_vars`` become defaults of this
process's environment (so every Ray process, not only the replicas, sees them).
Ray's metrics export port (Prometheus scrapes it) is fixed here (default 8080)
because a plain ``ray.init`` picks a random one. With ``--address`` it joins a running
Ray cluster instead (``ray start``: one node or many, each exporting its own metrics)
and only deploys.

Refuses to start (exit 2) when the HTTP or metrics port is already taken: Serve's
proxy would retry its bind in the background while the old listener answered
``/healthz`` for it. Stops on Ctrl-C or SIGTERM (Serve, then Ray) and returns only
once every process Ray started here has exited, so the ports are free again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmslo serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: %(default)s)")
    p.add_argument("--host", help="HTTP bind address (config: http_options.host)")
    p.add_argument("--port", type=int, help="HTTP port (config: http_options.port, 8000)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray metrics export port (default: %(default)s)")
    p.add_argument("--metrics-interval-ms", type=int, help="how often Ray reports metrics (Ray default 10000)")
    p.add_argument("--engine", help="simulated | upstream | transformers")
    p.add_argument("--replicas", type=int, help="fixed number of model replicas (default: autoscaling)")
    p.add_argument("--gpus-per-replica", type=int, help="GPUs reserved per model replica (one model copy)")
    p.add_argument("--time-scale", type=float, help="simulated engine: multiply every latency")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra engine_options entry, value parsed as JSON (repeatable)")
    p.add_argument("--admin-token", help="enable /admin/faults with this bearer token")
    p.add_argument("--model-id", help="served model id (default: slo.yaml service.model)")
    p.add_argument("--num-cpus", type=float, help="CPUs Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs Ray may use (default: all it detects)")
    p.add_argument("--temp-dir", help="Ray's temp dir (default /tmp/ray): holds prom_metrics_service_discovery.json")
    p.add_argument("--dashboard-port", type=int,
                   help="start Ray's dashboard on 127.0.0.1:PORT; it writes the Prometheus service-discovery file")
    p.add_argument("--address", help="join this running Ray cluster (HOST:GCS_PORT) instead of starting one")
    p.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"],
                   help="where Serve runs HTTP proxies (config: proxy_location); HeadOnly when nodes share one host")
    p.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                   help="what answers on the HTTP port: Ray Serve's Python proxy (default) or HAProxy relaying "
                        "to the ingress replicas' own HTTP servers (half the serving CPU per token; "
                        "docs/serve.md#haproxy-ingress)")
    p.add_argument("--colocate", action="store_true",
                   help="each model replica answers HTTP itself, no separate ingress replica (with --ingress haproxy "
                        "a quarter of the default's serving CPU per token; "
                        "docs/serve.md#colocated-replicas-llmslo-serve---colocate-opt-in)")
    p.add_argument("--stop-grace-s", type=float, default=30.0,
                   help="on stop, how long Ray's processes may take to exit before they are killed")
    return p.parse_args(argv)


def app_config(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(http_options, application entry, args) from the file with flags applied."""
    config = yaml.safe_load(ns.config.read_text(encoding="utf-8"))
    http = dict(config.get("http_options") or {})
    http.setdefault("port", 8000)
    if ns.host:
        http["host"] = ns.host
    if ns.port is not None:
        http["port"] = ns.port
    entry = config["applications"][0]
    args = dict(entry.get("args") or {})
    options = dict(args.get("engine_options") or {})
    if ns.engine:
        args["engine"] = ns.engine
        if ns.engine != (entry.get("args") or {}).get("engine"):
            options = {}
    if ns.time_scale is not None:
        options["time_scale"] = ns.time_scale
    for item in ns.engine_option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    args["engine_options"] = options
    if ns.replicas is not None:
        args["num_replicas"] = ns.replicas
    if ns.gpus_per_replica is not None:
        args["gpus_per_replica"] = ns.gpus_per_replica
    if ns.admin_token:
        args["admin_token"] = ns.admin_token
    if ns.model_id:
        args["model_id"] = ns.model_id
    if ns.colocate:
        args["colocated"] = True
    return http, entry, args


def config_proxy_location(ns: argparse.Namespace) -> str | None:
    """The config file's ``proxy_location`` (None: Serve's default)."""
    return yaml.safe_load(ns.config.read_text(encoding="utf-8")).get("proxy_location")


def export_env_vars(entry: dict[str, Any], environ: MutableMapping[str, str]) -> None:
    """The application's ``runtime_env.env_vars`` as defaults of ``environ`` (values already set win).

    Ray reads its Serve settings at import in each process; exported before Ray starts,
    they reach the HTTP proxy and the controller too, not only the replicas."""
    for key, value in ((entry.get("runtime_env") or {}).get("env_vars") or {}).items():
        environ.setdefault(key, str(value))


HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_env(environ: MutableMapping[str, str]) -> Path | None:
    """This server's own HAProxy files (a new temp dir, returned for removal at stop) and ports,
    when Serve's HAProxy ingress is on (values already set win); None when it is off.

    Ray's defaults are one fixed set per host (``/tmp/haproxy-serve/`` for the config, admin
    socket and server state; ports 9101 for HAProxy's metrics and 8404 for its stats page,
    both bound on every interface): a second server on the same host (a test next to another,
    a demo next to a stack) would overwrite the first one's config or fail to bind."""
    from serve.processes import free_port

    if environ.get(HAPROXY_FLAG) != "1":
        return None
    run_dir = Path(tempfile.mkdtemp(prefix="llmslo-serve-"))
    for key, value in {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": run_dir / "haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": run_dir / "admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": run_dir / "server-state",
        "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
        "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
        # Ray's proxy stays on as HAProxy's fallback, on fixed ports by default (8500, 9500)
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": free_port(),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": free_port(),
    }.items():
        environ.setdefault(key, str(value))
    return run_dir


def taken_ports(http: dict[str, Any], metrics_port: int | None) -> list[str]:
    """``host:port`` of every port this server would listen on that something already holds."""
    from serve.processes import port_taken

    host = http.get("host", "0.0.0.0")
    ports = [http["port"]] if metrics_port is None else [http["port"], metrics_port]
    return [f"{host}:{port}" for port in ports if port_taken(host, port)]


def start_ray(ns: argparse.Namespace) -> None:
    """Join ``--address``, or start a local Ray with a fixed metrics port."""
    import ray

    if ns.address:
        ray.init(address=ns.address, log_to_driver=True)
        return
    system_config = {"metrics_report_interval_ms": ns.metrics_interval_ms} if ns.metrics_interval_ms else None
    ray.init(
        address="local",
        num_cpus=ns.num_cpus,
        num_gpus=ns.num_gpus,
        include_dashboard=ns.dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=ns.dashboard_port,
        _temp_dir=ns.temp_dir,
        _metrics_export_port=ns.metrics_port,
        _system_config=system_config,
        log_to_driver=True,
    )


def stop_ray(grace_s: float) -> None:
    """Shut Serve and Ray down and wait until every process Ray started from here is gone.

    ``ray.shutdown`` returns while the raylet's workers (the HTTP proxy among them)
    are still exiting; waiting for them means the caller may reuse the ports at once.
    """
    import ray
    from ray import serve

    from serve.processes import descendants, reap

    ray_procs = descendants(os.getpid())
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        killed = reap(ray_procs, grace_s)
        print(json.dumps({"event": "ray_stopped", "processes": len(ray_procs), "killed": killed}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    http, entry, args = app_config(ns)
    if taken := taken_ports(http, None if ns.address else ns.metrics_port):
        print(f"llmslo serve: port already in use: {', '.join(taken)} (is another server still stopping?)",
              file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ns.ingress == "haproxy":
        os.environ[HAPROXY_FLAG] = "1"
    export_env_vars(entry, os.environ)
    run_dir = haproxy_env(os.environ)
    from ray import serve

    from serve.app import build_app

    app = build_app(args)  # validate before starting Ray
    start_ray(ns)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=ns.proxy_location or config_proxy_location(ns),
                    http_options={"host": http.get("host", "0.0.0.0"), "port": http["port"]})
        serve.run(app, name=entry.get("name", "llmslo"), route_prefix=entry.get("route_prefix", "/"))
        host = http.get("host", "0.0.0.0")
        metrics_url = None if ns.address else f"http://{host}:{ns.metrics_port}/metrics"
        print(json.dumps({"event": "serve_ready", "url": f"http://{host}:{http['port']}",
                          "metrics_url": metrics_url}), flush=True)
        stop.wait()
    finally:
        stop_ray(ns.stop_grace_s)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
