"""Where a decode step's time goes: the synthetic GLM-4-9B's plain forward (eager and CUDA-graph
replay, one token) and a torch.profiler table of the engine's continuous-batching loop.

Usage (GPU host, repo root): python3 benchmarks/gpu_profile.py --out DIR ['{engine_options JSON}']
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_engine import one_request  # noqa: E402
from serve.engines.transformers import TransformersEngine  # noqa: E402


def timed(fn, n: int = 20) -> float:
    """Mean milliseconds of ``fn`` over ``n`` calls after 3 warm-ups (synchronised host clock)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.monotonic()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.monotonic() - t0) / n


@torch.no_grad()
def plain_forward(model: torch.nn.Module, batch: int) -> dict[str, float]:
    """One-token forward (no cache) of ``batch`` sequences: eager vs. CUDA-graph replay."""
    ids = torch.randint(0, 1000, (batch, 1), device="cuda")
    eager = timed(lambda: model(ids, use_cache=False))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(ids, use_cache=False)
    return {"batch": batch, "eager_ms": eager, "graph_ms": timed(graph.replay)}


async def profile_engine(options: dict, out: Path) -> None:
    engine = TransformersEngine("autoglm-phone-9b", **options)
    await engine.start()
    model = engine.model
    attn = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    rows = [plain_forward(model, b) for b in (1, 8)]
    model.set_attn_implementation(attn)
    print("plain forward:", json.dumps(rows), flush=True)
    await one_request(engine, "warm", 512, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        sample = await one_request(engine, "profiled", 512, 48)
    print("profiled request:", json.dumps(sample), flush=True)
    averages = prof.key_averages()
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        text = averages.table(sort_by=key, row_limit=18, max_name_column_width=60)
        print(text, flush=True)
        (out / f"profile_{key}.txt").write_text(text)
    await engine.shutdown()


def main() -> int:
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    rest = [a for a in sys.argv[1:] if a not in ("--out", str(out))]
    asyncio.run(profile_engine(json.loads(rest[0]) if rest else {}, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
