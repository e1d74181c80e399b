"""Benchmark the transformers engine directly on a GPU host (no HTTP, no Ray): the seed's shape.

For each engine variant (engine_options overrides) and each concurrency level it runs a closed
loop: ``c`` workers, each sending ``rounds`` requests back to back (the first wave arrives
together), every request ``--input-tokens`` prompt tokens and exactly ``--output-tokens``
completion tokens (synthetic weights have no end token). Times are ``time.monotonic()`` in the
engine's own process.

Definitions (per request; percentiles are exact, numpy's linear interpolation over all samples):
- TTFT: from calling ``engine.generate()`` to receiving the first Delta.
- decode tokens/s: (completion tokens − tokens in the first Delta) / (last Delta time − first Delta time).
- ms/token: 1000 / decode tokens/s.
- aggregate tokens/s (per level): all completion tokens / wall time of the level.
- GPU memory: ``torch.cuda.mem_get_info`` used bytes per GPU (whole device, CUDA context included)
  after the level, and the PyTorch allocator's peak ``max_memory_allocated``.

Usage (on the GPU host, from the repo root, labelled "synthetic weights" unless --model-path):
    python3 benchmarks/gpu_engine.py --out $OUT/engine --concurrency 1 8 \
        --variant graphs='{}' --variant graphs-async='{"async_batching": true}'
Results: <out>/engine_results.json (every sample) and a table on stdout / engine_results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve.engines.base import Delta, Finish, GenerationRequest, Message  # noqa: E402
from serve.engines.transformers import TransformersEngine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="engine_options overrides for one variant (repeatable); default: one variant {}")
    p.add_argument("--base", default="{}", help="engine_options shared by all variants (JSON)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=2, help="requests per worker per level (>=2 gives staggered arrivals)")
    p.add_argument("--input-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--model-id", default="autoglm-phone-9b")
    p.add_argument("--full-levels", type=int, nargs="*", default=[],
                   help="afterwards, rerun the variant with the best decode p10 at the last level at these levels")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def one_request(engine: TransformersEngine, rid: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    req = GenerationRequest(
        request_id=rid,
        messages=(Message(role="user", text="open the settings app and turn on dark mode"),),
        prompt_tokens=input_tokens,
        max_tokens=output_tokens,
        ignore_eos=True,
    )
    t0 = time.monotonic()
    first = last = None
    first_tokens = 0
    finish: Finish | None = None
    async for item in engine.generate(req):
        now = time.monotonic()
        if isinstance(item, Delta):
            if first is None:
                first, first_tokens = now, item.tokens
            last = now
        else:
            finish = item
    assert finish is not None and first is not None and last is not None
    decode_tokens = finish.completion_tokens - first_tokens
    span = last - first
    return {
        "ttft_s": first - t0,
        "e2e_s": last - t0,
        "completion_tokens": finish.completion_tokens,
        "prompt_tokens": finish.prompt_tokens,
        "decode_tokens_per_s": decode_tokens / span if span > 0 and decode_tokens > 0 else None,
    }


async def run_level(engine: TransformersEngine, concurrency: int, rounds: int, args: argparse.Namespace,
                    tag: str) -> dict[str, Any]:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)

    async def worker(w: int) -> list[dict[str, Any]]:
        return [await one_request(engine, f"{tag}-c{concurrency}-w{w}-r{r}", args.input_tokens, args.output_tokens)
                for r in range(rounds)]

    t0 = time.monotonic()
    samples = [s for group in await asyncio.gather(*(worker(w) for w in range(concurrency))) for s in group]
    wall = time.monotonic() - t0
    ttft = [s["ttft_s"] for s in samples]
    tps = [s["decode_tokens_per_s"] for s in samples if s["decode_tokens_per_s"]]
    mem = [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "wall_s": wall,
        "ttft_ms_p50": 1000 * percentile(ttft, 50),
        "ttft_ms_p95": 1000 * percentile(ttft, 95),
        "ttft_ms_mean": 1000 * float(np.mean(ttft)),
        "ttft_ms_sd": 1000 * float(np.std(ttft)),
        "decode_tps_p10": percentile(tps, 10),
        "decode_tps_p50": percentile(tps, 50),
        "ms_per_token_mean": float(np.mean([1000 / t for t in tps])) if tps else None,
        "ms_per_token_sd": float(np.std([1000 / t for t in tps])) if tps else None,
        "aggregate_tps": sum(s["completion_tokens"] for s in samples) / wall,
        "gpu_mem_used_gib": [(total - free) / 2**30 for free, total in mem],
        "torch_peak_alloc_gib": [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(len(mem))],
        "samples": samples,
    }


async def run_variant(name: str, options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    engine = TransformersEngine(args.model_id, **options)
    t0 = time.monotonic()
    await engine.start()
    result: dict[str, Any] = {"variant": name, "options": options, "start_s": time.monotonic() - t0,
                              "synthetic_weights": engine.synthetic_weights, "levels": []}
    try:
        await one_request(engine, f"{name}-warm", args.input_tokens, 16)  # first-request costs out of the numbers
        for c in args.concurrency:
            rounds = max(args.rounds, 3) if c == 1 else args.rounds
            level = await run_level(engine, c, rounds, args, name)
            result["levels"].append(level)
            print(f"  {name} c={c}: TTFT p50 {level['ttft_ms_p50']:.0f} ms p95 {level['ttft_ms_p95']:.0f} ms, "
                  f"decode p10 {level['decode_tps_p10']:.1f} tok/s p50 {level['decode_tps_p50']:.1f}, "
                  f"aggregate {level['aggregate_tps']:.0f} tok/s, mem {level['gpu_mem_used_gib']}", flush=True)
    finally:
        result["kv"] = engine.stats().extra
        await engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return result


def environment() -> dict[str, Any]:
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
    }


def table(results: list[dict[str, Any]], weights: str) -> str:
    lines = [
        f"| variant ({weights}) | conc | TTFT p50 ms | TTFT p95 ms | decode tok/s p10 | p50 | ms/token mean | aggregate tok/s | GPU mem used GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            error = r["error"][:80].replace("\n", " ")
            lines.append(f"| {r['variant']} | error: {error} | | | | | | | |")
        for lv in r.get("levels", []):
            mem = " + ".join(f"{m:.1f}" for m in lv["gpu_mem_used_gib"])
            lines.append(
                f"| {r['variant']} | {lv['concurrency']} | {lv['ttft_ms_p50']:.0f} | {lv['ttft_ms_p95']:.0f} | "
                f"{lv['decode_tps_p10']:.1f} | {lv['decode_tps_p50']:.1f} | {lv['ms_per_token_mean']:.1f} | "
                f"{lv['aggregate_tps']:.0f} | {mem} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = json.loads(args.base)
    variants = [v.split("=", 1) for v in args.variant] or [["default", "{}"]]
    env = environment()
    print(json.dumps(env), flush=True)
    weights = "real weights" if base.get("model_path") else "synthetic weights"
    results: list[dict[str, Any]] = []
    for name, overrides in variants:
        results.append(measure(name, {**base, **json.loads(overrides)}, args, env, results, weights))
    best = max((r for r in results if r.get("levels")), default=None,
               key=lambda r: r["levels"][-1]["decode_tps_p10"] or 0)
    if args.full_levels and best is not None:
        args.concurrency = args.full_levels
        results.append(measure(f"{best['variant']}-full", best["options"], args, env, results, weights))
    print(table(results, weights))
    return 0


def measure(name: str, options: dict[str, Any], args: argparse.Namespace, env: dict[str, Any],
            done: list[dict[str, Any]], weights: str) -> dict[str, Any]:
    """One variant, its result saved with the earlier ones at once (a killed run keeps what it measured)."""
    print(f"variant {name}: {options}", flush=True)
    try:
        result = asyncio.run(run_variant(name, options, args))
    except Exception as exc:  # one broken variant must not lose the others' numbers
        traceback.print_exc()
        result = {"variant": name, "options": options, "error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
        torch.cuda.empty_cache()
    everything = [*done, result]
    (args.out / "engine_results.json").write_text(json.dumps({"env": env, "results": everything}, indent=1))
    (args.out / "engine_results.md").write_text(table(everything, weights) + "\n")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
