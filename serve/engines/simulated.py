"""A CPU-only engine that streams like AutoGLM-Phone-9B on 2x RTX 4090.

Why: load tests, dashboards and alerts need a server whose latency behaves like
the real one (seed 001 §4.2: TTFT 320±15 ms for 512 prompt tokens, 18±2 ms per
output token up to a batch of 8) on machines without GPUs.

Model (all times multiplied by ``time_scale``; 1.0 = calibrated):

- admission: up to ``max_num_seqs`` sequences run at once; later ones wait in a
  FIFO queue (their wait is ``Finish.queue_wait_s``).
- prefill: ``prefill_base_ms + prefill_per_token_ms x prompt_tokens`` (prompt
  tokens include image/audio tokens), ± ``ttft_jitter_ms`` (normal, clipped 2 sd);
  prefills overlap decode, like chunked prefill.
- decode: one token per step per sequence; the step takes
  ``itl_ms x (1 + itl_batch_slope x (min(b, max_batch) - 1)) x max(1, b / max_batch)``
  with ``b`` sequences running: near-flat up to ``max_batch``, then the GPU is
  time-shared and inter-token latency grows linearly.
- KV cache: ``kv_cache_gb`` of blocks of ``block_tokens`` tokens at
  ``kv_bytes_per_token`` (GLM-4-9B: 40 layers x 2 KV heads x 128 dims x K,V x fp16).
  A sequence takes blocks for its prompt at admission and one more every
  ``block_tokens`` generated tokens; when none is free the request fails with
  EngineOOMError (source "simulated"), counted like a CUDA OOM.
- determinism: text, lengths and jitter come from ``random.Random`` seeded by the
  request's ``seed`` (or the engine ``seed`` and a request counter).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from serve.engines.base import Delta, EngineOOMError, EngineStats, Finish, GenerationRequest

_REASONING = "嗯 ， 用户 问 的 是 身份 问题 。 我 需要 说明 我 是 谁 ， 能 做 什么 ， 并且 保持 简洁 。".split()
_INTRO = "我是 AutoGLM-Phone-9B ， 一个 运行 在 模拟 引擎 上 的 多模态 手机 助手 模型 。".split()
_FILLER = (
    "我 可以 理解 文字 、 图片 和 语音 ， 帮助 你 操作 手机 应用 ， 完成 查询 、 预订 与 设置 等 任务 。"
).split()


class SimulatedOptions(BaseModel):
    """``engine_options`` of the simulated engine (serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    time_scale: float = Field(1.0, gt=0, description="multiplies every latency; 0.1 = ten times faster")
    seed: int = 0
    max_batch: int = Field(8, ge=1)
    max_num_seqs: int = Field(16, ge=1)
    prefill_base_ms: float = Field(64.0, ge=0)
    prefill_per_token_ms: float = Field(0.5, ge=0)
    ttft_jitter_ms: float = Field(6.0, ge=0)
    itl_ms: float = Field(17.3, gt=0)
    itl_batch_slope: float = Field(0.012, ge=0)
    itl_jitter_ms: float = Field(0.8, ge=0)
    kv_cache_gb: float = Field(20.0, gt=0)
    kv_bytes_per_token: int = Field(2 * 40 * 2 * 128 * 2, ge=1)
    block_tokens: int = Field(16, ge=1)
    answer_tokens: tuple[int, int] = (24, 96)
    reasoning_tokens: tuple[int, int] = (16, 64)


@dataclass
class KVCache:
    """Block accounting of the KV cache; allocation beyond capacity is an OOM."""

    total_blocks: int
    block_tokens: int
    used_blocks: int = 0

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    def take(self, blocks: int) -> None:
        if self.used_blocks + blocks > self.total_blocks:
            raise EngineOOMError(
                f"KV cache exhausted: need {blocks} blocks, {self.total_blocks - self.used_blocks} free",
                source="simulated",
            )
        self.used_blocks += blocks

    def release(self, blocks: int) -> None:
        self.used_blocks -= blocks

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks


@dataclass
class _Plan:
    reasoning: list[str]
    content: list[str]
    finish: str
    rng: random.Random = field(repr=False)


class SimulatedEngine:
    """Latency- and memory-modelled stand-in for the real model (see module doc)."""

    name = "simulated"
    synthetic_weights = True

    def __init__(self, model_id: str, **options: object) -> None:
        self.model_id = model_id
        self.options = SimulatedOptions.model_validate(options)
        o = self.options
        self.kv = KVCache(int(o.kv_cache_gb * 1e9 / (o.kv_bytes_per_token * o.block_tokens)), o.block_tokens)
        self._slots = asyncio.Semaphore(o.max_num_seqs)
        self._running = 0
        self._waiting = 0
        self._counter = 0

    async def start(self) -> None:
        """Nothing to load."""

    async def check_health(self) -> None:
        """Always healthy; a killed replica is the crash drill, not this."""

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=self._waiting, kv_cache_usage=self.kv.usage)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        o = self.options
        plan = self._plan(request)
        arrived = time.monotonic()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        held = 0
        try:
            queue_wait = time.monotonic() - arrived
            held = self.kv.blocks_for(request.prompt_tokens)
            self.kv.take(held)
            prefill = o.prefill_base_ms + o.prefill_per_token_ms * request.prompt_tokens
            deadline = time.monotonic() + self._ms(prefill, o.ttft_jitter_ms, plan.rng)
            produced = 0
            for kind, text in [("r", t) for t in plan.reasoning] + [("c", t) for t in plan.content]:
                if produced:
                    deadline += self._ms(self._step_ms(), o.itl_jitter_ms, plan.rng)
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                need = self.kv.blocks_for(request.prompt_tokens + produced + 1) - held
                if need:
                    self.kv.take(need)
                    held += need
                produced += 1
                yield Delta(reasoning=text) if kind == "r" else Delta(content=text)
            yield Finish(
                reason=plan.finish,  # type: ignore[arg-type]
                prompt_tokens=request.prompt_tokens,
                completion_tokens=produced,
                reasoning_tokens=len(plan.reasoning),
                queue_wait_s=queue_wait,
            )
        finally:
            self.kv.release(held)
            self._running -= 1
            self._slots.release()

    def _step_ms(self) -> float:
        o = self.options
        b = max(1, self._running)
        return o.itl_ms * (1 + o.itl_batch_slope * (min(b, o.max_batch) - 1)) * max(1.0, b / o.max_batch)

    def _ms(self, mean_ms: float, sd_ms: float, rng: random.Random) -> float:
        """Seconds for a mean + clipped normal jitter, in the engine's time scale."""
        jitter = max(-2 * sd_ms, min(2 * sd_ms, rng.gauss(0.0, sd_ms))) if sd_ms else 0.0
        return max(0.0, mean_ms + jitter) / 1000 * self.options.time_scale

    def _plan(self, request: GenerationRequest) -> _Plan:
        """Decide the whole output up front: deterministic for a given seed."""
        o = self.options
        self._counter += 1
        seed = request.seed if request.seed is not None else (0 if request.temperature == 0 else self._counter)
        rng = random.Random(f"{o.seed}:{seed}")
        reasoning_n = rng.randint(*o.reasoning_tokens) if request.thinking else 0
        if request.ignore_eos:
            total = request.max_tokens
        else:
            total = max(request.min_tokens, reasoning_n + rng.randint(*o.answer_tokens))
        finish = "length" if total >= request.max_tokens else "stop"
        total = min(total, request.max_tokens)
        reasoning = [_REASONING[i % len(_REASONING)] for i in range(min(reasoning_n, total))]
        content = [(_INTRO + _FILLER * (total // len(_FILLER) + 1))[i] for i in range(total - len(reasoning))]
        content, finish = _apply_stop(content, request.stop, finish, request.min_tokens - len(reasoning))
        return _Plan(reasoning, content, finish, rng)


def _apply_stop(content: list[str], stops: tuple[str, ...], finish: str, min_content: int) -> tuple[list[str], str]:
    """Cut the content before the first stop string (never below min_tokens)."""
    if not stops:
        return content, finish
    text = ""
    for i, tok in enumerate(content):
        text += tok
        if i + 1 >= min_content and any(s in text for s in stops):
            return content[:i], "stop"
    return content, finish
