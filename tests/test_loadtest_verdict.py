"""The verdict: exact statistics, KPI judgement from slo.yaml, exit codes, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import free_port
from contract.slo import load_slo
from loadtest import run_headless
from loadtest._server_metrics import CPU, GPU_USED, OOM, ServerWatch, gpu_gb_per_copy, parse
from contract.record import RequestRecord
from loadtest._sse import StreamError, read_stream
from loadtest._truth_server import running
from loadtest._verdict import describe

SLO = load_slo()


def _lines(*items: bytes):
    it = iter(items)
    return lambda: next(it, b"")


def _chunk(delta: dict) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": delta}]}).encode() + b"\n"


def test_stream_timing_definitions_on_a_scripted_stream():
    stream = _lines(
        b": keep-alive\n", _chunk({"role": "assistant"}), b"\n", _chunk({"content": ""}),
        _chunk({"reasoning_content": "hm"}), _chunk({"content": "A"}), _chunk({"content": "B"}),
        b'data: {"choices": [], "usage": {"completion_tokens": 5, "prompt_tokens": 3,'
        b' "completion_tokens_details": {"reasoning_tokens": 1}}}\n',
        b"data: [DONE]\n",
    )
    clock = iter([0.01, 0.02, 0.03, 0.04, 0.5, 0.6, 0.7, 0.75, 0.8]).__next__
    rec = RequestRecord(id="x", cls="text", thinking=True, short=False, max_tokens=5)
    read_stream(rec, stream, t0=0.0, clock=clock)
    assert rec.ok and rec.ttft_s == 0.5 and rec.ttfo_s == 0.6  # role/empty/comment lines ignored
    assert rec.e2e_s == 0.8 and rec.output_tokens == 5 and rec.reasoning_tokens == 1
    assert rec.tpot_s == pytest.approx((0.8 - 0.5) / 4) and rec.decode_tokens_per_s == pytest.approx(4 / 0.3)
    assert rec.output_tokens_per_s == pytest.approx(5 / 0.8)
    assert rec.itl_s == pytest.approx([0.1, 0.1]) and rec.token_discrepancy == 2


def test_stream_without_tokens_or_with_garbage_fails():
    rec = RequestRecord(id="x", cls="text", thinking=False, short=False, max_tokens=5)
    with pytest.raises(StreamError, match="without any content"):
        read_stream(rec, _lines(_chunk({"role": "assistant"}), b"data: [DONE]\n"), 0.0)
    with pytest.raises(StreamError, match="malformed SSE line"):
        read_stream(rec, _lines(b"<html>oops</html>\n"), 0.0)


def test_describe_is_exact_not_bucketed():
    values = [0.1234, 0.5, 0.61, 0.2, 0.33, 0.901, 0.07]
    d = describe(values)
    assert d["p95"] == pytest.approx(np.percentile(values, 95)) and d["count"] == 7
    assert d["p50"] == 0.33 and d["mean"] == pytest.approx(sum(values) / 7)


EXPOSITION = """# TYPE ray_llmslo_oom_events_total counter
ray_llmslo_oom_events_total{model="m",source="simulated"} 2.0
# TYPE ray_llmslo_gpu_memory_used_bytes gauge
ray_llmslo_gpu_memory_used_bytes{gpu="0",model="m",uuid="a"} 2.0e10
ray_llmslo_gpu_memory_used_bytes{gpu="1",model="m",uuid="b"} 2.2e10
# TYPE ray_llmslo_process_cpu_percent gauge
ray_llmslo_process_cpu_percent{component="replica"} 35.0
ray_llmslo_process_cpu_percent{component="ingress"} 40.0
"""


def test_server_metrics_are_parsed_by_logical_name():
    data = parse(EXPOSITION)
    assert sum(v for _, v in data[OOM]) == 2 and data[CPU][0][1] == 35.0
    assert gpu_gb_per_copy(data[GPU_USED], 2) == pytest.approx(42.0)
    watch = ServerWatch("http://127.0.0.1:1/metrics", 2, level=8)
    watch.poll()
    assert watch.facts(8).oom_events is None and "unreachable" in watch.facts(8).note
    watch.observe(data)
    assert watch.facts(8).cpu_percent_max == pytest.approx(75.0)  # the node's serving processes together
    # at twice the target (headroom) a busier server is reported, not judged; its OOMs still count
    watch.level = 16
    watch.observe(parse(EXPOSITION.replace(" 40.0\n", " 60.0\n").replace("} 2.0\n", "} 3.0\n")))
    facts = watch.facts(8)
    assert facts.cpu_percent_max == pytest.approx(75.0) and "95 % at 16 streams" in facts.why("cpu_percent_max")
    assert facts.oom_events == 1


def test_passing_run_exits_zero_and_failing_run_non_zero(tmp_path):
    common = ("--mix", "text=1", "--input-tokens", "10", "--output-tokens", "12", "--short-share", "0.5")
    with running(free_port(), "--ttft", "0.03", "--itl", "0.008") as url:
        good = run_headless(url, tmp_path / "good", 8, "10s", *common, timeout=120)  # >= 59 short replies
    assert good.returncode in (0, 3), good.output[-3000:]  # 3 only if this shared machine saturated the generator
    assert good.verdict.startswith("PASS"), good.summary["kpis"]
    assert good.summary["kpis"]["concurrency"]["value"] == 8
    assert good.summary["kpis"]["ttft_p95"]["high"] < SLO.kpis["ttft_p95"].target  # PASS means its 95 % bound passed
    target_ms = int(SLO.kpis["ttft_p95"].target * 1000)
    with running(free_port(), "--ttft", str((target_ms + 100) / 1000), "--itl", "0.008") as url:
        bad = run_headless(url, tmp_path / "bad", 2, "4s", *common, timeout=120)
    assert bad.returncode == 1 and bad.verdict == "FAIL", bad.summary["kpis"]["ttft_p95"]
    assert bad.summary["kpis"]["ttft_p95"]["pass"] is False
    for name in ("summary.json", "requests.jsonl", "requests.csv", "report.html"):
        assert (tmp_path / "bad" / name).stat().st_size > 0
    html = (tmp_path / "bad" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    metrics = bad.summary["metrics"]["ttft_seconds"]
    assert metrics["text"]["count"] == metrics["all"]["count"] > 0 and "p99" in metrics["all"]
