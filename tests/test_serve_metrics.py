"""Server metrics go through Ray's metrics pipeline: series from both model replicas
reach the export port under the names in serve.metrics and sum right."""

from __future__ import annotations

import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from contract import names
from serve import metrics as M


def scrape(serve_app) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from Ray's metrics export port."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    text = httpx.get(serve_app.metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.5):
    """Poll until predicate() is truthy (Ray reports metrics every second here)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def quiet_scrape(serve_app, keys=(M.QUEUE_WAIT + "_count", M.COMPLETION_TOKENS)):
    """A scrape after earlier tests' metrics have all been reported (two equal reads 2.5 s apart)."""
    previous = None
    for _ in range(20):
        current = scrape(serve_app)
        if previous is not None and all(total(current, k) == total(previous, k) for k in keys):
            return current
        previous = current
        time.sleep(2.5)
    return current


def per_replica(samples, name: str) -> dict[str, float]:
    by: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        by[labels.get("replica", "")] += value
    return dict(by)


def test_two_replicas_reach_the_exporter_and_sum_right(serve_app):
    before = quiet_scrape(serve_app)
    base_by = per_replica(before, M.QUEUE_WAIT + "_count")
    base_tokens = total(before, M.COMPLETION_TOKENS, model=serve_app.model)
    n, per_request = 24, 3
    served: dict[str, int] = defaultdict(int)
    body = {
        "model": serve_app.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": per_request,
        "ignore_eos": True,
    }
    for _ in range(n):
        resp = httpx.post(f"{serve_app.api_base}/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200
        served[resp.headers["x-llmslo-replica"]] += 1
    assert len(served) == 2

    def grown(s) -> dict[str, float]:
        """Per serving replica: growth of its own queue-wait histogram count."""
        by = per_replica(s, M.QUEUE_WAIT + "_count")
        return {r: by.get(r, 0) - base_by.get(r, 0) for r in served}

    def settled():
        s = scrape(serve_app)
        tokens_done = total(s, M.COMPLETION_TOKENS, model=serve_app.model) - base_tokens == n * per_request
        return s if tokens_done and sum(grown(s).values()) == n else None

    after = wait_for(settled)
    assert after, "metrics did not reach the exporter"
    # each replica exported its own series, each counted exactly the requests it served,
    # and the series add up to n (series of replicas killed earlier in the session may vanish,
    # so only the two serving replicas are compared)
    assert grown(after) == served
    # one build_info and one start per replica process
    assert len(after[M.BUILD_INFO]) >= 2
    assert {lab["engine"] for lab, _ in after[M.BUILD_INFO]} == {"simulated"}
    assert {lab["weights"] for lab, _ in after[M.BUILD_INFO]} == {"simulated"}
    assert total(after, M.REPLICA_STARTS) >= 2


def test_exported_names_and_kpi_buckets(serve_app):
    for stream in (False, True):  # the hop histogram is observed for streams only
        httpx.post(
            f"{serve_app.api_base}/chat/completions",
            json={"model": serve_app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                  "stream": stream},
            timeout=30,
        )
    wanted = [M.REQUESTS, M.IN_FLIGHT, M.PROMPT_TOKENS, M.COMPLETION_TOKENS, M.BUILD_INFO, M.KV_CACHE_USAGE,
             M.REPLICA_STARTS, M.TTFT_HOP + "_count", M.TTFT_BUDGET, M.REPLICA_STARTUP,
             names.DEPLOYMENT_MAX_REPLICAS]
    histograms = [M.TTFT, M.ITL, M.TPOT, M.E2E, M.QUEUE_WAIT, M.TTFT_HOP]

    def all_present():
        s = scrape(serve_app)
        return s if all(n in s for n in wanted) else None

    samples = wait_for(all_present)
    assert samples, f"missing: {[n for n in wanted if n not in scrape(serve_app)]}"
    for h in histograms:
        for suffix in ("_bucket", "_sum", "_count"):
            assert h + suffix in samples, h + suffix
    les = lambda h: {float(lab["le"]) for lab, _ in samples[h + "_bucket"]}  # noqa: E731
    assert 0.6 in les(M.TTFT)
    assert 1 / 45 in les(M.TPOT) and 1 / 45 in les(M.ITL)
    assert 1.2 in les(M.E2E)
    assert {lab["status"] for lab, _ in samples[M.REQUESTS]} >= {"ok"}
    assert all(lab["model"] == serve_app.model for lab, _ in samples[M.TTFT + "_count"])
    assert {lab["hop"] for lab, _ in samples[M.TTFT_HOP + "_count"]} == set(M.TTFT_HOPS)
    assert {lab["outcome"] for lab, _ in samples[M.TTFT_BUDGET]} <= {"met", "missed"}
    assert all(0 < v < 300 for _, v in samples[M.REPLICA_STARTUP])
    # a fixed deployment of 2 replicas cannot scale: its ceiling is 2 (ScaleOutExhausted compares with it)
    assert {v for lab, v in samples[names.DEPLOYMENT_MAX_REPLICAS] if lab["component"] == names.MODEL_COMPONENT} \
        == {serve_app.replicas}


def test_server_cpu_covers_the_whole_serving_tree_once(serve_app):
    """One process per node reports every role of the serving tree (Ray's HTTP proxy, the Serve
    controller, raylet, GCS and the rest of Ray, not only llmslo's own replicas), once each,
    so ``sum by (instance)`` is the node's serving CPU."""
    name = names.PROCESS_CPU
    roles = {"ingress", "replica", "http_proxy", "serve_controller", "raylet", "gcs", "ray_other"}

    def reported():
        samples = scrape(serve_app).get(name, [])
        return samples if {lab["component"] for lab, _ in samples} >= roles else None

    samples = wait_for(reported)
    assert samples, scrape(serve_app).get(name)
    components = [lab["component"] for lab, _ in samples]
    assert sorted(components) == sorted(set(components)), "a role reported by more than one process"
    assert {lab["WorkerId"] for lab, _ in samples if "WorkerId" in lab} == {samples[0][0].get("WorkerId")}
    assert all(0 <= value <= 100 for _, value in samples)
