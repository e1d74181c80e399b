"""Locked doors on a real Serve app: API key, admin off, body size/time limits, rate limit,
no secret or payload in the logs, and the published OpenAPI schema.

Uses ``locked_app`` (API key from $LLMSLO_API_KEY, admin API not configured, limits of
conftest.LOCKED_LIMITS, upstream engine on a truth server) and the shared ``serve_app``.
"""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from conftest import LOCKED_LIMITS
from test_serve_api import png_data_url


def _chat_body(model: str, content="hi") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def _wait_for_bucket() -> None:
    """Let the rate limiter's bucket refill so one test's burst does not hit the next."""
    time.sleep(LOCKED_LIMITS["rate_limit_burst"] / LOCKED_LIMITS["rate_limit_per_s"])


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic dGVzdA==", "Bearer"])
def test_api_key_is_required_on_v1(locked_app, header):
    headers = {"authorization": header} if header else {}
    for method, path, body in (("GET", "/models", None), ("POST", "/chat/completions", _chat_body(locked_app.model))):
        resp = httpx.request(method, f"{locked_app.api_base}{path}", json=body, headers=headers, timeout=30)
        error = _assert_openai_error(resp, 401, "invalid_token")
        assert error["type"] == "authentication_error"
        assert locked_app.api_key not in resp.text


def test_right_key_works_with_the_openai_client_and_healthz_stays_open(locked_app):
    client = openai.OpenAI(base_url=locked_app.api_base, api_key=locked_app.api_key, max_retries=0)
    assert [m.id for m in client.models.list()] == [locked_app.model]
    stream = client.chat.completions.create(model=locked_app.model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert httpx.get(f"{locked_app.url}/healthz", timeout=10).status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked_app.api_base, api_key="EMPTY", max_retries=0).models.list()


def test_admin_api_is_disabled_unless_configured(locked_app):
    for method in ("GET", "POST", "DELETE"):
        resp = httpx.request(method, f"{locked_app.url}/admin/faults", json={"kill": True},
                             headers=locked_app.auth, timeout=10)
        _assert_openai_error(resp, 404, "admin_disabled")
    assert httpx.get(f"{locked_app.url}/healthz", timeout=10).status_code == 200  # nothing was killed


def test_body_over_the_limit_is_413_whether_declared_or_chunked(locked_app):
    limit = LOCKED_LIMITS["max_body_bytes"]
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * limit + b'"}]}'
    url = f"{locked_app.api_base}/chat/completions"
    headers = {**locked_app.auth, "content-type": "application/json"}
    _assert_openai_error(httpx.post(url, content=big, headers=headers, timeout=30), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    _assert_openai_error(httpx.post(url, content=chunks(), headers=headers, timeout=30), 413, "payload_too_large")
    assert httpx.post(url, json=_chat_body(locked_app.model), headers=locked_app.auth, timeout=30).status_code == 200


def test_slow_body_is_cut_off_at_the_body_timeout(locked_app):
    """Slowloris: a body dripping one byte every 0.5 s gets 408 after body_timeout_s, not never."""
    host, port = locked_app.url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {locked_app.api_key}\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        start = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while time.monotonic() - start < 20 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b" ")
            except OSError:
                pass  # the server may close its read side
            time.sleep(0.5)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            except OSError:
                break  # reset after the answer was sent
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert LOCKED_LIMITS["body_timeout_s"] - 0.5 <= elapsed < LOCKED_LIMITS["body_timeout_s"] + 5, elapsed


def test_rate_limit_answers_429_then_recovers(locked_app):
    _wait_for_bucket()
    url = f"{locked_app.api_base}/models"
    with httpx.Client(headers=locked_app.auth, timeout=30) as client:
        codes = [client.get(url) for _ in range(LOCKED_LIMITS["rate_limit_burst"] + 30)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert {r.status_code for r in codes} == {200, 429}
    error = _assert_openai_error(limited[0], 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and int(limited[0].headers["retry-after"]) >= 1
    _wait_for_bucket()
    assert httpx.get(url, headers=locked_app.auth, timeout=30).status_code == 200


def test_no_secret_or_payload_in_the_logs(locked_app):
    image = png_data_url(64, 64)
    payload = image.split(",", 1)[1]
    secret_prompt = "PROMPT-CANARY-7f3a"
    body = {"model": locked_app.model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": secret_prompt}, {"type": "image_url", "image_url": {"url": image}}]}]}
    resp = httpx.post(f"{locked_app.api_base}/chat/completions", json=body, headers=locked_app.auth, timeout=30)
    assert resp.status_code == 200, resp.text
    wrong = httpx.post(f"{locked_app.api_base}/chat/completions", json=body,
                       headers={"authorization": "Bearer WRONG-KEY-CANARY"}, timeout=30)
    assert wrong.status_code == 401
    request_id = resp.json()["id"]
    deadline = time.monotonic() + 20
    while request_id not in locked_app.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    text = locked_app.log_path.read_text(errors="replace")
    assert request_id in text, "the request log line never appeared"
    for secret in (locked_app.api_key, "WRONG-KEY-CANARY", secret_prompt, payload[:40], payload[-40:]):
        assert secret not in text, f"{secret[:12]}... leaked into the log"


def test_openapi_schema_publishes_the_chat_request(serve_app):
    schema = httpx.get(f"{serve_app.url}/openapi.json", timeout=30).json()
    op = schema["paths"]["/v1/chat/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages"} <= set(request["required"])
    assert {"stream", "max_tokens", "temperature", "stream_options"} <= set(request["properties"])
    assert {"400", "401", "413", "429", "503"} <= set(op["responses"])
    assert "ErrorResponse" in schema["components"]["schemas"]
