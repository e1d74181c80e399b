"""Drill: the upstream engine's inference server goes away and comes back.

``locked_app`` forwards to a ground-truth OpenAI server (loadtest._truth_server) in
its own process; the test SIGKILLs it, checks the service answers 503 with a clear
message (JSON and streaming) and ``/healthz`` turns 503, restarts it on the same
port and measures how long until requests and ``/healthz`` succeed again.
"""

from __future__ import annotations

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
