"""Decode and validate image and audio content parts.

Everything a client can send wrong about media (bad base64, a file that is not
the format it claims, a decompression bomb, an over-long clip, a remote URL when
fetching is off) is caught here and raised as a 400 :class:`APIError` naming the
part, so malformed media never reaches an engine.

Decoding runs in a small thread pool, off the ingress's event loop: a 16-megapixel
PNG takes ~150 ms of CPU to decode, and on the loop that stalled every stream the
ingress relays. Pillow's decoders, zlib and binascii release the GIL for most of
that work, so threads are enough; the pool is bounded so a burst of large images
cannot take every core (requests beyond it wait for a thread).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
from PIL import Image

from serve.engines.base import AudioInput, ImageInput
from serve.errors import invalid
from serve.settings import MediaLimits

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
DECODE_THREADS = 2
_POOL = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="llmslo-media")
_T = TypeVar("_T")


async def _off_loop(fn: Callable[..., _T], *args: object) -> _T:
    """Run a decoder in the media pool; the event loop keeps relaying other streams meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)


def b64decode(data: str, limit: int, param: str) -> bytes:
    """Strict base64 (whitespace tolerated); raise 400 when invalid or over ``limit`` bytes."""
    compact = "".join(data.split())
    if len(compact) * 3 // 4 > limit + 3:
        raise invalid(f"{param} is larger than the limit of {limit} bytes", param, "payload_too_large")
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param} is not valid base64", param, "invalid_base64") from None
    if not raw:
        raise invalid(f"{param} is empty", param, "invalid_base64")
    if len(raw) > limit:
        raise invalid(f"{param} is larger than the limit of {limit} bytes", param, "payload_too_large")
    return raw


async def image_from_url(url: str, limits: MediaLimits, param: str) -> ImageInput:
    """An ``image_url`` part: a base64 ``data:`` URL, or http(s) when the config allows it."""
    match = _DATA_URL.match(url)
    if match:
        return await _off_loop(_decode_base64_image, match["data"], limits, param)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_urls:
            raise invalid(
                f"{param}: remote image URLs are not fetched by this server; send a base64 data: URL",
                param,
                "remote_url_not_allowed",
            )
        return await _off_loop(decode_image, await _fetch(url, limits, param), limits, param)
    raise invalid(f"{param} must be a data:image/...;base64,... URL", param, "invalid_image_url")


async def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    """Download at most ``max_image_bytes`` from a remote URL."""
    try:
        async with httpx.AsyncClient(timeout=limits.remote_fetch_timeout_s) as client:
            async with client.stream("GET", url, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise invalid(f"{param}: fetching the URL gave HTTP {resp.status_code}", param, "image_fetch_failed")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_image_bytes:
                        raise invalid(f"{param} is larger than {limits.max_image_bytes} bytes", param, "payload_too_large")
                return bytes(body)
    except httpx.HTTPError as exc:
        raise invalid(f"{param}: could not fetch the URL ({type(exc).__name__})", param, "image_fetch_failed") from None


def _decode_base64_image(data: str, limits: MediaLimits, param: str) -> ImageInput:
    return decode_image(b64decode(data, limits.max_image_bytes, param), limits, param)


def decode_image(raw: bytes, limits: MediaLimits, param: str) -> ImageInput:
    """Open with Pillow, check format and size before decoding pixels, then decode fully."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = IMAGE_FORMATS.get(img.format or "")
            if fmt is None:
                raise invalid(f"{param}: unsupported image format {img.format}; use png, jpeg or webp", param, "invalid_image_format")
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise invalid(
                    f"{param}: image is {width}x{height}, more than {limits.max_image_pixels} pixels",
                    param,
                    "image_too_large",
                )
            if min(width, height) < limits.min_image_side:
                raise invalid(f"{param}: image is {width}x{height}, smaller than {limits.min_image_side} px", param, "image_too_small")
            img.load()
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise invalid(f"{param}: image has more than {limits.max_image_pixels} pixels", param, "image_too_large") from None
    except (OSError, SyntaxError, ValueError):
        raise invalid(f"{param} could not be decoded as an image", param, "invalid_image") from None
    return ImageInput(width=width, height=height, format=fmt, data=raw)


async def audio_from_part(data: str, fmt: str, limits: MediaLimits, param: str) -> AudioInput:
    """An ``input_audio`` part, decoded in the media pool."""
    return await _off_loop(decode_audio, data, fmt, limits, param)


def decode_audio(data: str, fmt: str, limits: MediaLimits, param: str) -> AudioInput:
    """An ``input_audio`` part: base64 wav (stdlib ``wave``) or mp3 (frame headers)."""
    raw = b64decode(data, limits.max_audio_bytes, param)
    try:
        duration, rate = _wav_info(raw) if fmt == "wav" else mp3_info(raw)
    except (wave.Error, EOFError, ValueError):
        raise invalid(f"{param} could not be decoded as {fmt} audio", param, "invalid_audio") from None
    if duration <= 0:
        raise invalid(f"{param} has no audio samples", param, "invalid_audio")
    if duration > limits.max_audio_seconds:
        raise invalid(
            f"{param} lasts {duration:.1f} s, longer than {limits.max_audio_seconds:g} s", param, "audio_too_long"
        )
    return AudioInput(duration_s=duration, sample_rate=rate, format=fmt, data=raw)


def _wav_info(raw: bytes) -> tuple[float, int]:
    with wave.open(io.BytesIO(raw)) as wav:
        rate = wav.getframerate()
        if rate <= 0:
            raise ValueError("bad sample rate")
        frames = wav.getnframes()
        wav.readframes(frames)  # fails on a truncated body
        return frames / rate, rate


# MPEG audio frame header tables (ISO 11172-3 / 13818-3), layer III only.
_MP3_BITRATES = {
    1: [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],  # MPEG-1
    2: [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],  # MPEG-2 / 2.5
}
_MP3_RATES = {3: [44100, 48000, 32000], 2: [22050, 24000, 16000], 0: [11025, 12000, 8000]}


def mp3_info(raw: bytes) -> tuple[float, int]:
    """(duration, sample rate) of an MPEG layer III stream by walking its frame headers.

    Skips an ID3v2 tag; stops at the first byte run that is not a valid frame
    (trailing tags). Raises ValueError when no frame is found.
    """
    pos = 0
    if raw[:3] == b"ID3" and len(raw) >= 10:
        pos = 10 + ((raw[6] << 21) | (raw[7] << 14) | (raw[8] << 7) | raw[9])
    samples, rate, frames = 0, 0, 0
    while pos + 4 <= len(raw):
        b1, b2 = raw[pos + 1], raw[pos + 2]
        if raw[pos] != 0xFF or (b1 & 0xE0) != 0xE0:
            break
        version_bits, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
        bitrate_idx, rate_idx, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
        if version_bits == 1 or layer_bits != 1 or bitrate_idx in (0, 15) or rate_idx == 3:
            break
        mpeg1 = version_bits == 3
        rate = _MP3_RATES[version_bits][rate_idx]
        bitrate = _MP3_BITRATES[1 if mpeg1 else 2][bitrate_idx] * 1000
        per_frame = 1152 if mpeg1 else 576
        length = per_frame // 8 * bitrate // rate + padding
        if pos + length > len(raw):
            break
        samples += per_frame
        frames += 1
        pos += length
    if frames == 0:
        raise ValueError("no MPEG layer III frame found")
    return samples / rate, rate
