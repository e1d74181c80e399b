"""The chat-completions request schema and its translation into a GenerationRequest.

Pydantic validates the wire format (roles, part types, ranges of sampling
parameters); :func:`prepare` then decodes media, counts prompt tokens and checks
the context budget. Any failure is an :class:`APIError` (400/404) raised before
the request reaches a model replica.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve import media, tokens
from serve.engines.base import AudioInput, GenerationRequest, ImageInput, Message
from serve.errors import APIError, invalid
from serve.settings import AppSettings


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Part):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Part):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Part):
    include_usage: bool = False


class Thinking(_Part):
    type: Literal["enabled", "disabled"]


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's request body plus the vLLM / GLM extensions load tests and the seed use.

    Unknown fields are ignored (as vLLM does), so newer clients keep working.
    """

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "autoglm-phone-9b", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "你是谁?"}]}]},
    )

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Thinking mode: the seed's extra_body fields, vLLM's and Zhipu's spellings.
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: Thinking | None = None

    def thinking_enabled(self, default: bool) -> bool:
        """vLLM's chat_template_kwargs wins, then Zhipu's thinking.type, then the seed's flag."""
        if self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking is not None:
            return self.chat_template_kwargs.enable_thinking
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        if self.enable_thinking is not None:
            return self.enable_thinking
        return default

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


@dataclass(frozen=True)
class Prepared:
    """A validated request: what the engine gets, plus what only the API layer needs."""

    generation: GenerationRequest
    stream: bool
    include_usage: bool
    return_reasoning: bool
    images: int
    audios: int

    @property
    def modality(self) -> str:
        """Metric label: text, image, audio, or image_audio."""
        kinds = [k for k, n in (("image", self.images), ("audio", self.audios)) if n]
        return "_".join(kinds) or "text"


def parse_body(body: bytes) -> ChatCompletionRequest:
    """JSON bytes -> request model; malformed JSON or schema errors become a 400."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    except ValueError:  # an integer beyond Python's 4300-digit limit
        raise invalid("request body is not valid JSON: a number is too long", None, "invalid_json") from None
    except RecursionError:
        raise invalid("request body is not valid JSON: nested too deeply", None, "invalid_json") from None
    if not isinstance(raw, dict):
        raise invalid("request body must be a JSON object", None, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    """The deepest pydantic error as OpenAI's 400 (param is the dotted field path).

    For ``str | list[part]`` content the deepest error is the one inside the list,
    which is the one that tells the user what to fix."""
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = _param(first["loc"]) or None
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return invalid(f"{param}: {first['msg']}" if param else first["msg"], param, code)


def _param(loc: tuple[int | str, ...]) -> str:
    """Field path without pydantic's union-member markers and discriminator tags."""
    out: list[int | str] = []
    after_tagged_union = False
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_MARKERS):
            after_tagged_union = "tagged-union" in part
            continue
        if after_tagged_union and isinstance(part, str) and out and isinstance(out[-1], int):
            after_tagged_union = False  # the discriminator value after the list index
            continue
        out.append(part)
    return ".".join(str(p) for p in out)


_TYPE_MARKERS = {"str", "int", "float", "bool", "none"}


async def prepare(req: ChatCompletionRequest, settings: AppSettings, request_id: str) -> Prepared:
    """Check model and context budget, decode media, count prompt tokens."""
    if req.model != settings.served_model:
        raise APIError(
            404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found"
        )
    messages = []
    prompt_tokens = tokens.PROMPT_OVERHEAD
    n_images = n_audios = 0
    for i, msg in enumerate(req.messages):
        message = await _message(msg, settings, f"messages.{i}")
        n_images += len(message.images)
        n_audios += len(message.audios)
        if n_images > settings.media.max_images:
            raise invalid(f"at most {settings.media.max_images} images per request", "messages", "too_many_images")
        if n_audios > settings.media.max_audios:
            raise invalid(f"at most {settings.media.max_audios} audio clips per request", "messages", "too_many_audios")
        prompt_tokens += tokens.message_tokens(
            message.text,
            [(im.width, im.height) for im in message.images],
            [au.duration_s for au in message.audios],
        )
        messages.append(message)
    max_tokens = _max_tokens(req, settings, prompt_tokens)
    if req.min_tokens > max_tokens:
        raise invalid(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
    generation = GenerationRequest(
        request_id=request_id,
        messages=tuple(messages),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        thinking=req.thinking_enabled(settings.thinking_default),
    )
    return Prepared(
        generation=generation,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        return_reasoning=req.return_reasoning is not False,
        images=n_images,
        audios=n_audios,
    )


def _max_tokens(req: ChatCompletionRequest, settings: AppSettings, prompt_tokens: int) -> int:
    room = settings.max_model_len - prompt_tokens
    if room < 1:
        raise invalid(
            f"the prompt is {prompt_tokens} tokens; this model's context is {settings.max_model_len}",
            "messages",
            "context_length_exceeded",
        )
    asked = req.max_completion_tokens or req.max_tokens
    if asked is None:
        return min(room, settings.default_max_tokens)
    if asked > room:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise invalid(
            f"{param} is {asked} but the prompt ({prompt_tokens} tokens) leaves {room} of this "
            f"model's {settings.max_model_len}-token context",
            param,
            "context_length_exceeded",
        )
    return asked


async def _message(msg: ChatMessage, settings: AppSettings, where: str) -> Message:
    if msg.content is None or msg.content == "" or msg.content == []:
        if msg.role != "assistant":
            raise invalid(f"{where}.content must not be empty", f"{where}.content")
        return Message(role=msg.role, text="")
    if isinstance(msg.content, str):
        return Message(role=msg.role, text=msg.content)
    limits = settings.media
    if len(msg.content) > limits.max_content_parts:
        raise invalid(
            f"{where}.content has {len(msg.content)} parts; at most {limits.max_content_parts}",
            f"{where}.content",
            "too_many_parts",
        )
    texts: list[str] = []
    images: list[ImageInput] = []
    audios: list[AudioInput] = []
    for j, part in enumerate(msg.content):
        param = f"{where}.content.{j}"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            images.append(await media.image_from_url(part.image_url.url, limits, f"{param}.image_url"))
        else:
            audios.append(await media.audio_from_part(part.input_audio.data, part.input_audio.format, limits,
                                                      f"{param}.input_audio"))
    if (images or audios) and msg.role != "user":
        raise invalid(f"{where}: only user messages may carry images or audio", f"{where}.content")
    return Message(role=msg.role, text="\n".join(texts), images=tuple(images), audios=tuple(audios))
