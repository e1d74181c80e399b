"""Fault drills through the admin API, mid-stream failures, and client disconnects."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serve import metrics as M
from test_serve_metrics import quiet_scrape, scrape, total, wait_for


def _chat(serve_app, **extra) -> httpx.Response:
    body = {"model": serve_app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}
    return httpx.post(f"{serve_app.api_base}/chat/completions", json=body, timeout=60)


def test_admin_requires_the_bearer_token(serve_app):
    url = f"{serve_app.url}/admin/faults"
    assert httpx.get(url, timeout=10).status_code == 401
    resp = httpx.post(url, json={"oom": 1}, headers={"authorization": "Bearer wrong"}, timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert serve_app.admin("GET").json()["oom_pending"] == 0


def test_admin_rejects_bad_fault_specs(serve_faults):
    for bad in ({"error_rate": 2}, {"slowdown": 0.5}, {"oom": -1}, {"explode": True}):
        resp = serve_faults.admin("POST", bad)
        assert resp.status_code == 400, bad
        assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_injected_oom_is_an_error_and_the_replica_keeps_serving(serve_faults, stream):
    app = serve_faults
    before = total(quiet_scrape(app, (M.OOM_EVENTS,)), M.OOM_EVENTS, source="simulated")
    state = app.admin("POST", {"oom": 1}).json()
    assert state["oom_pending"] == 1
    resp = _chat(app, stream=stream)
    assert resp.status_code == 500
    assert resp.json()["error"] == {
        "message": "injected out-of-memory (fault drill)",
        "type": "server_error",
        "param": None,
        "code": "out_of_memory",
    }
    assert app.admin("GET").json()["oom_pending"] == 0
    for _ in range(4):  # both replicas still answer
        assert _chat(app).status_code == 200
    assert wait_for(lambda: total(scrape(app), M.OOM_EVENTS, source="simulated") == before + 1)
    assert wait_for(lambda: total(scrape(app), M.REQUESTS, status="server_error", code="500") >= 1)


def test_mid_stream_failure_is_an_sse_error_then_done(serve_faults):
    serve_faults.admin("POST", {"error_rate": 1.0})
    body = {"model": serve_faults.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "stream": True}
    with httpx.stream("POST", f"{serve_faults.api_base}/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)
    serve_faults.admin("DELETE")
    assert _chat(serve_faults).status_code == 200


def test_disconnect_cancels_generation_and_frees_the_slot(serve_faults):
    app = serve_faults
    app.admin("POST", {"slowdown": 50})  # 2000 tokens would take ~3 minutes now
    cancelled_before = total(quiet_scrape(app, (M.REQUESTS,)), M.REQUESTS, status="cancelled")
    body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    clients = [httpx.Client(timeout=60) for _ in range(2)]
    streams = [c.stream("POST", f"{app.api_base}/chat/completions", json=body) for c in clients]
    lines = []  # keep the line iterators alive: a collected one closes its connection
    try:
        for s in streams:
            resp = s.__enter__()
            assert resp.status_code == 200
            lines.append(resp.iter_lines())
            next(lines[-1])  # the role chunk: generation is running
        assert wait_for(lambda: total(scrape(app), M.IN_FLIGHT) == 2), "both requests should be in flight"
    finally:
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()
    assert wait_for(lambda: total(scrape(app), M.IN_FLIGHT) == 0, timeout=20), "slots were not freed"
    assert wait_for(lambda: total(scrape(app), M.KV_CACHE_USAGE) == 0), "the engine kept KV-cache blocks"
    assert wait_for(lambda: total(scrape(app), M.REQUESTS, status="cancelled", code="499") - cancelled_before == 2)


def test_kill_drill_counts_a_crash_and_serve_recovers(serve_faults):
    app = serve_faults
    crashes_before = total(quiet_scrape(app, (M.REPLICA_CRASHES,)), M.REPLICA_CRASHES)
    answer = app.admin("POST", {"kill": True}).json()
    killed = answer["killed_replica"]
    assert answer["kills"] >= 1 and killed
    # the other replica keeps answering while Serve replaces the dead one
    ok = 0
    for _ in range(60):
        resp = _chat(app)
        ok = ok + 1 if resp.status_code == 200 else 0
        # a request that was on the dying replica fails cleanly (OpenAI-shaped 5xx), never hangs
        assert resp.status_code == 200 or resp.json()["error"]["type"] == "server_error", resp.text
        if ok >= 5:
            break
    assert ok >= 5
    assert wait_for(lambda: total(scrape(app), M.REPLICA_CRASHES) == crashes_before + 1)

    def two_live_replicas():
        seen = {_chat(app, max_tokens=1).headers.get("x-llmslo-replica") for _ in range(12)}
        return len(seen - {killed, None}) == 2

    assert wait_for(two_live_replicas, timeout=120, interval=1), "Serve did not restart the killed replica"


def test_disconnect_before_the_first_token_also_frees_the_slot(serve_faults):
    import threading

    app = serve_faults
    # the first token waits >= 1999 x the engine's prefill (>= 5.2 ms at time_scale 0.1): > 10 s, far past
    # the client's 3 s read timeout whatever the serving path adds
    app.admin("POST", {"slowdown": 2000})
    body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    outcome = []

    def client():
        try:
            httpx.post(f"{app.api_base}/chat/completions", json=body, timeout=httpx.Timeout(10, read=3))
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("gave up")  # the connection is closed here, before any byte arrived

    thread = threading.Thread(target=client)
    thread.start()
    assert wait_for(lambda: total(scrape(app), M.IN_FLIGHT) == 1, timeout=3), "request should be in flight"
    thread.join()
    assert outcome == ["gave up"]
    gave_up = time.monotonic()
    assert wait_for(lambda: total(scrape(app), M.IN_FLIGHT) == 0, timeout=10), "slot not freed"
    assert time.monotonic() - gave_up < 10


def test_a_replica_stall_shows_up_in_the_clients_itl(serve_faults):
    """The stall drill blocks the serving replica's event loop after the 5th token. The simulated
    engine has no catch-up, so the client sees one long gap and every later token still at the
    engine's pace: the stream lasts at least the stall plus all the decode steps (a lower bound:
    a slow machine only adds). With absolute token deadlines (the old engine) the tokens due
    during the stall arrived at once and the stream ended near its original schedule. The slowdown
    drill (the engine's time to each item x 10) makes the steps (>= 9.7 ms) slower than the serving
    path relays a burst of tokens (~1 ms each here), so a catch-up cannot hide behind transport time;
    with the old engine this stream took 1.5 s against the bound's 2.45 s, with this one 5.2 s."""
    from openai import OpenAI

    from conftest import SERVE_TIME_SCALE
    from serve.engines.simulated import TIMER_SLACK_S, SimulatedOptions

    o = SimulatedOptions()
    min_step_s = (o.itl_ms * (1 - 3 * o.decode_speed_sd) - 2 * o.itl_jitter_ms) / 1000 * SERVE_TIME_SCALE
    stall_s, tokens, slowdown = 1.0, 150, 10
    serve_faults.admin("POST", {"stall": stall_s, "slowdown": slowdown})
    client = OpenAI(base_url=serve_faults.api_base, api_key="EMPTY", max_retries=0, timeout=60)
    sent = time.monotonic()
    stamps = []
    stream = client.chat.completions.create(model=serve_faults.model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=tokens, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
    assert len(stamps) == tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) >= stall_s / 2, "the stall did not reach the client's inter-token latency"
    # the engine forgives only its own timer's overshoot (<= TIMER_SLACK_S in all), never the stall
    bound = stall_s + slowdown * ((tokens - 1) * min_step_s - TIMER_SLACK_S)
    assert stamps[-1] - sent >= bound, "tokens caught up after the stall"
    assert serve_faults.admin("GET").json()["stall_pending_s"] == 0  # one-shot
