"""A ground-truth OpenAI-style SSE server whose emit times are known.

Test and benchmark fixture for the load generator (not a model): every token
chunk is written on a fixed schedule (first after ``--ttft``, then every
``--itl`` seconds, on absolute deadlines so sleeps do not drift) and the
monotonic time of each write is logged per ``X-Request-Id``. ``GET /truth``
returns that log, so a test can compare the client's stamps with the server's.
CLOCK_MONOTONIC is system-wide on Linux, so the two processes share a clock.

``--mode`` makes it misbehave on purpose: http500, http400, redirect (307 to
an HTTPS address), midstream (an
error event after a few tokens), malformed (a non-JSON data line), stall
(stop writing), nodone (close without [DONE]); ``--max-streams N`` answers 503
to a request that would be the (N+1)-th concurrent stream (a server that fails
only under load); ``--strict`` answers 422 to a request field that OpenAI's
Chat Completions API does not define, as ``transformers serve`` does (a server
that takes no extensions); ``--tls-cert``/``--tls-key`` serve HTTPS; ``--drop-kept-alive N`` closes the connection without
answering every N-th chat request that arrives on a reused (kept-alive)
connection, as llama.cpp's server sometimes does. Every chat request is logged,
rejected ones with their status (dropped ones: ``"dropped"``).

Run: ``python -m loadtest._truth_server --port 8123 --ttft 0.1 --itl 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MODES = ("ok", "http500", "http400", "redirect", "midstream", "malformed", "stall", "nodone")
# the request fields of OpenAI's Chat Completions API (platform.openai.com/docs/api-reference/chat/create)
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "seed",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "audio", "modalities", "prediction",
    "reasoning_effort", "service_tier", "store", "metadata", "web_search_options",
})


class TruthServer:
    """The asyncio protocol logic; ``log`` maps request id -> {recv, emits, tokens, end, authorization}."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log: dict[str, dict] = {}
        self.active = 0  # streams in progress, for --ttft-per-stream
        self.reused = 0  # chat requests that came on a kept-alive connection, for --drop-kept-alive

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            served = 0
            while await self._one_request(reader, writer, served):
                served += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: int) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        recv = time.monotonic()
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if method == "GET" and path == "/truth":
            await self._send(writer, 200, "application/json", json.dumps(self.log).encode())
            return True
        if method == "GET" and path == "/healthz":
            await self._send(writer, 200, "application/json", b'{"status": "ok"}')
            return True
        if path != "/v1/chat/completions":
            await self._send(writer, 404, "application/json", _error("not found", "not_found"))
            return True
        entry = {"recv": recv, "emits": [], "authorization": headers.get("authorization", "")}
        if served and self.args.drop_kept_alive:
            self.reused += 1
            if self.reused % self.args.drop_kept_alive == 0:  # close without a byte of answer
                entry["status"] = "dropped"
                self.log[headers.get("x-request-id", "") + f"#dropped{self.reused}"] = entry
                return False
        return await self._stream(writer, json.loads(body), entry, headers.get("x-request-id", ""))

    async def _send(self, writer, code: int, ctype: str, payload: bytes, extra_headers: str = "") -> None:
        writer.write(
            f"HTTP/1.1 {code} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n{extra_headers}\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _stream(self, writer, req: dict, entry: dict, rid: str) -> bool:
        a = self.args
        self.log[rid] = entry
        if a.max_streams and self.active >= a.max_streams:
            entry["status"] = 503
            await self._send(writer, 503, "application/json", _error("overloaded (truth server --max-streams)", "server_error"))
            return True
        unknown = set(req) - OPENAI_CHAT_FIELDS if a.strict else set()
        if unknown:  # what transformers serve answers
            entry["status"] = 422
            await self._send(writer, 422, "application/json",
                             _error(f"Unexpected fields in the request: {sorted(unknown)}", "invalid_request_error"))
            return True
        if a.mode == "http500":
            await self._send(writer, 500, "application/json", _error("engine exploded (truth server http500 mode)", "server_error"))
            return True
        if a.mode == "redirect":  # a plain-HTTP address in front of an HTTPS one
            await self._send(writer, 307, "text/plain", b"moved", "Location: https://127.0.0.1/v1/chat/completions\r\n")
            return True
        if a.mode == "http400":
            await self._send(writer, 400, "application/json", _error("max_tokens is too large (truth server)", "invalid_request_error"))
            return True
        self.active += 1
        try:
            return await self._tokens(writer, req, entry, rid, a.ttft + a.ttft_per_stream * (self.active - 1))
        finally:
            self.active -= 1

    async def _tokens(self, writer, req: dict, entry: dict, rid: str, ttft: float) -> bool:
        a = self.args
        tokens = entry["tokens"] = int(req.get("max_tokens") or a.tokens)
        recv = entry["recv"]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = lambda obj: _chunked(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
        # role-only and empty chunks first: they must not count as the first token
        head += chunk(_delta({"role": "assistant"})) + chunk(_delta({"content": ""}))
        if not a.headers_with_first_token:
            writer.write(head)
            await writer.drain()
            head = b""
        reasoning = min(a.reasoning, tokens)
        sent = 0
        while sent < tokens:
            deadline = recv + ttft + a.itl * (sent // a.tokens_per_chunk)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            if a.mode == "stall" and sent >= 2:
                await asyncio.sleep(3600)
            if a.mode == "midstream" and sent >= 2:
                writer.write(chunk({"error": {"message": "replica lost (truth server midstream mode)", "type": "server_error"}}))
                break
            if a.mode == "malformed" and sent >= 2:
                writer.write(chunk(b"{not json"))
                break
            n = min(a.tokens_per_chunk, tokens - sent)
            key = "reasoning_content" if sent < reasoning else "content"
            entry["emits"].append(time.monotonic())
            writer.write(head + chunk(_delta({key: "tok " * n})))
            head = b""
            await writer.drain()
            sent += n
        else:
            writer.write(head)  # a reply of no tokens: the headers go now
            usage = {"prompt_tokens": 10, "completion_tokens": tokens + a.usage_offset, "total_tokens": 10 + tokens,
                     "completion_tokens_details": {"reasoning_tokens": reasoning}}
            writer.write(chunk({"id": rid, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
            if a.mode != "nodone":
                writer.write(chunk(b"[DONE]"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        entry["end"] = time.monotonic()
        return a.mode not in ("nodone", "midstream", "malformed")


def _delta(delta: dict) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _error(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft", type=float, default=0.1, help="seconds from request to first token")
    p.add_argument("--ttft-per-stream", type=float, default=0.0,
                   help="extra TTFT per other stream in progress (a server that degrades with load)")
    p.add_argument("--itl", type=float, default=0.02, help="seconds between chunks")
    p.add_argument("--tokens", type=int, default=16, help="reply length when the request has no max_tokens")
    p.add_argument("--tokens-per-chunk", type=int, default=1, help="tokens packed into one SSE chunk")
    p.add_argument("--usage-offset", type=int, default=0, help="misreport usage.completion_tokens by this much")
    p.add_argument("--reasoning", type=int, default=0, help="first N tokens are reasoning_content")
    p.add_argument("--headers-with-first-token", action="store_true",
                   help="hold the response headers back until the first token and send them in one write with it "
                        "(as llmslo's ingress does: it decides the status at the first token)")
    p.add_argument("--mode", choices=MODES, default="ok")
    p.add_argument("--max-streams", type=int, default=0, help="answer 503 beyond this many concurrent streams (0: no limit)")
    p.add_argument("--strict", action="store_true", help="answer 422 to request fields OpenAI does not define")
    p.add_argument("--drop-kept-alive", type=int, default=0,
                   help="close, unanswered, every N-th request that came on a reused connection (0: never)")
    p.add_argument("--cpu", type=int, default=-1, help="pin the server to this CPU core")
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (and --tls-key)")
    p.add_argument("--tls-key", help="the certificate's PEM private key")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    server = TruthServer(args)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", args.port, backlog=4096, ssl=tls)
    print(f"truth server listening on 127.0.0.1:{args.port}", flush=True)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    asyncio.run(serve(args))


@contextmanager
def running(port: int, *flags: str) -> Iterator[str]:
    """Start the server in a subprocess on 127.0.0.1:port; yield its URL; always stop it."""
    cmd = [sys.executable, "-m", "loadtest._truth_server", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # the "listening" line, or an error
        if "listening" not in line:
            raise RuntimeError(f"truth server did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        yield f"{'https' if '--tls-cert' in flags else 'http'}://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def self_signed_cert(folder: Path, openssl: str = "openssl") -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 in ``folder`` (made once, with openssl), for ``--tls-cert``/``--tls-key``."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    return cert, key


def fetch_truth(url: str) -> dict[str, dict]:
    """The server's emit log: request id -> {recv, emits, tokens, end, authorization}."""
    tls = ssl._create_unverified_context() if url.startswith("https") else None  # the tests' self-signed certificate
    with urllib.request.urlopen(f"{url}/truth", timeout=10, context=tls) as resp:
        return json.loads(resp.read())


if __name__ == "__main__":
    main()
