"""A broken server or bad options: the run finishes (or refuses to start) and says what broke."""

from __future__ import annotations

import json

import subprocess
import sys

import pytest

from conftest import free_port
from loadtest import run_headless
from loadtest._headless import LOCUSTFILE_DIR, locust_command
from loadtest._truth_server import fetch_truth, running

SMALL = ("--mix", "text=1", "--input-tokens", "10", "--output-tokens", "8", "--short-share", "0")


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("http500", "HTTP 500: engine exploded"),
        ("http400", "HTTP 400: max_tokens is too large"),
        ("redirect", "HTTP 307: redirected to https://127.0.0.1/v1/chat/completions (not followed"),
        ("midstream", "error mid-stream: replica lost"),
        ("malformed", "malformed SSE data (not JSON)"),
        ("nodone", "stream ended without [DONE]"),
        ("stall", "stalled: no byte for 1 s"),
    ],
)
def test_bad_server_is_counted_and_reported(tmp_path, mode, expected):
    with running(free_port(), "--ttft", "0.01", "--itl", "0.005", "--mode", mode) as url:
        out = run_headless(url, tmp_path, 1, "3s", *SMALL, "--stall-timeout", "1", timeout=120)
    assert out.returncode == 1, out.output[-2000:]
    summary = out.summary
    assert summary["requests"]["failed"] >= 1 and summary["requests"]["failed"] == summary["requests"]["total"]
    assert any(expected in error for error in summary["errors"]), summary["errors"]
    assert summary["kpis"]["error_rate"]["pass"] is False
    assert expected in (tmp_path / "report.html").read_text()
    assert expected in out.output  # the console table lists what broke


def test_connection_refused_is_a_failure_not_a_crash(tmp_path):
    out = run_headless(f"http://127.0.0.1:{free_port()}", tmp_path, 1, "2s", *SMALL, timeout=120)
    assert out.returncode == 1
    assert any("connection refused" in e.lower() for e in out.summary["errors"]), out.summary["errors"]


def test_plain_openai_requests_pass_a_strict_server_by_default(tmp_path):
    """The default dialect sends no extension, so a server that rejects unknown fields serves every request."""
    with running(free_port(), "--ttft", "0.01", "--itl", "0.005", "--strict") as url:
        out = run_headless(url, tmp_path, 2, "3s", *SMALL, timeout=120)
        truth = fetch_truth(url)
    s = out.summary
    assert s is not None, out.output[-2000:]
    assert s["requests"]["failed"] == 0 and s["requests"]["total"] == len(truth) > 0, s["errors"]
    assert s["config"]["request_fields"]["dialect"] == "openai"
    assert "max_tokens only" in s["config"]["request_fields"]["length_control"]
    assert "max_tokens only" in (tmp_path / "report.html").read_text()


def test_a_kept_alive_connection_closed_unanswered_is_resent_once_and_counted(tmp_path):
    """The server closes every reused connection at the next request without a byte (the worst case of
    llama.cpp's habit): each such request is resent once on a new connection, succeeds, and is counted."""
    with running(free_port(), "--ttft", "0.01", "--itl", "0.005", "--drop-kept-alive", "1") as url:
        out = run_headless(url, tmp_path, 2, "3s", *SMALL, timeout=120)
        truth = fetch_truth(url)
    s = out.summary
    assert s is not None, out.output[-2000:]
    dropped = sum(1 for entry in truth.values() if entry.get("status") == "dropped")
    assert dropped > 0 and s["requests"]["failed"] == 0, s["errors"]
    assert s["requests"]["connection_retries"] == dropped  # every drop seen, none hidden
    assert s["requests"]["total"] == len(truth) - dropped  # each request once, whatever it took
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sum(r["connection_retries"] for r in records) == dropped and max(r["connection_retries"] for r in records) == 1


@pytest.mark.parametrize(
    "server, limits, reason",
    [
        (("--strict",), ("--server-dialect", "llmslo", "--max-errors", "5"), "--max-errors 5"),
        (("--mode", "http500"), ("--max-error-rate", "0.5", "--max-error-rate-min", "8"), "--max-error-rate 0.5"),
    ],
)
def test_a_broken_run_ends_early_with_a_fail_naming_the_error(tmp_path, server, limits, reason):
    """Extensions a strict server rejects (or a failing server) end the run long before -t, every request recorded."""
    with running(free_port(), "--ttft", "0.01", "--itl", "0.005", *server) as url:
        out = run_headless(url, tmp_path, 2, "120s", *SMALL, *limits, timeout=120)
        truth = fetch_truth(url)
    s = out.summary
    assert out.returncode == 1 and s["verdict"] == "FAIL", out.output[-2000:]
    assert reason in s["stopped_early"] and s["duration_s"] < 60
    expected = "Unexpected fields in the request" if "--strict" in server else "HTTP 500: engine exploded"
    assert expected in s["stopped_early"] and expected in out.output
    assert s["requests"]["total"] == len(truth) == s["requests"]["failed"]  # every request sent is accounted for


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mix", "video=1"], "--mix: expected CLASS=WEIGHT"),
        (["--short-share", "2"], "--short-share must be within"),
        (["--step-users", "4,2"], "--step-users: user counts must be >= 1 and strictly increasing"),
        (["--max-error-rate", "2"], "--max-error-rate within [0, 1]"),
        (["--slo-file", "/nonexistent/slo.yaml"], "cannot read /nonexistent/slo.yaml"),
    ],
)
def test_invalid_options_fail_in_one_line_before_load(tmp_path, args, message):
    port = free_port()
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), "--headless", "-t", "5s",
           "--host", f"http://127.0.0.1:{port}", "--report-dir", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "llmslo loadtest: error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()  # no run happened


def test_invalid_slo_yaml_fails_in_one_line(tmp_path):
    bad = tmp_path / "slo.yaml"
    bad.write_text("kpis: [unclosed\n")
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), "--headless", "-t", "5s",
           "--host", "http://127.0.0.1:9", "--slo-file", str(bad), "--report-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if "is not valid YAML" in line]


STUCK_PLAN = '''
import sys
import gevent
from locust import events


@events.init.add_listener
def _first_plans_never_deliver(environment, **_kw):
    user = next(cls for cls in environment.user_classes if cls.__name__ == "ChatUser")
    sys.modules[user.__module__].PLAN_WAIT_S = 1.0
    plan_ahead = user._plan_ahead

    def stuck_once(self):
        if getattr(self, "stuck", False):
            return plan_ahead(self)
        self.stuck = True
        return gevent.spawn(gevent.sleep, 3600)  # a body that never comes

    user._plan_ahead = stuck_once
'''


def test_a_user_whose_planned_body_never_comes_plans_again_and_says_where_it_waited(tmp_path):
    """Each user's first body never arrives (as if the media thread pool lost it): after PLAN_WAIT_S the
    user builds one itself and sends; the log shows where the stuck plan waited."""
    plugin = tmp_path / "stuck_plan.py"
    plugin.write_text(STUCK_PLAN)
    with running(free_port(), "--ttft", "0.01", "--itl", "0.005") as url:
        cmd = locust_command(url, tmp_path / "r", 2, "4s", *SMALL, "--mix", "text=1,image=1")
        cmd[cmd.index("-f") + 1] += f",{plugin}"
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        truth = fetch_truth(url)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["requests"]["failed"] == 0 and summary["requests"]["total"] == len(truth) > 2
    assert {r["id"] for r in map(json.loads, (tmp_path / "r" / "requests.jsonl").read_text().splitlines())} == set(truth)
    stuck = [line for line in proc.stderr.splitlines() if "was not ready after 1 s" in line]
    assert len(stuck) == 2, proc.stderr[-3000:]  # once per user, then its plans come ahead again
    assert "in sleep" in proc.stderr  # where the stuck plan waited


NEVER_IDLE = '''
import gevent
from locust import events


@events.test_start.add_listener
def _keep_the_loop_busy(environment, **_kw):
    def spin():
        while True:
            gevent.sleep(0)  # always a greenlet ready to run: the loop is never idle
    gevent.spawn(spin)
'''


def test_users_of_a_process_that_is_never_idle_still_back_off_from_broken_streams(tmp_path):
    """A stream's content is parsed after its user sent the next request, when the process is idle.
    Adversary: a process never idle and a server whose every stream breaks at once (200, then a
    non-JSON line): the users still back off (0.1, 0.2, 0.4 ... s), at most one request ahead of
    what they know, and every request is recorded as the failure it was."""
    plugin = tmp_path / "never_idle.py"
    plugin.write_text(NEVER_IDLE)
    with running(free_port(), "--ttft", "0", "--itl", "0", "--mode", "malformed") as url:
        cmd = locust_command(url, tmp_path / "r", 4, "4s", *SMALL)
        cmd[cmd.index("-f") + 1] += f",{plugin}"
        subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        truth = fetch_truth(url)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # per user: 1 at once, 1 more before the first failure is known, then after 0.1+0.2+0.4+0.8+1.6 s
    assert 4 * 2 <= len(truth) <= 4 * 8, len(truth)
    assert summary["requests"]["total"] == summary["requests"]["failed"] == len(truth)
    assert {r["id"] for r in map(json.loads, (tmp_path / "r" / "requests.jsonl").read_text().splitlines())} == set(truth)
