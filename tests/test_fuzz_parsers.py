"""Hypothesis on the byte-level parsers: the load test's SSE reader and serve's media decoders.

SSE: whatever a server sends, a stream is recorded as a success only if it ended with
``[DONE]`` (or, from a server that sends none, after a ``finish_reason``) and carried a token; a broken stream raises (StreamError, or for a chunk of
the wrong JSON shape such as ``"choices": 5`` a TypeError/AttributeError), and the
locustfile counts any exception there as a failed request; it never hangs.
Media: any bytes give an image/audio or a 400 APIError, never another exception;
hostile headers (a 20000x20000 PNG, a WAV claiming hours) are refused before decoding.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.record import RequestRecord
from loadtest._sse import read_stream
from serve import media
from serve.errors import APIError
from serve.settings import MediaLimits

LIMITS = MediaLimits()
FUZZ = settings(max_examples=300, deadline=None)


# ---- SSE ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
chunk_objects = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.one_of(json_values, st.lists(st.fixed_dictionaries({}, optional={
            "delta": st.one_of(json_values, st.fixed_dictionaries({}, optional={
                "content": st.one_of(st.text(max_size=5), json_values),
                "reasoning_content": st.one_of(st.text(max_size=5), json_values),
            })),
            "finish_reason": json_values,
        }), max_size=2)),
        "usage": st.one_of(json_values, st.fixed_dictionaries({}, optional={
            "completion_tokens": json_values, "prompt_tokens": json_values,
            "completion_tokens_details": json_values,
        })),
        "error": json_values,
    },
)
sse_lines = st.one_of(
    chunk_objects.map(lambda o: b"data: " + json.dumps(o).encode() + b"\n"),
    st.sampled_from([b"data: [DONE]\n", b"\n", b": keep-alive\n", b"event: x\n", b"data:\n", b"data: {\n"]),
    st.binary(max_size=30).map(lambda b: b + b"\n"),
)


def _replay(lines: list[bytes]):
    it = iter(lines)
    return lambda: next(it, b"")


@FUZZ
@given(st.lists(sse_lines, max_size=12))
def test_sse_reader_never_counts_a_broken_stream_as_success(lines):
    record = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=8)
    clock = iter(range(1, 10_000)).__next__
    try:
        read_stream(record, _replay(lines), 0.0, clock=lambda: float(clock()))
    except Exception:  # noqa: BLE001 - locustfile.py counts ANY exception here as a failed request
        assert not record.ok
        return
    assert record.ok
    # success only with [DONE], or (servers that send none) a chunk with a finish_reason ...
    done = lines.index(b"data: [DONE]\n") if b"data: [DONE]\n" in lines else len(lines)
    assert done < len(lines) or any(_finishes(line) for line in lines)
    assert record.output_tokens is not None and record.ttft_s is not None  # ... and a token before it
    assert not any(b'"error"' in line for line in lines[:done] if line.startswith(b"data: {"))


def _finishes(line: bytes) -> bool:
    """Is this a chunk whose choice says the reply is complete (non-empty string finish_reason)?"""
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and isinstance(c.get("finish_reason"), str) and c["finish_reason"] for c in choices)


# ---- media ---------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming width x height and a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _wav(rate: int, nframes: int, body: bytes) -> bytes:
    """A WAV whose header claims ``nframes`` at ``rate`` whatever the body holds."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 16)
    raw = bytearray(buf.getvalue())
    struct.pack_into("<I", raw, 24, rate)
    struct.pack_into("<I", raw, 40, nframes * 2)  # data chunk size
    return bytes(raw[:44]) + body


def _outcome(fn, *args):
    try:
        return fn(*args)
    except APIError as err:
        assert err.status == 400 and err.code, err.body()
        return err


@FUZZ
@given(st.binary(max_size=2048))
def test_image_decoder_takes_any_bytes(raw):
    _outcome(media.decode_image, raw, LIMITS, "p")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@FUZZ
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_png_header_bombs_are_refused_before_decoding(width, height):
    out = _outcome(media.decode_image, _png_header(width, height), LIMITS, "p")
    if width * height > LIMITS.max_image_pixels:
        assert isinstance(out, APIError) and out.code in ("image_too_large", "invalid_image")


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(["wav", "mp3"]))
def test_audio_decoder_takes_any_bytes(raw, fmt):
    _outcome(media.decode_audio, base64.b64encode(raw).decode(), fmt, LIMITS, "p")


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=512))
def test_wav_headers_claiming_hours_are_refused(rate, nframes, body):
    out = _outcome(media.decode_audio, base64.b64encode(_wav(rate, nframes, body)).decode(), "wav", LIMITS, "p")
    if not isinstance(out, APIError):
        assert out.duration_s <= LIMITS.max_audio_seconds


@FUZZ
@given(st.text(max_size=200))
def test_base64_decoder_takes_any_text(text):
    _outcome(media.b64decode, text, 1024, "p")


@pytest.mark.parametrize("cut", [1, 5, 17, 101])
def test_truncated_base64_is_a_400(cut):
    data = base64.b64encode(_png_header(64, 64)).decode()
    out = _outcome(media.b64decode, data[:-cut], 10**6, "p")
    assert isinstance(out, APIError) and out.code == "invalid_base64"
