"""CPU time the serving path spends per streamed token, by process, under a Ray setting.

Why: on a small host the demo's decode speed at 8 streams is bounded by the Python
serving path (HTTP proxy -> ingress -> model replica), not by the simulated model.
This measures that cost directly, so a change to the path (or to Ray's settings,
``--env RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) can be judged by a number.

Method: start ``llmslo serve`` (simulated engine, ``time_scale`` 1.0, ``--replicas``),
warm up, read the CPU times (user + system, psutil) of every process of the server's
tree, stream ``--rounds`` x ``--streams`` requests of 512 prompt / 256 output tokens
(tokens from ``usage``), read the CPU times again. CPU per token = CPU seconds spent
during the streams / completion tokens. Processes are grouped by their title
(Ray names workers ``ray::ServeReplica:<app>:<deployment>``, ``ray::ProxyActor``).
Second reading, which nothing in the tree can hide from: the whole machine's busy CPU
(every CPU's time minus idle and iowait) during the streams, minus this client's own.

    .venv/bin/python benchmarks/serve_cpu_per_token.py [--streams 8] [--rounds 2] [--replicas 2]
        [--serve-arg=--ingress=haproxy] [--serve-arg=--colocate] [--env RAY_SERVE_THROUGHPUT_OPTIMIZED=0]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_simulated_latency import OUTPUT_TOKENS, http_stream, start_server  # noqa: E402


def process_group(proc: psutil.Process) -> str:
    """A stable name for a server process: Ray's worker title, else the executable."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "gone"
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split()[0].rsplit(".", 1)[0]
    return Path(title).name if not title.endswith("python") else " ".join(Path(c).name for c in cmd[:3])


def cpu_by_group(root: psutil.Process) -> dict[str, float]:
    """user + system CPU seconds of the root and every descendant, summed by group."""
    out: dict[str, float] = defaultdict(float)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[process_group(proc)] += t.user + t.system
        except psutil.Error:
            continue
    return dict(out)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every state but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def client_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


async def stream_rounds(url: str, model: str, streams: int, rounds: int, overheads: list[float]) -> int:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        for _ in range(rounds):
            await asyncio.gather(*[http_stream(client, url, model, overheads) for _ in range(streams)])
    return streams * rounds * OUTPUT_TOKENS  # http_stream asserted usage == OUTPUT_TOKENS for each


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the server")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra llmslo serve argument, e.g. --serve-arg=--colocate --serve-arg=--ingress=haproxy")
    ap.add_argument("--model", default="autoglm-phone-9b")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    proc, url = start_server(args.replicas, env, args.serve_arg)
    try:
        root = psutil.Process(proc.pid)
        overheads: list[float] = []
        asyncio.run(stream_rounds(url, args.model, 1, 1, []))  # warm-up
        before, t0 = cpu_by_group(root), time.monotonic()
        busy0, client0 = machine_busy_s(), client_cpu_s()
        tokens = asyncio.run(stream_rounds(url, args.model, args.streams, args.rounds, overheads))
        busy, client = machine_busy_s() - busy0, client_cpu_s() - client0
        after, wall = cpu_by_group(root), time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    spent = {g: after.get(g, 0.0) - before.get(g, 0.0) for g in after}
    rows = sorted(((g, s) for g, s in spent.items() if s > 0.005), key=lambda r: -r[1])
    total = sum(s for _, s in rows)
    import ray

    meta = {"python": platform.python_version(), "ray": ray.__version__, "cpus": psutil.cpu_count(),
            "env": env, "serve_args": args.serve_arg, "streams": args.streams, "rounds": args.rounds, "replicas": args.replicas,
            "tokens": tokens, "wall_s": round(wall, 2)}
    print(f"# {meta}")
    print(f"{'process':44} {'cpu s':>7} {'ms/token':>9}")
    for group, seconds in rows:
        print(f"{group:44} {seconds:7.2f} {seconds / tokens * 1e3:9.3f}")
    print(f"{'total':44} {total:7.2f} {total / tokens * 1e3:9.3f}   ({total / wall * 100:.0f} % of one CPU)")
    machine = busy - client
    print(f"{'whole machine busy minus this client':44} {machine:7.2f} {machine / tokens * 1e3:9.3f}"
          f"   (client {client:.2f} s)")
    cuts = statistics.quantiles(overheads, n=20, method="inclusive")
    overhead = {"p50_ms": statistics.median(overheads) * 1e3, "p95_ms": cuts[18] * 1e3, "n": len(overheads)}
    print(f"serving-path TTFT overhead (client TTFT - engine TTFT): p50 {overhead['p50_ms']:.1f} ms, "
          f"p95 {overhead['p95_ms']:.1f} ms over {len(overheads)} streams")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "cpu_s": dict(rows), "ms_per_token": total / tokens * 1e3,
                                         "machine_minus_client_ms_per_token": machine / tokens * 1e3,
                                         "ttft_overhead": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
