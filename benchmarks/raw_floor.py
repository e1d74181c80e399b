"""The machine's floor for a streaming client's CPU: a bare asyncio reader, nothing else.

``benchmarks/loadgen_accuracy.py --floor`` runs it against the same truth server, with the same
streams and reply length as the load test, pinned to the same core, so the load generator's CPU
per chunk can be read against what this machine costs for the reads alone (CPU per chunk differs
about 2x between the VMs this project has run on: docs/benchmarks.md). Every stream starts at
once (the lockstep pattern), keeps one connection and, in a loop, sends a request and takes the
response in whatever pieces arrive (an ``asyncio.Protocol``'s ``data_received``: asyncio's
cheapest read path), taking the clock once per piece and counting token chunks with one
substring count; no parsing, no records, no statistics. The CPU is this process's user + system
time while the streams run; chunks are the token chunks read.

    python benchmarks/raw_floor.py --url http://127.0.0.1:8123 --streams 256 --duration 20 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from urllib.parse import urlsplit

TOKEN_CHUNK = b'"content": "tok'  # how the truth server (loadtest/_truth_server.py) writes a token chunk


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Stream(asyncio.Protocol):
    """One closed-loop stream on one connection: ``data_received`` stamps and counts, nothing more."""

    def __init__(self, host: str, tokens: int, until: float, stamps: list[float], done: asyncio.Future) -> None:
        self.body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "max_tokens": tokens}).encode()
        self.host, self.until, self.stamps, self.done = host, until, stamps, done
        self.chunks, self.tail = 0, b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"X-Request-Id: {uuid.uuid4().hex}\r\nContent-Length: {len(self.body)}\r\n\r\n").encode()
        self.transport.write(head + self.body)

    def data_received(self, data: bytes) -> None:
        self.stamps.append(time.perf_counter())
        self.chunks += data.count(TOKEN_CHUNK)
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end: next request, same connection
            self.tail = b""
            if time.perf_counter() < self.until:
                self._send()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.chunks)


async def _stream_loop(host: str, port: int, tokens: int, until: float, stamps: list[float]) -> int:
    """One closed-loop stream until ``until``; returns the token chunks it read."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    await loop.create_connection(lambda: _Stream(host, tokens, until, stamps, done), host, port)
    return await done


async def _run(url: str, streams: int, duration: float, tokens: int) -> dict:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SystemExit(f"raw_floor reads plain HTTP only, not {url}")
    until = time.perf_counter() + duration
    stamps: list[float] = []
    cpu0 = _cpu_s()
    counts = await asyncio.gather(*(_stream_loop(parts.hostname, parts.port, tokens, until, stamps)
                                    for _ in range(streams)))
    cpu = _cpu_s() - cpu0
    chunks = sum(counts)
    return {"streams": streams, "chunks": chunks, "cpu_s": cpu,
            "cpu_s_per_1000_chunks": cpu / chunks * 1000 if chunks else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    print(json.dumps(asyncio.run(_run(args.url, args.streams, args.duration, args.tokens))))


if __name__ == "__main__":
    main()
