"""Read one OpenAI chat-completions SSE stream and turn it into a timed record.

Stamp first, parse later: the socket reads are stamped as they happen
(loadtest/_reads.py, where the per-chunk work is cut to the bone); splitting
lines, JSON decoding and every KPI happen here, once the stream has ended
(:func:`consume`). Each line is stamped with the stamp of the read that
delivered its last byte.

The definitions of every field live in docs/glossary.md; this module is their
one implementation.
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Iterable, Iterator, NamedTuple

import orjson

from contract.record import RequestRecord
from contract.timing import USAGE_KEY as TIMING_KEY
from loadtest._reads import Block, Clock, has_done_line


class StreamError(Exception):
    """The stream broke; the message says how, in words for the report."""


class _Event(NamedTuple):
    t: float
    content: str
    reasoning: str
    read: int  # index of the socket read that delivered it


def read_stream(record: RequestRecord, readline: Callable[[], bytes], t0: float, clock: Clock = time.perf_counter) -> None:
    """Consume a stream given as a line reader (each line stamped as it is returned) into ``record``."""

    def blocks() -> Iterator[Block]:
        while line := readline():
            yield clock(), line

    consume(record, blocks(), t0)


def consume(record: RequestRecord, blocks: Iterable[Block], t0: float, late_blocks: Collection[int] = ()) -> None:
    """Gather stamped blocks until the stream ends, then parse and summarise; raise StreamError when it broke.

    ``t0`` is the clock reading just before the request was sent; ``late_blocks``
    the indexes of blocks the reader read late (loadtest/_reads.py). Reading stops
    at the end of the body or at a ``data: [DONE]`` line (cheap substring check
    first, so a token that merely contains "[DONE]" does not end it). A stream
    ends well with ``[DONE]`` or, for servers that send none (``transformers
    serve``), when the body ends after a choice carried a ``finish_reason``.
    """
    data = bytearray()
    taken: list[bytes] = []  # the bytes of each read, up to the end
    stamps: list[float] = []
    for t, block in blocks:
        data += block
        taken.append(block)
        stamps.append(t)
        if b"[DONE]" in block and has_done_line(data, since=len(data) - len(block)):
            break
    record.response_bytes += len(data)
    _no_later_than_the_next(stamps)
    events, usage, done_at = _parse(taken, stamps)
    if done_at is None:
        raise StreamError("stream ended without [DONE] and without a finish_reason")
    record.e2e_s = done_at - t0
    _count_late_shared_reads(record, events, late_blocks)
    _summarise(record, events, usage, t0)


def _no_later_than_the_next(stamps: list[float]) -> None:
    """Bytes cannot have arrived after bytes behind them: cap each stamp at the next one's.

    Kernel arrival stamps can be earlier than a stamp taken by the clock: the bytes that came
    with the response headers (read by the HTTP client, whose kernel time is lost) are stamped
    when the reader got to them, which can be after the next read's bytes arrived. Capped, that
    block's stamp is the tightest bound known for it, and no gap comes out negative.
    """
    for i in range(len(stamps) - 2, -1, -1):
        if stamps[i] > stamps[i + 1]:
            stamps[i] = stamps[i + 1]


def _count_late_shared_reads(record: RequestRecord, events: list[_Event], late_blocks: Collection[int]) -> None:
    """Token events read late under one stamp with the next one (in one read; over TLS, also in records
    the kernel held under one arrival time): each carries the next one's arrival."""
    if not late_blocks:
        return
    shared = [a.read in late_blocks and a.t == b.t for a, b in zip(events, events[1:])]
    record.late_shared_reads = sum(shared)
    record.first_token_late_shared = bool(shared) and shared[0]


def _parse(blocks: list[bytes], stamps: list[float]) -> tuple[list[_Event], dict | None, float | None]:
    """Token events, the last usage object and the end stamp (None: the stream did not end well), in line order.

    Each line carries the stamp and index of the read that delivered its last byte
    (its ``\\n``; an unterminated last line, the last read's). The end is the
    ``[DONE]`` line or, without one, the last data line once a choice carried a
    ``finish_reason``. Comments (``:``), ``event:``/``id:``/``retry:`` fields and
    blank separators are skipped; a multi-line event is not used by OpenAI servers
    and is read as separate lines. One loop over the lines, run once per request
    for every token (docs/benchmarks.md measures it).
    """
    events: list[_Event] = []
    usage: dict | None = None
    finished_at: float | None = None
    carry, last = b"", len(blocks) - 1  # carry: the start of a line that a later read ends
    for read, block in enumerate(blocks):
        lines = (carry + block if carry else block).split(b"\n")
        carry = lines.pop() if read < last else b""
        t = stamps[read]
        for line in lines:
            if line.startswith(b"data: {"):  # the usual chunk: JSON allows the trailing \r or spaces
                payload = line[6:]
            else:
                payload = _data_field(line)
                if payload is None:
                    continue
                if payload == b"[DONE]":
                    return events, usage, t
            obj = _json_object(payload)
            if "error" in obj:
                raise StreamError(f"error mid-stream: {_error_text(obj)}")
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices") or ():
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if content or reasoning:
                        events.append(_Event(t, content, reasoning, read))
                reason = choice.get("finish_reason")
                if reason and isinstance(reason, str):
                    finished_at = t
            if finished_at is not None:
                finished_at = t  # a usage-only chunk may follow the finishing one
    return events, usage, finished_at


def _data_field(line: bytes) -> bytes | None:
    """The payload of a ``data:`` line, stripped; None for lines that carry none (blank, comment, other field)."""
    stripped = line.strip()
    if not stripped or stripped.startswith(b":"):
        return None
    if not stripped.startswith(b"data:"):
        if stripped.split(b":", 1)[0] in (b"event", b"id", b"retry"):
            return None
        raise StreamError(f"malformed SSE line: {stripped[:80].decode('utf-8', 'replace')!r}")
    return stripped[5:].strip() or None


def _json_object(payload: bytes) -> dict:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise StreamError(f"malformed SSE data (not JSON): {payload[:80].decode('utf-8', 'replace')!r}") from None
    if not isinstance(obj, dict):
        raise StreamError(f"malformed SSE data (not an object): {payload[:80].decode('utf-8', 'replace')!r}")
    return obj


def _error_text(obj: dict) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


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
        timing = usage.get(TIMING_KEY)  # an llmslo server's per-hop timing (loadtest/_hops.py)
        record.server_timing = timing if isinstance(timing, dict) else None
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
