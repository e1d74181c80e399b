"""The autoscaling drill (benchmarks/autoscaling_drill.py), short: 2 -> 16 streams, then back to 2.

Real parts: ``llmslo serve`` (Ray Serve, simulated engine at its calibrated speed, 1..2
replicas), ``locust -f loadtest/`` headless, Ray's metrics port. Steps are 30 s and Serve's
upscale delay 2 s so the whole drill fits CI; the full-length numbers are in docs/serve.md.
What must hold whatever the machine's speed: Serve adds the second replica during the
16-stream step and its first token is found; cold start and scale-up are positive and
ordered; every request the load test sent is in its records; scaling down breaks no stream;
the server exports each replica's startup time and the deployment's ceiling of 2 replicas.
"""

from __future__ import annotations

import pytest

from benchmarks.autoscaling_drill import run

STEP_S = 30.0


@pytest.mark.timeout(900)
def test_autoscaling_drill_scales_up_under_load_and_down_without_breaking_streams(tmp_path):
    result = run(["--step-s", f"{STEP_S:g}", "--tail-s", "30", "--upscale-delay-s", "2",
                  "--downscale-delay-s", "8", "--out", str(tmp_path / "drill.json")])
    assert result.get("note") is None, result
    assert result["replica_starts"] >= 2
    assert 0 < result["decision_after_step_s"] < STEP_S
    assert 0 < result["cold_start_s"] < result["scale_up_s"] < STEP_S + 30
    assert result["window_requests"] > 0 and 0 <= result["window_ttft_attainment"] <= 1
    assert result["budget_burned_share_of_run"] >= 0
    assert result["downscale_decision_after_tail_start_s"] is not None  # Serve scaled back to 1
    assert result["tail_requests"] > 0 and result["tail_failed"] == 0
    exported = result["exported"]
    assert exported["max_replicas"] and set(exported["max_replicas"]) == {2.0}
    assert exported["replica_startup_s"] and all(0 < s < 120 for s in exported["replica_startup_s"])
    assert (tmp_path / "drill.json").exists()
