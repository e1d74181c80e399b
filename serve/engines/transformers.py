"""The ``transformers`` engine: one model copy on its GPUs, served by the library's continuous batching.

A replica holds one model: a local Hugging Face checkpoint (``model_path``; never downloaded,
``trust_remote_code`` off) or, when none is given, the GLM-4-9B architecture with random
weights (``synthetic_glm``; reported as synthetic weights). Scheduling, paged KV cache, CUDA
graphs and per-request sampling (temperature, top-p, greedy as top-k 1) are the library's
(``model.init_continuous_batching``); this module only turns a :class:`GenerationRequest` into token
ids, streams the manager's per-request outputs as :class:`Delta` items (text after the chat
template's ``</think>`` as content, before it as reasoning), cancels a request when its consumer
goes away, and turns a CUDA OOM,
which kills the library's generation thread, into :class:`EngineOOMError` followed by a rebuilt
manager, so the replica keeps serving without a restart. A replica with several GPUs runs the
model tensor-parallel, one process per GPU (serve/engines/tensor_parallel.py); this process is rank 0.
Requests with images on a GLM-4.1V-style
checkpoint take the library's ``generate()`` through the vision tower instead
(serve/engines/hf_vision.py): continuous batching takes token ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.generation import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.continuous_api import (
    BackgroundThreadStatus,
    ContinuousBatchingManager,
)
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from serve.engines import gqa_attention, hf_vision, synthetic_glm, tensor_parallel
from serve.engines.base import (
    EngineError,
    EngineInputError,
    EngineOOMError,
    EngineOverloadedError,
    EngineStats,
    Delta,
    Finish,
    GenerationRequest,
)

log = structlog.get_logger("llmslo.engine")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_POLL_S = 1.0  # how often a waiting stream checks that the generation thread is still alive


class TransformersEngineConfig(BaseModel):
    """Everything a replica needs to build its model and batching; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str | None = None  # local checkpoint folder; None = synthetic weights
    synthetic_preset: str = "glm-4-9b"
    synthetic_overrides: dict[str, Any] = Field(default_factory=dict)
    # None: every GPU this process sees (Ray exposes exactly the replica's); 0 = CPU; >1 = tensor parallel
    gpus_per_replica: int | None = Field(None, ge=0)
    cpu_ranks: int = Field(1, ge=1)  # tensor-parallel ranks on the CPU (gloo), when gpus_per_replica is 0: tests
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: str = "paged|sdpa"
    gqa_folding: bool = True  # paged|sdpa decode steps without repeat_kv (serve/engines/gqa_attention.py)
    kv_cache_gib: float = Field(2.0, gt=0)  # KV budget per replica: GLM-4-9B takes 40 KiB/token, 2 GiB = 52k tokens
    block_size: int = Field(256, ge=4)
    max_batch_tokens: int = Field(2048, gt=0)  # tokens per forward pass (prefill chunks + decodes)
    max_requests_per_batch: int = Field(32, gt=0)
    cuda_graphs: bool = True
    # CUDA-graph shapes are padded up to these multiples (0 = the library's 64 query / 16384 KV tokens).
    # Decode reads the whole padded KV length every step, so a small KV interval keeps decode fast
    # (H100, 8 streams: 21 tok/s per stream with the library's 16384, 48 with 256; docs/gpu.md).
    q_padding_interval: int = Field(8, ge=0)
    kv_padding_interval: int = Field(256, ge=0)
    async_batching: bool | None = None  # None: the library decides
    compile_level: int = Field(0, ge=0, le=3)  # the library's default_compile_level
    compile_layers: bool = True  # torch.compile each decoder layer's norms and MLP; one-GPU CUDA replicas only
    prefix_caching: bool = False  # off: every request pays its full prefill, as the benchmark assumes
    warmup: bool = True
    # Before readiness (GPU only), replay closed-loop traffic at these concurrencies with this shape, so the
    # padded batch shapes real traffic meets have their CUDA graphs (and compiled code) before the first user
    # request: a shape first met under load costs its capture inside some request's TTFT (docs/gpu.md).
    warmup_streams: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    warmup_prompt_tokens: int = Field(512, gt=0)
    warmup_output_tokens: int = Field(256, gt=0)
    seed: int = 0
    gpu_memory_limit_gib: float = Field(50.0, gt=0)  # refuse to start above this (weights + KV estimate)


class TransformersEngine:
    """Engine protocol implementation over ``transformers`` continuous batching."""

    name = "transformers"

    def __init__(self, model_id: str, **options: Any) -> None:
        """``options`` are serve/config.yaml's ``engine_options`` (fields of TransformersEngineConfig)."""
        self.config = TransformersEngineConfig.model_validate(options)
        self.model_id = model_id
        self.synthetic_weights = self.config.model_path is None
        self.oom_events = 0  # CUDA OOMs caught since start (the API layer counts them from the raised errors)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.vision: hf_vision.VisionRunner | None = None  # image requests on a checkpoint with a vision tower
        self.think_ids: tuple[int | None, int | None] = (None, None)  # ids of <think>, </think> if the vocab has them
        self._manager: ContinuousBatchingManager | None = None
        self._ready = threading.Event()
        self._rebuild_lock = threading.Lock()
        self._ids = itertools.count()
        self.tp_group: tensor_parallel.TensorParallelGroup | None = None  # set when the model spans ranks

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build or load the model on its GPUs, then start the batching thread (slow: runs off the loop)."""
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        ranks, device_type = self._ranks_and_device()
        try:
            cfg = None
            if self.synthetic_weights:
                cfg = synthetic_glm.build_config(self.config.synthetic_preset, **self.config.synthetic_overrides)
                self._check_memory_budget(cfg, ranks)
            mesh = self._join_ranks(ranks, device_type)
            device = self._device(device_type)
            if cfg is not None:
                self.tokenizer = synthetic_glm.build_tokenizer(cfg)
                self.model = synthetic_glm.build_model(cfg, device, _DTYPES[self.config.dtype], self.config.seed, mesh)
            else:
                self.model, self.tokenizer = self._load_checkpoint(device, mesh)
                if hasattr(self.model.config, "vision_config"):
                    self.vision = hf_vision.VisionRunner(self.model, self.tokenizer, self.config.model_path)
            vocab = self.tokenizer.get_vocab()
            self.think_ids = (vocab.get("<think>"), vocab.get("</think>"))
            if self.config.gqa_folding:
                gqa_attention.install()
            self.model.set_attn_implementation(self.config.attn_implementation)
            if self.config.compile_layers and ranks == 1 and device.type == "cuda":
                _compile_layer_parts(self.model)
            self._manager = self._new_manager()
        except torch.OutOfMemoryError as exc:
            raise EngineOOMError(f"out of GPU memory while loading the model: {exc}") from exc
        self._ready.set()

    def _ranks_and_device(self) -> tuple[int, str]:
        """Tensor-parallel ranks of the model copy (one per GPU Ray gave the replica) and the device type."""
        n = self.config.gpus_per_replica
        n = torch.cuda.device_count() if n is None else n
        if n == 0:
            return self.config.cpu_ranks, "cpu"
        if torch.cuda.device_count() < n:
            raise EngineError(f"gpus_per_replica={n} but this process sees {torch.cuda.device_count()} GPU(s)")
        return n, "cuda"

    def _join_ranks(self, ranks: int, device_type: str) -> Any:
        """The device mesh of a tensor-parallel model (rank 0 starts the other ranks first); None for one rank."""
        if ranks > 1 and self.tp_group is None:
            self.tp_group = tensor_parallel.TensorParallelGroup.launch(
                ranks, device_type, self.model_id, self.config.model_dump(mode="json"))
        return self.tp_group.mesh if self.tp_group is not None else None

    def _device(self, device_type: str) -> torch.device:
        """This rank's device: the GPU of its rank index, or the CPU."""
        rank = self.tp_group.rank if self.tp_group is not None else 0
        return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")

    def _check_memory_budget(self, cfg: Any, num_gpus: int) -> None:
        """Refuse a configuration whose weights + KV budget alone exceed the GPU-memory limit."""
        with torch.device("meta"):
            params = sum(p.numel() for p in synthetic_glm.Glm4ForCausalLM(cfg).parameters())
        weights_gib = params * _DTYPES[self.config.dtype].itemsize / 2**30
        per_gpu = (weights_gib + self.config.kv_cache_gib) / max(1, num_gpus)
        if per_gpu > self.config.gpu_memory_limit_gib:
            raise EngineError(
                f"weights {weights_gib:.1f} GiB + KV cache {self.config.kv_cache_gib} GiB over {num_gpus} GPU(s) "
                f"exceeds gpu_memory_limit_gib={self.config.gpu_memory_limit_gib}"
            )

    def _load_checkpoint(self, device: torch.device, mesh: Any) -> tuple[torch.nn.Module, Any]:
        """A local checkpoint: text LMs through AutoModelForCausalLM, GLM-4.1V-style VLMs through image-text-to-text.

        With a device mesh the library loads only this rank's shards (its ``base_model_tp_plan``).
        """
        path = self.config.model_path
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        auto = AutoModelForImageTextToText if hasattr(hf_config, "vision_config") else AutoModelForCausalLM
        placement: dict[str, Any] = {"device_map": str(device)} if mesh is None else {
            "distributed_config": tensor_parallel.distributed_config(mesh.size()), "device_mesh": mesh}
        model = auto.from_pretrained(
            path,
            trust_remote_code=False,
            local_files_only=True,
            dtype=_DTYPES[self.config.dtype],
            **placement,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        return model.eval(), tokenizer

    def _kv_blocks(self) -> int:
        """Blocks that fit the KV budget: 2 (K, V) x layers x KV heads x head dim x dtype bytes per token."""
        text = self.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * self.model.dtype.itemsize
        return max(2, int(self.config.kv_cache_gib * 2**30 // (per_token * self.config.block_size)))

    def _new_manager(self) -> ContinuousBatchingManager:
        """A started continuous-batching manager over the loaded model, sized by the config."""
        c = self.config
        on_gpu = self.model.device.type == "cuda"
        cb = ContinuousBatchingConfig(
            block_size=c.block_size,
            num_blocks=self._kv_blocks(),
            max_batch_tokens=c.max_batch_tokens,
            max_requests_per_batch=c.max_requests_per_batch,
            allow_block_sharing=c.prefix_caching,
            use_cuda_graph=on_gpu and c.cuda_graphs,
            q_padding_interval_size=c.q_padding_interval,
            kv_padding_interval_size=c.kv_padding_interval,
            use_async_batching=c.async_batching,
            default_compile_level=c.compile_level,
            seed=c.seed,
            cpu_group_timeout=tensor_parallel.CPU_GROUP_TIMEOUT_S,
            per_request_processors=True,
        )
        # Sampling on, with values the library only uses to decide which per-request processors to build
        # (it builds none for temperature 1.0 / top_p 1.0); every request then passes its own values.
        # Compiled, no top-p: Inductor (torch 2.11) fails to generate its cumsum over the 151,552-token
        # vocabulary, and the generation thread then hangs (H200, 2026-11-29, docs/gpu.md).
        gen = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5 if c.compile_level == 0 else None,
            top_k=self._vocab_size(),
            eos_token_id=self._eos_ids() or -1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        if c.warmup and on_gpu:
            manager.warmup()
        manager.start()
        if c.warmup and on_gpu:
            self._replay_traffic(manager)
        return manager

    def _replay_traffic(self, manager: ContinuousBatchingManager) -> None:
        """Closed-loop traffic per ``warmup_streams`` level: a first wave of staggered lengths, so each worker's
        second request arrives while the others decode at every stage (prefill and decode mixed at many
        KV lengths), then the second wave."""
        c = self.config
        prompt = [0] * c.warmup_prompt_tokens
        t0 = time.monotonic()
        for n in c.warmup_streams:
            for i in range(n):
                first = max(1, c.warmup_output_tokens * (i + 1) // n)
                manager.add_request(prompt, request_id=f"__warm_{n}_{i}_a", max_new_tokens=first, eos_token_id=-1)
            finished = 0
            while finished < 2 * n:
                out = manager.get_result(timeout=120)
                if out is None or out.status == RequestStatus.FAILED:
                    reason = out.error if out else "no result in 120 s"
                    raise EngineError(f"warm-up traffic failed at {n} streams: {reason}")
                finished += 1
                if out.request_id.endswith("_a"):
                    manager.add_request(prompt, request_id=out.request_id[:-2] + "_b",
                                        max_new_tokens=c.warmup_output_tokens, eos_token_id=-1)
        log.info("warmup_traffic_done", seconds=round(time.monotonic() - t0, 1), levels=c.warmup_streams)

    def _vocab_size(self) -> int:
        return self.model.config.get_text_config().vocab_size

    def _sampling(self, request: GenerationRequest) -> dict[str, Any]:
        """The library's per-request processor values: temperature 0 is greedy (top-k 1), as in OpenAI's API.

        Only the keys the manager built processors for are passed (it refuses others): no top-p when compiled.
        """
        if request.temperature == 0:
            values = {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        else:
            values = {"temperature": float(request.temperature), "top_p": float(request.top_p),
                      "top_k": self._vocab_size()}
        supported = self._manager.logit_processor.supported_keys if self._manager is not None else values
        return {k: v for k, v in values.items() if k in supported}

    def _eos_ids(self) -> list[int]:
        """Stop ids of a real model. Synthetic weights have no meaningful end: they stop at max_tokens."""
        if self.synthetic_weights:
            return []
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])

    async def check_health(self) -> None:
        """Unhealthy only when the generation thread is gone and no rebuild is under way."""
        manager = self._manager
        if manager is None:
            raise EngineError("engine not started")
        if self.tp_group is not None and self._ready.is_set():
            await asyncio.to_thread(self.tp_group.check)  # first: a dead rank also stops this rank's thread
        if not manager.is_running() and self._ready.is_set():
            raise EngineError("continuous-batching thread is not running")

    def stats(self) -> EngineStats:
        """Running/waiting requests and KV-cache occupancy, read from the library's scheduler and cache."""
        manager = self._manager
        processor = manager.batch_processor if manager is not None else None
        if processor is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        cache = processor.cache
        used = 1.0 - cache.get_num_free_blocks() / cache.num_blocks
        return EngineStats(
            running=len(processor.scheduler.active_requests),
            waiting=len(processor.scheduler.waiting_requests) + manager.input_queue.qsize(),
            kv_cache_usage=used,
            extra={"oom_events": self.oom_events, "num_blocks": cache.num_blocks, "block_size": cache.block_size},
        )

    async def shutdown(self) -> None:
        """Stop the batching thread and drop its paged cache and CUDA graphs (replica exit)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.to_thread(manager.destroy)
        if self.tp_group is not None:
            await asyncio.to_thread(self.tp_group.close)

    # ------------------------------------------------------------------ requests

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids the model sees for a text-only ``request``.

        A real checkpoint gets its chat template (``enable_thinking`` passed through, as GLM templates
        read it). With synthetic weights the content is meaningless and only the length matters, so
        the prompt is the request's words, repeated or cut to exactly ``request.prompt_tokens`` (the
        API layer's count, images included: synthetic weights charge an image its counted tokens but
        never run it) — the benchmark's 512-token prompt is then 512 tokens on the GPU, and both sides
        report the same count.
        """
        if not self.synthetic_weights:
            chat = [{"role": m.role, "content": m.text} for m in request.messages]
            return list(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False, enable_thinking=request.thinking))
        text = "\n".join(m.text for m in request.messages)
        words = self.tokenizer(text, add_special_tokens=False).input_ids or [self.tokenizer.unk_token_id]
        n = max(1, request.prompt_tokens)
        return (words * (n // len(words) + 1))[:n]

    def _check_input(self, request: GenerationRequest) -> None:
        """Refuse what a real checkpoint cannot run, rather than answer without it."""
        if self.synthetic_weights:
            return
        if any(m.audios for m in request.messages):
            raise EngineInputError(f"model {self.model_id!r} has no audio encoder: audio input is not supported")
        if any(m.images for m in request.messages) and self.vision is None:
            raise EngineInputError(f"model {self.model_id!r} is a text-only checkpoint: image input is not supported")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        """Stream the request's tokens; closing or cancelling the consumer cancels it in the batch."""
        self._check_input(request)
        await asyncio.to_thread(self._ready.wait)
        eos = -1 if request.ignore_eos else (self._eos_ids() or -1)
        if self.vision is not None and any(m.images for m in request.messages):
            inputs = await asyncio.to_thread(self.vision.inputs, request)
            prompt = inputs["input_ids"][0].tolist()
            tokens = self.vision.stream(inputs, request, eos)
        else:
            prompt, tokens = self._submit(request, eos)
        text = _Detokenizer(self.tokenizer, request, prompt, self.think_ids)
        async with contextlib.aclosing(tokens):
            async for ids in tokens:
                if (delta := text.update(ids)) is not None:
                    yield delta
                if text.stopped:
                    break
        yield text.finish(len(prompt), request.max_tokens)

    def _submit(self, request: GenerationRequest, eos: int | list[int]) -> tuple[list[int], AsyncIterator[list[int]]]:
        """Add a text-only request to the continuous batch: its prompt ids and its stream of generated ids."""
        manager = self._manager
        if manager is None:
            raise EngineError("engine stopped")
        input_ids = self.prompt_ids(request)
        request_id = f"{request.request_id}#{next(self._ids)}"
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        manager.register_result_handler(request_id, outputs.put_nowait)
        added = manager.add_request(input_ids, request_id=request_id, max_new_tokens=request.max_tokens,
                                    streaming=True, eos_token_id=eos, **self._sampling(request))
        if added is None:
            _forget_handler(manager, request_id)
            raise EngineOverloadedError("the batching thread is not accepting requests (restarting)")
        return input_ids, self._tokens(manager, request_id, outputs)

    async def _tokens(self, manager: ContinuousBatchingManager, request_id: str,
                      outputs: asyncio.Queue[GenerationOutput]) -> AsyncIterator[list[int]]:
        """Generated ids so far, per output of the library's thread; closed early, it cancels the request."""
        settled = False  # finished or failed: already gone from the batch
        try:
            while True:
                try:
                    out = await asyncio.wait_for(outputs.get(), timeout=_POLL_S)
                except asyncio.TimeoutError:
                    if manager.is_running():
                        continue
                    out = GenerationOutput(request_id=request_id, status=RequestStatus.FAILED,
                                           error="continuous-batching thread stopped")
                if out.status == RequestStatus.FAILED:
                    settled = True
                    raise await asyncio.to_thread(self._failure, manager, out)
                settled = out.is_finished()
                yield out.generated_tokens
                if settled:
                    return
        finally:
            if not settled:
                manager.cancel_request(request_id)
            _forget_handler(manager, request_id)

    def _failure(self, manager: ContinuousBatchingManager, out: GenerationOutput) -> EngineError:
        """Classify a failed request; if the generation thread died with it, rebuild the manager first."""
        status = manager.background_thread_status
        thread_died = status.local_status >= BackgroundThreadStatus.HARD_STOP or not manager.is_running()
        error: BaseException | None = None
        if thread_died:
            deadline = time.monotonic() + 30
            while manager.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
            error = status.fatal_error
            self._rebuild(manager)
        message = out.error or (str(error) if error else "generation failed")
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message.lower():
            return EngineOOMError(f"CUDA out of memory: {message}")
        return EngineError(message)

    def _rebuild(self, dead: ContinuousBatchingManager) -> None:
        """Replace a manager whose thread died (once, however many requests saw it die)."""
        with self._rebuild_lock:
            if self._manager is not dead:
                return  # another failed request already rebuilt it
            if isinstance(dead.background_thread_status.fatal_error, torch.OutOfMemoryError):
                self.oom_events += 1
            self._ready.clear()
            try:
                dead.stop(block=True, timeout=30)
                dead.destroy()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.tp_group is not None:
                    self.tp_group.rebuild()  # the other ranks' managers are rebuilt in step with this one
                self._manager = self._new_manager()
            finally:
                self._ready.set()


class _Detokenizer:
    """A request's cumulative generated ids as Delta items.

    Thinking: when the output opens with ``<think>`` (or the chat template's prompt ends with it,
    as GLM thinking templates may write) and the vocabulary has ``</think>``, the ids up to and
    including ``</think>`` are reasoning (counted as ``reasoning_tokens``, as OpenAI counts them) and
    the rest is content. Stop strings apply to the content only.
    """

    def __init__(self, tokenizer: Any, request: GenerationRequest, prompt: list[int],
                 think_ids: tuple[int | None, int | None]) -> None:
        self.think_start, self.think_end = think_ids if request.thinking else (None, None)
        self.opened_in_prompt = self.think_start is not None and prompt[-1:] == [self.think_start]
        self.tokenizer, self.stops = tokenizer, request.stop
        self.tokens: list[int] = []
        self.reasoning_tokens, self.reasoning, self.content, self.stopped = 0, "", "", False

    def _split(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(reasoning ids, content ids)."""
        if self.think_end is None or not (self.opened_in_prompt or ids[:1] == [self.think_start]):
            return [], ids
        end = ids.index(self.think_end) + 1 if self.think_end in ids else len(ids)
        return ids[:end], ids[end:]

    def update(self, ids: list[int]) -> Delta | None:
        """The text ``ids`` add to what was sent, or None when they add no token."""
        if len(ids) <= len(self.tokens):
            return None
        thought, answer = self._split(ids)
        tags = (self.think_start, self.think_end)
        reasoning = self.tokenizer.decode([t for t in thought if t not in tags], skip_special_tokens=True)
        content = self.tokenizer.decode(answer, skip_special_tokens=True)
        stop_at = _first_stop(content, self.stops, len(self.content))
        if stop_at is not None:
            content, self.stopped = content[:stop_at], True
        delta = Delta(content=content[len(self.content):], reasoning=reasoning[len(self.reasoning):],
                      tokens=len(ids) - len(self.tokens))
        self.tokens, self.reasoning_tokens, self.reasoning, self.content = list(ids), len(thought), reasoning, content
        return delta

    def finish(self, prompt_tokens: int, max_tokens: int) -> Finish:
        reason = "length" if len(self.tokens) >= max_tokens and not self.stopped else "stop"
        return Finish(reason, prompt_tokens, len(self.tokens), self.reasoning_tokens)


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index where the earliest stop string begins, searching only text that may contain a new match."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _forget_handler(manager: ContinuousBatchingManager, request_id: str) -> None:
    """Drop a request's output callback (the library removes it only after a finished output)."""
    with manager.output_router._lock:
        manager.output_router.result_handlers.pop(request_id, None)


def _compile_layer_parts(model: torch.nn.Module) -> None:
    """Compile the norms and MLP of every decoder layer, in place, for all batch sizes at once.

    Why: their many small element-wise kernels dominate a decode step of the eager model, and unlike the
    library's whole-step compile (which sees the paged-attention arguments) these parts depend only on the
    number of tokens in the step, so one dynamic-shape compile serves every padded shape.
    """
    for layer in model.get_decoder().layers:
        for name, child in layer.named_children():
            if name.endswith("norm") or name == "mlp":
                child.compile(dynamic=True)
