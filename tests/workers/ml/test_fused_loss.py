"""The fused, chunked output projection + cross-entropy gives the stock head's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.ml import fused_loss, modeling
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.engine import cpp_compiler_available

VOCAB = 300


def _chunk_rows(monkeypatch: pytest.MonkeyPatch, device: str, rows: int) -> None:
    """Chunks of ``rows`` rows of the ``VOCAB``-token projection on ``device`` ("cpu" or "cuda"): small ones, so that
    the tests' few rows really are split into several chunks."""
    monkeypatch.setitem(fused_loss._CHUNK_BYTES, device, rows * VOCAB * 4)
    monkeypatch.setitem(fused_loss._MIN_CHUNK_ROWS, device, 1)


def _gpt2(task: str = "causal_lm") -> torch.nn.Module:
    torch.manual_seed(0)
    return modeling.build_from_scratch(
        architecture="gpt2", size="tiny", task=task, vocab_size=VOCAB, max_length=64, init="normal", dropout=0.0,
        num_labels=2 if task == "classification" else None,
    )  # fmt: skip


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 64), generator=generator)
    targets = input_ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :20] = IGNORE_INDEX  # a prompt the loss skips
    targets[2, :] = IGNORE_INDEX  # a row with nothing to train
    # Two packed documents per row: positions restart at 30.
    position_ids = torch.cat([torch.arange(30), torch.arange(34)]).repeat(3, 1)
    return input_ids, targets, position_ids


def _losses_and_gradients(model: torch.nn.Module, *, fused: bool, bf16: bool = False):
    input_ids, targets, position_ids = _batch()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if fused:
            parts = fused_loss.fused_parts(model)
            assert parts is not None
            body, projection = parts
            hidden = body(input_ids=input_ids, position_ids=position_ids).last_hidden_state
            loss = fused_loss.summed_linear_cross_entropy(hidden, projection, targets)
        else:
            logits = model(input_ids=input_ids, position_ids=position_ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
    (loss / 7).backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return loss.detach(), gradients


@pytest.mark.parametrize("aligned", [False, True], ids=["vocabulary-as-is", "vocabulary-padded-to-64"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2-tied-head", "llama-untied-head"])
def test_fused_loss_equals_the_stock_head_in_fp32(build, aligned, monkeypatch):
    _chunk_rows(monkeypatch, "cpu", 16)
    if aligned:  # what a GPU does: the 300-token projection padded to 320 rows
        monkeypatch.setitem(fused_loss._VOCABULARY_ALIGNMENT, "cpu", 64)
    model = build()
    stock_loss, stock_gradients = _losses_and_gradients(model, fused=False)
    fused, fused_gradients = _losses_and_gradients(model, fused=True)

    torch.testing.assert_close(fused, stock_loss, rtol=1e-6, atol=1e-4)
    assert fused_gradients.keys() == stock_gradients.keys()
    for name, gradient in stock_gradients.items():
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_follows_bf16_autocast_like_the_stock_head():
    model = _gpt2()
    stock_loss, stock_gradients = _losses_and_gradients(model, fused=False, bf16=True)
    fused, fused_gradients = _losses_and_gradients(model, fused=True, bf16=True)

    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, stock_loss, rtol=2e-3, atol=0.0)
    for name, gradient in stock_gradients.items():
        relative = (fused_gradients[name] - gradient).norm() / gradient.norm().clamp_min(1e-12)
        assert relative < 0.03, name


def test_fused_loss_is_deterministic():
    model = _gpt2()
    first = _losses_and_gradients(model, fused=True)
    second = _losses_and_gradients(model, fused=True)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])


def test_a_frozen_projection_gets_no_weight_gradient_and_the_same_hidden_one(monkeypatch):
    """LoRA leaves the head frozen: its weight gradient (a third of the head's matmuls, and the fp32 sum) is never
    computed, and the hidden states' gradient is the one a trained head gives."""
    _chunk_rows(monkeypatch, "cpu", 50)
    hidden, weight, targets = _chunked_problem()
    loss, grad_hidden, _ = _loss_and_gradients(hidden, weight, targets, "cpu")

    def no_weight_gradient(*arguments):
        raise AssertionError("a frozen projection's weight gradient was computed")

    monkeypatch.setattr(fused_loss, "_add_weight_gradient", no_weight_gradient)
    leaf_hidden = hidden.clone().requires_grad_()
    frozen_weight = weight.clone()
    frozen_loss = fused_loss.summed_linear_cross_entropy(leaf_hidden, frozen_weight, targets)
    frozen_loss.backward()
    assert frozen_weight.grad is None
    torch.testing.assert_close(frozen_loss.detach(), loss)
    torch.testing.assert_close(leaf_hidden.grad, grad_hidden)


def test_cpu_chunks_keep_enough_rows_to_share_the_weight_gradient_sum(monkeypatch):
    """However large the vocabulary, a CPU chunk takes at least ``_MIN_CHUNK_ROWS`` rows: each chunk reads and writes
    the whole fp32 weight-gradient sum, which a few dozen rows cannot pay for (SmolLM2's head was twice as slow)."""
    chunk_sizes: list[int] = []
    eager_chunk = fused_loss._logit_gradient

    def counting(logits, targets, vocabulary):
        chunk_sizes.append(logits.size(0))
        return eager_chunk(logits, targets, vocabulary)

    monkeypatch.setattr(fused_loss, "_logit_gradient", counting)
    monkeypatch.setitem(fused_loss._CHUNK_BYTES, "cpu", 8 * VOCAB * 4)  # the budget alone: chunks of 8 rows
    monkeypatch.setitem(fused_loss._MIN_CHUNK_ROWS, "cpu", 64)
    hidden, weight, targets = _chunked_problem()
    _loss_and_gradients(hidden, weight, targets, "cpu")
    trained = int((targets != IGNORE_INDEX).sum())
    assert chunk_sizes == [64] * (trained // 64) + [trained % 64]


def test_only_plain_causal_heads_take_the_fused_path():
    assert fused_loss.fused_parts(_gpt2()) is not None
    assert fused_loss.fused_parts(_gpt2(task="classification")) is None
    bert = modeling.build_from_scratch(
        architecture="bert", size="tiny", task="classification", vocab_size=VOCAB, max_length=64, init="normal",
        num_labels=2,
    )  # fmt: skip
    assert fused_loss.fused_parts(bert) is None


def test_lora_adapters_train_through_the_fused_path():
    model = modeling.apply_lora(_gpt2(), task="causal_lm", r=4, alpha=8, dropout=0.0, target_modules=None)
    stock_loss, stock_gradients = _losses_and_gradients(model, fused=False)
    fused, fused_gradients = _losses_and_gradients(model, fused=True)

    torch.testing.assert_close(fused, stock_loss, rtol=1e-6, atol=1e-4)
    assert stock_gradients and all("lora_" in name for name in stock_gradients)
    for name, gradient in stock_gradients.items():
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def _chunked_problem():
    """Several chunks of unequal size (with a 50-row budget), so that a compiled chunk function sees the last,
    shorter one too."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(3 * 64, 32, generator=generator)
    weight = torch.randn(VOCAB, 32, generator=generator) * 0.1
    targets = torch.randint(0, VOCAB, (3 * 64,), generator=generator)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def _loss_and_gradients(hidden, weight, targets, device: str, *, compiled: bool = False):
    leaf_hidden = hidden.clone().to(device).requires_grad_()
    leaf_weight = weight.clone().to(device).requires_grad_()
    loss = fused_loss.summed_linear_cross_entropy(leaf_hidden, leaf_weight, targets.to(device), compiled=compiled)
    loss.backward()
    return loss.detach().cpu(), leaf_hidden.grad.cpu(), leaf_weight.grad.cpu()


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_cpu_chunks_equal_the_eager_ones(monkeypatch):
    """What a compiled CPU run takes: each chunk's softmax work as one generated C++ kernel."""
    _chunk_rows(monkeypatch, "cpu", 50)
    problem = _chunked_problem()
    eager = _loss_and_gradients(*problem, "cpu")
    compiled = _loss_and_gradients(*problem, "cpu", compiled=True)
    for compiled_value, eager_value in zip(compiled, eager, strict=True):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_under_bf16_autocast_the_compiled_cpu_chunks_equal_the_eager_ones(monkeypatch):
    """bf16 logits compile to the fusable formulation on a CPU (fp32 ones to the scatter one): same results."""
    _chunk_rows(monkeypatch, "cpu", 50)
    problem = _chunked_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _loss_and_gradients(*problem, "cpu")
        compiled = _loss_and_gradients(*problem, "cpu", compiled=True)
    for compiled_value, eager_value in zip(compiled, eager, strict=True):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled chunk path runs on CUDA only")
def test_the_compiled_cuda_path_equals_the_cpu_one(monkeypatch):
    _chunk_rows(monkeypatch, "cuda", 50)
    problem = _chunked_problem()
    for cpu_value, cuda_value in zip(
        _loss_and_gradients(*problem, "cpu"), _loss_and_gradients(*problem, "cuda"), strict=True
    ):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-4, atol=1e-4)


def test_the_compilers_chunk_gradient_equals_the_eager_one_on_padded_logits():
    """The compiled path's formulation (padding masked to -inf, one-hot by comparison), run eagerly here: on a GPU
    the projection is padded to a multiple of 64 rows, whose logits are zero, and they must take no probability."""
    generator = torch.Generator().manual_seed(5)
    padded_logits = torch.randn(40, 320, generator=generator)
    padded_logits[:, VOCAB:] = 0
    targets = torch.randint(0, VOCAB, (40, 1), generator=generator)
    eager_loss, eager_gradient = fused_loss._logit_gradient(padded_logits, targets, VOCAB)
    loss, gradient = fused_loss._fusable_logit_gradient(padded_logits, targets, VOCAB)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(gradient, eager_gradient)
    assert gradient[:, VOCAB:].eq(0).all()
    expected = torch.nn.functional.cross_entropy(padded_logits[:, :VOCAB], targets.squeeze(1), reduction="sum")
    torch.testing.assert_close(loss, expected)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs CUDA bf16")
def test_under_bf16_autocast_on_cuda_the_weight_gradient_is_summed_in_fp32(monkeypatch):
    """Each chunk's bf16 weight gradient goes into the fp32 sum in one matmul (``out_dtype``): the result is fp32 and
    close to the fp32 computation on the CPU."""
    _chunk_rows(monkeypatch, "cuda", 50)
    problem = _chunked_problem()
    reference = _loss_and_gradients(*problem, "cpu")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = _loss_and_gradients(*problem, "cuda")
    assert grad_weight.dtype == torch.float32
    torch.testing.assert_close(loss, reference[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(grad_hidden, reference[1], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(grad_weight, reference[2], rtol=5e-2, atol=5e-2)
