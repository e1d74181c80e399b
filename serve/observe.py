"""Per-request measurement at the ingress: monotonic timings -> metrics + one log line.

One :class:`RequestRecord` follows a request from arrival to its end, whatever
the end is (answered, rejected, failed, cancelled), and :meth:`RequestRecord.close`
is the only place that records request metrics and writes the request's JSON log
line, so the two always agree. Payloads and credentials are never logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from contract import timing as T
from serve.engines.base import Delta, Finish
from serve.metrics import ServerMetrics

log = structlog.get_logger("llmslo.request")

# slo.yaml's per-class targets are keyed by the load test's traffic classes; a request with an
# image and audio gets the larger of the two budgets.
MODALITY_CLASSES = {"text": ("text",), "image": ("image",), "audio": ("audio",), "image_audio": ("image", "audio")}


def status_class(code: int) -> str:
    """Label of ``ray_llmslo_requests_total``'s status for an HTTP code (499 = client left)."""
    if code == 499:
        return "cancelled"
    if code < 400:
        return "ok"
    return "client_error" if code < 500 else "server_error"


@dataclass
class RequestRecord:
    metrics: ServerMetrics
    request_id: str
    stream: bool = False
    modality: str = "text"
    replica: str | None = None
    started: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)
    dispatched: float | None = None  # handed to Ray's router (monotonic)
    replica_started_unix: float | None = None
    engine_first_token_unix: float | None = None
    engine_queue_wait_s: float | None = None
    first_byte: float | None = None  # the first token's bytes handed to the HTTP server
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    streamed_tokens: int = 0
    finish_reason: str | None = None
    ttft_budget_s: float | None = None  # slo.yaml's TTFT budget for this request (set once it is parsed)
    closed: bool = False

    def on_item(self, item: Delta | Finish) -> None:
        """Time a token arrival (ITL per token of the chunk) or take the final counts."""
        if isinstance(item, Finish):
            self.prompt_tokens = item.prompt_tokens
            self.completion_tokens = item.completion_tokens
            self.reasoning_tokens = item.reasoning_tokens
            self.finish_reason = item.reason
            return
        now = time.monotonic()
        self.streamed_tokens += item.tokens
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None and item.tokens > 0:
            gap = (now - self.last_token) / item.tokens
            for _ in range(item.tokens):
                self.metrics.itl.observe(gap, self.metrics.tags)
        self.last_token = now

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()

    def timing(self) -> dict[str, float | None]:
        """The per-hop timing object of contract/timing.py (None where a hop never happened)."""

        def since_received(unix: float | None) -> float | None:
            return None if unix is None else round(unix - self.started_unix, 6)

        return {
            T.INGRESS_RECEIVED_UNIX: round(self.started_unix, 6),
            T.INGRESS_DISPATCHED: None if self.dispatched is None else round(self.dispatched - self.started, 6),
            T.REPLICA_STARTED: since_received(self.replica_started_unix),
            T.ENGINE_QUEUE_WAIT: None if self.engine_queue_wait_s is None else round(self.engine_queue_wait_s, 6),
            T.ENGINE_FIRST_TOKEN: since_received(self.engine_first_token_unix),
            T.INGRESS_FIRST_BYTE: None if self.first_byte is None else round(self.first_byte - self.started, 6),
        }

    def _observe_hops(self) -> None:
        """TTFT split into hops (``ray_llmslo_ttft_hop_seconds``), for streams that had every hop (a plain
        answer's "first byte" is its whole body, so its relay hop would hold the whole generation)."""
        t = self.timing()
        if not self.stream or any(v is None for v in t.values()):
            return
        for hop, seconds in T.server_hops(t).items():
            self.metrics.ttft_hop.observe(max(0.0, seconds), {**self.metrics.tags, "hop": hop})

    def close(self, code: int, error_code: str | None = None) -> None:
        """Record the outcome once: counters, latency histograms, one log line."""
        if self.closed:
            return
        self.closed = True
        end = time.monotonic()
        m, tags = self.metrics, self.metrics.tags
        self.completion_tokens = self.completion_tokens or self.streamed_tokens  # no Finish: count what streamed
        status = status_class(code)
        m.requests.inc(1, {**tags, "status": status, "code": str(code)})
        ttft = None if self.first_token is None else self.first_token - self.started
        if ttft is not None:
            m.ttft.observe(ttft, {**tags, "modality": self.modality})
            if self.ttft_budget_s is not None:
                m.ttft_budget.inc(1, {**tags, "outcome": "met" if ttft < self.ttft_budget_s else "missed"})
            self._observe_hops()
            m.e2e.observe((self.last_token or end) - self.started, tags)
            if self.completion_tokens > 1 and self.last_token is not None:
                m.tpot.observe((self.last_token - self.first_token) / (self.completion_tokens - 1), tags)
        for counter, value in (
            (m.prompt_tokens, self.prompt_tokens),
            (m.completion_tokens, self.completion_tokens),
            (m.reasoning_tokens, self.reasoning_tokens),
        ):
            if value:
                counter.inc(value, tags)
        log.info(
            "request",
            request_id=self.request_id,
            replica=self.replica,
            model=m.model,
            stream=self.stream,
            modality=self.modality,
            status=status,
            code=code,
            error=error_code,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            reasoning_tokens=self.reasoning_tokens,
            ttft_s=None if ttft is None else round(ttft, 6),
            e2e_s=round(end - self.started, 6),
        )
