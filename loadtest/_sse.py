"""Read one OpenAI chat-completions SSE stream and turn it into a timed record.

Stamp first, parse later. Under a burst (hundreds of streams whose tokens
arrive in the same millisecond) every greenlet's stamp waits for the work
the greenlets woken before it do per chunk, so that work is cut to the bone:
a socket read, the clock, the HTTP chunk decoder (C), an append. Splitting
lines, JSON decoding and every KPI happen once the stream has ended
(:func:`consume`). Each line is stamped with the clock reading taken right
after the socket read that delivered its last byte (``time.perf_counter()``,
CLOCK_MONOTONIC on Linux, the same clock in every process of a host).

Each read also asks the kernel when the bytes reached the socket
(``SO_TIMESTAMPNS``, the newest packet the read took). Where the kernel
answers (plain TCP on Linux), that arrival time is the stamp: the clock
reading moved back by the delay between arrival and read, so a generator busy
with other streams no longer makes a token look late. The delays are kept for
the self-check (loadtest/_selfcheck.py): a reader late by more than the gap
between two chunks takes both in one read, and the older one then carries the
newer one's time.

The definitions of every field live in docs/glossary.md; this module is their
one implementation.
"""

from __future__ import annotations

import bisect
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import gevent.ssl
import orjson

from contract.record import RequestRecord
from contract.timing import USAGE_KEY as TIMING_KEY

Clock = Callable[[], float]
Block = tuple[float, bytes]  # (stamp, bytes one read delivered)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not export it
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class StreamError(Exception):
    """The stream broke; the message says how, in words for the report."""


@dataclass
class _Event:
    t: float
    content: str
    reasoning: str


def kernel_timestamps_on() -> socket.socket:
    """A socket that asks for receive timestamps; keep it open for the run.

    Linux stamps incoming packets only while some socket asks for it, so
    without this the bytes that reach a fresh connection before its own flag
    is set (its first request's) would carry no kernel time.
    """
    keeper = socket.socket()
    keeper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return keeper


class SocketReads:
    """The response body as stamped blocks, read straight off the response's socket.

    ``response`` is geventhttpclient's ``HTTPSocketResponse`` (what Locust's
    FastResponse wraps): its socket, its HTTP parser (``feed``, which also
    undoes chunked encoding into ``_body_buffer``) and ``message_complete``.
    ``delays_s`` collects each read's delay from the kernel's receive time to
    the read (both on CLOCK_REALTIME), by which its stamp was moved back; empty
    where the kernel gives none (TLS sockets, non-Linux: stamps are then the
    read's own time).
    """

    def __init__(self, response, clock: Clock = time.perf_counter) -> None:
        self.response = response
        self.clock = clock
        self.delays_s: list[float] = []

    def __iter__(self) -> Iterator[Block]:
        resp, clock = self.response, self.clock
        buffered = resp._body_buffer
        if buffered:  # arrived with the headers
            yield clock(), bytes(buffered)
            del buffered[:]
        sock = resp._sock
        if sock is None or resp.message_complete:
            return
        recv = self._kernel_stamped(sock)
        try:
            while not resp.message_complete:
                data, late = recv()
                t = clock() - late  # stamp first: nothing but the read happened before this line
                if not data:
                    return
                resp.feed(data)
                if buffered:
                    yield t, bytes(buffered)
                    del buffered[:]
        except Exception:  # as geventhttpclient's own readline does: the half-read connection is closed
            resp.release()
            raise

    def _kernel_stamped(self, sock) -> Callable[[], tuple[bytes, float]]:
        """A read function returning (bytes, seconds since the kernel had them: 0 where it cannot say)."""
        size = self.response.block_size
        if isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket)):  # recvmsg would bypass TLS
            return lambda: (sock.recv(size), 0.0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            return lambda: (sock.recv(size), 0.0)
        delays, wall = self.delays_s, time.clock_gettime_ns

        def recv() -> tuple[bytes, float]:
            data, ancillary, _flags, _addr = sock.recvmsg(size, _ANCILLARY)
            now = wall(time.CLOCK_REALTIME)
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(raw)
                    late = max(0.0, (now - sec * 1_000_000_000 - nsec) / 1e9)
                    delays.append(late)
                    return data, late
            return data, 0.0

        return recv


def read_stream(record: RequestRecord, readline: Callable[[], bytes], t0: float, clock: Clock = time.perf_counter) -> None:
    """Consume a stream given as a line reader (each line stamped as it is returned) into ``record``."""

    def blocks() -> Iterator[Block]:
        while line := readline():
            yield clock(), line

    consume(record, blocks(), t0)


def consume(record: RequestRecord, blocks: Iterable[Block], t0: float) -> None:
    """Gather stamped blocks until the stream ends, then parse and summarise; raise StreamError when it broke.

    ``t0`` is the clock reading just before the request was sent. Reading stops
    at the end of the body or at a ``data: [DONE]`` line (cheap substring check
    first, so a token that merely contains "[DONE]" does not end it). A stream
    ends well with ``[DONE]`` or, for servers that send none (``transformers
    serve``), when the body ends after a choice carried a ``finish_reason``.
    """
    data = bytearray()
    stamps: list[float] = []
    ends: list[int] = []
    for t, block in blocks:
        data += block
        stamps.append(t)
        ends.append(len(data))
        if b"[DONE]" in block and _done_line(data):
            break
    record.response_bytes += len(data)
    _no_later_than_the_next(stamps)
    events, usage, done_at = _parse(_stamped_lines(data, stamps, ends))
    if done_at is None:
        raise StreamError("stream ended without [DONE] and without a finish_reason")
    record.e2e_s = done_at - t0
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


def _done_line(data: bytearray) -> bool:
    """Has a ``data: [DONE]`` line (any spacing) arrived?"""
    lines = (line.strip() for line in data.split(b"\n"))
    return any(line.startswith(b"data:") and line[5:].strip() == b"[DONE]" for line in lines)


def _stamped_lines(data: bytearray, stamps: list[float], ends: list[int]) -> Iterator[tuple[float, bytes]]:
    """Each line with the stamp of the read that delivered its last byte."""
    start = 0
    while start < len(data):
        stop = data.find(b"\n", start)
        stop = len(data) if stop < 0 else stop + 1
        yield stamps[bisect.bisect_left(ends, stop)], bytes(data[start:stop])
        start = stop


def _parse(lines: Iterable[tuple[float, bytes]]) -> tuple[list[_Event], dict | None, float | None]:
    """Token events, the last usage object and the end stamp (None: the stream did not end well), in line order.

    The end is the ``[DONE]`` line or, without one, the last data line once a
    choice carried a ``finish_reason``.

    Comments (``:``), ``event:``/``id:``/``retry:`` fields and blank separators
    are skipped; a multi-line event is not used by OpenAI servers and is read
    as separate lines.
    """
    events: list[_Event] = []
    usage: dict | None = None
    finished_at: float | None = None
    for t, line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith(b":"):
            continue
        if not stripped.startswith(b"data:"):
            if stripped.split(b":", 1)[0] in (b"event", b"id", b"retry"):
                continue
            raise StreamError(f"malformed SSE line: {stripped[:80].decode('utf-8', 'replace')!r}")
        payload = stripped[5:].strip()
        if not payload:
            continue
        if payload == b"[DONE]":
            return events, usage, t
        obj = _json_object(payload)
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
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                finished_at = t
        if finished_at is not None:
            finished_at = t  # a usage-only chunk may follow the finishing one
    return events, usage, finished_at


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
