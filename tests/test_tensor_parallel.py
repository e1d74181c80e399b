"""The transformers engine tensor-parallel over two CPU processes (gloo), tiny random GLM-4.

The replica process is rank 0 and starts rank 1 itself, as on a two-GPU replica; only the
backend differs (gloo instead of NCCL). Checks what a two-rank replica must keep from one rank:
the same greedy tokens, cancellation that frees the slot on every rank, an OOM that fails only
its requests (both ranks rebuild their managers), a health check that fails when a rank dies (so
Ray Serve replaces the replica), and a shutdown that ends every rank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_transformers_engine import TINY, collect, request, save_tiny_checkpoint, wait_idle  # noqa: E402

from serve.engines import tensor_parallel  # noqa: E402
from serve.engines.base import Delta, EngineError, EngineOOMError  # noqa: E402
from serve.engines.transformers import TransformersEngine  # noqa: E402

pytestmark = pytest.mark.timeout(120)
# A process holds one tensor-parallel group (torch's default process group): the tests that start
# their own engine come after the killed-rank test has stopped the module's engine.

TWO_RANKS = {**TINY, "cpu_ranks": 2}
# Concurrent requests of different lengths; 150 prompt tokens > max_batch_tokens (128): chunked prefill.
REQUESTS = [("short", 24, 6), ("long-prompt", 150, 8), ("long-output", 30, 20)]


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Any], Any]]:
    """One event loop for the module's engines (a two-rank start costs a process and a rendezvous)."""
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, timeout=90))
    loop.close()


@pytest.fixture(scope="module")
def two_ranks(run) -> Iterator[TransformersEngine]:
    eng = TransformersEngine("tiny-glm", **TWO_RANKS)
    run(eng.start())
    yield eng
    run(eng.shutdown())


def texts(eng: TransformersEngine, run, **kw: Any) -> dict[str, str]:
    """Generated greedy text of every request of REQUESTS, all in flight at once (temperature 0: comparable)."""
    async def all_at_once():
        return await asyncio.gather(*(collect(eng, request(rid, prompt_tokens=p, max_tokens=n, temperature=0.0, **kw))
                                      for rid, p, n in REQUESTS))

    results = run(all_at_once())
    assert [r[-1].completion_tokens for r in results] == [n for _, _, n in REQUESTS]
    return {rid: "".join(d.content for d in r if isinstance(d, Delta)) for (rid, _, _), r in zip(REQUESTS, results)}


async def both_idle(eng: TransformersEngine) -> None:
    """Until rank 0 and rank 1 both hold no request and no KV block."""
    await wait_idle(eng)
    while any(s["active"] or s["waiting"] or s["kv_cache_usage"] for s in eng.tp_group.worker_states()):
        await asyncio.sleep(0.05)


def test_two_ranks_generate_the_greedy_tokens_of_one(two_ranks, run):
    assert two_ranks.tp_group is not None and two_ranks.tp_group.size == 2
    one_rank = TransformersEngine("tiny-glm", **TINY)
    run(one_rank.start())
    try:
        expected = texts(one_rank, run)
    finally:
        run(one_rank.shutdown())
    assert texts(two_ranks, run) == expected
    run(both_idle(two_ranks))


def test_closing_the_stream_frees_the_slot_on_both_ranks(two_ranks, run):
    async def open_then_close():
        stream = two_ranks.generate(request("long", max_tokens=5000, prompt_tokens=40))
        await anext(stream)
        await anext(stream)
        rank1 = two_ranks.tp_group.worker_states()[0]
        assert two_ranks.stats().running == rank1["active"] == 1
        assert rank1["kv_cache_usage"] == two_ranks.stats().kv_cache_usage > 0
        await stream.aclose()  # what the API layer does on client disconnect
        await both_idle(two_ranks)

    run(open_then_close())
    assert run(collect(two_ranks, request("after", max_tokens=3)))[-1].completion_tokens == 3
    run(two_ranks.check_health())


def test_oom_on_rank_0_fails_its_requests_and_both_ranks_rebuild(two_ranks, run):
    """The OOM is raised after a complete forward pass, so rank 1 meets rank 0's hard stop at the next step."""
    model = two_ranks.model
    real_forward = model.forward
    calls = {"n": 0}

    def oom_after_first_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return out

    model.forward = oom_after_first_forward
    try:
        with pytest.raises(EngineOOMError, match="out of memory"):
            run(collect(two_ranks, request("oom", max_tokens=4)))
    finally:
        model.forward = real_forward
    assert two_ranks.oom_events == 1
    run(two_ranks.check_health())
    assert run(collect(two_ranks, request("next", max_tokens=4)))[-1].completion_tokens == 4
    run(both_idle(two_ranks))


# The library's generation thread on rank 0 dies when its peer does; its error handler's own
# all-reduce then fails too, and that exception leaves the thread (pytest reports it as a warning).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_rank_fails_the_health_check_and_stop_does_not_hang(two_ranks, run):
    run(two_ranks.check_health())
    two_ranks.tp_group.workers[0].kill()
    with pytest.raises(EngineError, match="rank 1"):
        run(two_ranks.check_health())
    run(two_ranks.shutdown())
    assert not dist.is_initialized()


def test_a_checkpoint_loads_sharded_and_stop_ends_every_rank(tmp_path, run):
    """The library's TP loader (``from_pretrained(distributed_config=...)``): the tokens of one rank."""
    save_tiny_checkpoint(tmp_path)
    got = {}
    for ranks in (1, 2):
        eng = TransformersEngine("tiny-glm", **{**TWO_RANKS, "cpu_ranks": ranks, "model_path": str(tmp_path)})
        run(eng.start())
        try:
            assert (eng.tp_group is not None) == (ranks == 2)
            got[ranks] = texts(eng, run, ignore_eos=True)
        finally:
            run(eng.shutdown())
    assert got[2] == got[1]
    assert eng.tp_group.workers[0].proc.returncode == 0  # rank 1 left on "stop", not killed
    assert not dist.is_initialized()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # as above
def test_a_stalled_group_is_found_broken_and_fails_the_health_check(run, monkeypatch):
    """An OOM on rank 0 alone, before its forward: rank 1 waits in a model all-reduce rank 0 never joins.

    Rank 0's step exchange times out (CPU_GROUP_TIMEOUT_S), its request fails instead of hanging, the
    group is declared broken rather than rebuilt, and the health check fails so Serve replaces it.
    """
    monkeypatch.setattr(tensor_parallel, "CPU_GROUP_TIMEOUT_S", 2.0)
    monkeypatch.setattr(tensor_parallel, "STATUS_TIMEOUT_S", 2.0)
    eng = TransformersEngine("tiny-glm", **TWO_RANKS)
    run(eng.start())
    try:
        eng.model.forward = _raise_oom
        with pytest.raises(EngineError, match="broken: rank 1 is stuck in a collective"):
            run(collect(eng, request("stall", max_tokens=4)))
        with pytest.raises(EngineError, match="broken"):
            run(eng.check_health())
    finally:
        run(eng.shutdown())
    assert not dist.is_initialized()


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 0 only)")
