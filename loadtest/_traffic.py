"""The traffic mix: which request to send next, and its body.

Bodies are built before the clock starts (off the timed path). Images and audio
are synthesised in gevent's OS-thread pool so that encoding a 1344 px PNG does
not stall the event loop that is stamping other users' tokens. Every image and
clip has unique pixels/samples, so no server-side multimodal cache can hit.
"""

from __future__ import annotations

import base64
import io
import json
import random
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ("text", "image", "audio")
CHARS_PER_TOKEN = 4
_WORDS = (
    "the phone screen shows a settings page with a list of options and a search bar at the top "
    "open the app tap the button scroll down until you find the item then confirm the dialog "
    "describe what the user sees and which action the assistant should take next on the device"
).split()


class TrafficError(ValueError):
    """A traffic option is invalid; the message is one line for the user."""


@dataclass(frozen=True)
class Dialect:
    """Which request fields beyond plain OpenAI a server takes (``--server-dialect``).

    A strict server (``transformers serve``, OpenAI itself) answers 422/400 to a
    field it does not know, so every extension is opt-in: a dialect lists what
    may be sent, and the report says how the reply length was controlled.
    """

    name: str
    length_fields: bool  # min_tokens = max_tokens and ignore_eos: fixed reply length (vLLM's sampling extensions)
    thinking_fields: tuple[str, ...]  # request fields that carry the thinking switch
    length_control: str  # for summary.json and the report


_FIXED = "min_tokens = max_tokens and ignore_eos: every reply exactly max_tokens long"
DIALECTS = {
    "openai": Dialect("openai", False, (), "max_tokens only: a reply may end earlier, at the model's end of sequence"),
    "vllm": Dialect("vllm", True, ("chat_template_kwargs",), _FIXED),
    "llmslo": Dialect("llmslo", True, ("enable_thinking", "return_reasoning", "chat_template_kwargs"), _FIXED),
}


@dataclass(frozen=True)
class Mix:
    """Parsed traffic options (from Locust custom arguments)."""

    weights: dict[str, float]
    thinking_share: float
    short_share: float
    input_tokens: int
    output_tokens: int
    length_spread: float
    short_tokens: int
    images_max: int
    image_px: tuple[int, int]
    audio_s: tuple[float, float]
    model: str
    dialect: Dialect = DIALECTS["openai"]
    prompts: tuple[dict, ...] = ()

    @classmethod
    def from_options(cls, opts, short_tokens: int, model: str) -> "Mix":
        """Validate options; raise TrafficError with one line on the first bad one."""
        weights = parse_weights(opts.mix)
        for name, lo, hi in (("--thinking-share", 0, 1), ("--short-share", 0, 1), ("--length-spread", 0, 0.99)):
            value = getattr(opts, name[2:].replace("-", "_"))
            if not lo <= value <= hi:
                raise TrafficError(f"{name} must be within [{lo}, {hi}], got {value}")
        if opts.input_tokens < 1 or opts.output_tokens < 1:
            raise TrafficError("--input-tokens and --output-tokens must be >= 1")
        if opts.images_max < 1:
            raise TrafficError("--images-max must be >= 1")
        if not 16 <= opts.image_min_px <= opts.image_max_px:
            raise TrafficError("--image-min-px must be >= 16 and <= --image-max-px")
        if not 0.1 <= opts.audio_min_s <= opts.audio_max_s <= 60:
            raise TrafficError("--audio-min-s/--audio-max-s must satisfy 0.1 <= min <= max <= 60")
        prompts = load_prompts(opts.prompts_file) if opts.prompts_file else ()
        dialect = DIALECTS[opts.server_dialect]
        return cls(
            weights=weights,
            # a dialect without a thinking switch cannot ask for thinking: no request is recorded as thinking
            thinking_share=opts.thinking_share if dialect.thinking_fields else 0.0,
            short_share=opts.short_share,
            input_tokens=opts.input_tokens,
            output_tokens=opts.output_tokens,
            length_spread=opts.length_spread,
            short_tokens=short_tokens,
            images_max=opts.images_max,
            image_px=(opts.image_min_px, opts.image_max_px),
            audio_s=(opts.audio_min_s, opts.audio_max_s),
            model=opts.model or model,
            dialect=dialect,
            prompts=prompts,
        )


def parse_weights(text: str) -> dict[str, float]:
    """'text=5,image=3,audio=2' -> {'text': 5.0, ...}; unknown classes are an error."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in CLASSES:
            raise TrafficError(f"--mix: expected CLASS=WEIGHT with CLASS in {'/'.join(CLASSES)}, got {part!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise TrafficError(f"--mix: weight of {name} is not a number: {value!r}") from None
        if weights[name] < 0:
            raise TrafficError(f"--mix: weight of {name} is negative")
    if not weights or sum(weights.values()) <= 0:
        raise TrafficError("--mix: at least one class needs a positive weight")
    return weights


def load_prompts(path: str) -> tuple[dict, ...]:
    """Read a JSONL file: each line {"prompt": str} or {"messages": [...]}, optional "max_tokens"."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrafficError(f"--prompts-file: cannot read {path}: {exc.strerror}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TrafficError(f"--prompts-file: {path}:{n} is not JSON") from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise TrafficError(f"--prompts-file: {path}:{n} needs a 'prompt' or 'messages' key")
        rows.append(row)
    if not rows:
        raise TrafficError(f"--prompts-file: {path} holds no prompts")
    return tuple(rows)


@dataclass
class Planned:
    """One request, decided: its class, flags and JSON body."""

    cls: str
    thinking: bool
    short: bool
    max_tokens: int
    body: bytes


def plan_request(mix: Mix, rng: random.Random, media_pool) -> Planned:
    """Draw the next request from the mix and build its body (media via media_pool.apply)."""
    if mix.prompts:
        return _from_prompt_file(mix, rng)
    cls = rng.choices(list(mix.weights), weights=list(mix.weights.values()))[0]
    short = rng.random() < mix.short_share
    thinking = not short and rng.random() < mix.thinking_share
    max_tokens = mix.short_tokens if short else _spread(mix.output_tokens, mix.length_spread, rng)
    content: list[dict] = [{"type": "text", "text": prompt_text(_spread(mix.input_tokens, mix.length_spread, rng), rng)}]
    if cls == "image":
        for _ in range(rng.randint(1, mix.images_max)):
            size = (rng.randint(*mix.image_px), rng.randint(*mix.image_px))
            fmt = rng.choice(("jpeg", "png"))
            data = media_pool.apply(synth_image, (size, fmt, rng.getrandbits(32)))
            content.append({"type": "image_url", "image_url": {"url": f"data:image/{fmt};base64,{data}"}})
    elif cls == "audio":
        seconds = rng.uniform(*mix.audio_s)
        data = media_pool.apply(synth_speech_wav, (seconds, rng.getrandbits(32)))
        content.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    body = _body(mix, [{"role": "user", "content": content}], max_tokens, thinking, fixed_length=True)
    return Planned(cls, thinking, short, max_tokens, body)


def _from_prompt_file(mix: Mix, rng: random.Random) -> Planned:
    row = rng.choice(mix.prompts)
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    max_tokens = int(row.get("max_tokens", mix.output_tokens))
    thinking = rng.random() < mix.thinking_share
    body = _body(mix, messages, max_tokens, thinking, fixed_length=False)
    kinds = json.dumps(messages)
    cls = "image" if '"image_url"' in kinds else "audio" if '"input_audio"' in kinds else "text"
    return Planned(cls, thinking, max_tokens <= mix.short_tokens, max_tokens, body)


def _body(mix: Mix, messages: list, max_tokens: int, thinking: bool, fixed_length: bool) -> bytes:
    """The JSON body: plain OpenAI fields, plus the extensions ``mix.dialect`` allows."""
    body: dict = {
        "model": mix.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }
    # the seed's LangChain call passes the thinking switches as extra_body (seed 000 §3)
    for name in mix.dialect.thinking_fields:
        body[name] = {"enable_thinking": thinking} if name == "chat_template_kwargs" else thinking
    if fixed_length and mix.dialect.length_fields:  # make the reply exactly max_tokens long
        body.update(min_tokens=max_tokens, ignore_eos=True)
    return json.dumps(body, separators=(",", ":")).encode()


def _spread(mean: int, spread: float, rng: random.Random) -> int:
    if spread <= 0:
        return mean
    return max(1, round(rng.uniform(mean * (1 - spread), mean * (1 + spread))))


def prompt_text(tokens: int, rng: random.Random) -> str:
    """About ``tokens`` tokens of English text (4 characters per token, OpenAI's rule of thumb and
    serve/tokens.py's count); a unique nonce first so no prefix cache can hit."""
    text = f"[{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}]"
    while len(text) < CHARS_PER_TOKEN * tokens - 1:
        text += " " + rng.choice(_WORDS)
    return text


def synth_image(size: tuple[int, int], fmt: str, seed: int) -> str:
    """A base64 image: smooth gradient (compresses like a screenshot) plus a noise patch unique to seed."""
    from PIL import Image

    w, h = size
    rs = np.random.default_rng(seed)
    xs = np.arange(w, dtype=np.uint32) * 255 // max(1, w - 1)
    ys = (np.arange(h, dtype=np.uint32) * 255 // max(1, h - 1))[:, None]
    pixels = np.empty((h, w, 3), np.uint8)
    for c, weight in enumerate(rs.integers(1, 16, 3)):
        pixels[..., c] = (xs * weight + ys * (16 - weight)) >> 4
    patch = min(64, w, h)
    pixels[:patch, :patch] = rs.integers(0, 256, (patch, patch, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    else:
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def synth_speech_wav(seconds: float, seed: int, rate: int = 16000) -> str:
    """A base64 16 kHz mono WAV that looks like speech: voiced harmonics, gliding pitch, syllable envelope."""
    rs = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 60 * np.sin(2 * np.pi * rs.uniform(0.2, 0.6) * t + rs.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * rs.uniform(3, 5) * t), 0, None) ** 0.5
    signal = voice * syllables + 0.02 * rs.standard_normal(t.size)
    pcm = (signal / np.max(np.abs(signal)) * 0.8 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()
