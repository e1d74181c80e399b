"""The load generator against a ground-truth SSE server whose emit times are logged.

Both processes read CLOCK_MONOTONIC, so each client stamp can be compared with
the server's write time of the same token. The truth TTFT of a request is the
server's write time of its first token minus the client's request start (the
request's trip to the server is part of real TTFT). Low load (3 users) on loopback.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import free_port
from loadtest import run_headless
from loadtest._truth_server import fetch_truth, running

TEXT_ONLY = ("--mix", "text=1", "--input-tokens", "20", "--output-tokens", "12", "--short-share", "0")


def _records(report_dir) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "requests.jsonl").read_text().splitlines()]


def _errors(tmp_path, *server_flags: str) -> tuple[dict[str, list[float]], dict]:
    """One low-load run; client-minus-truth errors per metric, and the summary."""
    with running(free_port(), "--ttft", "0.08", "--itl", "0.015", "--reasoning", "3", *server_flags) as url:
        out = run_headless(url, tmp_path, 3, "5s", *TEXT_ONLY, "--thinking-share", "1", timeout=120)
        truth = fetch_truth(url)
    ok = [r for r in _records(tmp_path) if r["ok"]]
    assert len(ok) >= 30, out.output[-2000:]
    errors: dict[str, list[float]] = {"ttft": [], "ttfo": [], "itl": [], "tpot": []}
    for r in ok:
        t = truth[r["id"]]
        t0 = r["start_mono"]
        assert t["emits"][0] - t["recv"] > 0.079  # the server never writes early
        errors["ttft"].append(r["ttft_s"] - (t["emits"][0] - t0))  # role-only/empty chunks came earlier
        errors["ttfo"].append(r["ttfo_s"] - (t["emits"][3] - t0))  # the first 3 tokens were reasoning
        true_gaps = np.diff(t["emits"])
        assert len(r["itl_s"]) == len(true_gaps) == 11
        errors["itl"].extend(np.asarray(r["itl_s"]) - true_gaps)
        errors["tpot"].append(r["tpot_s"] - (t["end"] - t["emits"][0]) / (t["tokens"] - 1))
        assert r["output_tokens"] == 12 and r["reasoning_tokens"] == 3 and r["token_discrepancy"] == 0
        assert r["decode_tokens_per_s"] == pytest.approx(1 / r["tpot_s"])
        assert r["output_tokens_per_s"] == pytest.approx(12 / r["e2e_s"])
    assert out.summary["requests"]["usage_vs_delta_discrepancies"] == 0
    return errors, out.summary


@pytest.mark.parametrize("server", ["headers-first", "headers-with-token", "https"])
def test_ttft_ttfo_itl_tpot_match_server_emit_times(tmp_path, server, request):
    """Within 2 ms for 95 % of samples whenever the generator's self-check says the run is valid.

    Also against a server that holds its headers until the first token (as llmslo's ingress does):
    that token then comes in the HTTP client's header read, which keeps the kernel's arrival time;
    and over HTTPS, where each read is stamped with the kernel's time too (a peek before it).

    The median error must be under 0.5 ms in every run. The 2-core test machine
    is shared by parallel test runs; when a neighbour deschedules the client,
    stamps shift by real milliseconds and the run's self-check (gevent loop lag)
    marks it invalid, so such a run is repeated (3 runs at most).
    """
    server_flags: tuple[str, ...] = ()
    if server == "headers-with-token":
        server_flags = ("--headers-with-first-token",)
    elif server == "https":
        cert, key = request.getfixturevalue("tls_cert")
        server_flags = ("--tls-cert", str(cert), "--tls-key", str(key))
    reasons = []
    for attempt in range(3):
        errors, summary = _errors(tmp_path / str(attempt), *server_flags)
        assert all(w["stamp_delay_reads"] > 0 for w in summary["validity"]["workers"].values())  # kernel stamps
        for name, errs in errors.items():
            assert np.median(np.abs(errs)) < 0.0005, name
        if not summary["validity"]["valid"]:
            reasons += summary["validity"]["reasons"]
            continue
        worst = {name: float(np.percentile(np.abs(errs), 95)) for name, errs in errors.items()}
        assert max(worst.values()) < 0.002, worst
        return
    pytest.skip(f"no valid run: this machine is too loaded to judge 2 ms accuracy ({'; '.join(reasons)})")


def test_tokens_come_from_usage_and_packing_is_reported(tmp_path):
    with running(free_port(), "--ttft", "0.02", "--itl", "0.01", "--tokens-per-chunk", "4") as url:
        out = run_headless(url, tmp_path, 1, "3s", *TEXT_ONLY, timeout=120)
    ok = [r for r in _records(tmp_path) if r["ok"]]
    assert ok, out.output[-2000:]
    for r in ok:
        assert r["output_tokens"] == 12 and r["content_deltas"] == 3 and r["token_discrepancy"] == 9
        assert r["tokens_source"] == "usage"
    assert out.summary["requests"]["usage_vs_delta_discrepancies"] == len(ok)


def test_usage_that_disagrees_with_deltas_is_flagged(tmp_path):
    with running(free_port(), "--ttft", "0.02", "--itl", "0.005", "--usage-offset", "2") as url:
        out = run_headless(url, tmp_path, 1, "3s", *TEXT_ONLY, timeout=120)
    ok = [r for r in _records(tmp_path) if r["ok"]]
    assert ok and all(r["token_discrepancy"] == 2 and r["output_tokens"] == 14 for r in ok)
    assert out.summary["requests"]["usage_vs_delta_discrepancies"] == len(ok)
