"""The load test against OpenAI-compatible servers nobody here wrote: ``transformers serve`` and
llama.cpp's ``llama-server``.

``transformers serve``: a tiny random-weight GLM-4 checkpoint is written locally
(serve/engines/synthetic_glm.py; no download) and served by Hugging Face's own server, which
answers HTTP 422 to any request field it does not know. With the default ``--server-dialect
openai`` every request must succeed; with our own server's dialect the run must end early with a
FAIL naming that 422.

``llama-server`` (built by .ci/llama-server.sh; CI requires it): a tiny random-weight Llama in
GGUF (tests/tiny_gguf.py). It takes unknown fields and vLLM's ``ignore_eos``, so with the default
dialect replies may end early at a random EOS (counted, never a failure), and with ``--server-dialect
vllm`` every reply is exactly ``max_tokens`` long.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the `gpu` extra brings torch and transformers
pytest.importorskip("transformers")

import torch  # noqa: E402

import tiny_gguf  # noqa: E402
from conftest import _stop, _wait_healthy, free_port, require_binary  # noqa: E402
from loadtest import run_headless  # noqa: E402
from serve.engines import synthetic_glm  # noqa: E402

TEXT = ("--mix", "text=1", "--input-tokens", "16", "--output-tokens", "8", "--short-share", "0")


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``transformers serve`` on a free loopback port with a tiny local checkpoint; its URL and model id
    (the server is pinned to the checkpoint and takes only its path as the model)."""
    binary = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("the transformers CLI is not installed (pip install -e '.[gpu]')")
    folder = tmp_path_factory.mktemp("tiny-glm")
    cfg = synthetic_glm.build_config("tiny")
    tokenizer = synthetic_glm.build_tokenizer(cfg)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"
    synthetic_glm.build_model(cfg, torch.device("cpu"), torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port, log_path = free_port(), folder / "serve.log"
    cmd = [binary, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", "float32"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path, path="/health", name="transformers serve")
        yield url, str(folder)
    finally:
        _stop(proc)


def test_plain_openai_dialect_passes_transformers_serve(transformers_serve, tmp_path):
    url, model = transformers_serve
    out = run_headless(url, tmp_path, 2, "10s", *TEXT, "--model", model, timeout=240)
    s = out.summary
    assert s is not None, out.output[-3000:]
    assert s["requests"]["total"] >= 2 and s["requests"]["failed"] == 0, s["errors"]
    assert s["config"]["request_fields"]["dialect"] == "openai"
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    for r in records:  # every stream timed and its tokens counted, from usage or (flagged) from deltas
        assert r["ok"] and r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] and r["output_tokens"] >= 1, r
        assert r["tokens_source"] in ("usage", "deltas")
    print({k: s["requests"][k] for k in ("total", "tokens_from_deltas", "shorter_than_max_tokens")})


def test_extensions_make_transformers_serve_fail_the_run_early(transformers_serve, tmp_path):
    url, model = transformers_serve
    out = run_headless(url, tmp_path, 2, "120s", *TEXT, "--model", model, "--server-dialect", "llmslo",
                       "--max-errors", "4", timeout=240)
    s = out.summary
    assert out.returncode == 1 and s["verdict"] == "FAIL", out.output[-3000:]
    assert "HTTP 422" in s["stopped_early"] and "ignore_eos" in s["stopped_early"], s["stopped_early"]
    assert s["duration_s"] < 60 and s["requests"]["failed"] == s["requests"]["total"]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server on a free loopback port with a tiny local GGUF, 2 slots, one thread."""
    binary = require_binary("llama-server")
    folder = tmp_path_factory.mktemp("tiny-gguf")
    model = tiny_gguf.write(folder / "tiny.gguf")
    port, log_path = free_port(), folder / "llama-server.log"
    cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "2",
           "-t", "1", "--chat-template", "chatml", "--skip-chat-parsing", "--alias", "tiny-llama", "--no-webui"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path, path="/health", name="llama-server")
        yield url
    finally:
        _stop(proc)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]


def test_plain_openai_dialect_passes_llama_server(llama_server, tmp_path):
    out = run_headless(llama_server, tmp_path, 2, "10s", *TEXT, "--model", "tiny-llama", timeout=240)
    s = out.summary
    assert s is not None, out.output[-3000:]
    assert s["requests"]["total"] >= 2 and s["requests"]["failed"] == 0, s["errors"]
    for r in _records(tmp_path):  # timed, counted; a random early EOS makes a reply short, not a failure
        assert r["ok"] and r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"], r
        assert 1 <= r["output_tokens"] <= r["max_tokens"] and r["tokens_source"] in ("usage", "deltas"), r
    print({k: s["requests"][k] for k in ("total", "tokens_from_deltas", "shorter_than_max_tokens",
                                         "connection_retries")})


def test_vllm_dialect_fixes_llama_servers_reply_length(llama_server, tmp_path):
    out = run_headless(llama_server, tmp_path, 2, "10s", *TEXT, "--model", "tiny-llama", "--server-dialect", "vllm",
                       timeout=240)
    s = out.summary
    assert s is not None, out.output[-3000:]
    assert s["requests"]["failed"] == 0 and s["requests"]["shorter_than_max_tokens"] == 0, s["requests"]
    assert all(r["output_tokens"] == r["max_tokens"] for r in _records(tmp_path))
