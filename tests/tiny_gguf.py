"""A tiny random-weight Llama checkpoint in GGUF, written locally for llama.cpp's server (no download).

Two layers, 64-wide, a byte-level GPT-2 BPE vocabulary of the printable ASCII bytes and tab,
newline, carriage return (a few merges, BOS/EOS): enough for ``llama-server`` to load it, apply a
chat template and stream tokens, which is all the load test needs from it. Replies are random
ASCII (llama.cpp's chat parser rejects invalid UTF-8, which random bytes produce); an EOS can
come early. Prompts must be ASCII too.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 64, 2, 4, 2, 128, 4096
MERGES = ["Ġ t", "Ġ a", "h e", "i n", "r e"]


TEXT_BYTES = [9, 10, 13, *range(32, 127)]


def _byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode for TEXT_BYTES: each byte as the character byte-level BPE stores it as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in TEXT_BYTES]


def write(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint to ``path``; return it."""
    tokens = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + ["<|bos|>", "<|eos|>"]
    bos, eos = len(tokens) - 2, len(tokens) - 1
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    kv = N_HEAD_KV * (N_EMBD // N_HEAD)
    tensor("token_embd.weight", len(tokens), N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    tensor("output.weight", len(tokens), N_EMBD)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.attn_k.weight", kv, N_EMBD)
        tensor(f"blk.{i}.attn_v.weight", kv, N_EMBD)
        tensor(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
