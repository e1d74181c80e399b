"""A CPU-only engine that streams like AutoGLM-Phone-9B on 2x RTX 4090.

Why: load tests, dashboards and alerts need a server whose latency behaves like
the real one (seed 001 §4.2: TTFT 320±15 ms for 512 prompt tokens, 18±2 ms per
output token up to a batch of 8) on machines without GPUs, including the ways a
real one degrades: a stalled replica, prefills pausing running streams, a full
KV cache. docs/serve.md writes the model down with its calibration table.

Model (all times multiplied by ``time_scale``; 1.0 = calibrated):

- admission (vLLM's scheduler): requests wait FIFO until fewer than
  ``max_num_seqs`` run and the KV cache has blocks for their context (keeping
  ``kv_watermark`` of it free when others run); the wait is ``Finish.queue_wait_s``.
- prefill: ``(prefill_base_ms + prefill_per_token_ms x context tokens) x f`` with
  a per-request speed factor ``f`` ~ N(1, ``prefill_speed_sd``). Of it,
  ``prefill_gpu_ms_per_token x tokens x f`` is GPU work: prefills run on the GPU
  one at a time and every running stream's next token is delayed by that time
  (``chunked_prefill``: in chunks of ``prefill_chunk_tokens``, one decode step
  between chunks, so streams see short pauses instead of one long one). The
  rest (tokenizer, scheduling, API) overlaps everything.
- decode: a sequence emits one token per step; its step is its own
  ``itl_ms x g`` (``g`` ~ N(1, ``decode_speed_sd``), drawn per request) times
  ``(1 + itl_batch_slope x (min(b, max_batch) - 1)) x max(1, b / max_batch)`` with
  ``b`` sequences decoding, +- ``itl_jitter_ms`` per token. A step starts when
  the previous token was taken by the consumer (less this engine's own timer
  overshoot on it, at most 3 ms), so a stalled replica delays every later
  token (no catch-up).
- KV cache: ``kv_cache_gb`` (default: 2 x 24 GB x ``gpu_memory_utilization`` -
  weights - activations) in blocks of ``block_tokens`` at ``kv_bytes_per_token``
  (GLM-4-9B: 40 layers x 2 KV heads x 128 dims x K,V x fp16). A sequence takes
  blocks for its context at admission and one more every ``block_tokens``
  tokens. When none is free the newest running sequence is pre-empted (blocks
  freed, back to the queue's head, prompt + output recomputed on readmission),
  as vLLM's recompute pre-emption does. EngineOOMError only when one sequence
  alone does not fit in the whole cache (a real allocation failure).
- determinism: text, lengths, speed factors and jitter come from
  ``random.Random`` seeded by the request's ``seed`` (or the engine ``seed``
  and a request counter).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from serve.engines.base import Delta, EngineOOMError, EngineStats, Finish, GenerationRequest

# asyncio.sleep(16.8 ms) took 18.3-19.2 ms on the 2-vCPU development VM: without forgiving the
# timer's own overshoot every simulated step would cost it too (+10 %). Real seconds.
TIMER_SLACK_S = 0.003

_REASONING = "嗯 ， 用户 问 的 是 身份 问题 。 我 需要 说明 我 是 谁 ， 能 做 什么 ， 并且 保持 简洁 。".split()
_INTRO = "我是 AutoGLM-Phone-9B ， 一个 运行 在 模拟 引擎 上 的 多模态 手机 助手 模型 。".split()
_FILLER = (
    "我 可以 理解 文字 、 图片 和 语音 ， 帮助 你 操作 手机 应用 ， 完成 查询 、 预订 与 设置 等 任务 。"
).split()


class SimulatedOptions(BaseModel):
    """``engine_options`` of the simulated engine (serve/config.yaml); docs/serve.md explains each."""

    model_config = ConfigDict(extra="forbid")

    time_scale: float = Field(1.0, gt=0, description="multiplies every latency; 0.1 = ten times faster")
    seed: int = 0
    max_batch: int = Field(8, ge=1)
    max_num_seqs: int = Field(16, ge=1)
    prefill_base_ms: float = Field(64.0, ge=0)
    prefill_per_token_ms: float = Field(0.5, ge=0)
    prefill_gpu_ms_per_token: float = Field(0.04, ge=0)
    prefill_speed_sd: float = Field(0.047, ge=0, le=0.3)
    chunked_prefill: bool = False
    prefill_chunk_tokens: int = Field(256, ge=1)
    itl_ms: float = Field(16.8, gt=0)
    itl_batch_slope: float = Field(0.004, ge=0)
    decode_speed_sd: float = Field(0.12, ge=0, le=0.3)
    itl_jitter_ms: float = Field(0.8, ge=0)
    gpu_memory_gb: float = Field(48.0, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    weights_gb: float = Field(20.6, ge=0)
    activations_gb: float = Field(1.6, ge=0)
    kv_cache_gb: float | None = Field(None, gt=0, description="default: derived from the four fields above")
    kv_bytes_per_token: int = Field(2 * 40 * 2 * 128 * 2, ge=1)
    block_tokens: int = Field(16, ge=1)
    kv_watermark: float = Field(0.01, ge=0, lt=1)
    answer_tokens: tuple[int, int] = (24, 96)
    reasoning_tokens: tuple[int, int] = (16, 64)

    def kv_bytes(self) -> float:
        """KV-cache size: what vLLM leaves after weights and activations on the platform's GPUs."""
        if self.kv_cache_gb is not None:
            return self.kv_cache_gb * 1e9
        return (self.gpu_memory_gb * self.gpu_memory_utilization - self.weights_gb - self.activations_gb) * 1e9


@dataclass
class KVCache:
    """Block accounting of the KV cache."""

    total_blocks: int
    block_tokens: int
    used_blocks: int = 0

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def take(self, blocks: int) -> None:
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


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine: what it will say, how fast, what it holds."""

    request: GenerationRequest
    plan: _Plan
    prefill_factor: float
    step_ms: float  # this request's decode step at batch 1
    blocks: int = 0
    produced: int = 0
    decoding: bool = False  # past its (re)computed prefill, in the decode batch
    preempted: bool = False
    pause_mark: float = 0.0  # the engine's GPU pause total when this sequence last accounted for it
    step_end: float = 0.0  # monotonic time its last step was due to end (the simulated GPU's clock)
    woke: float = 0.0  # monotonic time the engine's timer actually returned for that step
    admitted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context_tokens(self) -> int:
        return self.request.prompt_tokens + self.produced

    def next_token(self) -> Delta:
        reasoning = self.plan.reasoning
        i = self.produced
        self.produced += 1
        return Delta(reasoning=reasoning[i]) if i < len(reasoning) else Delta(content=self.plan.content[i - len(reasoning)])

    @property
    def total_tokens(self) -> int:
        return len(self.plan.reasoning) + len(self.plan.content)


class SimulatedEngine:
    """Latency- and memory-modelled stand-in for the real model (see module doc)."""

    name = "simulated"
    synthetic_weights = True

    def __init__(self, model_id: str, **options: object) -> None:
        self.model_id = model_id
        self.options = SimulatedOptions.model_validate(options)
        o = self.options
        self.kv = KVCache(int(o.kv_bytes() / (o.kv_bytes_per_token * o.block_tokens)), o.block_tokens)
        if self.kv.total_blocks < 1:
            raise ValueError("the KV cache holds no block: weights and activations exceed GPU memory")
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # admission order: pre-emption takes the newest
        self._gpu_free_at = 0.0  # monotonic time the GPU's last reserved prefill ends
        self._paused_s = 0.0  # total GPU time reserved by prefills (running streams wait for it)
        self._counter = 0
        self.preemptions = 0

    async def start(self) -> None:
        """Nothing to load."""

    async def check_health(self) -> None:
        """Always healthy; a killed replica is the crash drill, not this."""

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=len(self._waiting), kv_cache_usage=self.kv.usage,
                           extra={"preemptions": self.preemptions})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        seq = self._sequence(request)
        if self.kv.blocks_for(request.prompt_tokens + 1) > self.kv.total_blocks:
            raise EngineOOMError(f"KV cache of {self.kv.total_blocks} blocks cannot hold a "
                                 f"{request.prompt_tokens}-token prompt", source="simulated")
        arrived = time.monotonic()
        queue_wait: float | None = None
        self._waiting.append(seq)
        self._admit()
        try:
            while seq.produced < seq.total_tokens:
                if not seq.decoding:
                    await seq.admitted.wait()
                    queue_wait = time.monotonic() - arrived if queue_wait is None else queue_wait
                    await self._prefill(seq)
                else:
                    await self._decode_step(seq)
                    self._grow(seq)
                if seq.preempted:  # lost its blocks meanwhile: back to the queue, recomputed later
                    seq.preempted = False
                    continue
                yield seq.next_token()
            yield Finish(
                reason=seq.plan.finish,  # type: ignore[arg-type]
                prompt_tokens=request.prompt_tokens,
                completion_tokens=seq.produced,
                reasoning_tokens=len(seq.plan.reasoning),
                queue_wait_s=queue_wait or 0.0,
            )
        finally:
            self._retire(seq)

    # ---- scheduler ----------------------------------------------------------------

    def _admit(self) -> None:
        """Start queued sequences in FIFO order while a slot and their context's blocks are free."""
        o = self.options
        watermark = int(o.kv_watermark * self.kv.total_blocks)
        while self._waiting and len(self._running) < o.max_num_seqs:
            seq = self._waiting[0]
            need = self.kv.blocks_for(seq.context_tokens + 1)
            if need > self.kv.free_blocks - (watermark if self._running else 0):
                return
            self._waiting.popleft()
            self.kv.take(need)
            seq.blocks = need
            self._running.append(seq)
            seq.admitted.set()

    def _grow(self, seq: _Sequence) -> None:
        """Blocks for ``seq``'s next token; pre-empts the newest sequences (possibly ``seq``) when full."""
        need = self.kv.blocks_for(seq.context_tokens + 1) - seq.blocks
        while need > self.kv.free_blocks and not seq.preempted:
            if self._running == [seq]:
                raise EngineOOMError(f"KV cache of {self.kv.total_blocks} blocks cannot hold one "
                                     f"{seq.context_tokens + 1}-token sequence", source="simulated")
            self._preempt(self._running[-1])
        if not seq.preempted and need > 0:
            self.kv.take(need)
            seq.blocks += need

    def _preempt(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self.kv.release(seq.blocks)
        seq.blocks = 0
        seq.decoding = False
        seq.preempted = True
        seq.admitted.clear()
        self._waiting.appendleft(seq)
        self.preemptions += 1

    def _retire(self, seq: _Sequence) -> None:
        """A sequence ended (finished, failed or cancelled): free its slot and blocks."""
        if seq in self._running:
            self._running.remove(seq)
            self.kv.release(seq.blocks)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        seq.blocks = 0
        self._admit()

    # ---- timing -------------------------------------------------------------------

    async def _prefill(self, seq: _Sequence) -> None:
        """Compute the context (first time: also the latency outside the GPU); ends with a token."""
        o = self.options
        tokens = seq.context_tokens
        gpu_ms = o.prefill_gpu_ms_per_token * tokens * seq.prefill_factor
        if seq.produced == 0:
            total_ms = (o.prefill_base_ms + o.prefill_per_token_ms * tokens) * seq.prefill_factor
            await self._sleep_ms(max(0.0, total_ms - gpu_ms))
        chunk = o.prefill_chunk_tokens if o.chunked_prefill else tokens
        for done in range(0, tokens, chunk):
            if done and self._decoding_count():
                await self._sleep_ms(self._batch_step_ms(o.itl_ms))  # decoders take their step between chunks
            await self._use_gpu(gpu_ms * min(chunk, tokens - done) / tokens)
        seq.decoding = not seq.preempted
        seq.pause_mark = self._paused_s
        seq.step_end = seq.woke = time.monotonic()

    async def _use_gpu(self, ms: float) -> None:
        """Reserve the GPU for a prefill after the ones before it; decoders wait the same time."""
        now = time.monotonic()
        seconds = ms / 1000 * self.options.time_scale
        end = max(now, self._gpu_free_at) + seconds
        self._gpu_free_at = end
        self._paused_s += seconds
        await asyncio.sleep(end - now)

    async def _decode_step(self, seq: _Sequence) -> None:
        """One step of ``seq`` plus any prefill pauses. It starts when the consumer took the previous
        token (now), less this engine's own timer overshoot on that token (at most ``TIMER_SLACK_S``):
        the consumer's delay, however long, is never made up."""
        o = self.options
        step_s = _clipped(seq.plan.rng, self._batch_step_ms(seq.step_ms), o.itl_jitter_ms, 2) / 1000 * o.time_scale
        now = time.monotonic()
        overshoot = min(TIMER_SLACK_S, max(0.0, seq.woke - seq.step_end))
        seq.step_end = now - overshoot + step_s
        await asyncio.sleep(seq.step_end - now)
        while self._paused_s > seq.pause_mark and not seq.preempted:
            seq.step_end += self._paused_s - seq.pause_mark
            seq.pause_mark = self._paused_s
            await asyncio.sleep(max(0.0, seq.step_end - time.monotonic()))
        seq.woke = time.monotonic()

    def _decoding_count(self) -> int:
        return sum(s.decoding for s in self._running)

    def _batch_step_ms(self, step_ms: float) -> float:
        o = self.options
        b = max(1, self._decoding_count())
        return step_ms * (1 + o.itl_batch_slope * (min(b, o.max_batch) - 1)) * max(1.0, b / o.max_batch)

    async def _sleep_ms(self, ms: float) -> None:
        await asyncio.sleep(max(0.0, ms) / 1000 * self.options.time_scale)

    # ---- requests -----------------------------------------------------------------

    def _sequence(self, request: GenerationRequest) -> _Sequence:
        """Decide the whole output and the request's speed up front: deterministic for a given seed."""
        o = self.options
        plan = self._plan(request)
        prefill_factor = _clipped(plan.rng, 1.0, o.prefill_speed_sd, 3)
        step_ms = o.itl_ms * _clipped(plan.rng, 1.0, o.decode_speed_sd, 3)
        return _Sequence(request, plan, prefill_factor, step_ms)

    def _plan(self, request: GenerationRequest) -> _Plan:
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


def _clipped(rng: random.Random, mean: float, sd: float, clip_sd: float) -> float:
    """``mean`` + normal noise of ``sd`` clipped at ``clip_sd`` sd, never below zero."""
    noise = max(-clip_sd * sd, min(clip_sd * sd, rng.gauss(0.0, sd))) if sd else 0.0
    return max(0.0, mean + noise)


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
