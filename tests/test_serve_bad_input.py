"""Bad input gets OpenAI-shaped 4xx errors, never a 500, and the replicas keep serving."""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from test_serve_api import png_data_url, wav_b64

MODEL = "autoglm-phone-9b"


def _user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


def _img(url: str):
    return _user([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}])


def _b64_image(fmt: str, size=(64, 64), noise: bool = False) -> str:
    buf = io.BytesIO()
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size)
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


GARBAGE = base64.b64encode(b"definitely not an image" * 10).decode()

# (id, raw body or JSON object, expected status, expected error code, expected param)
CASES = [
    ("malformed_json", b'{"model": "autoglm-phone-9b", "messages": [', 400, "invalid_json", None),
    ("json_not_object", b"[1, 2]", 400, "invalid_json", None),
    ("missing_messages", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("missing_model", {"messages": [{"role": "user", "content": "x"}]}, 400, "missing_required_parameter", "model"),
    ("empty_messages", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ("messages_not_list", {"model": MODEL, "messages": "hi"}, 400, "invalid_value", "messages"),
    ("unknown_role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages.0.role"),
    ("empty_content", _user(""), 400, "invalid_value", "messages.0.content"),
    ("unknown_part_type", _user([{"type": "video_url", "video_url": {"url": "x"}}]), 400, "invalid_value", "messages.0.content.0"),
    ("text_part_without_text", _user([{"type": "text"}]), 400, "missing_required_parameter", "messages.0.content.0.text"),
    ("invalid_base64", _img("data:image/png;base64,@@@not-base64@@@"), 400, "invalid_base64", None),
    ("undecodable_image", _img(f"data:image/png;base64,{GARBAGE}"), 400, "invalid_image", None),
    ("truncated_png", _img("data:image/png;base64," + _b64_image("PNG", noise=True)[:2000]), 400, "invalid_image", None),
    ("gif_not_supported", _img("data:image/gif;base64," + _b64_image("GIF")), 400, "invalid_image_format", None),
    ("oversized_image", _img("data:image/png;base64," + _b64_image("PNG", (5000, 4000))), 400, "image_too_large", None),
    ("remote_url_refused", _img("http://127.0.0.1:9/cat.png"), 400, "remote_url_not_allowed", None),
    ("not_a_url", _img("cat.png"), 400, "invalid_image_url", None),
    ("too_many_parts", _user([{"type": "text", "text": "x"}] * 33), 400, "too_many_parts", "messages.0.content"),
    ("too_many_images", _user([{"type": "image_url", "image_url": {"url": png_data_url(16, 16)}}] * 9), 400, "too_many_images", "messages"),
    ("invalid_audio", _user([{"type": "input_audio", "input_audio": {"data": GARBAGE, "format": "wav"}}]), 400, "invalid_audio", None),
    ("invalid_mp3", _user([{"type": "input_audio", "input_audio": {"data": GARBAGE, "format": "mp3"}}]), 400, "invalid_audio", None),
    ("audio_too_long", _user([{"type": "input_audio", "input_audio": {"data": wav_b64(61, rate=8000), "format": "wav"}}]), 400, "audio_too_long", None),
    ("unknown_audio_format", _user([{"type": "input_audio", "input_audio": {"data": GARBAGE, "format": "ogg"}}]), 400, "invalid_value", None),
    ("image_in_system_message", {"model": MODEL, "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": png_data_url(16, 16)}}]}]}, 400, "invalid_value", "messages.0.content"),
    ("max_tokens_zero", {**_user("x"), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens_negative", {**_user("x"), "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ("max_completion_tokens_zero", {**_user("x"), "max_completion_tokens": 0}, 400, "invalid_value", "max_completion_tokens"),
    ("max_tokens_beyond_context", {**_user("x"), "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    ("prompt_beyond_context", _user("word " * 9000), 400, "context_length_exceeded", "messages"),
    ("min_tokens_above_max", {**_user("x"), "max_tokens": 5, "min_tokens": 10}, 400, "invalid_value", "min_tokens"),
    ("temperature_too_high", {**_user("x"), "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ("temperature_negative", {**_user("x"), "temperature": -0.1}, 400, "invalid_value", "temperature"),
    ("top_p_zero", {**_user("x"), "top_p": 0}, 400, "invalid_value", "top_p"),
    ("top_p_above_one", {**_user("x"), "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("presence_penalty_out_of_range", {**_user("x"), "presence_penalty": 3}, 400, "invalid_value", "presence_penalty"),
    ("n_two", {**_user("x"), "n": 2}, 400, "invalid_value", "n"),
    ("max_tokens_string", {**_user("x"), "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    ("unknown_model", {**_user("x"), "model": "gpt-5"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("body, status, code, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_an_openai_4xx(serve_app, body, status, code, param):
    url = f"{serve_app.api_base}/chat/completions"
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        resp = httpx.post(url, json=body, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]


def test_wrong_method_and_path_are_openai_shaped(serve_app):
    resp = httpx.get(f"{serve_app.api_base}/chat/completions", timeout=10)
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    resp = httpx.get(f"{serve_app.api_base}/nothing-here", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "invalid_request_error"


def test_replicas_still_serve_after_bad_input(serve_app):
    body = {**_user("x"), "max_tokens": 3}
    for _ in range(4):
        assert httpx.post(f"{serve_app.api_base}/chat/completions", json=body, timeout=30).status_code == 200
