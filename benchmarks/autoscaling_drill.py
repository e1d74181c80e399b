"""Autoscaling under load: 2 -> 16 streams on one replica, until Serve adds the second, then back to 2.

Starts ``llmslo serve`` (simulated engine, calibrated latencies, ``min_replicas`` 1,
``max_replicas`` 2, Serve's default upscale delay unless ``--upscale-delay-s``; downscale delay
``--downscale-delay-s`` instead of Serve's 600 s so the drill ends) and drives it with
``locust -f loadtest/``:

- phase A: ``--step-users 2,16``, ``--step-s`` seconds each (text only, 512 in / 256 out);
- phase B: 2 streams for ``--tail-s`` seconds, during which Serve scales back down.

Read from the server's own logs (Serve controller: the scale decisions; replicas: the
``replica_started`` events; ingress: one ``request`` line per request with its replica) and the
load test's ``requests.jsonl``, it reports (definitions in docs/glossary.md, "Scale-out drills"):
scale-up time (16-stream step -> first token from the new replica), replica cold start (scale
decision -> that first token), TTFT p95 and attainment of the requests started during the
scale-up, the TTFT error budget they burned, and the requests that failed while Serve scaled down;
plus what the server exported about it at the end (each replica's startup gauge, the deployment's
max replicas), read from Ray's metrics port.

tests/test_autoscaling_drill.py runs a short version (30 s steps, 2 s upscale delay) in CI.

Run: ``.venv/bin/python benchmarks/autoscaling_drill.py --out benchmarks/results/autoscaling.json``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract import names as n  # noqa: E402
from contract.slo import load_slo  # noqa: E402
from serve.processes import descendants, free_port, reap  # noqa: E402
from loadtest import run_headless  # noqa: E402

LOAD = ["--mix", "text=1", "--input-tokens", "512", "--output-tokens", "256", "--short-share", "0"]
CONTROLLER_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(Upscaling|Downscaling) .*?from (\d+) to (\d+)")


def _config(workdir: Path, downscale_delay_s: float, upscale_delay_s: float | None) -> Path:
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    delays = {"downscale_delay_s": downscale_delay_s}
    if upscale_delay_s is not None:
        delays["upscale_delay_s"] = upscale_delay_s
    config["applications"][0]["args"].update(
        min_replicas=1, max_replicas=2, engine_options={"time_scale": 1.0}, autoscaling_options=delays)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _events(log: Path, event: str) -> list[dict]:
    """JSON log lines of one event from the server's output (Ray prefixes them with the actor)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"event": "{event}"' in line:
            record = json.loads(line[line.index("{"):])
            record["t"] = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            out.append(record)
    return out


def _scale_decisions(ray_dir: Path) -> list[tuple[float, str, int, int]]:
    """(time, Upscaling|Downscaling, from, to) from the Serve controller's log (UTC host clock)."""
    out = []
    for path in sorted(ray_dir.glob("session_latest/logs/serve/controller_*.log")):
        for match in CONTROLLER_LINE.finditer(path.read_text(errors="replace")):
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc)
            out.append((when.timestamp(), match.group(2), int(match.group(3)), int(match.group(4))))
    return sorted(out)


def _requests(report: Path) -> list[dict]:
    return [json.loads(line) for line in (report / "requests.jsonl").read_text().splitlines() if line.strip()]


def _start_server(workdir: Path, config: Path, port: int, metrics_port: int) -> tuple[subprocess.Popen, Path]:
    ray_dir = Path(tempfile.mkdtemp(prefix="llmslo-drill-"))
    log = workdir / "serve.log"
    cmd = [sys.executable, "-m", "serve.cli", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--temp-dir", str(ray_dir), "--num-cpus", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while '"serve_ready"' not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llmslo serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, ray_dir


def _exported(metrics_port: int) -> dict[str, list[float]]:
    """The replicas' startup gauges and the deployment's max replicas on Ray's metrics port now."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    wanted = {n.REPLICA_STARTUP: "replica_startup_s", n.DEPLOYMENT_MAX_REPLICAS: "max_replicas"}
    out: dict[str, list[float]] = {key: [] for key in wanted.values()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("component", n.MODEL_COMPONENT) == n.MODEL_COMPONENT:
                out[wanted[sample.name]].append(sample.value)
    return out


def _stop(proc: subprocess.Popen) -> None:
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reap(family, grace_s=10)


def analyse(records: list[dict], requests_log: list[dict], starts: list[dict],
            decisions: list[tuple[float, str, int, int]], step_at: float, tail_from: float) -> dict:
    """The drill's numbers from the raw records (all times Unix seconds)."""
    slo = load_slo()

    def missed(r: dict) -> bool:
        budget = slo.request_budget_s("ttft", (r["cls"],), r.get("prompt_tokens"))
        return not r["ok"] or r["ttft_s"] is None or r["ttft_s"] >= budget
    first, new = starts[0]["replica"], [s for s in starts[1:]]
    up = next((d for d in decisions if d[1] == "Upscaling" and d[0] >= step_at - 5), None)
    down = next((d for d in decisions if d[1] == "Downscaling" and d[0] >= tail_from), None)
    out: dict = {"replica_starts": len(starts), "scale_decisions": decisions, "step_at": step_at}
    if not new or up is None:
        out["note"] = "no second replica started"
        return out
    second = new[0]["replica"]
    served = [r["t"] - r["e2e_s"] + r["ttft_s"] for r in requests_log
              if r.get("replica") == second and r.get("ttft_s") is not None]
    first_token = min(served)
    window = [r for r in records if step_at <= r["start_wall"] < first_token]
    ttfts = [r["ttft_s"] for r in window if r["ttft_s"] is not None]
    bad = [r for r in window if missed(r)]
    out.update({
        "first_replica": first, "second_replica": second,
        "scale_up_s": first_token - step_at,
        "decision_after_step_s": up[0] - step_at,
        "cold_start_s": first_token - up[0],
        "replica_started_after_decision_s": new[0]["t"] - up[0],
        "window_requests": len(window),
        "window_ttft_p95_s": float(np.percentile(ttfts, 95)) if ttfts else None,
        "window_ttft_attainment": 1 - len(bad) / len(window) if window else None,
        "window_bad_requests": len(bad),
        "budget_burned_share_of_run": len(bad) / (len(records) * slo.slos["ttft"].error_budget),
        "downscale_decision_after_tail_start_s": down[0] - tail_from if down else None,
        "tail_requests": len([r for r in records if r["start_wall"] >= tail_from]),
        "tail_failed": len([r for r in records if r["start_wall"] >= tail_from and not r["ok"]]),
    })
    return out


def run(argv: list[str] | None = None) -> dict:
    """Run the drill; return (and write to ``--out``) its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, default=90.0)
    parser.add_argument("--tail-s", type=float, default=90.0)
    parser.add_argument("--downscale-delay-s", type=float, default=20.0)
    parser.add_argument("--upscale-delay-s", type=float, default=None, help="default: Serve's own (30 s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "autoscaling.json")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="llmslo-drill-run-"))
    port, metrics_port = free_port(), free_port()
    config = _config(workdir, args.downscale_delay_s, args.upscale_delay_s)
    proc, ray_dir = _start_server(workdir, config, port, metrics_port)
    url = f"http://127.0.0.1:{port}"
    try:
        ramp = run_headless(url, workdir / "ramp", 16, f"{2 * args.step_s:.0f}s", *LOAD, "--step-users", "2,16",
                            "--step-duration", f"{args.step_s:g}", "--step-keep-going",
                            timeout=2 * args.step_s + 300)
        tail_from = time.time()
        tail = run_headless(url, workdir / "tail", 2, f"{args.tail_s:.0f}s", *LOAD, timeout=args.tail_s + 300)
        time.sleep(3)
        exported = _exported(metrics_port)
    finally:
        _stop(proc)
    records = _requests(workdir / "ramp") + _requests(workdir / "tail")
    step_at = min(r["start_wall"] for r in _requests(workdir / "ramp")) + args.step_s
    result = analyse(records, _events(workdir / "serve.log", "request"), _events(workdir / "serve.log", "replica_started"),
                     _scale_decisions(ray_dir), step_at, tail_from)
    result.update({"exported": exported, "sent": len(records),
                   "exit_codes": [ramp.returncode, tail.returncode], "verdicts": [ramp.verdict, tail.verdict],
                   "validity": [o.summary["validity"] if o.summary else None for o in (ramp, tail)],
                   "args": vars(args) | {"out": str(args.out)}, "workdir": str(workdir), "ray_dir": str(ray_dir)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> int:
    result = run()
    print(json.dumps({k: v for k, v in result.items() if k not in ("scale_decisions", "validity")}, indent=1,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
