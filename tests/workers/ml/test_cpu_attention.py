"""Blocked attention for packed rows of Llama-family decoders on a CPU: the stock forward's numbers, documents kept
apart, taken only where it fits, and a training run that follows the stock run's losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.workers.ml.engine_fixtures import train
from workers.ml import cpu_attention, modeling
from workers.ml.data.samples import write_sample_datasets
from workers.ml.tokenizer_training import train_byte_level_bpe

LENGTH = 150  # not a multiple of the query block: a short last block too
DOCUMENTS = (40, 70, 40)  # three documents per packed row, the middle one across two query blocks


def _llama(vocab_size: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
        use_cache=False,  # as the engine trains: a key/value cache turns transformers' packed-row masking off
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _packed_rows() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (2, LENGTH), generator=generator)
    position_ids = torch.cat([torch.arange(length) for length in DOCUMENTS]).repeat(2, 1)
    return input_ids, position_ids


def _hidden_and_gradients(model: LlamaForCausalLM, implementation: str, input_ids, position_ids):
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    hidden.pow(2).mean().backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return hidden.detach(), gradients


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_blocked_attention_equals_the_stock_forward_and_backward(reference: str) -> None:
    model = _llama()
    rows = _packed_rows()
    stock_hidden, stock_gradients = _hidden_and_gradients(model, reference, *rows)
    hidden, gradients = _hidden_and_gradients(model, cpu_attention.BLOCKED_ATTENTION, *rows)

    torch.testing.assert_close(hidden, stock_hidden, rtol=1e-4, atol=1e-5)
    for name, gradient in stock_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-3, atol=1e-5, msg=name)


def test_a_document_never_sees_the_one_before_it() -> None:
    model = _llama().eval()
    model.set_attn_implementation(cpu_attention.BLOCKED_ATTENTION)
    input_ids, position_ids = _packed_rows()
    second = slice(DOCUMENTS[0], DOCUMENTS[0] + DOCUMENTS[1])
    with torch.no_grad():
        packed = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        alone = model.model(input_ids=input_ids[:, second]).last_hidden_state
    torch.testing.assert_close(packed[:, second], alone, rtol=1e-4, atol=1e-5)


def test_only_llama_family_batches_that_fit_take_it() -> None:
    small_rows = {"rows": 8, "length": 256}
    lora = modeling.apply_lora(_llama(), task="causal_lm", r=4, alpha=8, dropout=0.0, target_modules=None)
    assert cpu_attention.use_blocked_attention(lora, **small_rows)
    assert lora.get_base_model().config._attn_implementation == cpu_attention.BLOCKED_ATTENTION

    # 2 layers x 4 heads: 64 rows of 2,048 tokens would keep 6.4 GB of probabilities.
    too_wide = _llama()
    assert not cpu_attention.use_blocked_attention(too_wide, rows=64, length=2048)
    assert too_wide.config._attn_implementation == "sdpa"

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    assert not cpu_attention.use_blocked_attention(gpt2, **small_rows)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_sample_datasets(str(tmp_path_factory.mktemp("samples")))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, str]) -> Path:
    """A small Llama saved like a catalog model: safetensors weights and its own tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = Path(samples["corpus.txt"]).read_text(encoding="utf-8").splitlines()
    tokenizer = train_byte_level_bpe([text for text in texts if text.strip()], vocab_size=400)
    tokenizer.save_pretrained(folder)
    _llama(vocab_size=len(tokenizer)).save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_packed_cpu_run_of_a_llama_takes_it_and_follows_the_stock_runs_losses(
    llama_folder: Path, samples: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    original = cpu_attention.use_blocked_attention

    def recording(model, **sizes):
        taken.append(original(model, **sizes))
        return taken[-1]

    settings = {"mode": "full", "base_model": str(llama_folder), "max_steps": 4, "precision": "fp32", "compile": "off"}
    monkeypatch.setattr(cpu_attention, "use_blocked_attention", recording)
    blocked = train(samples["corpus.txt"], tmp_path / "blocked", **settings)
    monkeypatch.setattr(cpu_attention, "use_blocked_attention", lambda model, **sizes: False)
    stock = train(samples["corpus.txt"], tmp_path / "stock", **settings)

    assert taken == [True]
    assert len(blocked.recorder.losses) == 4
    assert blocked.recorder.losses == pytest.approx(stock.recorder.losses, rel=1e-4)
    # The exported model names no attention implementation of ours: it loads anywhere.
    exported = json.loads((tmp_path / "blocked" / "config.json").read_text())
    assert cpu_attention.BLOCKED_ATTENTION not in json.dumps(exported)
