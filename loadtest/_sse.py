"""Read one OpenAI chat-completions SSE stream and turn it into a timed record.

Why line by line: geventhttpclient's ``read(n)`` waits until n bytes have
arrived, which would stamp a token with the arrival time of a later one. Each
``data:`` line is stamped with ``time.perf_counter()`` (CLOCK_MONOTONIC on
Linux, the same clock in every process of a host) the moment ``readline``
hands it over.

The definitions of every field live in docs/glossary.md; this module is their
one implementation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from contract.record import RequestRecord

Clock = Callable[[], float]


class StreamError(Exception):
    """The stream broke; the message says how, in words for the report."""


@dataclass
class _Event:
    t: float
    content: str
    reasoning: str


def iter_sse_data(readline: Callable[[], bytes], clock: Clock) -> Iterator[tuple[float, bytes, int]]:
    """Yield (arrival time, data payload, raw line bytes) for each ``data:`` line.

    Comments (``:``), ``event:``/``id:`` fields and blank separators are skipped;
    a multi-line event is not used by OpenAI servers and is treated as separate lines.
    """
    while True:
        line = readline()
        t = clock()
        if not line:
            return
        raw = len(line)
        stripped = line.strip()
        if not stripped or stripped.startswith(b":"):
            yield t, b"", raw
            continue
        if stripped.startswith(b"data:"):
            yield t, stripped[5:].strip(), raw
        elif stripped.split(b":", 1)[0] in (b"event", b"id", b"retry"):
            yield t, b"", raw
        else:
            raise StreamError(f"malformed SSE line: {stripped[:80].decode('utf-8', 'replace')!r}")


def _error_text(obj: dict) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def read_stream(record: RequestRecord, readline: Callable[[], bytes], t0: float, clock: Clock = time.perf_counter) -> None:
    """Consume the stream into ``record``; raise StreamError when it breaks.

    ``t0`` is the clock reading just before the request was sent.
    """
    events: list[_Event] = []
    usage: dict | None = None
    done = False
    for t, data, raw in iter_sse_data(readline, clock):
        record.response_bytes += raw
        if not data:
            continue
        if data == b"[DONE]":
            done = True
            record.e2e_s = t - t0
            break
        try:
            obj = json.loads(data)
        except ValueError:
            raise StreamError(f"malformed SSE data (not JSON): {data[:80].decode('utf-8', 'replace')!r}") from None
        if not isinstance(obj, dict):
            raise StreamError(f"malformed SSE data (not an object): {data[:80].decode('utf-8', 'replace')!r}")
        if "error" in obj:
            raise StreamError(f"error mid-stream: {_error_text(obj)}")
        if obj.get("usage"):
            usage = obj["usage"]
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if content or reasoning:
                events.append(_Event(t, content, reasoning))
    if not done:
        raise StreamError("stream ended without [DONE]")
    _summarise(record, events, usage, t0)


def _summarise(record: RequestRecord, events: list[_Event], usage: dict | None, t0: float) -> None:
    """Derive TTFT, TTFO, gaps, tokens and speeds from the stamped events."""
    record.content_deltas = sum(1 for e in events if e.content)
    record.reasoning_deltas = sum(1 for e in events if e.reasoning)
    deltas = len(events)
    if events:
        record.ttft_s = events[0].t - t0
        record.itl_s = [b.t - a.t for a, b in zip(events, events[1:])]
    first_content = next((e for e in events if e.content), None)
    if first_content is not None:
        record.ttfo_s = first_content.t - t0
    if usage is not None and usage.get("completion_tokens") is not None:
        record.output_tokens = int(usage["completion_tokens"])
        record.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("completion_tokens_details") or {}
        record.reasoning_tokens = details.get("reasoning_tokens")
        record.tokens_source = "usage"
        record.token_discrepancy = record.output_tokens - deltas
    else:
        record.output_tokens = deltas
        record.tokens_source = "deltas"
    if record.ttft_s is None:
        raise StreamError("stream finished without any content or reasoning token")
    n = record.output_tokens
    assert record.e2e_s is not None
    if n >= 2 and record.e2e_s > record.ttft_s:
        record.tpot_s = (record.e2e_s - record.ttft_s) / (n - 1)
        record.decode_tokens_per_s = 1.0 / record.tpot_s
    if n >= 1 and record.e2e_s > 0:
        record.output_tokens_per_s = n / record.e2e_s
    record.ok = True
