"""Building, initialising, adapting (LoRA) and exporting models, on tiny models built from config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from workers.ml.errors import TrainingDataError
from workers.ml.modeling import (
    ADAPTER_MARKER,
    ARCHITECTURE_TASKS,
    INIT_SCHEMES,
    apply_lora,
    build_from_scratch,
    count_parameters,
    export_model,
    initialise_weights,
    load_pretrained,
    load_tokenizer,
    require_qlora_support,
)

VOCAB = 40
MAX_LENGTH = 32
LOCAL = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}
BUILDS = [(architecture, task) for architecture, tasks in ARCHITECTURE_TASKS.items() for task in tasks]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with eos and unk but no pad token, as many decoder tokenizers are."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def tiny(architecture: str, task: str, init: str = "normal") -> nn.Module:
    return build_from_scratch(
        architecture=architecture,
        size="tiny",
        task=task,
        vocab_size=VOCAB,
        max_length=MAX_LENGTH,
        init=init,
        num_labels=3 if task == "classification" else None,
        pad_token_id=1 if architecture != "bert" else 0,
        eos_token_id=1,
    )


def batch(task: str, *, rows: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (rows, length), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if task == "classification":
        inputs["labels"] = torch.tensor([0, 2] * (rows // 2) + [1] * (rows % 2))
    else:
        inputs["labels"] = torch.randint(2, VOCAB, (rows, length), generator=generator)
    return inputs


def logits_of(model: nn.Module, task: str) -> torch.Tensor:
    model.eval()
    inputs = batch(task)
    if task == "seq2seq":
        inputs["decoder_input_ids"] = inputs["labels"]
    del inputs["labels"]
    with torch.no_grad():
        return model(**inputs).logits


def assert_no_pickles(folder: Path) -> None:
    names = [p.name for p in folder.rglob("*")]
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], names
    assert any(n.endswith(".safetensors") for n in names), names


@pytest.mark.parametrize(("architecture", "task"), BUILDS)
def test_every_architecture_and_task_builds_and_trains(architecture, task):
    model = tiny(architecture, task)
    assert model.config._attn_implementation == "sdpa"
    if architecture == "gpt2":
        assert model.config.n_positions == MAX_LENGTH
    if architecture == "bert":
        assert model.config.max_position_embeddings == MAX_LENGTH
    model.train()
    loss = model(**batch(task)).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_architecture_task_size_and_label_errors():
    with pytest.raises(TrainingDataError) as error:
        tiny("bert", "causal_lm")
    assert (error.value.code, error.value.param) == ("invalid_hyperparameter", "architecture")
    assert "classification" in error.value.message
    with pytest.raises(TrainingDataError) as error:
        build_from_scratch(
            architecture="t5", size="huge", task="seq2seq", vocab_size=VOCAB, max_length=8, init="normal"
        )
    assert error.value.param == "model_size"
    with pytest.raises(TrainingDataError) as error:
        build_from_scratch(
            architecture="gpt3", size="tiny", task="causal_lm", vocab_size=VOCAB, max_length=8, init="normal"
        )
    assert error.value.param == "architecture"
    with pytest.raises(TrainingDataError) as error:
        build_from_scratch(
            architecture="bert", size="tiny", task="classification", vocab_size=VOCAB, max_length=8, init="normal"
        )
    assert error.value.param == "num_labels"
    with pytest.raises(TrainingDataError) as error:
        build_from_scratch(
            architecture="gpt2", size="tiny", task="causal_lm", vocab_size=VOCAB, max_length=0, init="normal"
        )
    assert error.value.param == "max_length"


def _theoretical_std(scheme: str, fan_in: int, fan_out: int, std: float) -> float:
    if scheme.startswith("xavier"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme.startswith("kaiming"):
        return math.sqrt(2.0 / fan_in)
    return std


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_statistics_of_a_large_linear_layer(scheme):
    fan_in, fan_out = 512, 2048
    model = nn.Sequential(nn.Linear(fan_in, fan_out), nn.LayerNorm(fan_out))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-3, 3)
    initialise_weights(model, scheme, std=0.05)
    weight = model[0].weight
    expected = _theoretical_std(scheme, fan_in, fan_out, 0.05)
    assert weight.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(weight.mean().item()) < 0.05 * expected
    assert torch.count_nonzero(model[0].bias) == 0
    assert torch.all(model[1].weight == 1) and torch.count_nonzero(model[1].bias) == 0


@pytest.mark.parametrize("scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal"])
def test_conv1d_fans_are_the_true_input_and_output_widths(scheme):
    fan_in, fan_out = 256, 1024
    layer = Conv1D(nf=fan_out, nx=fan_in)  # weight stored (in, out), the transpose of nn.Linear
    assert layer.weight.shape == (fan_in, fan_out)
    initialise_weights(layer, scheme)
    assert layer.weight.std().item() == pytest.approx(_theoretical_std(scheme, fan_in, fan_out, 0.02), rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0


def test_init_of_whole_models_keeps_ties_and_norms():
    gpt2 = tiny("gpt2", "causal_lm", init="kaiming_normal")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    mlp_in = gpt2.transformer.h[0].mlp.c_fc  # Conv1D 64 -> 256
    assert mlp_in.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert torch.all(gpt2.transformer.ln_f.weight == 1)
    t5 = tiny("t5", "seq2seq", init="xavier_uniform")
    assert t5.lm_head.weight is t5.shared.weight
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert torch.all(t5.encoder.final_layer_norm.weight == 1)  # T5LayerNorm
    bert = tiny("bert", "classification", init="xavier_normal")
    assert torch.count_nonzero(bert.bert.embeddings.word_embeddings.weight[0]) == 0  # padding row
    assert torch.count_nonzero(bert.classifier.bias) == 0
    with pytest.raises(TrainingDataError) as error:
        initialise_weights(bert, "orthogonal")
    assert (error.value.code, error.value.param) == ("invalid_hyperparameter", "init")


def test_packed_rows_attend_within_each_document():
    model = tiny("gpt2", "causal_lm")
    model.eval()
    first = torch.randint(2, VOCAB, (1, 7))
    second = torch.randint(2, VOCAB, (1, 5))
    packed = torch.cat([first, second], dim=1)
    restarting = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=second).logits
        packed_logits = model(input_ids=packed, position_ids=restarting, attention_mask=None).logits[:, 7:]
        # The same row with continuous positions attends across the boundary, so it differs: the test is not vacuous.
        unpacked = model(input_ids=packed, position_ids=torch.arange(12).unsqueeze(0)).logits[:, 7:]
    torch.testing.assert_close(packed_logits, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(unpacked, alone, atol=1e-3)
    # Training mode behaves the same (dropout aside): no key/value cache is built in a training forward pass.
    assert model.config.use_cache is False and model.generation_config.use_cache is True


def test_count_parameters_counts_tied_weights_once():
    model = tiny("gpt2", "causal_lm")
    every = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert count_parameters(model) == sum(p.numel() for p in {id(p): p for p in every}.values())
    assert count_parameters(model) < sum(p.numel() for p in every)  # lm_head shares the token embedding
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_load_tokenizer_pads_with_eos(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 1


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory, tokenizer) -> dict[tuple[str, str], Path]:
    """Tiny models saved as folders: LoRA starts from a pretrained folder, as for the catalog models."""
    root = tmp_path_factory.mktemp("bases")
    folders = {}
    for architecture, task in [("gpt2", "causal_lm"), ("gpt2", "classification"), ("bert", "classification")]:
        folders[(architecture, task)] = export_model(
            tiny(architecture, task), tokenizer, root / f"{architecture}-{task}"
        )
    folders[("t5", "seq2seq")] = export_model(tiny("t5", "seq2seq"), tokenizer, root / "t5-seq2seq")
    return folders


def test_exported_plain_folder_is_safetensors_and_loads(base_folders):
    folder = base_folders[("gpt2", "causal_lm")]
    assert_no_pickles(folder)
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    assert (folder / "generation_config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by serving processes
    model = load_pretrained(folder, task="causal_lm")
    assert model.config.use_cache is False


def test_load_pretrained_refuses_a_model_that_cannot_do_the_task(base_folders):
    with pytest.raises(TrainingDataError) as error:
        load_pretrained(base_folders[("gpt2", "causal_lm")], task="seq2seq")
    assert (error.value.param, "causal_lm" in error.value.message) == ("model", True)
    with pytest.raises(TrainingDataError) as error:
        load_pretrained(base_folders[("bert", "classification")], task="causal_lm")
    assert error.value.param == "model"


def test_load_pretrained_classification_takes_pad_from_the_tokenizer(base_folders, tmp_path):
    # A decoder folder without a pad id, like Llama's: the classifier needs one to find the last real token.
    folder = base_folders[("gpt2", "causal_lm")]
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    copy = tmp_path / "nopad"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "config.json").write_text(json.dumps(config))
    model = load_pretrained(copy, task="classification", num_labels=2)
    assert model.config.pad_token_id == 1 and model.score.out_features == 2


@pytest.mark.parametrize(
    ("architecture", "task", "head"),
    [
        ("gpt2", "causal_lm", None),
        ("gpt2", "classification", "score"),
        ("bert", "classification", "classifier"),
        ("t5", "seq2seq", None),
    ],
)
def test_lora_trains_only_adapters_and_exports_both_ways(base_folders, tokenizer, tmp_path, architecture, task, head):
    base = load_pretrained(base_folders[(architecture, task)], task=task, num_labels=3)
    model = apply_lora(base, task=task, r=4, alpha=8, dropout=0.0, target_modules=None)
    assert isinstance(model, PeftModel)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable)
    for name in trainable:
        assert "lora_" in name or (head is not None and f"{head}.modules_to_save" in name), name
    if head is not None:
        assert any("modules_to_save" in name for name in trainable)
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in trainable.values())

    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    model(**batch(task)).loss.backward()
    optimizer.step()
    changed = {name for name, p in trainable.items() if not torch.equal(p, before[name])}
    assert any("lora_B" in name for name in changed)
    if head is not None:
        assert any("modules_to_save" in name for name in changed)
    expected = logits_of(model, task)

    merged = export_model(model, tokenizer, tmp_path / "merged", lora_export="merged")
    assert_no_pickles(merged)
    assert not (merged / "adapter_config.json").exists()
    reloaded = AUTO_CLASSES[task].from_pretrained(merged, **LOCAL)
    torch.testing.assert_close(logits_of(reloaded, task), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(model, task), expected)  # the exported PeftModel keeps its adapters

    adapter = export_model(model, tokenizer, tmp_path / "adapter", lora_export="adapter")
    assert_no_pickles(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", ADAPTER_MARKER} <= {
        p.name for p in adapter.iterdir()
    }
    marker = json.loads((adapter / ADAPTER_MARKER).read_text())
    assert marker["base_model"] == str(base_folders[(architecture, task)])
    fresh_base = load_pretrained(marker["base_model"], task=task, num_labels=3)
    restored = PeftModel.from_pretrained(fresh_base, adapter)
    torch.testing.assert_close(logits_of(restored, task), expected, atol=1e-5, rtol=0)


def test_lora_validation_names_the_field():
    model = tiny("gpt2", "causal_lm")
    with pytest.raises(TrainingDataError) as error:
        apply_lora(model, task="causal_lm", r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    assert error.value.param == "lora_target_modules"
    assert "q_proj" in error.value.message and "c_attn" in error.value.message and "c_fc" in error.value.message
    for kwargs, param in [
        ({"r": 0}, "lora_r"),
        ({"r": 2048}, "lora_r"),
        ({"alpha": 0}, "lora_alpha"),
        ({"dropout": 1.0}, "lora_dropout"),
        ({"target_modules": []}, "lora_target_modules"),
    ]:
        arguments = {"task": "causal_lm", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, **kwargs}
        with pytest.raises(TrainingDataError) as error:
            apply_lora(model, **arguments)
        assert (error.value.code, error.value.param) == ("invalid_hyperparameter", param)


def test_export_replaces_an_existing_folder(tokenizer, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export_model(tiny("bert", "classification"), tokenizer, target)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left
    with pytest.raises(TrainingDataError) as error:
        export_model(tiny("bert", "classification"), tokenizer, target, lora_export="pickled")
    assert error.value.param == "lora_export"


def test_adapter_export_needs_a_base_folder(tokenizer, tmp_path):
    model = apply_lora(tiny("gpt2", "causal_lm"), task="causal_lm", r=2, alpha=4, dropout=0.0, target_modules=None)
    with pytest.raises(TrainingDataError) as error:
        export_model(model, tokenizer, tmp_path / "adapter", lora_export="adapter")
    assert error.value.param == "lora_export"
    assert not (tmp_path / "adapter").exists()


def test_qlora_needs_bitsandbytes_and_cuda():
    with pytest.raises(TrainingDataError) as error:
        require_qlora_support("cpu")
    assert (error.value.code, error.value.param) == ("qlora_unavailable", "mode")
    assert "bitsandbytes" in error.value.message or "CUDA" in error.value.message
