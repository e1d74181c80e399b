"""Image requests on a GLM-4.1V-style checkpoint: the library's ``generate()`` through the vision tower.

Why a second path: the library's continuous batching takes token ids only, and GLM-4.1V's image
tokens need both the vision tower's embeddings and 3-D (M-RoPE) positions, which only the model's
own ``forward`` builds from ``pixel_values`` / ``image_grid_thw``. So an image request runs
``generate()`` (one at a time, beside the batching thread) on a *twin* of the model: a second module
tree whose parameters are the same tensors (no extra memory) but whose attention is plain ``sdpa``,
because the batching manager switches the model itself to ``paged|sdpa``, which needs its cache.
The prompt is the checkpoint's chat template with one image slot per image, each slot expanded to
the image's token count as the library's GLM-4.1V processor does (the processor class itself needs
torchvision for its video half; only the image processor is loaded).
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from transformers.generation import StoppingCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.utils import is_torchvision_available

from serve.engines.base import EngineError, EngineInputError, EngineOOMError, GenerationRequest

IMAGE_TOKEN = "<|image|>"  # GLM-4.1V's image slot, as its processor names it


class VisionRunner:
    """Runs image requests on a weight-sharing twin of ``model`` (see module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = _image_processor(Path(path))
        self.twin = _weight_sharing_twin(model)
        self._lock = threading.Lock()  # one generate() at a time: it does not batch with others

    def inputs(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """Model inputs (ids, pixel values, grids) from the chat template and the request's images."""
        chat, images = [], []
        for m in request.messages:
            parts = [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.text}]
            chat.append({"role": m.role, "content": parts if m.images else m.text})
            images += [Image.open(io.BytesIO(im.data)).convert("RGB") for im in m.images]
        text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=request.thinking)
        pixels = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        slots = text.split(IMAGE_TOKEN)
        if len(slots) - 1 != len(images):
            raise EngineInputError(f"the chat template placed {len(slots) - 1} image slots for {len(images)} images")
        counts = [int(grid.prod()) // merge for grid in pixels["image_grid_thw"]]
        text = "".join(s + IMAGE_TOKEN * n for s, n in zip(slots, counts)) + slots[-1]
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        device = self.twin.device
        return {k: v.to(device) for k, v in {**ids, **pixels}.items()}

    async def stream(self, inputs: dict[str, torch.Tensor], request: GenerationRequest,
                     eos: int | list[int]) -> AsyncIterator[list[int]]:
        """Generated ids so far, as ``generate()`` produces them; closing the stream stops generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()
        greedy = request.temperature == 0  # as the batched path: temperature 0 is greedy
        kwargs = {
            **inputs, "max_new_tokens": request.max_tokens, "eos_token_id": eos,
            "pad_token_id": self.tokenizer.pad_token_id, "do_sample": not greedy,
            "temperature": None if greedy else request.temperature,
            "top_p": None if greedy else request.top_p, "top_k": None,
            "streamer": _QueueStreamer(loop, queue), "stopping_criteria": [_Cancelled(cancelled)],
        }
        worker = asyncio.ensure_future(asyncio.to_thread(self._generate, kwargs, loop, queue))
        tokens: list[int] = []
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                tokens += item
                yield list(tokens)
        finally:
            cancelled.set()
            await asyncio.shield(worker)

    def _generate(self, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop,
                  queue: asyncio.Queue[list[int] | BaseException | None]) -> None:
        try:
            with self._lock, torch.inference_mode():
                self.twin.generate(**kwargs)
        except torch.OutOfMemoryError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, EngineOOMError(f"CUDA out of memory: {exc}"))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, EngineError(f"generate() failed: {exc}"))
        loop.call_soon_threadsafe(queue.put_nowait, None)


class _QueueStreamer(BaseStreamer):
    """The library's streamer hook: new token ids into an asyncio queue (the prompt's first put is skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        """Nothing: the worker signals the end after generate() returns or raises."""


class _Cancelled(StoppingCriteria):
    """Stops generate() once the consumer went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _image_processor(path: Path) -> Any:
    """The checkpoint's image processor class; its PIL backend where torchvision is absent (the CPU test env)."""
    name = json.loads((path / "preprocessor_config.json").read_text())["image_processor_type"].removesuffix("Pil")
    return getattr(transformers, name if is_torchvision_available() else f"{name}Pil").from_pretrained(path)


def _weight_sharing_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture built on the meta device, then pointed at ``model``'s tensors, with sdpa attention."""
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # rotary tables are not in the state dict
        module, _, attr = name.rpartition(".")
        twin.get_submodule(module)._buffers[attr] = buffer
    twin.set_attn_implementation("sdpa")
    twin.generation_config = model.generation_config
    return twin.eval()
