"""Random-weight GLM-4 models and a local tokenizer, for GPU performance work without a checkpoint.

No weights can be downloaded on the GPU hosts, yet speed and memory depend only on the
architecture: the GLM-4-9B text backbone (the language model inside AutoGLM-Phone-9B /
GLM-4.1V) is built here from ``Glm4Config`` with random bf16 weights, placed directly on
its GPU (never materialised on the CPU), or sharded over tensor-parallel ranks.
The tokenizer is a word-level one built in memory: one whitespace-separated word is one
token, and every id of the 151,552-entry vocabulary decodes to a word, so random tokens
stream as readable text.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.device_mesh import DeviceMesh
from transformers import Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

from serve.engines import tensor_parallel

# Sizes of the GLM-4-9B backbone are Glm4Config's defaults (hidden 4096, 40 layers, 32 heads,
# 2 KV heads, head dim 128, intermediate 13696, vocab 151552): 9.4 B parameters.
PRESETS: dict[str, dict[str, Any]] = {
    "glm-4-9b": {},
    # A few-MB model with the same layer types, for CPU tests.
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "pad_token_id": 0,
        "eos_token_id": [1],
    },
}

UNK = "<unk>"


def build_config(preset: str = "glm-4-9b", **overrides: Any) -> Glm4Config:
    """The architecture of ``preset`` with ``overrides`` applied (a clear error for unknown presets)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return Glm4Config(**{**PRESETS[preset], **overrides})


def build_tokenizer(config: Glm4Config) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is exactly the model's: id ``i`` is the word ``w<i>``.

    Special ids of the config (pad, eos) get GLM-style names so logs read naturally.
    """
    specials = {config.pad_token_id: "<|endoftext|>"} if config.pad_token_id is not None else {}
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    for i, token_id in enumerate(t for t in eos if t is not None and t not in specials):
        specials[token_id] = f"<|eos{i}|>"
    vocab = {specials.get(i, f"w{i}"): i for i in range(config.vocab_size)}
    unk = next(name for name in vocab if name.startswith("w"))  # unknown words map to an ordinary id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    first_eos = next((specials[t] for t in eos if t in specials), None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        pad_token=specials.get(config.pad_token_id),
        eos_token=first_eos,
    )


@torch.no_grad()
def _random_value(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                  std: float, generator_seed: int) -> torch.Tensor:
    """Initial value like the library's ``_init_weights``: N(0, std) matrices, ones for norms, zero biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if "norm" in name.rsplit(".", 2)[-2]:
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(generator_seed)
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=gen)


def build_model(config: Glm4Config, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                mesh: DeviceMesh | None = None) -> Glm4ForCausalLM:
    """Random-weight ``Glm4ForCausalLM`` on ``device``; with a device mesh, this rank's tensor-parallel shards.

    Parameters are created on the meta device and materialised directly on their device, so a 9.4 B
    model never touches host memory and builds in seconds. Each weight is drawn whole from its own
    seed on every rank and then cut to the rank's shard, so any number of ranks holds the same model.
    """
    with torch.device("meta"):
        model = Glm4ForCausalLM(config)
    if mesh is not None:
        model = Glm4ForCausalLM.maybe_distribute_model(model, tensor_parallel.distributed_config(mesh.size()), mesh)
    for index, (name, param) in enumerate(list(model.named_parameters())):
        value = _random_value(name, param.shape, dtype, device, config.initializer_range, seed + index)
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = tensor_parallel.shard_like(param, value)
    # Non-persistent buffers (rotary inverse frequencies) were computed on meta: rebuild them.
    with device:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.config.dtype = dtype
    return model.eval()
