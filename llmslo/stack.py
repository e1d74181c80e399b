"""``llmslo up``: the compose stack as local processes on loopback, no Docker.

Which services run is :mod:`llmslo.catalogue`; starting, watching and stopping
them (every descendant, Ray's included) is :mod:`llmslo.supervisor`. Ctrl-C or
SIGTERM stops them all in reverse order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from llmslo.catalogue import Ports, default_run_dir, plan
from llmslo.supervisor import Stack, StackError, stop_on_sigterm


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
    parser.add_argument("--nodes", type=int, default=1,
                        help="Ray nodes on this host (default 1: `llmslo serve` runs its own Ray); 2 or more: "
                             "a `ray start` head and workers, every node scraped through Ray's service discovery")
    parser.add_argument("--node-cpus", type=float, help="with --nodes: CPUs each Ray node offers (default: all)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run_dir = args.run_dir or default_run_dir("up")
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports.free() if args.free_ports else Ports()
    the_plan = plan(ports, run_dir, serve_args=args.serve_arg, grafana_password=os.environ.get("GF_ADMIN_PASSWORD"),
                    nodes=args.nodes, node_cpus=args.node_cpus)
    for line in the_plan.missing:
        print(f"llmslo up: {line}", flush=True)
    stop_on_sigterm()
    stack = Stack(the_plan.services, run_dir)
    try:
        with stack:
            print(f"llmslo up: running (logs in {run_dir / 'logs'}); Ctrl-C stops everything", flush=True)
            for service in stack.services:
                print(f"  {service.name:<13} {service.url}", flush=True)
            reported: set[str] = set()
            while (dead := stack.watch()) is None:
                for node in stack.lost():
                    if node.name not in reported:
                        reported.add(node.name)
                        print(f"llmslo up: {node.name} exited with {node.proc.returncode}; the cluster goes on "
                              f"without it\n{stack.tail(node)}", file=sys.stderr, flush=True)
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
