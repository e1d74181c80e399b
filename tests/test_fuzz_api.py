"""Property-based fuzzing of the running API from its own OpenAPI schema (schemathesis).

Every generated request, valid or deliberately invalid, must get an answer in time
that is not a 5xx, whose status the schema documents, and schema-violating bodies
must be rejected with a 4xx. Afterwards both replicas still serve. Bounded: a fixed
number of examples per operation, a request timeout, no shrinking-time surprises.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance


CHECKS = [not_a_server_error, status_code_conformance, negative_data_rejection]


def _send(case, base_url: str) -> httpx.Response:
    """Send a generated case with httpx (schemathesis's requests transport breaks on the
    urllib3-future this venv has); the bytes are exactly what schemathesis serialised."""
    kw = case.as_transport_kwargs(base_url=base_url)
    content = json.dumps(kw["json"]).encode() if "json" in kw else kw.get("data")
    headers = {**kw["headers"], **({"content-type": "application/json"} if "json" in kw else {})}
    return httpx.request(kw["method"], kw["url"], params=kw.get("params"), headers=headers, content=content, timeout=30)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_fuzzed_requests_never_get_a_5xx(serve_app, mode):
    schema = schemathesis.openapi.from_url(f"{serve_app.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "GET /v1/models", "GET /healthz"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing in a parameterless GET can violate the schema

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            case.validate_response(_send(case, serve_app.url), checks=CHECKS)

        call()


def test_replicas_serve_after_fuzzing(serve_app):
    assert len(serve_app.serving_replicas()) == serve_app.replicas
