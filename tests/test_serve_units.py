"""Unit tests of the serving parts that need no Ray: token formulas, media parsing,
the simulated engine's scheduler and memory model, settings, faults, CLI config."""

from __future__ import annotations

import asyncio
import base64
import math
import time

import pytest

from contract.slo import load_slo
from serve import tokens
from serve.cli import app_config, export_env_vars, parse_args
from serve.engines import create_engine
from serve.engines.base import Delta, EngineOOMError, Finish, GenerationRequest, Message
from serve.engines.simulated import SimulatedEngine
from serve.faults import FaultSpec, FaultState
from serve.media import mp3_info
from serve.processes import LATE_BIND_PORTS, free_port
from serve.settings import AppSettings
from test_serve_api import mp3_b64


def _request(prompt_tokens=16, max_tokens=32, **kw) -> GenerationRequest:
    return GenerationRequest("r", (Message("user", "hi"),), prompt_tokens, max_tokens, **kw)


async def _collect(engine, request):
    return [item async for item in engine.generate(request)]


def test_text_token_estimate():
    assert tokens.text_tokens("") == 0
    assert tokens.text_tokens("你是谁?") == 3 + 1
    assert tokens.text_tokens("abcdefgh") == 2
    assert tokens.text_tokens("abcdefghi") == 3


@pytest.mark.parametrize(
    "size, resized",
    [
        ((640, 480), (644, 476)),  # nearest multiples of 28
        ((28, 28), (84, 84)),  # below the minimum budget: scaled up
        ((8000, 6000), (2520, 1876)),  # above the maximum budget: scaled down
    ],
)
def test_image_resizing_follows_glm41v_rules(size, resized):
    w, h = tokens.resized_image(*size)
    assert (w, h) == resized
    assert w % 28 == 0 and h % 28 == 0
    assert tokens.MIN_IMAGE_PIXELS <= w * h <= tokens.MAX_IMAGE_PIXELS
    assert tokens.image_tokens(*size) == (w // 28) * (h // 28) + 2


def test_audio_tokens_per_second():
    assert tokens.audio_tokens(2.0) == 25 + 2
    assert tokens.audio_tokens(0.01) == 1 + 2


def test_mp3_duration_from_frame_headers():
    raw = base64.b64decode(mp3_b64(100))
    duration, rate = mp3_info(b"ID3\x03\x00\x00\x00\x00\x00\x00" + raw + b"TAG" + bytes(125))
    assert rate == 44100 and duration == pytest.approx(100 * 1152 / 44100)
    with pytest.raises(ValueError):
        mp3_info(b"not an mp3 at all")


def test_simulated_engine_is_deterministic_with_a_seed():
    engine = SimulatedEngine("m", time_scale=0.001)
    a = asyncio.run(_collect(engine, _request(seed=3, thinking=True, max_tokens=200)))
    b = asyncio.run(_collect(engine, _request(seed=3, thinking=True, max_tokens=200)))
    assert a[:-1] == b[:-1]
    finish = a[-1]
    assert finish.completion_tokens == b[-1].completion_tokens and finish.reason == b[-1].reason
    assert isinstance(finish, Finish) and finish.reasoning_tokens > 0
    assert finish.completion_tokens == len(a) - 1
    assert [i.reasoning for i in a[: finish.reasoning_tokens]] == [i.reasoning for i in b[: finish.reasoning_tokens]]


def test_simulated_engine_honours_length_controls():
    engine = SimulatedEngine("m", time_scale=0.001)
    items = asyncio.run(_collect(engine, _request(max_tokens=40, ignore_eos=True)))
    assert items[-1].completion_tokens == 40 and items[-1].reason == "length"
    items = asyncio.run(_collect(engine, _request(max_tokens=300, min_tokens=150)))
    assert items[-1].completion_tokens >= 150


def test_simulated_engine_stops_at_a_stop_string():
    engine = SimulatedEngine("m", time_scale=0.001)
    items = asyncio.run(_collect(engine, _request(max_tokens=100, stop=("模拟",))))
    text = "".join(i.content for i in items if isinstance(i, Delta))
    assert "模拟" not in text and items[-1].reason == "stop"


def test_kv_cache_exhaustion_is_an_oom_and_frees_memory():
    # 4 blocks of 16 tokens: a 40-token prompt fits (3 blocks); growing past 64 tokens does not.
    engine = SimulatedEngine("m", time_scale=0.001, kv_cache_gb=4 * 16 * 1000 / 1e9, kv_bytes_per_token=1000)
    assert engine.kv.total_blocks == 4
    with pytest.raises(EngineOOMError) as err:
        asyncio.run(_collect(engine, _request(prompt_tokens=40, max_tokens=100, ignore_eos=True)))
    assert err.value.source == "simulated"
    assert engine.stats().kv_cache_usage == 0 and engine.stats().running == 0
    with pytest.raises(EngineOOMError):
        asyncio.run(_collect(engine, _request(prompt_tokens=100, max_tokens=4)))
    assert asyncio.run(_collect(engine, _request(prompt_tokens=8, max_tokens=4)))[-1].completion_tokens == 4


def test_requests_beyond_max_num_seqs_queue():
    engine = SimulatedEngine("m", time_scale=0.05, max_num_seqs=2, max_batch=2)

    async def run():
        return await asyncio.gather(*[_collect(engine, _request(max_tokens=20, ignore_eos=True)) for _ in range(4)])

    results = asyncio.run(run())
    waits = sorted(r[-1].queue_wait_s for r in results)
    assert waits[0] < 0.01 and waits[1] < 0.01
    assert waits[2] > 0.01 and waits[3] > 0.01  # the last two waited for a slot
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_cancelling_a_generation_frees_its_slot():
    engine = SimulatedEngine("m", time_scale=1.0)

    async def run():
        task = asyncio.create_task(_collect(engine, _request(max_tokens=1000, ignore_eos=True)))
        await asyncio.sleep(0.5)
        assert engine.stats().running == 1 and engine.stats().kv_cache_usage > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert engine.stats().running == 0 and engine.stats().kv_cache_usage == 0


def test_decode_step_rises_beyond_max_batch():
    engine = SimulatedEngine("m")
    o = engine.options
    steps = {}
    for b in (1, 8, 16):
        engine._decoding_count = lambda b=b: b  # type: ignore[method-assign]
        steps[b] = engine._batch_step_ms(o.itl_ms)
    assert 16 <= steps[1] <= 20 and 16 <= steps[8] <= 20  # the 18 +/- 2 ms calibration
    assert steps[16] == pytest.approx(2 * steps[8])
    prefill_512 = o.prefill_base_ms + o.prefill_per_token_ms * 512
    assert 305 <= prefill_512 <= 335  # TTFT 320 +/- 15 ms at 512 prompt tokens


def test_time_scale_makes_the_engine_faster():
    fast = SimulatedEngine("m", time_scale=0.1)
    t0 = time.monotonic()
    asyncio.run(_collect(fast, _request(prompt_tokens=512, max_tokens=50, ignore_eos=True)))
    assert time.monotonic() - t0 < (0.32 + 49 * 0.018) * 0.5


def test_engine_registry():
    assert isinstance(create_engine("simulated", "m", {"time_scale": 0.5}), SimulatedEngine)
    with pytest.raises(ValueError):
        create_engine("nope", "m")
    with pytest.raises(ValueError):
        create_engine("simulated", "m", {"no_such_option": 1})


def test_deployment_options_derive_from_slo():
    slo = load_slo()
    opts = AppSettings().model_deployment_options()
    assert opts["autoscaling_config"]["target_ongoing_requests"] == math.floor(slo.concurrency_target * 0.75)
    assert opts["max_ongoing_requests"] == 2 * slo.concurrency_target
    assert "placement_group_bundles" not in opts  # simulated: no GPUs
    gpu = AppSettings(engine="upstream").model_deployment_options()
    assert gpu["placement_group_bundles"] == [{"CPU": 1.0, "GPU": slo.service.gpus_per_replica}]
    assert gpu["placement_group_strategy"] == "STRICT_PACK"
    assert gpu["ray_actor_options"]["num_gpus"] == slo.service.gpus_per_replica
    fixed = AppSettings(num_replicas=3, max_ongoing_requests=5).model_deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed and fixed["max_ongoing_requests"] == 5


def test_fault_state_consumes_ooms_one_request_at_a_time():
    state = FaultState()
    state.apply(FaultSpec(oom=2, slowdown=3))
    directives = [state.next_directive() for _ in range(3)]
    assert [d.oom for d in directives] == [True, True, False]
    assert all(d.slowdown == 3 for d in directives)
    state.clear()
    assert state.next_directive().slowdown == 1.0


def test_cli_flags_override_the_config_file():
    ns = parse_args(["--port", "9001", "--engine", "simulated", "--time-scale", "0.2", "--replicas", "2",
                     "--admin-token", "t", "--engine-option", "seed=5"])
    http, entry, args = app_config(ns)
    assert http["port"] == 9001 and entry["import_path"] == "serve.app:build_app"
    assert args["engine_options"] == {"time_scale": 0.2, "seed": 5}
    assert args["num_replicas"] == 2 and args["admin_token"] == "t"
    AppSettings.model_validate(args)


def test_remote_image_urls_are_fetched_only_when_allowed():
    import http.server
    import threading

    from serve.errors import APIError
    from serve.media import image_from_url
    from serve.settings import MediaLimits
    from test_serve_api import png_data_url

    png = base64.b64decode(png_data_url(60, 40).split(",", 1)[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - stdlib name
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.end_headers()
            if found:
                self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        allowed = MediaLimits(allow_remote_urls=True)
        image = asyncio.run(image_from_url(f"{base}/cat.png", allowed, "p"))
        assert (image.width, image.height, image.format) == (60, 40, "png")
        with pytest.raises(APIError) as err:
            asyncio.run(image_from_url(f"{base}/missing.png", allowed, "p"))
        assert err.value.code == "image_fetch_failed"
        with pytest.raises(APIError) as err:
            asyncio.run(image_from_url(f"{base}/cat.png", MediaLimits(), "p"))
        assert err.value.code == "remote_url_not_allowed" and err.value.status == 400
    finally:
        server.shutdown()
        server.server_close()


def test_config_env_vars_become_defaults_of_the_servers_environment():
    """serve/config.yaml turns on Ray's throughput mode but keeps the HTTP proxy and stdout logs;
    a value the operator already exported wins."""
    _, entry, _ = app_config(parse_args([]))
    environ = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    export_env_vars(entry, environ)
    assert environ == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                       "RAY_SERVE_LOG_TO_STDERR": "1"}
    fresh: dict[str, str] = {}
    export_env_vars(entry, fresh)
    assert fresh["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


class _Counted:
    """Stands in for one Ray metric object: records what the request record reports to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append((value, tags))

    observe = set = inc


class _Metrics:
    model = "m"
    tags = {"model": "m"}

    def __getattr__(self, name: str) -> _Counted:
        counted = _Counted()
        setattr(self, name, counted)
        return counted


@pytest.mark.parametrize("modality, prompt_tokens, ttft_s, outcome", [
    ("text", 512, 0.59, "met"),
    ("text", 512, 0.61, "missed"),
    ("image", 1545, 0.9, "met"),          # 600 + 1,033 x 0.625 = 1,246 ms: the image's own budget
    ("image", 1545, 1.25, "missed"),
    ("image_audio", 512, 0.6, "missed"),  # the budget is a strict "<", as the KPI's op
])
def test_the_server_counts_each_first_token_against_its_own_slo_budget(modality, prompt_tokens, ttft_s, outcome):
    from serve.observe import MODALITY_CLASSES, RequestRecord

    # started at 0.0: a real clock reading + 0.6 - itself can round to 0.59999..., a hit at the budget
    rec = RequestRecord(_Metrics(), "r1", stream=True, modality=modality, prompt_tokens=prompt_tokens, started=0.0)
    rec.ttft_budget_s = load_slo().request_budget_s("ttft", MODALITY_CLASSES[modality], prompt_tokens)
    rec.first_token = rec.last_token = rec.started + ttft_s
    rec.close(200)
    assert rec.metrics.ttft_budget.calls == [(1, {"model": "m", "outcome": outcome})]


def test_ports_for_later_binds_are_outside_the_ephemeral_range_and_never_repeat():
    """Ports handed to programs that bind them later (the stack's services, Ray's side ports) must not be
    the kernel's picks, which any process may take meanwhile, nor one another's."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(p in LATE_BIND_PORTS for p in ports) and LATE_BIND_PORTS.stop <= 32768  # Linux ephemeral: 32768+
