"""The API's locked doors: bearer tokens, a per-client rate limit, a bounded request body.

Why in the ingress: Ray Serve's HTTP proxy has none of these, and the ingress is
the one process every request passes before any decoding or replica work, so a
rejected request costs almost nothing. Every rejection is an OpenAI-shaped 4xx.
Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time

from starlette.requests import Request

from serve.errors import APIError

# Buckets of clients idle this long are full again and can be forgotten.
_IDLE_BUCKET_S = 300.0
_MAX_BUCKETS = 10_000


def check_bearer(request: Request, token: str, what: str) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise APIError(401, f"missing or wrong {what} bearer token", type="authentication_error", code="invalid_token")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused early (413) past ``limit`` bytes and (408) when it takes
    longer than ``timeout_s`` to arrive, so a huge or slow-dripping body holds nothing for long."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    return bytes(body)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="payload_too_large")


class RateLimiter:
    """Token bucket per client address: ``rate`` requests/s sustained, ``burst`` at once.

    Keyed by the TCP peer (not X-Forwarded-For, which a client can forge). With one
    ingress replica this is the service's limit; with N ingress replicas it is per replica.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)

    def check(self, request: Request) -> None:
        """Take one token for this client or raise 429 with Retry-After."""
        if self.rate <= 0:
            return
        client = request.client.host if request.client else "unknown"
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.rate)
            self._buckets[client] = (tokens, now)
            raise RateLimited(wait, self.rate, self.burst)
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        for client, (_, last) in list(self._buckets.items()):
            if now - last > _IDLE_BUCKET_S:
                del self._buckets[client]


class RateLimited(APIError):
    """429 in OpenAI's shape; ``retry_after`` seconds goes into the Retry-After header."""

    def __init__(self, retry_after: int, rate: float, burst: int) -> None:
        super().__init__(
            429,
            f"rate limit reached: {rate:g} requests/s per client (burst {burst}); retry after {retry_after} s",
            type="requests",
            code="rate_limit_exceeded",
        )
        self.retry_after = retry_after
