"""The load test against the real serving app (Ray Serve, simulated engine; conftest's serve_app)."""

from __future__ import annotations

import json

from contract.record import RequestRecord
from loadtest import _hops, run_headless

MIX = ("--mix", "text=2,image=1,audio=1", "--image-max-px", "448", "--audio-max-s", "2",
       "--input-tokens", "64", "--output-tokens", "48", "--short-share", "0.3", "--thinking-share", "0.5",
       "--server-dialect", "llmslo")


def test_multimodal_run_against_serve_reads_server_kpis(serve_faults, tmp_path):
    app = serve_faults
    out = run_headless(app.url, tmp_path / "ok", 4, "12s", *MIX, "--server-metrics-url", app.metrics_url, timeout=180)
    s = out.summary
    assert s is not None, out.output[-3000:]
    assert s["requests"]["failed"] == 0, s["errors"]
    for cls in ("text", "image", "audio"):
        assert s["metrics"]["ttft_seconds"][cls]["count"] > 0, cls
    assert s["requests"]["tokens_from_deltas"] == 0  # the server reports usage
    assert s["kpis"]["oom_per_hour"]["value"] == 0 and s["kpis"]["oom_per_hour"]["pass"] is True
    assert s["kpis"]["crashes_per_day"]["pass"] is True
    assert s["server_metrics"]["scrapes"] >= 2
    text = [json.loads(line) for line in (tmp_path / "ok" / "requests.jsonl").read_text().splitlines()]
    prompt = {r["prompt_tokens"] for r in text if r["ok"] and r["cls"] == "text"}
    assert prompt and all(64 <= p <= 64 + 10 for p in prompt), prompt  # --input-tokens as the server counts
    # every successful stream carried the server's per-hop timing; no hop is negative (each is a
    # difference of milestones in path order)
    hops = s["ttft_hops"]["4"]
    assert hops["requests"] == sum(1 for r in text if r["ok"]), hops
    for r in (r for r in text if r["ok"]):
        split = _hops.split(RequestRecord.from_dict(r))
        assert split is not None and min(split.values()) >= 0, split

    app.admin("POST", {"oom": 2})
    failed = run_headless(app.url, tmp_path / "oom", 2, "5s", *MIX, "--server-metrics-url", app.metrics_url, timeout=180)
    f = failed.summary
    assert failed.returncode == 1
    assert f["kpis"]["oom_per_hour"]["pass"] is False, f["kpis"]["oom_per_hour"]
    assert f["requests"]["failed"] >= 1 and f["errors"]
