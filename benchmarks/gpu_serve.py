"""The full path on one GPU host: ``llmslo serve`` with the transformers engine + the project's load test.

Everything runs on the host (no network there): a local Ray Serve app with one model replica over
``--gpus`` GPUs (synthetic GLM-4-9B weights unless ``--engine-options`` names a ``model_path``), then
``locust -f loadtest/`` headless with the seed's shape (text only, 512 in / 256 out, fixed length),
closed loop, server KPIs from Ray's metrics port. Both arrival patterns run against the same server,
one after the other: ``--fixed USERS:SECONDS`` (all users started together) and ``--ramp
LEVELS:SECONDS`` (a step ramp). Each load test's report folder (summary.json, requests.jsonl,
report.html, platform.json for ``llmslo compare``) lands in ``OUT/fixed`` / ``OUT/ramp``; the
server log in ``OUT/serve.log``.

Usage: python3 benchmarks/gpu_serve.py --out DIR [--gpus 1] [--fixed 8:90] [--ramp 1,2,4,8,16:30]
           [--engine-options '{"kv_cache_gib": 4}'] [--platform-label "1×H200 (synthetic weights)"]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadtest._headless import locust_argv  # noqa: E402  (the one Locust command builder)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the one model replica")
    p.add_argument("--fixed", default="", metavar="USERS:SECONDS", help="closed loop, all users started together")
    p.add_argument("--ramp", default="", metavar="LEVELS:SECONDS", help="step ramp, e.g. 1,2,4,8,16:30")
    # The load test sizes prompts in serve/tokens.py's tokens (4 characters each); the chat wrapping adds ~7,
    # and the synthetic engine runs exactly the counted tokens: 512 -> ~519 prompt tokens on the GPU.
    p.add_argument("--input-tokens", type=int, default=512)
    p.add_argument("--no-server-metrics", action="store_true",
                   help="do not scrape Ray's metrics port (server KPIs then NOT MEASURED)")
    p.add_argument("--engine-options", default="{}", help="engine_options JSON (TransformersEngineConfig fields)")
    p.add_argument("--platform-label", default="")
    p.add_argument("--ready-timeout", type=float, default=420)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8080)
    return p.parse_args()


def write_config(args: argparse.Namespace) -> Path:
    """serve/config.yaml with the transformers engine, one fixed replica on ``--gpus`` GPUs."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app_args = config["applications"][0]["args"]
    app_args.update(engine="transformers", engine_options=json.loads(args.engine_options),
                    gpus_per_replica=args.gpus, num_replicas=1, cpus_per_replica=1.0)
    app_args.pop("min_replicas", None)
    app_args.pop("max_replicas", None)
    path = args.out / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> float:
    """Seconds until /healthz answers 200 (the model replica is up); raises if the server died."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"/healthz not ready after {timeout} s")


def headline(summary_file: Path) -> dict[str, float | None]:
    """The numbers the GPU note quotes, read from the load test's own summary (its definitions)."""
    s = json.loads(summary_file.read_text())
    m = {k: v.get("all", {}) for k, v in s["metrics"].items()}
    records = [json.loads(line) for line in (summary_file.parent / "requests.jsonl").open()]
    prompts = [r["prompt_tokens"] for r in records if r.get("prompt_tokens")]
    ttfts = [r["ttft_s"] for r in sorted(records, key=lambda r: r["start_wall"]) if r.get("ttft_s") is not None]
    return {
        "requests": s["requests"]["total"], "failed": s["requests"]["failed"],
        "ttft_p50_s": m.get("ttft_seconds", {}).get("p50"), "ttft_p95_s": m.get("ttft_seconds", {}).get("p95"),
        "decode_tps_p10": m.get("decode_tokens_per_second", {}).get("p10"),
        "decode_tps_p50": m.get("decode_tokens_per_second", {}).get("p50"),
        "ttft_max_s": max(ttfts, default=None), "ttft_first_s": ttfts[0] if ttfts else None,
        "prompt_tokens_mean": sum(prompts) / len(prompts) if prompts else None,
        "levels": [{"users": lv["level"], "requests": lv["requests"], **lv["kpis"],
                    "output_tokens_per_s": lv["output_tokens_per_s"]} for lv in s["levels"]],
    }


def run_load(args: argparse.Namespace, name: str, spec: str, url: str, env: dict[str, str]) -> None:
    """One load test against the running server; its report folder is OUT/<name>."""
    users, seconds = spec.split(":")
    report = args.out / name
    cmd = locust_argv("--headless", "--host", url, "--only-summary", "--report-dir", str(report), "--mix", "text=1",
                      "--thinking-share", "0", "--short-share", "0", "--input-tokens", str(args.input_tokens),
                      "--output-tokens", "256", "--server-dialect", "llmslo")
    if name == "fixed":
        cmd += ["-u", users, "-r", users, "-t", f"{seconds}s"]
    else:  # every level is measured (the seed's table has them all), not only up to the first failing one
        levels = users.split(",")
        # no -t: the shape ends the ramp after the last step's drain (a -t would cut the drains short)
        cmd += ["-u", levels[-1], "-r", levels[-1], "--step-users", users, "--step-duration", seconds,
                "--step-keep-going"]
    if not args.no_server_metrics:
        cmd += ["--server-metrics-url", f"http://127.0.0.1:{args.metrics_port}/metrics"]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=900)
    label = args.platform_label or f"{args.gpus}×GPU transformers (synthetic weights)"
    (report / "platform.json").write_text(json.dumps({"platform": f"{label}, {name}", "gpus": label}))
    print(f"{name}: load test exit code {done.returncode} (0 pass, 1 an SLO failed, 3 run invalid)", flush=True)
    print(json.dumps(headline(report / "summary.json")), flush=True)


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    serve_cmd = [sys.executable, "-m", "llmslo.cli", "serve", "--config", str(write_config(args)),
                 "--host", "127.0.0.1", "--port", str(args.port), "--metrics-port", str(args.metrics_port),
                 "--metrics-interval-ms", "2000"]
    log = (args.out / "serve.log").open("w")
    server = subprocess.Popen(serve_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        print(f"server ready after {wait_ready(url, server, args.ready_timeout):.0f} s", flush=True)
        loads = [("fixed", args.fixed), ("ramp", args.ramp)]
        for name, spec in [(n, v) for n, v in loads if v]:
            run_load(args, name, spec, url, env)
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
