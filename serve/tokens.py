"""Prompt-token accounting: text estimate and image/audio token formulas.

No tokenizer can be downloaded where this runs, so text is counted by a
documented estimate, and media by the model family's published geometry. The
engine's latency and KV-cache models charge these counts, and ``usage`` reports
them, so they are one definition used everywhere (docs/serve.md, "Prompt tokens").

Text: each CJK character (Han, kana, hangul, CJK punctuation) counts one token;
every other run of characters counts ceil(chars / 4) tokens (OpenAI's rule of
thumb for English). Each chat message adds 4 template tokens (role marker and
separators) and the prompt adds 2 for the assistant turn.

Images (GLM-4.1V vision tower, 14 px patches merged 2x2): the image is resized to
H' x W', both multiples of 28, nearest to the original; when H'·W' falls outside
[MIN_IMAGE_PIXELS, MAX_IMAGE_PIXELS] both sides are scaled by one factor (aspect
kept) and rounded down (too big) or up (too small) to multiples of 28.
Tokens = (H'/28)·(W'/28) + 2 (begin/end-of-image markers).

Audio: 12.5 tokens per second (a Whisper-style encoder's 50 frames/s pooled 4x,
the rate of GLM-4-Voice's speech tokenizer), rounded up, + 2 markers.
"""

from __future__ import annotations

import math
import re

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28 px per image token side
MIN_IMAGE_PIXELS = 112 * 112 // 2  # GLM-4.1V's budget is over 2 temporal frames
MAX_IMAGE_PIXELS = 14 * 14 * 2 * 2 * 6144
IMAGE_MARKERS = 2
AUDIO_TOKENS_PER_SECOND = 12.5
AUDIO_MARKERS = 2
MESSAGE_OVERHEAD = 4
PROMPT_OVERHEAD = 2
CHARS_PER_TOKEN = 4

_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")


def text_tokens(text: str) -> int:
    """Estimated tokens of a text: CJK characters one each, the rest 4 chars per token."""
    cjk = len(_CJK.findall(text))
    rest = len(text) - cjk
    return cjk + math.ceil(rest / CHARS_PER_TOKEN)


def resized_image(width: int, height: int) -> tuple[int, int]:
    """(W', H') the vision tower sees: multiples of 28 within the pixel budget."""
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    if w * h > MAX_IMAGE_PIXELS:
        beta = math.sqrt(width * height / MAX_IMAGE_PIXELS)
        w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
        h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
    elif w * h < MIN_IMAGE_PIXELS:
        beta = math.sqrt(MIN_IMAGE_PIXELS / (width * height))
        w = math.ceil(width * beta / FACTOR) * FACTOR
        h = math.ceil(height * beta / FACTOR) * FACTOR
    return w, h


def image_tokens(width: int, height: int) -> int:
    """Prompt tokens of one image of the given size."""
    w, h = resized_image(width, height)
    return (w // FACTOR) * (h // FACTOR) + IMAGE_MARKERS


def audio_tokens(duration_s: float) -> int:
    """Prompt tokens of one audio clip of the given duration."""
    return math.ceil(duration_s * AUDIO_TOKENS_PER_SECOND) + AUDIO_MARKERS


def message_tokens(text: str, image_sizes: list[tuple[int, int]], audio_durations: list[float]) -> int:
    """Prompt tokens of one chat message (its template overhead included)."""
    return (
        MESSAGE_OVERHEAD
        + text_tokens(text)
        + sum(image_tokens(w, h) for w, h in image_sizes)
        + sum(audio_tokens(d) for d in audio_durations)
    )
