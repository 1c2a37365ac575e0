"""GPT-2's forward pass over packed training rows, with attention kernels that never look across documents.

A packed row holds several documents; the stock module turns its position ids into a dense block-diagonal mask
(``rows x length x length``) and hands it to SDPA, which then cannot use its FlashAttention kernel and reads the
mask in every layer. Here the rows' documents are described once per batch, and each layer calls a kernel that skips
the blocks between documents:

- ``varlen``: FlashAttention over variable-length sequences (``torch.nn.attention.varlen.varlen_attn``; CUDA, fp16 or
  bf16). The batch is one stream of documents given by their cumulative lengths; nothing outside a document is read.
- ``flex``: FlexAttention with a block mask built from the document index of every token (compiled into one Triton
  kernel by ``torch.compile``; eager runs a reference implementation).
- ``blocked``: the attention written out (two matmuls and a softmax, which ``torch.compile`` fuses into C++ kernels on a
  CPU), with an additive fp32 mask built once per batch, and the queries taken in blocks of ``_QUERY_BLOCK`` that only
  multiply the keys up to their block's end: causality skips about a third of the matmul work, and the additive mask
  costs the softmax nothing, where the stock module's boolean mask, rebuilt in every layer, doubles its time. The CPU's
  kernel (see ``choose_kernel``).
- ``sdpa``: SDPA with the dense block-diagonal causal mask: what the stock module computes, kept as the reference
  the tests compare the others with.
- ``hf``: no packed body at all: the stock module.

The body is the same parameters as the ``GPT2Model`` it wraps (nothing is copied; checkpoints and exports are the
stock model's), and it calls the stock submodules for everything but attention, so LoRA adapters that peft injects
into ``c_attn`` or the MLP take part as they do in the stock forward. Numerically it is the stock forward up to float
rounding (tests/workers/ml/test_packed_gpt2.py compares hidden states and gradients on packed rows). Attention dropout
is applied by the ``blocked`` kernel only (the stock module's own dropout module, on the attention weights, as in
GPT-2's eager attention): with another kernel a model whose ``attn_pdrop`` is above zero keeps the stock path.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch import nn
from torch.nn import functional

from workers.ml import modeling, transfer

KERNELS = ("hf", "sdpa", "flex", "varlen", "blocked")
KERNEL_VARIABLE = "TUNEHOUSE_PACKED_ATTENTION"
"""Environment variable that forces one of ``KERNELS`` (benchmarks compare them in one run); unset = automatic."""
# cu_seqlens is padded to a multiple of this (zero-length documents at the end), so a compiled body sees a handful of
# shapes instead of one per document count.
_SEGMENT_BUCKET = 256
# Queries per block of the ``blocked`` kernel. Smaller blocks skip more of the causal triangle but make smaller
# matmuls: one layer's attention (rows of 256 tokens, 4 heads of 64) on a 2-core AMD EPYC was fastest with 64.
_QUERY_BLOCK = 64


def choose_kernel(device: torch.device) -> str:
    """The kernel for packed rows on ``device``: FlexAttention on CUDA (on an H200 with torch 2.11, GPT-2 124M at
    16 x 1024 trained at 337k tokens/s with it, 300k with varlen and 295k with the stock module, compiled alike); the
    written-out ``blocked`` attention on a CPU (flex has no backward there, and SDPA's CPU kernel with a mask was
    slower than the stock module; GPT-2 mini in bf16 on a 2-core AMD EPYC: 7-15% faster than the stock module over
    several runs of a noisy machine, and level with it in fp32)."""
    forced = os.environ.get(KERNEL_VARIABLE, "").strip()
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"{KERNEL_VARIABLE} must be one of {', '.join(KERNELS)}, not {forced!r}.")
        return forced
    return "flex" if device.type == "cuda" else "blocked"


def packed_body(model: nn.Module, kernel: str) -> PackedGPT2Body | None:
    """A packed-row body for ``model``'s GPT-2 transformer, or None where the stock path must stay: another
    architecture, the ``hf`` kernel, attention dropout with a kernel that has none, or options of GPT-2 the kernels do
    not reproduce."""
    if kernel == "hf":
        return None
    model = modeling.transformers_model(model)
    config = getattr(model, "config", None)
    transformer = getattr(model, "transformer", None)
    if getattr(config, "model_type", None) != "gpt2" or transformer is None:
        return None
    dropout_unsupported = config.attn_pdrop > 0 and kernel != "blocked"
    if dropout_unsupported or config.add_cross_attention or config.scale_attn_by_inverse_layer_idx:
        return None
    return PackedGPT2Body(transformer, kernel)


def segment_inputs(position_ids: torch.Tensor, kernel: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-batch description of the documents in packed rows (positions restart at 0 at each document), computed
    from the CPU copy of ``position_ids`` so that no GPU synchronisation is needed; keyword arguments of the body."""
    starts = position_ids == 0
    if kernel == "varlen":
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        total = position_ids.numel()
        count = flat_starts.numel()
        padded = -(-(count + 1) // _SEGMENT_BUCKET) * _SEGMENT_BUCKET
        boundaries = torch.full((padded,), total, dtype=torch.int32)
        boundaries[:count] = flat_starts.to(torch.int32)
        return {"cu_seqlens": transfer.to_device(boundaries, device)}
    documents = transfer.to_device((starts.cumsum(dim=1) - 1).to(torch.int32), device)
    if kernel == "blocked":
        # Built once per batch and shared by every layer: 0 where a query may look, -inf elsewhere.
        allowed = _document_dense_mask(documents)
        return {"additive_mask": torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))}
    if kernel == "flex":
        # Built once per batch, outside the (compiled) body, and shared by every layer.
        return {"block_mask": _document_block_mask(documents)}
    return {"documents": documents}


class PackedGPT2Body(nn.Module):
    """``GPT2Model.forward`` for packed rows: returns the final hidden states (``rows x length x width``)."""

    def __init__(self, transformer: nn.Module, kernel: str):
        super().__init__()
        if kernel not in KERNELS or kernel == "hf":
            raise ValueError(f"no packed body for kernel {kernel!r}")
        self.transformer = transformer
        self.kernel = kernel
        config = transformer.config
        self.heads = config.n_head
        self.width = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        documents: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        block_mask=None,
        additive_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``documents`` (sdpa), ``cu_seqlens`` (varlen), ``block_mask`` (flex) or ``additive_mask`` (blocked) come
        from ``segment_inputs``."""
        transformer = self.transformer
        rows, length = input_ids.shape
        dense_mask = _document_dense_mask(documents) if self.kernel == "sdpa" else None
        hidden = transformer.drop(transformer.wte(input_ids) + transformer.wpe(position_ids))
        for block in transformer.h:
            query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(self.width, dim=2)
            if self.kernel == "varlen":
                attended = self._varlen(query, key, value, cu_seqlens, length)
            else:
                shape = (rows, length, self.heads, self.head_dim)
                query, key, value = (part.view(shape).transpose(1, 2) for part in (query, key, value))
                if self.kernel == "blocked":
                    attended = self._blocked(query, key, value, additive_mask, block.attn.attn_dropout)
                elif self.kernel == "flex":
                    attended = _flex_attention()(query, key, value, block_mask=block_mask, scale=self.scaling)
                else:
                    attended = functional.scaled_dot_product_attention(
                        query, key, value, attn_mask=dense_mask, scale=self.scaling
                    )
                attended = attended.transpose(1, 2).reshape(rows, length, self.width)
            hidden = hidden + block.attn.resid_dropout(block.attn.c_proj(attended))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return transformer.ln_f(hidden)

    def _blocked(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        additive_mask: torch.Tensor,
        dropout: nn.Module,
    ) -> torch.Tensor:
        length = query.shape[2]
        attended = []
        for start in range(0, length, _QUERY_BLOCK):
            end = min(start + _QUERY_BLOCK, length)
            # Keys after the block's last query are masked for all of its queries: they are not multiplied at all.
            scores = (query[:, :, start:end] @ key[:, :, :end].transpose(-1, -2)).float() * self.scaling
            weights = (scores + additive_mask[:, :, start:end, :end]).softmax(dim=-1).to(value.dtype)
            attended.append(dropout(weights) @ value[:, :, :end])
        return torch.cat(attended, dim=2)

    def _varlen(self, query, key, value, cu_seqlens, length: int) -> torch.Tensor:
        rows = query.shape[0]
        shape = (rows * length, self.heads, self.head_dim)
        attend, causal = _varlen_attention()
        # The longest document is at most a row: a fixed bound keeps the compiled graph free of data-dependent ints.
        attended = attend(
            query.reshape(shape), key.reshape(shape), value.reshape(shape), cu_seqlens, cu_seqlens, length, length,
            **causal,
        )  # fmt: skip
        return attended.reshape(rows, length, self.width)


def _document_dense_mask(documents: torch.Tensor) -> torch.Tensor:
    length = documents.shape[1]
    causal = torch.ones((length, length), dtype=torch.bool, device=documents.device).tril()
    same_document = documents[:, :, None] == documents[:, None, :]
    return (same_document & causal)[:, None]


def _document_block_mask(documents: torch.Tensor, *, compiled: bool | None = None):
    """FlexAttention's block mask of packed rows; built by compiled code on CUDA (``compiled`` None) or when asked."""

    def same_document_causal(batch, head, query_index, key_index):
        return (documents[batch, query_index] == documents[batch, key_index]) & (query_index >= key_index)

    rows, length = documents.shape
    use_compiled = documents.is_cuda if compiled is None else compiled
    build = _compiled_block_mask_builder() if use_compiled else _block_mask_builder()
    return build(same_document_causal, rows, None, length, length, device=documents.device)


@functools.cache
def _block_mask_builder():
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask


@functools.cache
def _compiled_block_mask_builder():
    """``create_block_mask`` compiled once per process: it then never materialises rows x length x length booleans
    (which only pays on a GPU). Each batch's mask function is a new closure over its documents; the compiled code
    takes it without compiling again. (``create_block_mask(..., _compile=True)``, deprecated, wraps a new compiled
    function at every call: host time per step, and a warning.)"""
    return torch.compile(_block_mask_builder())


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _varlen_attention():
    """(varlen_attn, its causal keyword) where torch has it; its signature changed between releases (``is_causal``
    in 2.9-2.10, ``window_size`` later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return varlen_attn, {"is_causal": True}
    return None
