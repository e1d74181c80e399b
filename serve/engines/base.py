"""The one small interface every engine implements.

Data flows one way: the API layer validates a request and turns it into a
:class:`GenerationRequest`; an engine turns that into a stream of
:class:`Delta` items ending with one :class:`Finish`; the API layer turns the
stream into OpenAI chunks and metrics. Engines never see HTTP, and the API layer
never sees tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class ImageInput:
    """A decoded, validated image. ``data`` is the original encoded bytes."""

    width: int
    height: int
    format: str
    data: bytes


@dataclass(frozen=True)
class AudioInput:
    """A decoded, validated audio clip (mono float samples are decoded on demand)."""

    duration_s: float
    sample_rate: int
    format: str
    data: bytes


@dataclass(frozen=True)
class Message:
    """One chat turn after validation: text parts joined, media parts decoded."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    text: str
    images: tuple[ImageInput, ...] = ()
    audios: tuple[AudioInput, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: tuple[Message, ...]
    prompt_tokens: int  # text tokens + media tokens, by the API layer's documented formula
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    thinking: bool = False  # generate reasoning tokens before the answer


@dataclass(frozen=True)
class Delta:
    """Newly generated text; ``tokens`` is how many tokens it carries (may be > 1)."""

    content: str = ""
    reasoning: str = ""
    tokens: int = 1


@dataclass(frozen=True)
class Finish:
    """Always the last item of a successful stream; counts are the engine's own."""

    reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int  # includes reasoning tokens, as OpenAI counts them
    reasoning_tokens: int
    queue_wait_s: float = 0.0  # time the request waited for an engine slot (0 if it never queues)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    extra: dict[str, Any] = field(default_factory=dict)


class EngineError(RuntimeError):
    """A generation failed for a server-side reason; the engine stays usable."""


class EngineOOMError(EngineError):
    """Out of accelerator memory. A real ``torch.cuda.OutOfMemoryError``, an upstream
    server's OOM error and the simulated KV-cache exhaustion are all raised as this,
    so the OOM metric and alert treat them the same. ``source`` is the metric label
    (``cuda``, ``upstream`` or ``simulated``)."""

    def __init__(self, message: str = "out of memory", *, source: str = "cuda") -> None:
        super().__init__(message)
        self.source = source


class EngineOverloadedError(EngineError):
    """The engine refuses new work right now (answered as 503, retryable)."""


class EngineInputError(EngineError):
    """The engine cannot run this request's input as sent (audio on a model without an audio
    encoder, images on a text-only checkpoint): answered as 400 ``unsupported_input``, since a
    retry cannot help and silently dropping the part would answer a different question."""


class EngineUnavailableError(EngineError):
    """The server the engine relies on cannot be reached (the upstream engine's
    inference server is down): answered as 503, and ``/healthz`` reports it."""


@runtime_checkable
class Engine(Protocol):
    name: str
    model_id: str
    synthetic_weights: bool

    async def start(self) -> None:
        """Load weights / connect; called once in the replica before traffic."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
        """Stream deltas then one Finish. Cancelling the consuming task must free
        the request's slot and memory (client disconnect)."""

    def stats(self) -> EngineStats:
        """Cheap snapshot for metrics and autoscaling."""

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve (Ray Serve restarts the replica)."""

    # Lifecycle, optional: ``async def shutdown(self) -> None`` releases what start() acquired (a
    # launched vLLM child and its workers, the batching thread and its GPU memory); the replica calls it
    # once when Serve stops it. Engines that hold nothing (the simulated one) need not define it.
    # Optional: ``async def check_ready(self) -> None`` raises EngineUnavailableError
    # while something outside the replica is missing (an upstream server); /healthz
    # then answers 503, and Serve does NOT restart the replica (a restart cannot help).
