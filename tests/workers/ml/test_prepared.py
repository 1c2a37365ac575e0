"""Data prepared ahead of training (on a `cpu` worker) trains exactly as data prepared in the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from workers.ml import prepared
from workers.ml.data.samples import write_sample_datasets
from workers.ml.engine import prepare_training_data, run_training
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer

from .engine_fixtures import Recorder, make_config


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_sample_datasets(str(tmp_path_factory.mktemp("samples")))


CASES = {
    "chat-from-scratch": ("chat.jsonl", {"max_steps": 4, "validation_fraction": 0.2, "eval_every_steps": 2}),
    "text-from-scratch": ("corpus.txt", {"max_steps": 4}),
    "classification": ("sentiment.csv", {"max_steps": 4, "task": "classification", "validation_fraction": 0.2}),
    # With a tokenizer of its own: tokenizers 0.23's Unigram trainer breaks ties differently on every call, so two
    # runs that each trained one would differ for that reason alone.
    "translation": ("translation.tsv", {"max_steps": 3, "task": "seq2seq", "architecture": "t5", "tokenizer": None}),
}


@pytest.fixture(scope="module")
def unigram_tokenizer(samples: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    with open(samples["translation.tsv"], encoding="utf-8") as handle:
        texts = [part for line in handle for part in line.rstrip("\n").split("\t")]
    folder = tmp_path_factory.mktemp("unigram")
    spec = TokenizerSpec(algorithm="unigram", vocab_size=400, min_frequency=1)
    train_tokenizer(iter(texts), spec).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_on_prepared_data_equals_a_run_that_prepares_its_own(
    case: str, samples: dict[str, str], unigram_tokenizer: str, tmp_path: Path
) -> None:
    filename, overrides = CASES[case]
    if "tokenizer" in overrides:
        overrides = {**overrides, "tokenizer": unigram_tokenizer}
    config = make_config(samples[filename], tmp_path / "in-run", **overrides)
    in_run = Recorder()
    run_training(config, in_run)

    manifest = prepare_training_data(config, tmp_path / "prepared")
    assert manifest["sides"]["train"]["examples"] > 0
    # The training run never opens the data files: they are gone.
    on_prepared = dataclasses.replace(
        config,
        train_file=str(tmp_path / "deleted.jsonl"),
        output_dir=str(tmp_path / "on-prepared"),
        prepared_data=str(tmp_path / "prepared"),
    )
    ahead = Recorder()
    result = run_training(on_prepared, ahead)

    assert ahead.losses == in_run.losses and len(ahead.losses) == overrides["max_steps"]
    evaluations = [data for data in in_run.metrics if any(key.startswith("validation_") for key in data)]
    assert evaluations == [data for data in ahead.metrics if any(key.startswith("validation_") for key in data)]
    assert result.output_dir and (Path(result.output_dir) / "training_report.json").exists()


def test_a_prepared_folder_made_for_other_settings_is_refused(samples: dict[str, str], tmp_path: Path) -> None:
    config = make_config(samples["chat.jsonl"], tmp_path / "out", max_steps=2)
    prepare_training_data(config, tmp_path / "prepared")
    other = dataclasses.replace(config, max_length=32, prepared_data=str(tmp_path / "prepared"))
    with pytest.raises(ValueError, match="other data settings"):
        run_training(other, Recorder())


def test_data_errors_surface_while_preparing(samples: dict[str, str], tmp_path: Path) -> None:
    single_label = tmp_path / "one-label.csv"
    single_label.write_text("text,label\n" + "".join(f"review number {i},good\n" for i in range(30)))
    config = make_config(str(single_label), tmp_path / "out", task="classification", max_steps=2)
    with pytest.raises(TrainingDataError) as raised:
        prepare_training_data(config, tmp_path / "prepared")
    assert raised.value.code == "too_few_labels"
    assert prepared.read_manifest(tmp_path / "prepared") is None


def test_a_run_on_prepared_data_resumes_from_its_checkpoint(samples: dict[str, str], tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "max_steps": 6,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "checkpoint_every_steps": 3,
    }
    config = make_config(samples["chat.jsonl"], tmp_path / "out", **common)
    prepare_training_data(config, tmp_path / "prepared")
    on_prepared = dataclasses.replace(
        config, train_file=str(tmp_path / "gone.jsonl"), prepared_data=str(tmp_path / "prepared")
    )
    run_training(on_prepared, Recorder(stop_after_metrics=3))

    resumed = run_training(on_prepared, Recorder())
    assert resumed.resumed_from_step == 3 and resumed.steps_completed == 6
