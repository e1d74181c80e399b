"""The Locust web UI in headless Chromium: start a run, read the live SLO tab, stop it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, require_binary
from loadtest._headless import LOCUSTFILE_DIR
from loadtest._truth_server import fetch_truth, running

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer")


def test_slo_tab_shows_live_kpis_and_stop_writes_the_report(tmp_path):
    chromium = require_binary("chromium")
    from playwright.sync_api import sync_playwright

    web_port = free_port()
    with running(free_port(), "--ttft", "0.03", "--itl", "0.008") as url:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), "--web-host", "127.0.0.1",
             "--web-port", str(web_port), "--host", url, "--mix", "text=1", "--input-tokens", "10",
             "--output-tokens", "12", "--report-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        web = f"http://127.0.0.1:{web_port}"
        try:
            _wait_http(web)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                page = browser.new_page()
                page.goto(web)
                assert page.locator("input[name=mix]").input_value() == "text=1"  # custom args in the form
                page.fill("input[name=userCount]", "2")
                page.fill("input[name=spawnRate]", "2")
                page.get_by_role("button", name="START").click()
                page.get_by_role("tab", name="SLO").click()
                ttft_row = page.locator("tr", has_text="ttft_p95")
                ttft_row.filter(has_text="PASS").wait_for(timeout=30_000)  # live values arrived
                assert " ms" in ttft_row.inner_text()
                assert "concurrency" in page.locator("table").first.inner_text()
                page.get_by_role("button", name="STOP").click()
                page.get_by_role("button", name="NEW").wait_for(timeout=30_000)
                browser.close()
            metrics = urllib.request.urlopen(f"{web}/metrics", timeout=5).read().decode()
            ttft = {s.labels["le"]: s.value for f in text_string_to_metric_families(metrics)
                    if f.name == "llmslo_client_ttft_seconds" for s in f.samples if s.name.endswith("_bucket")}
            assert ttft["0.6"] > 0  # a bucket edge at the TTFT target, filled by the run
            deadline = time.monotonic() + 30
            while not (tmp_path / "summary.json").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert (tmp_path / "report.html").exists()
        finally:
            locust.terminate()
            output, _ = locust.communicate(timeout=30)
    assert "SLO verdict:" in output


def test_headless_run_serves_client_metrics_on_its_port(tmp_path):
    metrics_port = free_port()
    with running(free_port(), "--ttft", "0.02", "--itl", "0.005") as url:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), "--headless", "-u", "2", "-r", "2",
             "-t", "6s", "--host", url, "--mix", "text=1", "--input-tokens", "10", "--output-tokens", "8",
             "--report-dir", str(tmp_path), "--client-metrics-port", str(metrics_port), "--api-key", "sk-test"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_http(f"http://127.0.0.1:{metrics_port}/metrics")
            finished = 0.0
            deadline = time.monotonic() + 30
            while finished == 0 and time.monotonic() < deadline:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
                finished = sum(s.value for f in text_string_to_metric_families(text)
                               if f.name == "llmslo_client_requests" for s in f.samples if s.name.endswith("_total"))
                time.sleep(0.5)
            assert finished > 0
            assert locust.wait(timeout=60) in (0, 1, 3, 4)
            assert {t["authorization"] for t in fetch_truth(url).values()} == {"Bearer sk-test"}
        finally:
            if locust.poll() is None:
                locust.kill()
                locust.wait()


def test_api_key_goes_only_to_the_configured_host(tmp_path):
    """Anyone with the web UI can point the run elsewhere; the key must not follow it there."""
    canary, web_port = "sk-canary-web-41c2", free_port()
    with running(free_port(), "--ttft", "0.01", "--itl", "0.002") as configured, \
            running(free_port(), "--ttft", "0.01", "--itl", "0.002") as elsewhere:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), "--web-host", "127.0.0.1",
             "--web-port", str(web_port), "--host", configured, "--mix", "text=1", "--input-tokens", "10",
             "--output-tokens", "8", "--report-dir", str(tmp_path), "--api-key", canary],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        web = f"http://127.0.0.1:{web_port}"
        try:
            _wait_http(web)
            form = urllib.parse.urlencode({"user_count": 1, "spawn_rate": 1, "host": elsewhere}).encode()
            urllib.request.urlopen(f"{web}/swarm", data=form, timeout=10).close()
            deadline = time.monotonic() + 30
            while len(fetch_truth(elsewhere)) < 3 and time.monotonic() < deadline:
                time.sleep(0.3)
            urllib.request.urlopen(urllib.request.Request(f"{web}/stop", method="POST"), timeout=10).close()
            while not (tmp_path / "summary.json").exists() and time.monotonic() < deadline + 30:
                time.sleep(0.2)
            received = fetch_truth(elsewhere)
        finally:
            locust.terminate()
            output, _ = locust.communicate(timeout=30)
    assert len(received) >= 3 and all(r["authorization"] == "" for r in received.values()), received
    summary = (tmp_path / "summary.json").read_text()
    assert "API key withheld" in summary and canary not in summary and canary not in output
