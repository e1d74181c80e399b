"""A real checkpoint path on CPU: a tiny GLM-4.1V-architecture model (vision tower + text model,
``Glm4vForConditionalGeneration``) with its tokenizer, chat template and image processor, written
with ``save_pretrained`` and served by the transformers engine from ``model_path``: text chat through
the library's continuous batching, thinking split into reasoning, images through the vision tower,
audio refused with a clear error — first on the engine, then through ``llmslo serve`` over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import Glm4vConfig, Glm4vForConditionalGeneration, PreTrainedTokenizerFast  # noqa: E402
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil  # noqa: E402

from conftest import _serve_process, free_port  # noqa: E402
from serve.engines.base import AudioInput, Delta, EngineInputError, Finish, GenerationRequest, ImageInput, Message  # noqa: E402
from serve.engines.transformers import TransformersEngine  # noqa: E402
from test_serve_api import png_data_url, wav_b64  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>", "<|begin_of_image|>",
           "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
VOCAB = 512
# GLM-4.1V's template shape: one image slot per image part; thinking opens <think> in the prompt.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|> "
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% if enable_thinking %}<think>{% endif %}{% endif %}"
)
ENGINE = {"gpus_per_replica": 0, "dtype": "float32", "kv_cache_gib": 0.002, "block_size": 16, "max_batch_tokens": 128}


def tiny_glm4v(path: Path) -> Path:
    """Save a random tiny GLM-4.1V checkpoint (vision depth 1, 2 text layers) with tokenizer and processor."""
    vocab = {t: i for i, t in enumerate(SPECIAL)} | {f"w{i}": i for i in range(len(SPECIAL), VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w20"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w20", pad_token=SPECIAL[0],
                                        eos_token=SPECIAL[0], chat_template=TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    ids = {"image_token_id": vocab["<|image|>"], "image_start_token_id": vocab["<|begin_of_image|>"],
           "image_end_token_id": vocab["<|end_of_image|>"], "video_token_id": vocab["<|video|>"],
           "video_start_token_id": vocab["<|begin_of_video|>"], "video_end_token_id": vocab["<|end_of_video|>"]}
    config = Glm4vConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "pad_token_id": 0,
                     "eos_token_id": [0], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}},
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "image_size": 56},
        eos_token_id=[0], pad_token_id=0, **ids,
    )
    torch.manual_seed(0)
    Glm4vForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Glm4vImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_glm4v(tmp_path_factory.mktemp("glm4v"))


@pytest.fixture(scope="module")
def run():
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, timeout=120))
    loop.close()


@pytest.fixture(scope="module")
def engine(checkpoint, run):
    eng = TransformersEngine("tiny-glm4v", model_path=str(checkpoint), **ENGINE)
    run(eng.start())
    yield eng
    run(eng.shutdown())


def png(width: int, height: int) -> ImageInput:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return ImageInput(width, height, "PNG", buf.getvalue())


def ask(text: str = "open the settings", max_tokens: int = 6, **kw) -> GenerationRequest:
    images, audios = kw.pop("images", ()), kw.pop("audios", ())
    return GenerationRequest(request_id="r", messages=(Message("user", text, images, audios),), prompt_tokens=10,
                             max_tokens=max_tokens, ignore_eos=True, temperature=0.0, **kw)


async def collect(eng: TransformersEngine, req: GenerationRequest) -> list[Delta | Finish]:
    return [item async for item in eng.generate(req)]


def test_text_chat_runs_on_the_batching_path_with_the_chat_template(engine, run):
    assert engine.synthetic_weights is False and engine.vision is not None
    ids = engine.prompt_ids(ask())
    assert engine.tokenizer.decode(ids) == "<|user|> w20 w20 w20 <|assistant|>"  # unknown words -> w20
    *deltas, finish = run(collect(engine, ask()))
    assert finish == Finish("length", len(ids), 6, 0)
    assert sum(d.tokens for d in deltas) == 6 and not any(d.reasoning for d in deltas)


def test_thinking_streams_reasoning_and_counts_reasoning_tokens(engine, run):
    req = ask(max_tokens=5, thinking=True)
    assert engine.prompt_ids(req)[-1] == SPECIAL.index("<think>")  # the template opened the thought
    *deltas, finish = run(collect(engine, req))
    # a random model never closes </think>: everything it wrote is reasoning
    assert finish.reasoning_tokens == finish.completion_tokens == 5
    assert "".join(d.reasoning for d in deltas).split() and not "".join(d.content for d in deltas)


def test_reasoning_ends_at_the_closing_tag_and_content_follows(engine):
    from serve.engines.transformers import _Detokenizer

    think, end = SPECIAL.index("<think>"), SPECIAL.index("</think>")
    assert engine.think_ids == (think, end)
    text = _Detokenizer(engine.tokenizer, ask(thinking=True, stop=("w30",)), [1, 2], engine.think_ids)
    first = text.update([think, 100, 101])
    second = text.update([think, 100, 101, end, 200, 201, 30, 202])
    assert (first.reasoning, first.content, first.tokens) == ("w100 w101", "", 3)
    assert (second.reasoning, second.content.strip(), text.stopped) == ("", "w200 w201", True)
    assert text.finish(2, 50) == Finish("stop", 2, 8, 4)  # <think> w100 w101 </think>


def test_images_go_through_the_vision_tower(engine, run):
    calls = []
    hook = engine.vision.twin.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        req = ask(images=(png(80, 60), png(56, 56)))
        *deltas, finish = run(collect(engine, req))
    finally:
        hook.remove()
    assert calls and calls[0][0] == 24 + 16  # patches of both images: 4x6 and 4x4 (14-px patches, resized)
    text_only = len(engine.prompt_ids(req))  # the same chat without image slots
    # per image: <|begin_of_image|> and <|end_of_image|>, and one <|image|> per 2x2 merged patches
    assert finish.prompt_tokens == text_only + 2 * 2 + (24 + 16) // 4
    assert finish.completion_tokens == sum(d.tokens for d in deltas) == 6


def test_audio_and_images_on_a_text_checkpoint_are_refused(engine, run, tmp_path):
    with pytest.raises(EngineInputError, match="no audio encoder"):
        run(collect(engine, ask(audios=(AudioInput(1.0, 16000, "wav", b""),))))
    text_only = TransformersEngine("text", model_path=str(tmp_path), **ENGINE)  # refused before any model is needed
    with pytest.raises(EngineInputError, match="text-only checkpoint"):
        run(collect(text_only, ask(images=(png(56, 56),))))


@pytest.fixture(scope="module")
def glm4v_app(checkpoint, tmp_path_factory) -> str:
    """``llmslo serve`` with the transformers engine on the tiny checkpoint, on the CPU."""
    options = {**ENGINE, "model_path": str(checkpoint)}
    args = ["--engine", "transformers", "--replicas", "1", "--gpus-per-replica", "0", "--num-cpus", "2",
            "--metrics-port", str(free_port()), *[a for k, v in options.items() for a in ("--engine-option", f"{k}={json.dumps(v)}")]]
    with _serve_process(args, {}, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield f"{url}/v1/chat/completions"


def test_over_http_thinking_images_and_refused_audio(glm4v_app):
    model = "autoglm-phone-9b"
    thought = httpx.post(glm4v_app, json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 4, "chat_template_kwargs": {"enable_thinking": True}},
                         timeout=60).json()
    assert thought["usage"]["completion_tokens_details"]["reasoning_tokens"] == thought["usage"]["completion_tokens"]
    assert thought["choices"][0]["message"]["reasoning_content"]
    image = {"type": "image_url", "image_url": {"url": png_data_url(56, 56)}}
    seen = httpx.post(glm4v_app, json={"model": model, "max_tokens": 3, "temperature": 0.5,
                                       "messages": [{"role": "user", "content": [image, {"type": "text", "text": "x"}]}]},
                      timeout=60)
    assert seen.status_code == 200 and seen.json()["usage"]["completion_tokens"] == 3
    audio = {"type": "input_audio", "input_audio": {"data": wav_b64(1, rate=8000), "format": "wav"}}
    refused = httpx.post(glm4v_app, json={"model": model, "messages": [{"role": "user", "content": [audio]}]}, timeout=60)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "unsupported_input"
