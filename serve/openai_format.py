"""OpenAI chat-completion wire objects: SSE chunks, the final completion, usage.

Byte layout follows OpenAI's API: ``data: {json}\\n\\n`` per chunk, the first
chunk carries ``role``, reasoning streams in ``reasoning_content`` (mirrored in
``reasoning`` for clients that read vLLM's newer field), then content, then a
chunk with ``finish_reason``, an optional usage chunk with empty ``choices``, and
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from serve.engines.base import Delta, Finish
from serve.errors import APIError
from contract.timing import USAGE_KEY

DONE = b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(finish: Finish, timing: dict[str, float | None]) -> dict[str, Any]:
    """OpenAI's usage object plus the server's per-hop timing (contract/timing.py), which
    OpenAI clients keep as an unknown extra."""
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
        USAGE_KEY: timing,
    }


def delta_fields(item: Delta, return_reasoning: bool) -> dict[str, str]:
    """The ``delta`` object of a chunk (empty when only hidden reasoning arrived)."""
    out: dict[str, str] = {}
    if item.reasoning and return_reasoning:
        out["reasoning_content"] = item.reasoning
        out["reasoning"] = item.reasoning
    if item.content:
        out["content"] = item.content
    return out


@dataclass
class ChunkWriter:
    """Serialises one streamed completion."""

    completion_id: str
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    def role(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def usage_chunk(self, finish: Finish, timing: dict[str, float | None]) -> bytes:
        return _sse(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(finish, timing),
            }
        )

    @staticmethod
    def error(err: APIError) -> bytes:
        return _sse(err.body())


def completion(
    completion_id: str, model: str, content: str, reasoning: str | None, finish: Finish,
    timing: dict[str, float | None],
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish.reason}],
        "usage": usage(finish, timing),
    }
