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

from serve.engines.base import Delta, Finish
from serve.metrics import ServerMetrics

log = structlog.get_logger("llmslo.request")


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
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    streamed_tokens: int = 0
    finish_reason: str | None = None
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
