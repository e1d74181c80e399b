"""The traffic mix: request bodies, synthetic media, prompt files, option validation."""

from __future__ import annotations

import base64
import io
import json
import random
import wave
from types import SimpleNamespace

import pytest
from PIL import Image

from loadtest._traffic import Mix, TrafficError, parse_weights, plan_request, synth_image, synth_speech_wav


class _Inline:
    """Stands in for gevent's thread pool: runs the function in this thread."""

    @staticmethod
    def apply(fn, args):
        return fn(*args)


def _opts(**kw):
    base = dict(mix="text=1,image=1,audio=1", thinking_share=0.5, short_share=0.25, input_tokens=40,
                output_tokens=64, length_spread=0.0, images_max=3, image_min_px=224, image_max_px=400,
                audio_min_s=1.0, audio_max_s=2.0, prompts_file="", model="", server_dialect="llmslo")
    return SimpleNamespace(**{**base, **kw})


PLAIN_OPENAI = {"model", "messages", "stream", "stream_options", "max_tokens"}


@pytest.mark.parametrize(
    "dialect, extensions",
    [
        ("openai", set()),
        ("vllm", {"min_tokens", "ignore_eos", "chat_template_kwargs"}),
        ("llmslo", {"min_tokens", "ignore_eos", "chat_template_kwargs", "enable_thinking", "return_reasoning"}),
    ],
)
def test_extensions_are_sent_only_in_a_dialect_that_takes_them(dialect, extensions):
    mix = Mix.from_options(_opts(server_dialect=dialect, mix="text=1", short_share=0), short_tokens=32, model="m")
    planned = [plan_request(mix, random.Random(i), _Inline) for i in range(20)]
    assert all(set(json.loads(p.body)) == PLAIN_OPENAI | extensions for p in planned)
    # no thinking switch in the dialect: no request is counted as a thinking one
    assert any(p.thinking for p in planned) == bool(extensions)


def test_bodies_follow_the_mix_and_ask_for_usage():
    mix = Mix.from_options(_opts(), short_tokens=32, model="autoglm-phone-9b")
    rng = random.Random(1)
    planned = [plan_request(mix, rng, _Inline) for _ in range(60)]
    assert {p.cls for p in planned} == {"text", "image", "audio"}
    for p in planned:
        body = json.loads(p.body)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["model"] == "autoglm-phone-9b"
        assert body["max_tokens"] == body["min_tokens"] == (32 if p.short else 64) and body["ignore_eos"]
        assert body["enable_thinking"] == p.thinking and not (p.short and p.thinking)
        parts = body["messages"][0]["content"]
        kinds = [part["type"] for part in parts]
        assert kinds[0] == "text"
        if p.cls == "image":
            assert 1 <= kinds.count("image_url") <= 3
        if p.cls == "audio":
            assert kinds.count("input_audio") == 1
    assert any(p.short for p in planned) and any(p.thinking for p in planned)
    texts = [json.loads(p.body)["messages"][0]["content"][0]["text"] for p in planned]
    assert len(set(t.split("]")[0] for t in texts)) == len(texts)  # unique nonce: no prefix cache hit


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("png", "PNG")])
def test_images_have_the_requested_size_and_unique_pixels(fmt, pil_format):
    a, b = (Image.open(io.BytesIO(base64.b64decode(synth_image((300, 224), fmt, s)))) for s in (1, 2))
    assert a.format == pil_format and a.size == (300, 224)
    assert a.tobytes() != b.tobytes()


def test_audio_is_16khz_mono_speech_length():
    with wave.open(io.BytesIO(base64.b64decode(synth_speech_wav(1.5, 7)))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.getnframes() == 24000


def test_prompt_file_is_an_alternative_source(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 8}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    mix = Mix.from_options(_opts(prompts_file=str(path)), short_tokens=32, model="m")
    bodies = [json.loads(plan_request(mix, random.Random(i), _Inline).body) for i in range(20)]
    assert {b["messages"][0]["content"] for b in bodies} == {"hello", "hi"}
    assert all("ignore_eos" not in b for b in bodies)  # real prompts end where the model ends them


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mix="text=1,video=2"), "--mix"),
        (dict(mix="text=0"), "positive weight"),
        (dict(thinking_share=1.5), "--thinking-share"),
        (dict(image_min_px=800, image_max_px=400), "--image-min-px"),
        (dict(audio_max_s=0.05, audio_min_s=0.05), "--audio-min-s"),
        (dict(prompts_file="/nonexistent.jsonl"), "cannot read"),
    ],
)
def test_bad_traffic_options_are_one_line_errors(change, message):
    with pytest.raises(TrafficError, match=message.replace("-", r"\-")) as err:
        Mix.from_options(_opts(**change), short_tokens=32, model="m")
    assert "\n" not in str(err.value)


def test_weights_parse():
    assert parse_weights("text=5, image=3,audio=0") == {"text": 5.0, "image": 3.0, "audio": 0.0}
