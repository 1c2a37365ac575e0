"""Attention of packed rows on a CPU for the Llama family of decoders, written out in blocks of queries.

Packed rows always carry a mask (a document must not see the one before it), and on a CPU SDPA with a mask runs
torch's CPU flash kernel, whose backward pass is slow; transformers' eager attention multiplies the whole causal square
and keeps it for the backward pass, which grows with the square of the row. LoRA on SmolLM2-135M, the body's forward
and backward over 2,048 tokens in bf16 on one core of a 2-core AMD EPYC, rows of 256 / 512 / 1,024 tokens:
SDPA 7.7 / 9.1 / 11.2 s, eager 6.7 / 8.2 / 17.7 s, these blocks 6.7 / 7.7 / 9.9 s.

Here the queries are taken in blocks of ``_QUERY_BLOCK`` that multiply only the keys up to their block's end (causality
skips the blocks above the diagonal), the softmax runs in fp32 over transformers' additive mask (built once per
forward pass, ``eager_mask``, and shared by every layer), and the rest is the eager attention's arithmetic: numerically
the stock eager path up to float rounding (tests/workers/ml/test_cpu_attention.py). Each block keeps its
probabilities for the backward pass, about rows x heads x length² x 3 bytes per layer in all, so a run takes it only
while that stays under ``_SAVED_BYTES_BUDGET``; longer or wider batches keep SDPA, whose memory does not grow so.

Only CPU training switches (``use_blocked_attention``); GPUs keep their flash kernels. The switch is the model's
attention implementation, registered with transformers' ``AttentionInterface``, so LoRA adapters and every other
part of the stock forward take part as they do there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask

from workers.ml import modeling

BLOCKED_ATTENTION = "tunehouse_blocked"
# Decoders whose attention is plain scaled dot-product over a mask (no logit soft-capping or attention sinks, which
# this function does not reproduce; sliding windows are part of the mask).
_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Queries per block: as for GPT-2's packed rows (workers/ml/packed_gpt2.py), 64 was the best trade between the
# triangle skipped and the size of each matmul on a CPU.
_QUERY_BLOCK = 64
# What the blocks may keep for the backward pass in one micro-batch, all layers together.
_SAVED_BYTES_BUDGET = 2 * 2**30


def blocked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` is (rows, heads, length, head size), ``key`` and
    ``value`` (rows, key-value heads, key length, head size), ``attention_mask`` additive (rows, 1, length, key
    length); returns (rows, length, heads, head size) and no attention weights."""
    if attention_mask is None:  # nothing to mask (not a training row): SDPA, as the model had
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key-value head serves a group of query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    length, key_length = query.shape[2], key.shape[2]
    # Keys before the queries' first position (a cache) are visible to every query block.
    offset = key_length - length
    attended = []
    for start in range(0, length, _QUERY_BLOCK):
        end = min(start + _QUERY_BLOCK, length)
        visible = offset + end  # keys after the block's last query are masked for all of its queries
        scores = (query[:, :, start:end] @ key[:, :, :visible].transpose(-1, -2)).float() * scaling
        weights = (scores + attention_mask[:, :, start:end, :visible]).softmax(dim=-1).to(value.dtype)
        weights = functional.dropout(weights, p=dropout, training=module.training)
        attended.append(weights @ value[:, :, :visible])
    return torch.cat(attended, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(BLOCKED_ATTENTION, blocked_attention)
AttentionMaskInterface.register(BLOCKED_ATTENTION, eager_mask)


def use_blocked_attention(model: nn.Module, *, rows: int, length: int) -> bool:
    """Switches ``model`` (a transformers decoder, possibly inside peft) to ``blocked_attention`` for micro-batches of
    ``rows`` x ``length`` tokens when it is of the Llama family and what the blocks keep fits the budget; returns
    whether it did."""
    base = modeling.transformers_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _MODEL_TYPES or not hasattr(base, "set_attn_implementation"):
        return False
    saved_bytes = rows * config.num_attention_heads * length * length * 3 * config.num_hidden_layers
    if saved_bytes > _SAVED_BYTES_BUDGET or not base._can_set_attn_implementation():
        return False
    base.set_attn_implementation(BLOCKED_ATTENTION)
    return config._attn_implementation == BLOCKED_ATTENTION
