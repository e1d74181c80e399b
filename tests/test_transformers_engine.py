"""The transformers engine on CPU with a tiny random-weight GLM-4: streaming, counts,
cancellation, OOM recovery, per-request sampling and local-checkpoint loading, through the
library's real continuous-batching thread (only the CUDA OOM is injected: no GPU here to run
out of). The GLM-4.1V checkpoint path (vision tower, thinking) is in test_glm4v_checkpoint.py."""

from __future__ import annotations

import asyncio
import time

import pytest

# torch/transformers come with the `gpu` extra (pip install -e '.[test,gpu]'); without it these skip.
pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from serve.engines import synthetic_glm  # noqa: E402
from serve.engines.base import (  # noqa: E402
    Delta,
    Engine,
    EngineError,
    EngineOOMError,
    Finish,
    GenerationRequest,
    Message,
)
from serve.engines.transformers import TransformersEngine  # noqa: E402

TINY = {
    "synthetic_preset": "tiny",
    "gpus_per_replica": 0,
    "dtype": "float32",
    "kv_cache_gib": 0.002,  # 512 B of K+V per token in the tiny model: 256 blocks of 16 tokens
    "block_size": 16,
    "max_batch_tokens": 128,
}


def request(rid: str, prompt_tokens: int = 24, max_tokens: int = 10, **kw) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        messages=(Message(role="user", text="describe the screen and tap the button"),),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        **kw,
    )


@pytest.fixture
def run():
    """Run coroutines on one event loop for the whole test (the engine's callbacks are bound to it)."""
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, timeout=120))
    loop.close()


@pytest.fixture
def engine(run):
    eng = TransformersEngine("tiny-glm", **TINY)
    run(eng.start())
    yield eng
    run(eng.shutdown())


async def collect(eng: TransformersEngine, req: GenerationRequest) -> list[Delta | Finish]:
    return [item async for item in eng.generate(req)]


async def wait_idle(eng: TransformersEngine) -> None:
    """Until the scheduler holds no request and every KV block is free again."""
    while True:
        stats = eng.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.kv_cache_usage == 0.0:
            return
        await asyncio.sleep(0.02)


def test_protocol_and_synthetic_label(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "transformers" and engine.model_id == "tiny-glm"
    assert engine.synthetic_weights is True


def test_streams_deltas_then_finish_with_counts(engine, run):
    items = run(collect(engine, request("a", prompt_tokens=30, max_tokens=9)))
    *deltas, finish = items
    assert all(isinstance(d, Delta) for d in deltas) and isinstance(finish, Finish)
    assert len(deltas) >= 2  # streamed, not one final blob
    assert sum(d.tokens for d in deltas) == finish.completion_tokens == 9
    assert finish.prompt_tokens == 30  # synthetic prompt sized to the API layer's count
    assert finish.reason == "length"
    text = "".join(d.content for d in deltas)
    assert len(text.split()) == 9  # one word per generated token


def test_concurrent_requests_are_batched_and_all_finish(engine, run):
    async def many():
        return await asyncio.gather(*(collect(engine, request(f"c{i}", max_tokens=5 + i)) for i in range(8)))

    results = run(many())
    assert [r[-1].completion_tokens for r in results] == [5 + i for i in range(8)]
    run(wait_idle(engine))


def test_closing_the_stream_cancels_and_frees_the_slot(engine, run):
    async def open_then_close():
        stream = engine.generate(request("long", max_tokens=5000, prompt_tokens=40))
        got = [await anext(stream), await anext(stream)]
        assert engine.stats().running == 1 and engine.stats().kv_cache_usage > 0
        await stream.aclose()  # what the API layer does on client disconnect
        await wait_idle(engine)
        return got

    assert all(isinstance(d, Delta) for d in run(open_then_close()))
    # the freed engine still serves
    assert run(collect(engine, request("after", max_tokens=3)))[-1].completion_tokens == 3


def test_cancelling_the_consumer_task_cancels_the_request(engine, run):
    """The consumer's task is cancelled mid-stream: the request leaves the batch and frees its KV blocks.

    Each decode step is slowed to 5 ms (a real sleep, which frees the GIL): at full speed on a busy
    2-core machine the library's thread once generated 4,170 tokens before the cancelled consumer
    got the GIL back, filled the tiny KV cache and failed the request instead.
    """
    real_forward = engine.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.005)
        return real_forward(*args, **kwargs)

    async def cancel_midway():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request("task", max_tokens=5000)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)

    engine.model.forward = slow_forward
    try:
        run(cancel_midway())
    finally:
        engine.model.forward = real_forward


def test_cuda_oom_is_engine_oom_and_engine_recovers(engine, run):
    model = engine.model
    real_forward = model.forward
    calls = {"n": 0}

    def oom_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(*args, **kwargs)

    model.forward = oom_once
    try:
        with pytest.raises(EngineOOMError, match="out of memory"):
            run(collect(engine, request("oom", max_tokens=4)))
        assert engine.oom_events == 1
        items = run(collect(engine, request("next", max_tokens=4)))
        assert items[-1] == Finish("length", 24, 4, 0)
        run(engine.check_health())
    finally:
        model.forward = real_forward


def save_tiny_checkpoint(path) -> PreTrainedTokenizerFast:
    """The tiny random GLM-4 as a local checkpoint with a chat template; returns its tokenizer."""
    cfg = synthetic_glm.build_config("tiny")
    model = synthetic_glm.build_model(cfg, torch.device("cpu"), torch.float32)
    tokenizer = synthetic_glm.build_tokenizer(cfg)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def test_loads_a_local_checkpoint_with_its_chat_template(tmp_path, run):
    tokenizer = save_tiny_checkpoint(tmp_path)
    eng = TransformersEngine("tiny-glm", **TINY, model_path=str(tmp_path))
    run(eng.start())
    try:
        assert eng.synthetic_weights is False
        req = request("ckpt", max_tokens=6, ignore_eos=True)
        ids = eng.prompt_ids(req)
        assert tokenizer.decode(ids).startswith("w")  # unknown words map to an ordinary id
        assert len(ids) == len("user describe the screen and tap the button assistant".split())
        finish = run(collect(eng, req))[-1]
        assert (finish.prompt_tokens, finish.completion_tokens) == (len(ids), 6)
    finally:
        run(eng.shutdown())


def test_temperature_zero_is_greedy_and_other_temperatures_sample_per_request(engine, run):
    async def tokens(temperature: float, top_p: float = 1.0) -> list[str]:
        items = await collect(engine, request(f"t{temperature}-{top_p}", max_tokens=12, temperature=temperature,
                                              top_p=top_p))
        return "".join(d.content for d in items[:-1]).split()

    async def mixed_batch():  # greedy and sampled requests share the library's batches
        return await asyncio.gather(tokens(0.0), tokens(0.5), tokens(0.0), tokens(0.5), tokens(1.0, 0.9))

    greedy_a, sampled_a, greedy_b, sampled_b, nucleus = run(mixed_batch())
    assert greedy_a == greedy_b == run(tokens(0.0))  # argmax: the same tokens, batched or alone
    assert sampled_a != sampled_b  # the seed's temperature=0.5 call gets sampled output
    assert greedy_a not in (sampled_a, sampled_b, nucleus)
    assert {len(t) for t in (greedy_a, sampled_a, nucleus)} == {12}


def test_warmup_traffic_replays_every_level_then_frees_the_cache(run):
    # on a GPU this runs inside start(); called directly here, where there are no CUDA graphs to capture
    eng = TransformersEngine("tiny-glm", **TINY, warmup_streams=[1, 3], warmup_prompt_tokens=20, warmup_output_tokens=6)
    run(eng.start())
    try:
        eng._replay_traffic(eng._manager)
        run(wait_idle(eng))
        assert run(collect(eng, request("after-warmup", max_tokens=3)))[-1].completion_tokens == 3
    finally:
        run(eng.shutdown())


def test_bad_config_and_memory_budget_are_refused(run):
    with pytest.raises(ValueError, match="no_such_key"):
        TransformersEngine("m", no_such_key=1)
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        run(TransformersEngine("m", **{**TINY, "synthetic_preset": "nope"}).start())
    with pytest.raises(EngineError, match="gpu_memory_limit_gib"):
        run(TransformersEngine("m", **{**TINY, "gpu_memory_limit_gib": 0.0001}).start())


class _StubCache:
    """Returns fixed cached keys/values, as PagedAttentionCache.update does after writing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        return self.keys, self.values


@pytest.mark.parametrize("q_len", [1, 8, 300])  # 300 > FOLD_MAX_QUERY_TOKENS: the library's path
def test_folded_gqa_attention_matches_library_sdpa(q_len):
    from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward

    from serve.engines.gqa_attention import folded_gqa_paged_attention

    torch.manual_seed(q_len)
    heads, kv_heads, dim, kv_len = 8, 2, 16, 333
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, heads // kv_heads
    query = torch.randn(1, heads, q_len, dim, dtype=torch.float64)
    keys = torch.randn(kv_len, kv_heads, dim, dtype=torch.float64)
    values = torch.randn(kv_len, kv_heads, dim, dtype=torch.float64)
    allowed = torch.rand(q_len, kv_len) < 0.7  # any packed/causal pattern; keep one key per row
    allowed[:, 0] = True
    mask = torch.zeros(1, 1, q_len, kv_len, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    new_kv = torch.randn(1, kv_heads, q_len, dim, dtype=torch.float64)  # written to the cache, then read back
    kwargs = {"read_index": None, "write_index": None, "scaling": dim**-0.5}
    ref, _ = sdpa_attention_paged_forward(module, query, new_kv, new_kv, mask, cache=_StubCache(keys, values), **kwargs)
    out, _ = folded_gqa_paged_attention(module, query, new_kv, new_kv, mask, cache=_StubCache(keys, values), **kwargs)
    assert out.shape == ref.shape == (1, q_len, heads, dim)
    # the folded path takes its softmax in float32 (as it does for bf16), hence not 1e-15
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-5
