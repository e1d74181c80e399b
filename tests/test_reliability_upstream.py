"""Drill: the upstream engine's inference server goes away and comes back.

``locked_app`` forwards to a ground-truth OpenAI server (loadtest._truth_server) in
its own process; the test SIGKILLs it, checks the service answers 503 with a clear
message (JSON and streaming) and ``/healthz`` turns 503, restarts it on the same
port and measures how long until requests and ``/healthz`` succeed again.
"""

from __future__ import annotations

import json
import time

import httpx


def _chat(app, stream: bool = False) -> httpx.Response:
    body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    return httpx.post(f"{app.api_base}/chat/completions", json=body, headers=app.auth, timeout=30)


def test_upstream_gone_is_503_and_unhealthy_then_recovers(locked_app):
    app = locked_app
    assert _chat(app).status_code == 200
    app.upstream.stop()
    try:
        for stream in (False, True):
            resp = _chat(app, stream)
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "upstream_unavailable"
            assert "upstream inference server unreachable" in error["message"]
        health = httpx.get(f"{app.url}/healthz", timeout=30)
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "reason": "upstream inference server unreachable"}
    finally:
        app.upstream.start()
    back = time.monotonic()
    recovered = None
    while time.monotonic() - back < 30:
        if httpx.get(f"{app.url}/healthz", timeout=30).status_code == 200 and _chat(app).status_code == 200:
            recovered = time.monotonic() - back
            break
        time.sleep(0.1)
    assert recovered is not None, "no recovery within 30 s of the upstream's return"
    print(f"upstream back -> healthz 200 and a 200 answer after {recovered:.2f} s")
    assert _chat(app, stream=True).status_code == 200


def test_upstream_dying_mid_stream_is_an_sse_error_never_a_clean_end(locked_app):
    app = locked_app
    body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": True}
    try:
        with httpx.stream("POST", f"{app.api_base}/chat/completions", json=body, headers=app.auth, timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            events = [next(lines) for _ in range(3)]  # role chunk and tokens: the stream is running
            app.upstream.stop()
            events += [line for line in lines if line]
    finally:
        app.upstream.start()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_unavailable" and "unreachable" in error["message"], error
    assert not any('"finish_reason": "length"' in e or '"finish_reason":"length"' in e for e in events)
    until_ok = time.monotonic() + 30
    while _chat(app).status_code != 200:
        assert time.monotonic() < until_ok, "no recovery after the upstream came back"
        time.sleep(0.1)
