"""TTFT and ms/token of the simulated engine at 1 and 8 concurrent streams vs its calibration.

Calibration targets (seed 001 §4.2, 2x RTX 4090): TTFT 320 +/- 15 ms for 512 prompt
tokens, 18 +/- 2 ms per output token while <= 8 sequences run; read as mean +/- sd
across requests.

Two layers are measured, so engine behaviour and serving overhead can be told apart:

- ``engine``: SimulatedEngine in this process (no HTTP, no Ray).
- ``serve``:  a real ``llmslo serve`` (Ray Serve, 1 model replica, time_scale 1.0) on
  loopback free ports, streamed with httpx (or ``--url`` of a running server).

Load: ``c`` closed-loop streams (each sends its next request when the previous one
ended), started ``request time / c`` apart so requests overlap as in a steady load
(8 requests sent in the same millisecond would queue their prefills on the one GPU,
which the seed's numbers do not describe). Each stream sends ``--rounds`` requests
after one warm-up request.

Definitions (monotonic clock, exact statistics over all samples, no buckets):
TTFT = request sent -> first token received; ms/token (TPOT) = per request, (last
token - first token) / (tokens - 1); ITL = gap between consecutive tokens of one
stream (each SSE chunk here carries one token); sd = sample standard deviation
across requests. Workload: 512 prompt tokens (verified from ``usage.prompt_tokens``),
256 output tokens (``ignore_eos``).

    .venv/bin/python benchmarks/serve_simulated_latency.py [--rounds 3] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract import timing as T  # noqa: E402
from serve import tokens  # noqa: E402
from serve.engines.base import Delta, GenerationRequest, Message  # noqa: E402
from serve.engines.simulated import SimulatedEngine  # noqa: E402
from serve.processes import free_port  # noqa: E402

PROMPT_TOKENS, OUTPUT_TOKENS = 512, 256
TARGETS = {"ttft_ms": (320, 15), "tpot_ms": (18, 2)}
REQUEST_S = 0.32 + (OUTPUT_TOKENS - 1) * 0.018  # one request at the calibration, for the start stagger
PROMPT = "abcd" * (PROMPT_TOKENS - tokens.PROMPT_OVERHEAD - tokens.MESSAGE_OVERHEAD)


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sd, median and p95 (nearest rank) of exact samples, in ms."""
    ordered = sorted(values)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values) * 1e3, "sd": sd * 1e3,
            "p50": statistics.median(values) * 1e3, "p95": p95 * 1e3}


async def engine_stream(engine: SimulatedEngine, i: int) -> tuple[float, list[float]]:
    req = GenerationRequest(f"b{i}", (Message("user", PROMPT),), PROMPT_TOKENS, OUTPUT_TOKENS, ignore_eos=True)
    t0, stamps = time.monotonic(), []
    async for item in engine.generate(req):
        if isinstance(item, Delta):
            stamps.append(time.monotonic())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


async def http_stream(client: httpx.AsyncClient, url: str, model: str,
                      overheads: list[float] | None = None) -> tuple[float, list[float]]:
    """(TTFT, gaps between content chunks) of one stream; with ``overheads``, also appends its
    serving-path TTFT overhead: client TTFT minus the engine's own (first token - replica start)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": OUTPUT_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, stamps, usage = time.monotonic(), [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.monotonic())
    assert usage and usage["prompt_tokens"] == PROMPT_TOKENS and usage["completion_tokens"] == OUTPUT_TOKENS, usage
    if overheads is not None:
        hops = usage[T.USAGE_KEY]
        overheads.append(stamps[0] - t0 - (hops[T.ENGINE_FIRST_TOKEN] - hops[T.REPLICA_STARTED]))
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


async def run_level(make_stream, concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    """``concurrency`` closed-loop streams of ``rounds`` requests each, started staggered."""
    ttft, tpot, itl = [], [], []

    async def stream(i: int) -> None:
        await asyncio.sleep(i * REQUEST_S / concurrency)
        await make_stream(-1 - i)  # warm-up, not counted
        for r in range(rounds):
            first, gaps = await make_stream(r * concurrency + i)
            ttft.append(first)
            tpot.append(statistics.fmean(gaps))
            itl.extend(gaps)

    await asyncio.gather(*[stream(i) for i in range(concurrency)])
    return {"ttft_ms": summarize(ttft), "tpot_ms": summarize(tpot), "itl_ms": summarize(itl)}


def start_server(
    replicas: int = 1, env: dict[str, str] | None = None, serve_args: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serve.cli", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
           str(free_port()), "--replicas", str(replicas), "--time-scale", "1.0", "--num-cpus", "2",
           *(serve_args or [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("llmslo serve did not become healthy")


def verdict(stats: dict[str, float], key: str) -> str:
    """Whether the mean lies within the seed's +/- and the sd is that +/- (within 30 %)."""
    target, tol = TARGETS[key]
    mean_ok = "within" if abs(stats["mean"] - target) <= tol else "OUTSIDE"
    sd_ok = "matches" if abs(stats["sd"] - tol) <= 0.3 * tol else "differs"
    return f"mean {mean_ok}, sd {sd_ok}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--url", help="a running server (default: start llmslo serve)")
    ap.add_argument("--engine-only", action="store_true", help="skip the serve layer")
    ap.add_argument("--model", default="autoglm-phone-9b")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, dict] = {"engine": {}, "serve": {}}

    engine = SimulatedEngine(args.model)
    for c in levels:
        results["engine"][c] = asyncio.run(run_level(lambda i: engine_stream(engine, i), c, args.rounds))

    serve_levels = [] if args.engine_only else levels
    proc, url = (None, args.url) if args.url or args.engine_only else start_server()
    try:
        async def serve_level(c: int):
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await run_level(lambda i: http_stream(client, url, args.model), c, args.rounds)

        for c in serve_levels:
            results["serve"][c] = asyncio.run(serve_level(c))
    finally:
        if proc:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)

    import ray

    meta = {"python": platform.python_version(), "ray": ray.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "rounds": args.rounds}
    print(f"# {meta}")
    print(f"{'layer':7} {'conc':>4} {'metric':7} {'n':>5} {'mean':>8} {'sd':>6} {'p50':>8} {'p95':>8}  target")
    for layer, by_level in results.items():
        for c, stats in by_level.items():
            for key in ("ttft_ms", "tpot_ms", "itl_ms"):
                s = stats[key]
                target = f"{TARGETS[key][0]}±{TARGETS[key][1]} ms: {verdict(s, key)}" if key in TARGETS else ""
                print(f"{layer:7} {c:>4} {key:7} {s['n']:>5} {s['mean']:8.1f} {s['sd']:6.1f} {s['p50']:8.1f}"
                      f" {s['p95']:8.1f}  {target}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
