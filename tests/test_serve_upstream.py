"""The upstream engine against a real OpenAI-compatible server: the session's Serve app.

(Launching ``vllm serve`` needs GPUs and weights: only its command line is tested here.)
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from serve.engines.base import Delta, EngineError, EngineOOMError, Finish, GenerationRequest, ImageInput, Message
from serve.engines.upstream import LaunchOptions, UpstreamEngine, classify, launch_command
from test_serve_api import png_data_url


def _run(engine: UpstreamEngine, request: GenerationRequest) -> list:
    async def go():
        await engine.start()
        return [item async for item in engine.generate(request)]

    return asyncio.run(go())


def _request(**kw) -> GenerationRequest:
    return GenerationRequest("r", (Message("user", "你是谁?"),), 10, kw.pop("max_tokens", 50), **kw)


def test_streams_deltas_and_usage_from_upstream(serve_app):
    engine = UpstreamEngine(serve_app.model, base_url=serve_app.api_base)
    items = _run(engine, _request(thinking=True, max_tokens=300, seed=1))
    finish = items[-1]
    assert isinstance(finish, Finish) and all(isinstance(i, Delta) for i in items[:-1])
    assert finish.reasoning_tokens > 0 and finish.completion_tokens == len(items) - 1
    assert any(i.reasoning for i in items[:-1]) and any(i.content for i in items[:-1])
    assert engine.stats().running == 0


def test_forwards_images_and_length_controls(serve_app):
    png = base64.b64decode(png_data_url(56, 56).split(",", 1)[1])
    msg = Message("user", "look", images=(ImageInput(56, 56, "png", png),))
    engine = UpstreamEngine(serve_app.model, base_url=serve_app.api_base)
    items = _run(engine, GenerationRequest("r", (msg,), 10, 12, ignore_eos=True))
    assert items[-1].completion_tokens == 12 and items[-1].reason == "length"
    assert items[-1].prompt_tokens > 10  # upstream counted the image


def test_upstream_oom_becomes_engine_oom(serve_faults):
    serve_faults.admin("POST", {"oom": 1})
    engine = UpstreamEngine(serve_faults.model, base_url=serve_faults.api_base)
    with pytest.raises(EngineOOMError) as err:
        _run(engine, _request())
    assert err.value.source == "upstream"


def test_unreachable_upstream_is_an_engine_error():
    from conftest import free_port

    engine = UpstreamEngine("m", base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=2)
    with pytest.raises(EngineError, match="unreachable"):
        _run(engine, _request())


def test_error_classification():
    assert isinstance(classify(500, '{"error": {"message": "CUDA out of memory. Tried to allocate"}}'), EngineOOMError)
    assert type(classify(503, '{"error": {"message": "busy"}}')).__name__ == "EngineOverloadedError"
    assert type(classify(500, "boom")) is EngineError


def test_vllm_launch_command_matches_the_seed_line():
    cmd = launch_command(LaunchOptions(model_path="/models/autoglm-phone-9b"), "autoglm-phone-9b", 8001)
    assert cmd[:3] == ["vllm", "serve", "/models/autoglm-phone-9b"]
    joined = " ".join(cmd)
    for flag in ("--tensor-parallel-size 2", "--dtype half", "--max-model-len 2048", "--port 8001",
                 "--served-model-name autoglm-phone-9b"):
        assert flag in joined
