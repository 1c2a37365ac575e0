"""Sampling from a freshly trained tiny model: real tokenizer, real weights; no Django."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.workers.ml.engine_fixtures import train
from tests.workers.ml.test_train import write_training_corpus
from workers.ml import generate
from workers.ml.generate import GenerationResult, generate_text

PROMPT = "The old sailor"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("generate")
    corpus = write_training_corpus(folder / "corpus.txt")
    # A tiny gpt2 on plain text, trained long enough to write sentences like the corpus's (and end paragraphs).
    run = train(str(corpus), folder / "model", max_steps=60, log_every_steps=20, learning_rate=3e-3)
    assert run.result.output_dir is not None
    return run.result.output_dir


def test_returns_only_the_new_text_with_token_counts(model_dir: str) -> None:
    result = generate_text(model_dir, PROMPT, max_new_tokens=12, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected_ids = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12, do_sample=False
        )
    expected_new_ids = expected_ids[0, prompt_ids.shape[1] :].tolist()

    assert isinstance(result, GenerationResult)
    assert result.prompt_tokens == prompt_ids.shape[1]
    assert result.finish_reason in {"stop", "length"}
    assert result.completion_tokens == len(expected_new_ids)
    assert result.text == tokenizer.decode(expected_new_ids, skip_special_tokens=True)
    assert result.text.strip()
    assert not result.text.startswith(PROMPT)
    if result.finish_reason == "length":
        assert result.completion_tokens == 12


def test_temperature_zero_is_deterministic_whatever_the_seed(model_dir: str) -> None:
    first = generate_text(model_dir, PROMPT, max_new_tokens=20, temperature=0, seed=1)
    second = generate_text(model_dir, PROMPT, max_new_tokens=20, temperature=0, seed=2)
    third = generate_text(model_dir, PROMPT, max_new_tokens=20, temperature=0)
    assert first == second == third


def test_the_same_seed_reproduces_a_sample_and_other_seeds_vary(model_dir: str) -> None:
    first = generate_text(model_dir, PROMPT, max_new_tokens=24, temperature=1.0, seed=11)
    second = generate_text(model_dir, PROMPT, max_new_tokens=24, temperature=1.0, seed=11)
    assert first == second
    samples = {
        generate_text(model_dir, PROMPT, max_new_tokens=24, temperature=1.0, seed=seed).text for seed in range(6)
    }
    assert len(samples) > 1


def test_a_seeded_call_leaves_the_global_generator_alone(model_dir: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_text(model_dir, PROMPT, max_new_tokens=5, seed=4)
    assert torch.equal(torch.rand(3), expected)


def test_empty_prompt_starts_from_the_beginning_of_text(model_dir: str) -> None:
    result = generate_text(model_dir, "", max_new_tokens=16, temperature=0)
    assert result.prompt_tokens == 0
    assert result.completion_tokens >= 1
    assert result.text.strip()


def test_stops_at_end_of_text(model_dir: str) -> None:
    # Paragraphs in the corpus end with an end-of-text token, so some samples end on their own.
    results = [generate_text(model_dir, PROMPT, max_new_tokens=60, seed=seed) for seed in range(8)]
    stopped = [result for result in results if result.finish_reason == "stop"]
    assert stopped
    for result in stopped:
        # The end-of-text token counts as a completion token, so a sample may stop on exactly its 60th.
        assert result.completion_tokens <= 60
        assert "<|endoftext|>" not in result.text
    for result in results:
        if result.finish_reason == "length":
            assert result.completion_tokens == 60


def test_a_prompt_longer_than_the_context_keeps_its_end(model_dir: str) -> None:
    long_prompt = " ".join(["The baker paints a long bridge at night."] * 40)
    result = generate_text(model_dir, long_prompt, max_new_tokens=48, temperature=0)
    context_length = 64
    assert result.prompt_tokens == context_length // 2
    assert result.prompt_tokens + result.completion_tokens <= context_length
    assert result.completion_tokens >= 1


@pytest.mark.parametrize(
    "arguments",
    [{"max_new_tokens": 0}, {"max_new_tokens": 513}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}],
)
def test_rejects_bad_sampling_arguments(model_dir: str, arguments: dict) -> None:
    with pytest.raises(ValueError):
        generate_text(model_dir, PROMPT, **arguments)


def test_a_folder_without_safetensors_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        generate_text(str(tmp_path), PROMPT)


def test_loaded_models_are_cached_until_the_weights_change(model_dir: str) -> None:
    loaded = generate._load_model(model_dir)
    assert generate._load_model(model_dir) is loaded
    model_file = os.path.join(model_dir, "model.safetensors")
    stat = os.stat(model_file)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reloaded = generate._load_model(model_dir)
    assert reloaded is not loaded
    assert generate._load_model(model_dir) is reloaded
