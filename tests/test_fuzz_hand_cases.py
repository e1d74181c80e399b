"""Hostile inputs by hand against the real app: each gets an OpenAI-shaped 4xx in bounded
time, and both replicas keep serving. (The slow-dripping body is in test_security_api.py,
against the app with a short body timeout.)"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import wave

import httpx
import pytest

from test_fuzz_parsers import _png_header
from test_serve_api import wav_b64

MODEL = "autoglm-phone-9b"


def _user(content) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _wav_claiming_hours(hours: float = 5) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 160)
    raw = bytearray(buf.getvalue())
    struct.pack_into("<I", raw, 40, int(16000 * 3600 * hours) * 2)  # data chunk size: hours of samples
    return base64.b64encode(bytes(raw)).decode()


def _nested(depth: int) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "x"}], "x": ' + \
        b"[" * depth + b"]" * depth + b"}"


PNG_BOMB = "data:image/png;base64," + base64.b64encode(_png_header(20_000, 20_000)).decode()
TRUNCATED = "data:image/png;base64," + base64.b64encode(_png_header(64, 64)).decode()[:-3]

# (id, body: bytes or JSON object, status, code)
CASES = [
    ("body_50MB_text", _user("a" * 50_000_000), 400, "context_length_exceeded"),
    ("content_parts_10000", _user([{"type": "text", "text": "x"}] * 10_000), 400, "too_many_parts"),
    ("messages_10000_images", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_BOMB}}]}] * 10_000},
     400, "image_too_large"),
    ("png_header_20000x20000", _user([{"type": "image_url", "image_url": {"url": PNG_BOMB}}]), 400, "image_too_large"),
    ("truncated_base64", _user([{"type": "image_url", "image_url": {"url": TRUNCATED}}]), 400, "invalid_base64"),
    ("wav_header_claiming_5h", _user([{"type": "input_audio", "input_audio": {"data": _wav_claiming_hours(), "format": "wav"}}]),
     400, "audio_too_long"),
    ("invalid_utf8", b'{"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', 400, "invalid_json"),
    ("nested_json_100000", _nested(100_000), 400, "invalid_json"),
    ("integer_with_5000_digits", b'{"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "x"}], "max_tokens": '
     + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("nan_temperature", b'{"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     400, "invalid_value"),
    ("infinite_max_tokens", b'{"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
     400, "invalid_value"),
    ("null_bytes_and_lone_surrogate", None, 200, None),
]


@pytest.mark.parametrize("body, status, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_answered_in_bounded_time(serve_app, body, status, code):
    url = f"{serve_app.api_base}/chat/completions"
    if body is None:  # valid JSON text a naive encoder chokes on
        body = json.dumps(_user("a\u0000b\ud800c")).encode()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.monotonic()
    resp = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
    elapsed = time.monotonic() - start
    print(f"{len(raw)} B -> {resp.status_code} in {elapsed:.2f} s")
    assert resp.status_code == status, resp.text[:300]
    if code is not None:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
        assert len(resp.content) < 2000  # the answer never echoes the payload back
    assert elapsed < 30


def test_body_over_64MiB_is_413_without_reading_it(serve_app):
    raw = b" " * (65 * 2**20)
    start = time.monotonic()
    try:
        resp = httpx.post(f"{serve_app.api_base}/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=60)
    except httpx.HTTPError as exc:  # the server may close before the upload ends
        pytest.fail(f"no answer: {exc!r}")
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    print(f"65 MiB -> 413 in {time.monotonic() - start:.2f} s")


def test_replicas_serve_after_hostile_input(serve_app):
    body = {**_user("hi"), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {"data": wav_b64(1), "format": "wav"}}]}]}
    assert len(serve_app.serving_replicas(body)) == serve_app.replicas
