"""The output projection and the cross-entropy of a causal language model, fused and computed in chunks of rows.

The stock path materialises the logits of every position — ``rows x vocabulary`` — then an fp32 copy of them, their
log-softmax and, in the backward pass, a gradient of the same size: with a 50k vocabulary that is the largest tensor of
a training step by far, and on a CPU the log-softmax alone costs about a sixth of a step. Here the rows are taken a
chunk at a time: the chunk's logits are computed (in the autocast dtype, like the stock head), their log-sum-exp and
the target's logit give the loss in fp32, and since the loss is the end of the graph, its gradient with respect to the
logits (``softmax - one_hot``) is known at once and turned into the gradients of the hidden states and of the
projection weight right there. Nothing of size ``rows x vocabulary`` outlives a chunk, and nothing is recomputed in the
backward pass, which only scales the stored gradients. Rows whose target is ignored (prompt tokens under
``train_on="completion"``, padding) are dropped before the projection, so they cost nothing.

Numerically it is the stock head followed by ``cross_entropy(logits.float(), targets, reduction="sum")`` up to float
rounding (tests/workers/ml/test_fused_loss.py compares loss and gradients with it), and it is deterministic: the
chunks are visited in order.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional

from workers.ml import modeling
from workers.ml.data.templates import IGNORE_INDEX

# Model types whose causal LM is ``base_model`` followed by a bias-free linear ``lm_head`` applied as is: no logit
# scaling, soft-capping or extra head layers (those keep the stock path).
_PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
# Bytes of fp32 logits per chunk (in bf16, the chunk's logits and its gradient together). On a CPU each chunk also
# converts and adds a full-size weight gradient, so fewer, larger chunks pay up to a point: GPT-2 mini (vocabulary
# 8,192, 2,048 rows) trained 5% faster with 16 MB than with 4 MB and 7% slower with 64 MB, whose chunks no longer stay
# in the cache hierarchy. On CUDA (None) the budget is a share of the device's memory, below.
_CHUNK_BYTES: dict[str, int | None] = {"cpu": 16 * 2**20, "cuda": None, "default": 256 * 2**20}
# A GPU gains nothing from small chunks (no cache holds even one: 1,353 rows of GPT-2's vocabulary are 134 MB in bf16),
# while each chunk reads and writes the whole fp32 weight gradient once more and costs the host a dozen launches: a
# fortieth of the memory puts GPT-2 124M's 16 x 1024 rows (3.25 GB) in one chunk on an H200 and two on an H100.
_CUDA_CHUNK_MEMORY_SHARE = 1 / 40
# Fewest rows per chunk, whatever the vocabulary: the weight gradient's fp32 sum (vocabulary x width, read and
# written once per chunk) must be shared by enough rows. With SmolLM2's 49,152 tokens, 16 MB is 85 rows, and the head
# of 2,048 rows took 4.5 s on a 2-core AMD EPYC core against 2.5 s in chunks of 512 rows (2.3 s in one chunk).
_MIN_CHUNK_ROWS = {"cpu": 512, "default": 1}
# Rows the projection is padded to a multiple of, per device type (CPU kernels do not need it).
_VOCABULARY_ALIGNMENT = {"cuda": 64}


def fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Parameter] | None:
    """The body (returns ``last_hidden_state``) and output projection weight of ``model`` when the fused loss can
    replace its head, else None. Works through ``torch.compile`` wrappers and peft adapters; an ``lm_head`` that peft
    wraps (adapted or trained as a module to save) is not a plain Linear, so it keeps the stock path."""
    model = modeling.transformers_model(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    head = getattr(model, "lm_head", None)
    body = getattr(model, "base_model", None)
    if type(head) is not nn.Linear or head.bias is not None or body is None or body is model:
        return None
    return body, head.weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        trained_rows: torch.Tensor,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk_rows: int,
        compiled: bool,
    ) -> torch.Tensor:
        vocabulary = weight.size(0)
        # The projection gets zero rows up to a multiple of 64: GPU matrix kernels need aligned leading dimensions,
        # and a vocabulary like GPT-2's 50,257 sent all three matmuls of a chunk to slow fallback kernels (profiled
        # on an H200). The padded logits take no probability and get zero gradient columns, which are cut off, so
        # nothing changes numerically.
        alignment = _VOCABULARY_ALIGNMENT.get(hidden.device.type, 1)
        padded_vocabulary = -(-vocabulary // alignment) * alignment
        projection = weight.to(compute_dtype)
        if padded_vocabulary != vocabulary:
            projection = functional.pad(projection, (0, 0, 0, padded_vocabulary - vocabulary))
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        # A frozen projection (LoRA, whose adapters leave the head as it is) needs no weight gradient: a third of the
        # head's matmul work and the fp32 sum skipped.
        trains_weight = ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_weight = None
        logit_gradient = _compiled_logit_gradient(hidden.device.type, compute_dtype) if compiled else _logit_gradient
        for start in range(0, trained_rows.numel(), chunk_rows):
            rows = trained_rows[start : start + chunk_rows]
            inputs = hidden.index_select(0, rows).to(compute_dtype)
            chunk_targets = targets.index_select(0, rows).unsqueeze(1)
            chunk_loss, gradient = logit_gradient(inputs @ projection.t(), chunk_targets, vocabulary)
            loss += chunk_loss
            grad_hidden.index_copy_(0, rows, (gradient @ projection).to(hidden.dtype))
            if trains_weight:
                grad_weight = _add_weight_gradient(grad_weight, gradient, inputs)
        if trains_weight and grad_weight is None:  # no trained rows at all
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        saved_weight_gradient = grad_weight[:vocabulary].to(weight.dtype) if grad_weight is not None else None
        ctx.save_for_backward(grad_hidden, saved_weight_gradient)
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden * scale, grad_weight, None, None, None, None, None


def _add_weight_gradient(
    grad_weight: torch.Tensor | None, gradient: torch.Tensor, inputs: torch.Tensor
) -> torch.Tensor:
    """``grad_weight + gradient.T @ inputs``, summed in fp32 chunk by chunk (the stock head sums all rows in the
    compute dtype); the first chunk (``grad_weight`` None) writes the product alone, with no zeros to add it to. On
    CUDA a bf16 product goes straight into the fp32 sum in one matmul (``out_dtype``); elsewhere it is rounded to the
    compute dtype, converted and added (on an H200 those two extra passes over a vocabulary x width fp32 tensor per
    chunk took about 5% of a GPT-2 124M step)."""
    if gradient.dtype == torch.float32:
        return gradient.t() @ inputs if grad_weight is None else grad_weight.addmm_(gradient.t(), inputs)
    if gradient.is_cuda:
        if grad_weight is None:
            return torch.mm(gradient.t(), inputs, out_dtype=torch.float32)
        return torch.addmm(grad_weight, gradient.t(), inputs, out_dtype=torch.float32)
    product = (gradient.t() @ inputs).to(torch.float32)
    return product if grad_weight is None else grad_weight.add_(product)


def _logit_gradient(
    padded_logits: torch.Tensor, targets: torch.Tensor, vocabulary: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of a chunk's logits (in fp32; only the first ``vocabulary`` columns are real) and
    its gradient with respect to the padded logits, ``softmax - one_hot(target)`` and zero on the padding, in the
    logits' dtype."""
    compute_dtype = padded_logits.dtype
    logits = padded_logits[:, :vocabulary].float()
    # The log-sum-exp written out, so that the softmax reuses its exponentials instead of taking them a second time
    # (exp is most of the chunk's elementwise work: compiled on a CPU, a GPT-2 mini step took 1.5% less).
    largest = logits.amax(dim=1, keepdim=True)
    exponentials = (logits - largest).exp()
    normaliser = exponentials.sum(dim=1, keepdim=True)
    loss = (largest + normaliser.log() - logits.gather(1, targets)).sum()
    probabilities = exponentials / normaliser
    probabilities.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=torch.float32))
    if padded_logits.size(1) != vocabulary:
        probabilities = functional.pad(probabilities, (0, padded_logits.size(1) - vocabulary))
    return loss, probabilities.to(compute_dtype)


def _fusable_logit_gradient(
    padded_logits: torch.Tensor, targets: torch.Tensor, vocabulary: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_logit_gradient`` written for the compiler: no in-place scatter and no padding pass (each cut inductor's
    work into separate kernels: on an H200 a GPT-2 124M step spent 5.5 ms in them, an fp32 probabilities tensor
    written and read back). Padding columns take -inf logits, so their probability and gradient are zero, and the
    one-hot is a comparison with the column index: every step is elementwise or a row reduction, one read of the
    logits and one write of the gradient in the logits' dtype."""
    columns = torch.arange(padded_logits.size(1), device=padded_logits.device)
    logits = padded_logits.float()
    if padded_logits.size(1) != vocabulary:
        logits = logits.masked_fill(columns >= vocabulary, float("-inf"))
    largest = logits.amax(dim=1, keepdim=True)
    exponentials = (logits - largest).exp()
    normaliser = exponentials.sum(dim=1, keepdim=True)
    loss = (largest + normaliser.log() - logits.gather(1, targets)).sum()
    gradient = exponentials / normaliser - (columns == targets).to(torch.float32)
    return loss, gradient.to(padded_logits.dtype)


@functools.cache
def _compiled_logit_gradient(device_type: str, compute_dtype: torch.dtype):
    # The chunk's elementwise work (fp32 copy, log-sum-exp, softmax, one-hot) is memory-bound: eagerly it reads and
    # writes rows x vocabulary fp32 values about eight times; compiled it is one reduction and one pass. The
    # vocabulary varies between models (and the last chunk is shorter): dynamic shapes, not one graph per value.
    # Which formulation compiles faster depends on the logits' dtype on a CPU: in fp32 the scatter one ran a GPT-2
    # mini step about 3% faster (a 2-core AVX2 EPYC, two runs each); in bf16 the fusable one's kernel took 20 ms of
    # a step against 34 (four chunks of 512 x 8,192, an AVX512-BF16 EPYC core, inductor's kernel profile).
    fusable = device_type == "cuda" or compute_dtype != torch.float32
    return torch.compile(_fusable_logit_gradient if fusable else _logit_gradient, dynamic=True)


def summed_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    trained_rows: torch.Tensor | None = None,
    *,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum over the targets that are not ``IGNORE_INDEX`` of the cross-entropy of ``hidden @ weight.T``, in fp32.

    ``hidden`` is ``(..., width)`` and ``targets`` the matching ``(...)`` (already shifted: the target of a position
    is the next token). ``trained_rows``, the flat indices of the trained targets, may be given already (see
    ``trained_row_indices``; on a GPU finding them from ``targets`` waits for the device). The projection runs in the
    autocast dtype when autocast is on for the device, else in the weight's dtype. The gradients are computed during
    the forward pass: call ``backward`` on this loss (or a multiple of it) once, as a training step does.

    ``compiled``: each chunk's softmax and one-hot work runs as one compiled kernel (always on CUDA; on a CPU when the
    run compiles, since it needs a C++ compiler: 5 ms instead of 33 for 512 rows of an 8,192 vocabulary).
    """
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    flat_targets = targets.reshape(-1)
    if trained_rows is None:
        trained_rows = trained_row_indices(flat_targets)
    fewest_rows = _MIN_CHUNK_ROWS.get(device_type, _MIN_CHUNK_ROWS["default"])
    chunk_rows = max(fewest_rows, _chunk_bytes(hidden.device) // (4 * weight.size(0)))
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(
            flat_hidden, weight, trained_rows, flat_targets, compute_dtype, chunk_rows, compiled or hidden.is_cuda
        )


def _chunk_bytes(device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["default"])
    if budget is None:
        return int(torch.cuda.get_device_properties(device).total_memory * _CUDA_CHUNK_MEMORY_SHARE)
    return budget


def trained_row_indices(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of the targets that are trained (not ``IGNORE_INDEX``); cheap on the CPU copy of a batch."""
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
