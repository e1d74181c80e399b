"""The ``transformers`` engine: one model copy on its GPUs, served by the library's continuous batching.

A replica holds one model: a local Hugging Face checkpoint (``model_path``; never downloaded,
``trust_remote_code`` off) or, when none is given, the GLM-4-9B architecture with random
weights (``synthetic_glm``; reported as synthetic weights). Scheduling, paged KV cache, CUDA
graphs and sampling are the library's (``model.init_continuous_batching``); this module only
turns a :class:`GenerationRequest` into token ids, streams the manager's per-request outputs as
:class:`Delta` items, cancels a request when its consumer goes away, and turns a CUDA OOM,
which kills the library's generation thread, into :class:`EngineOOMError` followed by a rebuilt
manager, so the replica keeps serving without a restart. A replica with several GPUs runs the
model tensor-parallel, one process per GPU (serve/engines/tensor_parallel.py); this process is rank 0.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.generation import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.continuous_api import (
    BackgroundThreadStatus,
    ContinuousBatchingManager,
)
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from serve.engines import gqa_attention, synthetic_glm, tensor_parallel
from serve.engines.base import (
    EngineError,
    EngineOOMError,
    EngineOverloadedError,
    EngineStats,
    Delta,
    Finish,
    GenerationRequest,
)

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
    prefix_caching: bool = False  # off: every request pays its full prefill, as the benchmark assumes
    warmup: bool = True
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
            if self.config.gqa_folding:
                gqa_attention.install()
            self.model.set_attn_implementation(self.config.attn_implementation)
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
        )
        gen = GenerationConfig(
            do_sample=False,
            eos_token_id=self._eos_ids() or -1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        if c.warmup and on_gpu:
            manager.warmup()
        manager.start()
        return manager

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

    async def stop(self) -> None:
        """Stop the batching thread (replica shutdown)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.to_thread(manager.destroy)
        if self.tp_group is not None:
            await asyncio.to_thread(self.tp_group.close)

    # ------------------------------------------------------------------ requests

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids the model sees for ``request``.

        A real checkpoint gets its chat template. With synthetic weights the content is meaningless and
        only the length matters, so the prompt is the request's words, repeated or cut to exactly
        ``request.prompt_tokens`` (the API layer's count, images included) — the benchmark's
        512-token prompt is then 512 tokens on the GPU, and both sides report the same count.
        """
        if not self.synthetic_weights:
            chat = [{"role": m.role, "content": m.text} for m in request.messages]
            return list(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        text = "\n".join(m.text for m in request.messages)
        words = self.tokenizer(text, add_special_tokens=False).input_ids or [self.tokenizer.unk_token_id]
        n = max(1, request.prompt_tokens)
        return (words * (n // len(words) + 1))[:n]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        """Stream the request's tokens; closing or cancelling the consumer cancels it in the batch."""
        await asyncio.to_thread(self._ready.wait)
        manager = self._manager
        if manager is None:
            raise EngineError("engine stopped")
        input_ids = self.prompt_ids(request)
        request_id = f"{request.request_id}#{next(self._ids)}"
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        manager.register_result_handler(request_id, outputs.put_nowait)
        added = manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=True,
            eos_token_id=-1 if request.ignore_eos else (self._eos_ids() or -1),
        )
        if added is None:
            _forget_handler(manager, request_id)
            raise EngineOverloadedError("the batching thread is not accepting requests (restarting)")
        done = False
        try:
            async for item in self._stream(manager, request, request_id, input_ids, outputs):
                if isinstance(item, Finish):
                    done = True
                yield item
        except EngineError:
            done = True  # a failed request is already gone from the batch
            raise
        finally:
            if not done:
                manager.cancel_request(request_id)
            _forget_handler(manager, request_id)

    async def _stream(self, manager: ContinuousBatchingManager, request: GenerationRequest, request_id: str,
                      input_ids: list[int], outputs: asyncio.Queue[GenerationOutput]
                      ) -> AsyncIterator[Delta | Finish]:
        sent_tokens, sent_text = 0, ""
        while True:
            try:
                out = await asyncio.wait_for(outputs.get(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                if manager.is_running():
                    continue
                out = GenerationOutput(request_id=request_id, status=RequestStatus.FAILED,
                                       error="continuous-batching thread stopped")
            if out.status == RequestStatus.FAILED:
                raise await asyncio.to_thread(self._failure, manager, out)
            tokens = out.generated_tokens
            if len(tokens) > sent_tokens:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                stop_at = _first_stop(text, request.stop, len(sent_text))
                if stop_at is not None:
                    yield Delta(content=text[len(sent_text):stop_at], tokens=len(tokens) - sent_tokens)
                    manager.cancel_request(request_id)
                    yield Finish("stop", len(input_ids), len(tokens), 0)
                    return
                yield Delta(content=text[len(sent_text):], tokens=len(tokens) - sent_tokens)
                sent_tokens, sent_text = len(tokens), text
            if out.is_finished():
                reason = "length" if len(tokens) >= request.max_tokens else "stop"
                yield Finish(reason, len(input_ids), len(tokens), 0)
                return

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


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index where the earliest stop string begins, searching only text that may contain a new match."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _forget_handler(manager: ContinuousBatchingManager, request_id: str) -> None:
    """Drop a request's output callback (the library removes it only after a finished output)."""
    with manager.output_router._lock:
        manager.output_router.result_handlers.pop(request_id, None)

