"""An engine that forwards to an OpenAI-compatible server (vLLM, SGLang, another llmslo).

Why: the real model runs best in a dedicated inference server; this engine lets
the same ingress, metrics, fault drills and load tests measure it unchanged.
Either ``base_url`` names a running server, or ``launch`` makes the replica start
``vllm serve ... --tensor-parallel-size N`` on the GPUs Ray gave it (the child
inherits ``CUDA_VISIBLE_DEVICES``) and wait until its ``/health`` answers; ``shutdown`` (called when
the replica exits) stops that child and its tensor-parallel workers, so a replaced replica never
leaves a vLLM holding the GPUs the next one needs.

Errors map onto the engine interface: an upstream error whose code or message
says out-of-memory becomes EngineOOMError(source="upstream") (counted like a
CUDA OOM), 429/503 become EngineOverloadedError, anything else EngineError.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from serve.engines.base import (
    Delta,
    EngineError,
    EngineOOMError,
    EngineOverloadedError,
    EngineStats,
    EngineUnavailableError,
    Finish,
    GenerationRequest,
    Message,
)
from serve.processes import free_port

OOM_MARKERS = ("out of memory", "out_of_memory", "outofmemory")
READY_TIMEOUT_S = 2.0
SHUTDOWN_GRACE_S = 30.0  # vLLM frees its GPUs and workers on SIGTERM within seconds


class LaunchOptions(BaseModel):
    """How to start ``vllm serve`` inside the replica (the seed's launch line by default)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(description="weights directory or hub id (must be available offline)")
    executable: str = "vllm"
    port: int = Field(0, ge=0, description="0 = a free port")
    tensor_parallel_size: int = Field(2, ge=1)
    dtype: str = "half"
    max_model_len: int = Field(2048, ge=16)
    extra_args: list[str] = Field(default_factory=list)
    ready_timeout_s: float = Field(900.0, gt=0)


class UpstreamOptions(BaseModel):
    """``engine_options`` of the upstream engine."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="e.g. http://10.0.0.5:8000/v1; unset when launching")
    upstream_model: str | None = Field(None, description="model name upstream; default: the served id")
    api_key: str = "EMPTY"
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0)
    launch: LaunchOptions | None = None


def launch_command(launch: LaunchOptions, served_model: str, port: int) -> list[str]:
    """The ``vllm serve`` command line for one model copy on this replica's GPUs."""
    return [
        launch.executable, "serve", launch.model_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--tensor-parallel-size", str(launch.tensor_parallel_size),
        "--dtype", launch.dtype,
        "--max-model-len", str(launch.max_model_len),
        "--served-model-name", served_model,
        *launch.extra_args,
    ]  # fmt: skip


def openai_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Validated messages back to OpenAI's wire format (media as base64 again)."""
    out = []
    for m in messages:
        if not (m.images or m.audios):
            out.append({"role": m.role, "content": m.text})
            continue
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.text}] if m.text else []
        for im in m.images:
            url = f"data:image/{im.format};base64,{base64.b64encode(im.data).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        for au in m.audios:
            parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(au.data).decode(),
                                                                 "format": au.format}})
        out.append({"role": m.role, "content": parts})
    return out


def classify(status: int, body: str) -> EngineError:
    """An upstream failure as the engine error the rest of the service understands."""
    message = body
    try:
        error = json.loads(body).get("error") or {}
        message = error.get("message") or body if isinstance(error, dict) else str(error)
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
    except (json.JSONDecodeError, AttributeError):
        code = ""
    text = f"{code} {message}".lower()
    if any(marker in text for marker in OOM_MARKERS):
        return EngineOOMError(f"upstream out of memory: {message}", source="upstream")
    if status in (429, 503):
        return EngineOverloadedError(f"upstream overloaded ({status}): {message}")
    return EngineError(f"upstream error ({status}): {message}")


class UpstreamEngine:
    """Streams from an OpenAI-compatible server (see module doc)."""

    name = "upstream"
    synthetic_weights = False

    def __init__(self, model_id: str, **options: object) -> None:
        self.model_id = model_id
        self.options = UpstreamOptions.model_validate(options)
        if self.options.base_url is None and self.options.launch is None:
            raise ValueError("upstream engine needs engine_options.base_url or engine_options.launch")
        self.base_url = (self.options.base_url or "").rstrip("/")
        self._process: asyncio.subprocess.Process | None = None
        self._client: httpx.AsyncClient | None = None
        self._running = 0

    async def start(self) -> None:
        if self.options.launch is not None:
            await self._launch(self.options.launch)
        timeout = httpx.Timeout(self.options.read_timeout_s, connect=self.options.connect_timeout_s)
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers={"authorization": f"Bearer {self.options.api_key}"}
        )

    async def _launch(self, launch: LaunchOptions) -> None:
        """Start ``vllm serve`` and wait for its /health; it shares this replica's GPUs."""
        port = launch.port or free_port()
        # its own process group: shutdown() can then reach vLLM's worker processes too
        self._process = await asyncio.create_subprocess_exec(*launch_command(launch, self.model_id, port),
                                                             start_new_session=True)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + launch.ready_timeout_s
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    raise EngineError(f"vllm serve exited with {self._process.returncode} during startup")
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(2)
        raise EngineError(f"vllm serve not healthy after {launch.ready_timeout_s:g} s")

    async def shutdown(self) -> None:
        """Close the HTTP client; stop a launched vLLM (SIGTERM to its group, SIGKILL after the grace period)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), SHUTDOWN_GRACE_S)
        except asyncio.TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=0, kv_cache_usage=0.0)

    async def check_health(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise EngineError(f"vllm serve exited with {self._process.returncode}")

    async def check_ready(self) -> None:
        """Any HTTP answer from the upstream counts as reachable; no answer -> unavailable."""
        if self._client is None:
            raise EngineUnavailableError("upstream engine not started")
        try:
            await self._client.get("/models", timeout=READY_TIMEOUT_S)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"upstream inference server unreachable ({type(exc).__name__})") from None

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.options.upstream_model or self.model_id,
            "messages": openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "chat_template_kwargs": {"enable_thinking": request.thinking},
        }
        if request.min_tokens:
            body["min_tokens"] = request.min_tokens
        if request.ignore_eos:
            body["ignore_eos"] = True
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        if self._client is None:
            raise EngineError("upstream engine not started")
        self._running += 1
        try:
            async with self._client.stream("POST", "/chat/completions", json=self._body(request)) as resp:
                if resp.status_code >= 400:
                    raise classify(resp.status_code, (await resp.aread()).decode(errors="replace"))
                async for item in self._parse(resp, request):
                    yield item
        except httpx.TransportError as exc:  # refused, reset, timed out: the server is gone
            raise EngineUnavailableError(f"upstream inference server unreachable ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream error: {type(exc).__name__}") from None
        finally:
            self._running -= 1

    async def _parse(self, resp: httpx.Response, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        """SSE lines -> Delta..., Finish (from the usage chunk and finish_reason)."""
        reason, produced, usage = "stop", 0, None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise classify(500, json.dumps(chunk))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                content = delta.get("content") or ""
                if reasoning or content:
                    produced += 1
                    yield Delta(content=content, reasoning=reasoning)
                reason = choice.get("finish_reason") or reason
        details = (usage or {}).get("completion_tokens_details") or {}
        yield Finish(
            reason="length" if reason == "length" else "stop",
            prompt_tokens=(usage or {}).get("prompt_tokens", request.prompt_tokens),
            completion_tokens=(usage or {}).get("completion_tokens", produced),
            reasoning_tokens=details.get("reasoning_tokens") or 0,
        )
