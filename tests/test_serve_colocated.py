"""``llmslo serve --colocate``: each model replica answers HTTP itself, no separate ingress.

The model lives in the ingress replica's process (serve/model_client.py ``LocalClient``), so
its streams are plain async generators instead of Ray handles: cancelling on a client's
disconnect, the fault drills and the per-request records must work the same. The fault and
disconnect tests of test_serve_faults.py run here unchanged against a colocated server (one
replica, so the faults set through /admin/faults are the only replica's); what differs is
tested below: the topology is visible, and a killed replica is counted (by the node's crash
witness: the process that would have counted it is the one that died) and replaced.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from conftest import ServeApp, serving_app
from contract import names
from contract.timing import FIELDS
from test_serve_faults import (  # noqa: F401 (collected here, against the colocated server)
    test_a_replica_stall_shows_up_in_the_clients_itl,
    test_disconnect_before_the_first_token_also_frees_the_slot,
    test_disconnect_cancels_generation_and_frees_the_slot,
    test_injected_oom_is_an_error_and_the_replica_keeps_serving,
    test_mid_stream_failure_is_an_sse_error_then_done,
)
from test_serve_metrics import scrape, total, wait_for


@pytest.fixture(scope="module")
def colocated_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with serving_app(tmp_path_factory.mktemp("serve-colocated"), 1, ("--colocate",)) as app:
        yield app


@pytest.fixture
def serve_faults(colocated_app: ServeApp) -> Iterator[ServeApp]:
    """The colocated app for the imported drills, faults cleared around each."""
    colocated_app.admin("DELETE")
    yield colocated_app
    colocated_app.admin("DELETE")


def _stream(app: ServeApp) -> tuple[str, dict]:
    """(the replica header, the final usage chunk's llmslo_timing) of one streamed answer."""
    client = OpenAI(base_url=app.api_base, api_key="EMPTY", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=app.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(raw.parse())
    assert chunks[-1].usage.completion_tokens == 5
    return raw.headers["x-llmslo-replica"], chunks[-1].usage.model_extra["llmslo_timing"]


def test_the_model_replica_answers_http_itself(serve_faults):
    app = serve_faults
    replica, timing = _stream(app)
    assert app.admin("GET").json()["replica"] == replica  # faults hold in the replica that answered
    assert set(timing) == set(FIELDS)  # per-hop timing as in the split topology (routing: the same process)
    samples = scrape(app)
    assert {lab["topology"] for lab, _ in samples[names.BUILD_INFO]} == {"colocated"}
    roles = {lab["component"] for lab, _ in samples[names.PROCESS_CPU]}
    assert "replica" in roles and "ingress" not in roles, roles


def test_a_killed_replica_is_counted_and_replaced(serve_faults):
    """The process that would count the crash is the one that dies: the node's crash witness
    (serve/crash_witness.py) counts it from outside."""
    app = serve_faults
    before = total(scrape(app), names.REPLICA_CRASHES)
    killed = app.admin("POST", {"kill": True}).json()["killed_replica"]

    def answered_by_a_new_replica() -> bool:
        try:
            resp = httpx.post(f"{app.api_base}/chat/completions", timeout=10, json={
                "model": app.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and resp.headers["x-llmslo-replica"] != killed

    assert wait_for(answered_by_a_new_replica, timeout=120, interval=1), "Serve did not replace the replica"
    assert wait_for(lambda: total(scrape(app), names.REPLICA_CRASHES) == before + 1, timeout=30)
