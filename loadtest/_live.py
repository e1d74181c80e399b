"""Live view: the "SLO" tab in Locust's web UI and client-side Prometheus metrics.

The tab uses Locust's documented extension points (``template_args``
``extended_tabs``/``extended_tables`` plus an ``extended_stats`` entry added to
the ``/stats/requests`` poll, as in Locust's examples/extend_web_ui.py), so it
refreshes with the stock UI. The Prometheus registry lives on the master and is
served at ``/metrics`` of the web UI, or on ``--client-metrics-port`` headless.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from contract import names
from contract.record import RequestRecord
from contract.slo import SLOConfig
from loadtest._verdict import max_gap, meets_slo

TAB_KEY = "slo"
COLUMNS = [
    ("kpi", "KPI"),
    ("value", "Value"),
    ("target", "Target"),
    ("status", "Result"),
    ("samples", "Samples"),
    ("note", "Note"),
]
_LADDER = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def buckets(*edges: float) -> tuple[float, ...]:
    """A latency ladder with the KPI edges added, so 'share under target' is exact."""
    return tuple(sorted(set(_LADDER) | set(edges)))


class ClientMetrics:
    """prometheus-client metrics of the load generator, fed from the master's records."""

    def __init__(self, slo: SLOConfig) -> None:
        self.registry = CollectorRegistry()
        k = slo.kpis
        tpot_edge = 1.0 / k["decode_tokens_per_s_p10"].target
        labels = ("model", "traffic_class")
        self.ttft = Histogram(names.CLIENT_TTFT, "Client-measured time to first token", labels,
                              buckets=buckets(k["ttft_p95"].target), registry=self.registry)
        self.tpot = Histogram(names.CLIENT_TPOT, "Client-measured time per output token", labels,
                              buckets=buckets(tpot_edge, 0.001, 0.002), registry=self.registry)
        self.e2e = Histogram(names.CLIENT_E2E, "Client-measured end-to-end time", labels,
                             buckets=buckets(k["e2e_short_p95"].target), registry=self.registry)
        self.requests = Counter(names.CLIENT_REQUESTS.removesuffix("_total"), "Requests completed by the load generator",
                                (*labels, "outcome"), registry=self.registry)
        self.users = Gauge(names.CLIENT_USERS, "Simulated users running", registry=self.registry)
        self.rps = Gauge(names.CLIENT_REQUEST_RATE, "Current requests per second (Locust)", registry=self.registry)
        self.failures = Gauge(names.CLIENT_FAILURE_RATIO, "Failed / total requests (Locust)", registry=self.registry)
        self._attainment_metrics(labels)
        self.model, self.slo = slo.service.model, slo
        self._children: dict[str, SimpleNamespace] = {}

    def _attainment_metrics(self, labels: tuple[str, ...]) -> None:
        """SLO attainment, goodput and stream smoothness, by the judge's per-request definition."""
        self.slo_requests = Counter(names.CLIENT_SLO_REQUESTS.removesuffix("_total"),
                                    "Finished requests that met every per-request budget (met) or not (missed)",
                                    (*labels, "outcome"), registry=self.registry)
        self.good_tokens = Counter(names.CLIENT_GOOD_TOKENS.removesuffix("_total"),
                                   "Output tokens of requests that met every per-request budget", labels,
                                   registry=self.registry)
        self.max_gap = Histogram(names.CLIENT_MAX_GAP, "Longest gap between two chunks of a stream", labels,
                                 buckets=buckets(), registry=self.registry)

    def observe(self, rec: RequestRecord) -> None:
        c = self._children.get(rec.cls) or self._children_for(rec.cls)
        (c.requests_ok if rec.ok else c.requests_failed).inc()
        met = meets_slo(rec, self.slo)
        (c.slo_met if met else c.slo_missed).inc()
        if met:
            c.good_tokens.inc(rec.output_tokens or 0)
        if rec.ok:
            c.ttft.observe(rec.ttft_s)
            c.e2e.observe(rec.e2e_s)
            if rec.tpot_s is not None:
                c.tpot.observe(rec.tpot_s)
            if (gap := max_gap(rec)) is not None:
                c.max_gap.observe(gap)

    def _children_for(self, cls: str) -> SimpleNamespace:
        """One traffic class's labelled series, looked up once: ``labels()`` costs ~4 µs a call, 9 a request."""
        lab = (self.model, cls)
        c = self._children[cls] = SimpleNamespace(
            requests_ok=self.requests.labels(*lab, "ok"), requests_failed=self.requests.labels(*lab, "failed"),
            slo_met=self.slo_requests.labels(*lab, "met"), slo_missed=self.slo_requests.labels(*lab, "missed"),
            good_tokens=self.good_tokens.labels(*lab), ttft=self.ttft.labels(*lab), e2e=self.e2e.labels(*lab),
            tpot=self.tpot.labels(*lab), max_gap=self.max_gap.labels(*lab))
        return c

    def refresh(self, runner) -> None:
        """Copy the runner's live gauges (called before each scrape)."""
        self.users.set(runner.user_count)
        self.rps.set(runner.stats.total.current_rps)
        self.failures.set(runner.stats.total.fail_ratio)

    def serve(self, port: int) -> None:
        """Expose the registry on its own port (gauges refreshed by the master's poll loop)."""
        start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def exposition(self, runner) -> bytes:
        self.refresh(runner)
        return generate_latest(self.registry)


def install_web_ui(environment, metrics: ClientMetrics, rows: Callable[[], list[dict]]) -> None:
    """Add the SLO tab, its data feed and /metrics to Locust's Flask app."""
    web_ui = environment.web_ui
    if web_ui is None:
        return
    from flask import Response, request

    web_ui.template_args["extended_tabs"] = [{"title": "SLO", "key": TAB_KEY}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB_KEY, "structure": [{"key": k, "title": t} for k, t in COLUMNS]}
    ]

    @web_ui.app.after_request
    def _add_slo_rows(response):
        if request.path != "/stats/requests" or response.status_code != 200:
            return response
        data = response.get_json()
        data["extended_stats"] = [{"key": TAB_KEY, "data": rows()}]
        response.set_data(json.dumps(data))
        return response

    @web_ui.app.route("/slo.json")
    def _slo_json():
        return Response(json.dumps(rows()), mimetype="application/json")

    @web_ui.app.route("/metrics")
    def _metrics():
        return Response(metrics.exposition(environment.runner), mimetype=CONTENT_TYPE_LATEST)
