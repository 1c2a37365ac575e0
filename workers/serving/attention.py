"""Attention over a key/value cache kept in float32 for a bfloat16 (or float16) model served on a CPU.

On a CPU the half-precision attention kernels are the slow part of a half-precision decode step: torch's CPU flash
attention in bfloat16 took 1.6 ms where float32 took 0.3 (32 rows, 80 positions, one thread, AVX512-BF16 EPYC), and a
bfloat16 batched matmul copies the cache's strided views (rows in place, spare positions) to contiguous ones first.
So a scheduler serving a half-precision model on a CPU keeps its cache in float32 (the keys and values are the
model's half-precision outputs, so storing them wider loses nothing) and the model attends through
``sdpa_over_wider_cache``: the query cast up to the cache's dtype, torch's SDPA in float32, the output cast back. The
matmuls keep the half-precision speed; attention keeps the float32 one, and is no less exact. On a GPU the
half-precision kernels are the fast ones, and nothing here is used.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

WIDER_CACHE_ATTENTION = "tunehouse_sdpa_wider_cache"
"""The name under which transformers' attention (and mask) interfaces know ``sdpa_over_wider_cache``."""

_HALF_DTYPES = (torch.bfloat16, torch.float16)


def sdpa_over_wider_cache(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, also for keys and values in a wider dtype than the query (the output keeps the
    query's dtype)."""
    if key.dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output, weights = sdpa_attention_forward(module, query.to(key.dtype), key, value, attention_mask, **kwargs)
    return output.to(query.dtype), weights


AttentionInterface.register(WIDER_CACHE_ATTENTION, sdpa_over_wider_cache)
# The same masks as SDPA's: the function above is SDPA.
AttentionMaskInterface.register(WIDER_CACHE_ATTENTION, sdpa_mask)


def prepare_cache_dtype(base_model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a generation scheduler should keep ``base_model``'s key/value cache in (the transformers model, a
    PeftModel's base): float32 for a half-precision model on a CPU whose attention goes through SDPA (the model is
    switched to ``sdpa_over_wider_cache`` here); None (the model's own dtype) anywhere else: on a GPU, in float32, or
    for a model with its own attention code."""
    parameter = next(base_model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype not in _HALF_DTYPES:
        return None
    config = getattr(base_model, "config", None)
    if config is None or not hasattr(base_model, "set_attn_implementation"):
        return None
    if config._attn_implementation == "sdpa" and base_model._can_set_attn_implementation():
        base_model.set_attn_implementation(WIDER_CACHE_ATTENTION)
    if config._attn_implementation != WIDER_CACHE_ATTENTION:
        return None
    return torch.float32
