"""The packed-row GPT-2 body computes what the stock module computes on packed rows, with every attention kernel
this machine can run, and never lets a document see another one."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from tests.workers.ml.engine_fixtures import dropout_free_models, train
from workers.ml import modeling, packed_gpt2
from workers.ml.data.samples import write_sample_datasets
from workers.ml.engine import cpp_compiler_available

VOCAB = 300
LENGTH = 64


def _gpt2(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return modeling.build_from_scratch(
        architecture="gpt2", size="tiny", task="causal_lm", vocab_size=VOCAB, max_length=LENGTH, init="normal",
        dropout=dropout,
    )  # fmt: skip


def _packed_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of documents of uneven lengths (positions restart at each one), the last with a padded tail."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, LENGTH), generator=generator)
    layouts = [[30, 34], [5, 17, 1, 41], [60, 4]]
    position_ids = torch.stack([torch.cat([torch.arange(length) for length in layout]) for layout in layouts])
    return input_ids, position_ids


def _stock_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return model.transformer(input_ids=input_ids, position_ids=position_ids).last_hidden_state


def _packed_hidden(model, input_ids, position_ids, kernel: str) -> torch.Tensor:
    body = packed_gpt2.packed_body(model, kernel)
    assert body is not None
    return body(input_ids, position_ids, **packed_gpt2.segment_inputs(position_ids, kernel, input_ids.device))


CPU_KERNELS = ["sdpa", "flex", "blocked"]


# FlexAttention has no backward on a CPU; its forward is compared below. The blocked kernel is also run with query
# blocks that cut the 64-token rows into several blocks, the last one shorter (24 + 24 + 16).
@pytest.mark.parametrize(("kernel", "query_block"), [("sdpa", None), ("blocked", 64), ("blocked", 24)])
def test_hidden_states_and_gradients_equal_the_stock_module(kernel, query_block, monkeypatch):
    if query_block is not None:
        monkeypatch.setattr(packed_gpt2, "_QUERY_BLOCK", query_block)
    model = _gpt2()
    model.train()
    input_ids, position_ids = _packed_rows()
    weights = torch.randn(3, LENGTH, model.config.n_embd, generator=torch.Generator().manual_seed(2))

    stock = _stock_hidden(model, input_ids, position_ids)
    (stock * weights).sum().backward()
    stock_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    packed = _packed_hidden(model, input_ids, position_ids, kernel)
    (packed * weights).sum().backward()

    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)
    assert stock_gradients.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, parameter in model.named_parameters():
        # The blocked kernel sums in another order: rounding of the order of the tensor's largest entries.
        expected = stock_gradients[name]
        atol = 1e-5 + 1e-6 * float(expected.abs().max())
        torch.testing.assert_close(parameter.grad, expected, atol=atol, rtol=1e-4, msg=name)


def test_flex_forward_equals_the_stock_module():
    model = _gpt2().eval()
    input_ids, position_ids = _packed_rows()
    with torch.no_grad():
        stock = _stock_hidden(model, input_ids, position_ids)
        packed = _packed_hidden(model, input_ids, position_ids, "flex")
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_a_document_never_sees_the_one_before_it(kernel):
    model = _gpt2().eval()
    input_ids, position_ids = _packed_rows()
    changed = input_ids.clone()
    changed[1, :5] = (changed[1, :5] + 7) % VOCAB  # the first document of row 1 only
    with torch.no_grad():
        before = _packed_hidden(model, input_ids, position_ids, kernel)
        after = _packed_hidden(model, changed, position_ids, kernel)
    assert not torch.allclose(before[1, :5], after[1, :5])
    torch.testing.assert_close(before[1, 5:], after[1, 5:], atol=0, rtol=0)
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]], atol=0, rtol=0)


def test_the_blocked_kernel_applies_attention_dropout_in_training_only(monkeypatch):
    """Pre-trained GPT-2s come with attention dropout: the blocked kernel keeps them on the packed path. Training
    drops attention weights (seeded: the same seed gives the same pass, another seed another one) and still never
    lets a document see the one before it; evaluation is the stock forward."""
    monkeypatch.setattr(packed_gpt2, "_QUERY_BLOCK", 24)
    model = _gpt2(dropout=0.3)
    input_ids, position_ids = _packed_rows()
    changed = input_ids.clone()
    changed[1, :5] = (changed[1, :5] + 7) % VOCAB

    def training_pass(ids: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return _packed_hidden(model.train(), ids, position_ids, "blocked")

    first, again, other_seed = training_pass(input_ids, 5), training_pass(input_ids, 5), training_pass(input_ids, 6)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other_seed)
    after = training_pass(changed, 5)
    torch.testing.assert_close(first[1, 5:], after[1, 5:], atol=0, rtol=0)
    torch.testing.assert_close(first[[0, 2]], after[[0, 2]], atol=0, rtol=0)

    model.eval()
    with torch.no_grad():
        evaluated = _packed_hidden(model, input_ids, position_ids, "blocked")
        torch.testing.assert_close(evaluated, _stock_hidden(model, input_ids, position_ids), atol=1e-5, rtol=1e-4)

    # Only the attention weights' dropout differs from the stock training pass: with it alone set to zero, the same
    # seed gives the stock module's hidden states (embedding and residual dropout draw the same masks).
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.0
    torch.manual_seed(5)
    stock_without = _stock_hidden(model.train(), input_ids, position_ids).detach()
    torch.testing.assert_close(training_pass(input_ids, 5), stock_without, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first, stock_without)


def test_lora_adapters_take_part_like_in_the_stock_forward():
    model = get_peft_model(_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect to compare
            torch.nn.init.normal_(parameter, std=0.02)
    input_ids, position_ids = _packed_rows()
    stock = _stock_hidden(model.get_base_model(), input_ids, position_ids)
    stock.sum().backward()
    stock_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    packed = _packed_hidden(model, input_ids, position_ids, "sdpa")
    packed.sum().backward()
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)
    assert stock_gradients and all("lora_" in name for name in stock_gradients)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, stock_gradients[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_stock_path_stays_where_the_kernels_cannot_reproduce_it():
    assert packed_gpt2.packed_body(_gpt2(), "hf") is None
    assert packed_gpt2.packed_body(_gpt2(dropout=0.1), "sdpa") is None  # attention dropout
    assert packed_gpt2.packed_body(_gpt2(dropout=0.1), "blocked") is not None  # which the blocked kernel applies
    llama = modeling.build_from_scratch(
        architecture="gpt2", size="tiny", task="classification", vocab_size=VOCAB, max_length=LENGTH, init="normal",
        num_labels=2,
    )  # fmt: skip
    assert packed_gpt2.packed_body(llama, "sdpa") is None  # no causal LM head, no packed rows


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(packed_gpt2.KERNEL_VARIABLE, raising=False)
    assert packed_gpt2.choose_kernel(torch.device("cpu")) == "blocked"
    assert packed_gpt2.choose_kernel(torch.device("cuda")) == "flex"
    monkeypatch.setenv(packed_gpt2.KERNEL_VARIABLE, "flex")
    assert packed_gpt2.choose_kernel(torch.device("cpu")) == "flex"
    monkeypatch.setenv(packed_gpt2.KERNEL_VARIABLE, "fast")
    with pytest.raises(ValueError, match=packed_gpt2.KERNEL_VARIABLE):
        packed_gpt2.choose_kernel(torch.device("cpu"))


def test_varlen_boundaries_describe_every_document_and_keep_a_few_shapes():
    _, position_ids = _packed_rows()
    boundaries = packed_gpt2.segment_inputs(position_ids, "varlen", torch.device("cpu"))["cu_seqlens"]
    documents = [0, 30, 64, 69, 86, 87, 128, 188]
    assert boundaries.dtype == torch.int32
    assert boundaries[: len(documents)].tolist() == documents
    assert set(boundaries[len(documents) :].tolist()) == {3 * LENGTH}  # empty documents pad it to a bucket
    assert boundaries.numel() % 256 == 0


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_block_mask_builder_equals_the_eager_one_and_compiles_once():
    """What a GPU builds for every batch (here on a CPU): the same block mask as the eager builder, and batches with
    other document layouts (a new mask closure each) run the code compiled for the first."""
    generator = torch.Generator().manual_seed(7)
    layouts = []
    for _ in range(3):
        starts = torch.rand(2, 256, generator=generator) < 0.03
        starts[:, 0] = True
        layouts.append((starts.cumsum(dim=1) - 1).to(torch.int32))
    packed_gpt2._document_block_mask(layouts[0], compiled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for documents in layouts:
            compiled = packed_gpt2._document_block_mask(documents, compiled=True)
            eager = packed_gpt2._document_block_mask(documents, compiled=False)
            for compiled_part, eager_part in zip(compiled.as_tuple(), eager.as_tuple(), strict=True):
                if isinstance(eager_part, torch.Tensor):
                    assert torch.equal(compiled_part, eager_part)
                elif not callable(eager_part):  # the mask function itself is each call's own closure
                    assert compiled_part == eager_part


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen and compiled flex need CUDA")
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_cuda_kernels_equal_the_stock_module_in_bf16(kernel):
    if kernel == "varlen" and packed_gpt2._varlen_attention() is None:
        pytest.skip("this torch has no varlen_attn")
    model = _gpt2().cuda()
    input_ids, position_ids = (tensor.cuda() for tensor in _packed_rows())
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        stock = _stock_hidden(model, input_ids, position_ids)
        body = packed_gpt2.packed_body(model, kernel)
        packed = body(input_ids, position_ids, **packed_gpt2.segment_inputs(position_ids.cpu(), kernel, "cuda"))
    torch.testing.assert_close(packed.float(), stock.float(), atol=2e-2, rtol=2e-2)


def test_a_training_run_through_the_packed_body_follows_the_stock_runs_curve(tmp_path, monkeypatch):
    """The engine's packed-row forward (the blocked kernel a CPU takes) trains like the stock path: same losses, grad
    norms and final weights up to float rounding, for plain text and for chat rows whose prompts are not trained."""
    samples = write_sample_datasets(str(tmp_path / "samples"))
    monkeypatch.setattr(packed_gpt2, "_QUERY_BLOCK", 16)  # several blocks per row, as in real runs
    for data in ("corpus.txt", "chat.jsonl"):
        runs = {}
        for kernel in ("hf", "blocked"):
            monkeypatch.setenv(packed_gpt2.KERNEL_VARIABLE, kernel)
            with dropout_free_models():
                runs[kernel] = train(samples[data], tmp_path / f"{data}-{kernel}", max_steps=6, seed=3)
        stock, packed = runs["hf"].recorder, runs["blocked"].recorder
        assert runs["blocked"].config.packing and len(stock.losses) == 6
        assert packed.losses == pytest.approx(stock.losses, rel=1e-4)
        stock_norms = [data["grad_norm"] for data in stock.metrics]
        assert [data["grad_norm"] for data in packed.metrics] == pytest.approx(stock_norms, rel=1e-3)
        stock_weights = load_file(str(tmp_path / f"{data}-hf" / "model.safetensors"))
        packed_weights = load_file(str(tmp_path / f"{data}-blocked" / "model.safetensors"))
        # Adam turns a rounding-level difference in a near-zero gradient into a whole step (the blocked kernel sums in
        # another order), so a few weights may be up to a learning rate per step apart; all others agree to rounding.
        largest_drift = 2 * runs["hf"].config.learning_rate * len(stock.losses)
        for name, tensor in stock_weights.items():
            difference = (packed_weights[name] - tensor).abs()
            agreeing = (difference <= 1e-5 + 1e-4 * tensor.abs()).float().mean()
            assert agreeing >= 0.99 and difference.max() <= largest_drift, (name, float(agreeing))
