"""A decode-friendly replacement for the library's ``paged|sdpa`` attention (grouped-query folding).

Why: continuous batching packs every request of a step into one sequence and masks across them,
and the library's ``paged|sdpa`` expands the 2 GLM-4 KV heads to 32 (``repeat_kv``) before one
fused attention call. For a decode step (a handful of query rows against thousands of cached
keys) that fused kernel runs one small tile per head (32 blocks on a 132-SM GPU) and the
expansion copies the whole KV read 16 times: measured on an H200, attention and those copies were
~70 % of a decode step's GPU time. Here the 16 query heads sharing a KV head are folded into the
query rows instead, so a step is two plain batched matmuls and a softmax over the real KV heads,
parallel over keys, with no copy. Prefill-sized steps (many query rows) keep the library's kernel.

Only the attention arithmetic is replaced: the paged cache update, the mask and the CUDA-graph
capture stay the library's. Registered under the library's own name so the batching code keeps
building the mask it needs.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward

NAME = "paged|sdpa"
FOLD_MAX_QUERY_TOKENS = 256  # steps with more query rows (prefill chunks) use the library's kernel


def folded_gqa_paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None, **kwargs
                               ) -> tuple[torch.Tensor, None]:
    """Same contract as ``sdpa_attention_paged_forward``: query [1, H, q, D] -> output [1, q, H, D]."""
    _, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len > FOLD_MAX_QUERY_TOKENS or heads == kv_heads or attention_mask is None:
        return sdpa_attention_paged_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cache = kwargs.pop("cache")
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    group = heads // kv_heads  # query head h reads KV head h // group, as repeat_kv does
    k = key.transpose(0, 1)  # [KVH, kv, D]
    v = value.transpose(0, 1)
    q = query[0].reshape(kv_heads, group * q_len, dim)  # rows ordered (head in group, query token)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(q, k.transpose(1, 2)).view(kv_heads, group, q_len, -1)
    scores = scores * scale + attention_mask[0, 0]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs.view(kv_heads, group * q_len, -1), v)  # [KVH, group*q, D]
    return out.view(heads, q_len, dim).transpose(0, 1).unsqueeze(0).contiguous(), None


def install() -> None:
    """Use the folded kernel for every model using ``paged|sdpa`` in this process."""
    AttentionInterface.register(NAME, folded_gqa_paged_attention)


def uninstall() -> None:
    """Back to the library's kernel."""
    AttentionInterface.register(NAME, sdpa_attention_paged_forward)
