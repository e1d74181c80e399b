"""How exact is the load generator? Client stamps vs a ground-truth server's emit times.

The truth server (loadtest/_truth_server.py) runs pinned to one CPU core and
logs the CLOCK_MONOTONIC time of every token write; one Locust process (one
"worker"; with ``--processes P``, P of them on P cores) runs pinned to another
core with N concurrent closed-loop streams, started in one of two patterns:

- staggered: users spawned over ~2 s (``-r N/2``), so the streams' token
  writes spread over each inter-token gap;
- lockstep: every user spawned at once (``-r N``); with a deterministic server
  and fixed reply lengths the streams then stay in step, so every gap hundreds
  of chunks arrive in the same millisecond (a fleet of synchronized clients).

Per pattern and level N it reports:

- TTFT error = client-stamped arrival of the first token - server write time of
  it (the request's start is the same client clock reading on both sides);
- ITL error = client gap between consecutive token chunks - server gap;
- achieved vs target concurrency (time-average requests in flight at the level);
- generator CPU-seconds per 1,000 streamed chunks (the process's user+system
  CPU over the run, from its self-check);
- the self-check's stamping delay p99 bound and loop lag p99, the share of
  tokens (and of first tokens) read late together with the next one, and
  whether it marked the run invalid.

Not a test: run by hand, write the table into docs/benchmarks.md.

    .venv/bin/python benchmarks/loadgen_accuracy.py --streams 1 64 256 1024 --duration 20 \
        --patterns staggered lockstep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve.processes import free_port  # noqa: E402
from loadtest._headless import locust_command  # noqa: E402
from loadtest._truth_server import fetch_truth, running, self_signed_cert  # noqa: E402


SPAWN_SECONDS = {"staggered": 2.0, "lockstep": 0.0}  # how long spawning all users takes


def one_level(streams: int, pattern: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run one level in one arrival pattern; return the row of the results table."""
    report = workdir / f"{pattern}-n{streams}"
    server_flags = ("--ttft", str(args.ttft), "--itl", str(args.itl), "--cpu", str(args.server_cpu),
                    *(["--headers-with-first-token"] if args.headers_with_first_token else []),
                    *(_tls_flags(workdir) if args.tls else []))
    with running(free_port(), *server_flags) as url:
        cmd = locust_command(url, report, streams, f"{args.duration}s", "--mix", "text=1", "--short-share", "0",
                             "--input-tokens", "32", "--output-tokens", str(args.tokens),
                             "--stall-timeout", "60", "--request-timeout", "300")
        env = dict(os.environ)
        if args.stall_ms:  # the adversarial run: one stall of the generator over the first-token burst
            cmd[cmd.index("-f") + 1] += f",{REPO / 'benchmarks' / 'stall_once.py'}"
            env.update(LLMSLO_STALL_MS=str(args.stall_ms), LLMSLO_STALL_AT_S=str(args.stall_at))
        if args.processes > 1:  # Locust's own: a master and N worker processes, forked, on the client cores
            cmd += ["--processes", str(args.processes)]
        spawn_s = SPAWN_SECONDS[pattern]
        # Locust spawns floor(rate) users per 1 s tick: -r N starts them all in one tick
        cmd[cmd.index("-r") + 1] = str(max(1, round(streams / spawn_s)) if spawn_s else streams)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 240, env=env,
                              preexec_fn=lambda: os.sched_setaffinity(0, _client_cpus(args)))
        truth = fetch_truth(url)
        floor = _floor(url, streams, args) if args.floor else None
    summary = json.loads((report / "summary.json").read_text())
    records = [json.loads(line) for line in (report / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["ok"] and r["id"] in truth and r["level"] == streams]
    ttft_err, itl_err, chunks = [], [], 0
    for r in ok:
        t = truth[r["id"]]
        ttft_err.append(r["start_mono"] + r["ttft_s"] - t["emits"][0])
        server_gaps = np.diff(t["emits"])
        if len(server_gaps) == len(r["itl_s"]):
            itl_err.extend(np.asarray(r["itl_s"]) - server_gaps)
    for r in records:
        chunks += r["content_deltas"] + r["reasoning_deltas"]
    level = next((row for row in summary["levels"] if row["level"] == streams), {})
    workers = list(summary["validity"]["workers"].values())
    worst = lambda key: max((w.get(key) or 0.0 for w in workers), default=0.0)  # noqa: E731  the worst process
    ms = lambda a, q: float(np.percentile(np.abs(a), q) * 1000) if len(a) else float("nan")  # noqa: E731
    return {
        "pattern": pattern,
        "streams": streams,
        "requests": len(ok),
        "ttft_err_p50_ms": ms(ttft_err, 50),
        "ttft_err_p99_ms": ms(ttft_err, 99),
        "itl_err_p50_ms": ms(itl_err, 50),
        "itl_err_p99_ms": ms(itl_err, 99),
        "achieved_concurrency": level.get("achieved_concurrency"),
        "processes": len(workers),
        "cpu_s_per_1000_chunks": sum(w.get("cpu_seconds", 0.0) for w in workers) / chunks * 1000 if chunks else float("nan"),
        "generator_cpu_p90": worst("cpu_percent_p90"),
        "loop_lag_p99_ms": worst("loop_lag_p99_s") * 1000,
        "stamp_delay_p99_ms": (worst("stamp_delay_p99_s") or float("nan")) * 1000,
        "coalesced_share": worst("coalesced_share"),
        "late_shared_share": worst("late_shared_share"),
        "late_shared_first_share": worst("late_shared_first_share"),
        "invalid": not summary["validity"]["valid"],
        "invalid_because": summary["validity"]["reasons"],
        "failed": summary["requests"]["failed"],
        "locust_exit": proc.returncode,
        "floor_cpu_s_per_1000_chunks": floor,
    }


def _floor(url: str, streams: int, args: argparse.Namespace) -> float:
    """CPU-s per 1000 chunks of a bare asyncio reader (benchmarks/raw_floor.py): same server, streams, core."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "raw_floor.py"), "--url", url, "--streams", str(streams),
           "--duration", str(args.duration), "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=args.duration + 120,
                         preexec_fn=lambda: os.sched_setaffinity(0, {args.client_cpu}))
    return json.loads(out.stdout)["cpu_s_per_1000_chunks"]


def _client_cpus(args: argparse.Namespace) -> set[int]:
    """The generator's cores: --client-cpu, and with --processes N the N-1 cores after it for the other workers."""
    return {args.client_cpu + i for i in range(args.processes)}


def _tls_flags(workdir: Path) -> list[str]:
    """The truth server's flags for HTTPS with a certificate made here (Debian's openssl)."""
    cert, key = self_signed_cert(workdir)
    return ["--tls-cert", str(cert), "--tls-key", str(key)]


def markdown(rows: list[dict]) -> str:
    head = ("| pattern | streams | requests | \\|TTFT err\\| p50 / p99 (ms) | \\|ITL err\\| p50 / p99 (ms) "
            "| achieved concurrency | CPU-s per 1000 chunks | generator CPU p90 | stamping delay p99 ≤ (ms) "
            "| tokens sharing a read | tokens (first tokens) sharing a late read | loop lag p99 (ms) | run invalid | failed |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        achieved = f"{r['achieved_concurrency']:.1f}" if r["achieved_concurrency"] is not None else "n/a"
        lines.append(
            f"| {r['pattern']} | {r['streams']}{_processes_cell(r)} | {r['requests']} | {r['ttft_err_p50_ms']:.2f} / {r['ttft_err_p99_ms']:.2f} "
            f"| {r['itl_err_p50_ms']:.2f} / {r['itl_err_p99_ms']:.2f} | {achieved} of {r['streams']} "
            f"| {r['cpu_s_per_1000_chunks']:.3f}{_floor_cell(r)} | {r['generator_cpu_p90'] or 0:.0f} % | {r['stamp_delay_p99_ms']:.1f} "
            f"| {(r['coalesced_share'] or 0):.2%} "
            f"| {(r['late_shared_share'] or 0):.2%} ({(r['late_shared_first_share'] or 0):.2%}) | {r['loop_lag_p99_ms']:.1f} "
            f"| {'yes' if r['invalid'] else 'no'} | {r['failed']} |"
        )
    return "\n".join(lines)


def _processes_cell(row: dict) -> str:
    return f" ({row['processes']} processes)" if row.get("processes", 1) > 1 else ""


def _floor_cell(row: dict) -> str:
    floor = row.get("floor_cpu_s_per_1000_chunks")
    return "" if floor is None else f" (floor {floor:.3f}: {row['cpu_s_per_1000_chunks'] / floor:.2f}x)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256, 1024])
    p.add_argument("--patterns", nargs="+", choices=sorted(SPAWN_SECONDS), default=["staggered", "lockstep"])
    p.add_argument("--duration", type=int, default=20, help="seconds per level")
    p.add_argument("--ttft", type=float, default=0.32, help="server TTFT (seed: 2x RTX 4090, 320 ms)")
    p.add_argument("--itl", type=float, default=0.018, help="server inter-token gap (seed: 18 ms/token)")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--headers-with-first-token", action="store_true",
                   help="the server holds its response headers until the first token (as llmslo's ingress does)")
    p.add_argument("--tls", action="store_true", help="the truth server speaks HTTPS (self-signed, made with openssl)")
    p.add_argument("--stall-ms", type=float, default=0.0,
                   help="block the generator once for this long (benchmarks/stall_once.py), --stall-at s after "
                        "the test's start (aimed at the first-token burst: the self-check must see it)")
    p.add_argument("--stall-at", type=float, default=0.36)
    p.add_argument("--floor", action="store_true",
                   help="also run a bare asyncio reader (benchmarks/raw_floor.py) on the same server and core: "
                        "this machine's CPU floor per chunk, to read the generator's against")
    p.add_argument("--processes", type=int, default=1,
                   help="generator processes (Locust's --processes: a master and N workers) on N cores from --client-cpu; "
                        "CPU per chunk is their sum, the other columns the worst process")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--keep", type=Path, help="keep each level's report folder (requests.jsonl, summary.json) here")
    args = p.parse_args()
    if args.floor and args.tls:
        p.error("--floor reads plain HTTP only (benchmarks/raw_floor.py): leave out --tls")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for pattern in args.patterns:
            for n in args.streams:
                rows.append(one_level(n, pattern, args, args.keep or Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
