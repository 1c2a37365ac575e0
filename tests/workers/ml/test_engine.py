"""The training engine end to end (`workers.ml.engine.run_training`): every from-scratch architecture and task on the
sample datasets, weight initialisation, determinism, exact resumption from checkpoints, gradient accumulation,
schedules, optimizers, early stopping, evaluation metrics, packing, config errors and the command line; the real
offline models (LoRA on SmolLM2, full fine-tuning of MiniLM) in the slow tests. Tiny models, a few steps each."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as functional
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from tests.workers.ml.engine_fixtures import (
    MODEL_CACHE_DIR,
    REPOSITORY_ROOT,
    Recorder,
    Run,
    dropout_free_models,
    make_config,
    train,
)
from workers.ml import checkpoint as checkpoints
from workers.ml import engine, modeling
from workers.ml.callbacks import NullCallback
from workers.ml.config import INIT_SCHEMES, INVALID_HYPERPARAMETER, MISSING_REQUIRED_PARAMETER, TrainingConfig
from workers.ml.data.samples import write_sample_datasets
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.data.training_sets import (
    WRONG_TASK,
    BatchSource,
    TokenizedSet,
    limit,
    pack,
    read_example_sets,
    tokenize_like_config,
    trained_target_count,
)
from workers.ml.engine import REPORT_FILENAME, _prepare, cpp_compiler_available, run_training
from workers.ml.errors import TrainingDataError
from workers.ml.model_cache import prepare_offline_model
from workers.ml.train import main as train_main

_LABELS = ["negative", "neutral", "positive"]
_PUBLISHABLE_SUFFIXES = (".safetensors", ".json", ".txt")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LOAD = {"local_files_only": True, "trust_remote_code": False}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_sample_datasets(str(tmp_path_factory.mktemp("samples")))


def _bert() -> dict[str, Any]:
    return {"task": "classification", "architecture": "bert"}


# --- Every architecture x task, end to end ---------------------------------------------------------------------------

ARCHITECTURE_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-plain-text": ("corpus.txt", {"task": "causal_lm", "architecture": "gpt2"}),
    "gpt2-chat": ("chat.jsonl", {"task": "causal_lm", "architecture": "gpt2"}),
    "gpt2-prompt-completion": ("prompt_completion.jsonl", {"task": "causal_lm", "architecture": "gpt2"}),
    "gpt2-classification": ("sentiment.csv", {"task": "classification", "architecture": "gpt2"}),
    "bert-classification": ("sentiment.csv", {"task": "classification", "architecture": "bert"}),
    "t5-seq2seq": ("translation.tsv", {"task": "seq2seq", "architecture": "t5", "generation_max_new_tokens": 16}),
}
_STEPS = 8
_EVAL_EVERY = 4


@pytest.fixture(scope="module", params=list(ARCHITECTURE_RUNS))
def architecture_run(
    request: pytest.FixtureRequest, samples: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Run:
    filename, overrides = ARCHITECTURE_RUNS[request.param]
    return train(
        samples[filename],
        tmp_path_factory.mktemp(request.param) / "model",
        max_steps=_STEPS,
        validation_fraction=0.2,
        eval_every_steps=_EVAL_EVERY,
        **overrides,
    )


def test_every_architecture_and_task_trains_to_an_exported_model(architecture_run: Run) -> None:
    config, result, recorder = architecture_run.config, architecture_run.result, architecture_run.recorder
    assert result.output_dir == config.output_dir
    assert (result.steps_completed, result.total_steps) == (_STEPS, _STEPS)
    assert not result.stopped and not result.early_stopped and result.resumed_from_step is None
    assert recorder.steps == list(range(1, _STEPS + 1))
    losses = recorder.losses
    assert all(math.isfinite(loss) for loss in losses)
    assert result.initial_train_loss == losses[0] and result.final_train_loss == losses[-1]
    if config.task != "classification":
        # Eight steps at 3e-3 take a random model below its starting loss (t5's by ~0.08, gpt2's by ~1); three
        # labels need longer.
        assert sum(losses[-2:]) / 2 < losses[0] - (0.3 if config.task == "causal_lm" else 0.03)
    assert result.num_parameters == result.trainable_parameters > 10_000
    assert result.train_tokens > 0
    assert not recorder.warnings or all("max_length" in warning for warning in recorder.warnings)

    files = sorted(path.name for path in Path(config.output_dir).iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", REPORT_FILENAME} <= set(files)
    assert all(name.endswith(_PUBLISHABLE_SUFFIXES) for name in files), files
    assert not [path for path in Path(config.output_dir).rglob("*") if path.name.endswith(_PICKLE_SUFFIXES)]
    assert not list(Path(config.output_dir).parent.glob(".*tmp*")), "the atomic export left its staging folder"

    report = json.loads((Path(config.output_dir) / REPORT_FILENAME).read_text())
    assert report["task"] == config.task and report["mode"] == "from_scratch"
    assert report["steps_completed"] == report["total_steps"] == _STEPS
    assert report["final_train_loss"] == pytest.approx(losses[-1])
    assert report["labels"] == (_LABELS if config.task == "classification" else None)
    assert report["metrics"]["valid_loss"] == pytest.approx(result.final_metrics["valid_loss"])
    assert report["hyperparameters"]["architecture"] == config.architecture
    assert report["hyperparameters"]["learning_rate"] == config.learning_rate
    # Local paths of the worker are not part of the published report.
    assert "train_file" not in report["hyperparameters"] and "output_dir" not in report["hyperparameters"]


def _validation_examples(config: TrainingConfig, tokenizer: Any) -> TokenizedSet:
    """The validation rows the run evaluated on, tokenized again with the exported tokenizer."""
    sets = read_example_sets(config, NullCallback())
    assert sets.validation is not None
    return limit(
        tokenize_like_config(
            sets.validation[: config.max_eval_examples],
            tokenizer,
            config=config,
            sets=sets,
            label_ids={label: index for index, label in enumerate(_LABELS)},
        ),
        config.max_eval_examples,
    )


def test_the_exported_model_reloads_and_reproduces_the_reported_metrics(architecture_run: Run) -> None:
    """Loaded back with plain transformers Auto classes (no remote code), the exported model gives, one example at
    a time and with transformers' own loss, the validation numbers the engine reported from padded batches."""
    config, metrics = architecture_run.config, architecture_run.result.final_metrics
    folder = config.output_dir
    tokenizer = AutoTokenizer.from_pretrained(folder, **_LOAD)
    auto_class = {
        "causal_lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
    }[config.task]
    model = auto_class.from_pretrained(folder, **_LOAD).eval()
    assert type(model).__name__.lower().startswith(config.architecture)
    validation = _validation_examples(config, tokenizer)
    loss_sum, counted, correct, predicted = 0.0, 0, 0, []
    with torch.no_grad():
        for index, ids in enumerate(validation.input_ids):
            input_ids = torch.tensor([ids])
            if config.task == "classification":
                logits = model(input_ids=input_ids).logits[0]
                assert validation.class_ids is not None
                loss_sum += functional.cross_entropy(logits, torch.tensor(validation.class_ids[index])).item()
                counted += 1
                predicted.append(model.config.id2label[int(logits.argmax())])
                continue
            assert validation.labels is not None
            labels = torch.tensor([validation.labels[index]])
            output = model(input_ids=input_ids, labels=labels)
            if config.task == "seq2seq":
                targets, logits = labels[0], output.logits[0]
            else:
                # A causal LM's logits at t predict the label at t + 1.
                targets, logits = labels[0, 1:], output.logits[0, :-1]
            trained = int((targets != IGNORE_INDEX).sum())
            if trained:
                loss_sum += output.loss.item() * trained
                counted += trained
                correct += int(((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum())
    assert counted > 0
    assert loss_sum / counted == pytest.approx(metrics["valid_loss"], rel=1e-4)
    if config.task == "classification":
        assert model.config.id2label == dict(enumerate(_LABELS))
        assert metrics["accuracy"] == pytest.approx(accuracy_score(validation.references, predicted))
        report = json.loads((Path(folder) / REPORT_FILENAME).read_text())
        assert [row["prediction"] for row in report["sample_predictions"]] == predicted[:10]
    else:
        assert metrics["valid_token_accuracy"] == pytest.approx(correct / counted)


def test_evaluations_report_the_metrics_of_their_task(architecture_run: Run) -> None:
    config, result, recorder = architecture_run.config, architecture_run.result, architecture_run.recorder
    metrics = result.final_metrics
    evaluations = recorder.with_data_key("evaluation")
    assert [event.data["step"] for event in evaluations] == [_EVAL_EVERY, _STEPS]
    assert evaluations[-1].data["evaluation"] == metrics
    # The metrics events of evaluation steps carry the scalar metrics next to the training ones.
    for data in recorder.metrics:
        assert {"train_loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch", "eta_seconds"} <= set(data)
        assert ("valid_loss" in data) == (data["step"] % _EVAL_EVERY == 0)
    assert recorder.metrics[-1]["valid_loss"] == metrics["valid_loss"]
    validation_examples = recorder.start["validation_examples"]
    assert validation_examples > 0
    assert math.isfinite(metrics["valid_loss"]) and metrics["valid_loss"] > 0
    assert metrics["valid_perplexity"] == pytest.approx(math.exp(metrics["valid_loss"]))
    report = json.loads((Path(config.output_dir) / REPORT_FILENAME).read_text())
    if config.task == "classification":
        for name in ("accuracy", "f1_macro", "f1_micro", "f1_weighted"):
            assert 0.0 <= metrics[name] <= 1.0
        matrix = metrics["confusion_matrix"]
        assert matrix["labels"] == _LABELS
        assert sum(map(sum, matrix["matrix"])) == validation_examples == metrics["examples"]
        # Stratified: every label is held out.
        assert all(sum(row) > 0 for row in matrix["matrix"])
    elif config.task == "seq2seq":
        for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
            assert 0.0 <= metrics[name] <= 100.0
        assert metrics["examples"] == validation_examples
    if config.task == "causal_lm":
        assert 0.0 <= metrics["valid_token_accuracy"] <= 1.0
        # The share of the (non-padding) tokens the loss covers: all but each example's last one for plain text,
        # less where prompts and user turns are context.
        fractions = [data["trained_tokens_fraction"] for data in recorder.metrics]
        assert all(0.0 < fraction <= 1.0 for fraction in fractions)
        if config.train_file.endswith(".txt"):
            assert min(fractions) > 0.9
        else:
            assert max(fractions) < 0.9
        assert report["sample_predictions"] == []
    else:
        rows = report["sample_predictions"]
        assert len(rows) == min(10, validation_examples)
        assert all(set(row) == {"input", "reference", "prediction", "correct"} for row in rows)
        assert all(row["correct"] == (row["prediction"].strip() == row["reference"].strip()) for row in rows)


def test_unpacked_causal_rows_train_one_example_each(samples: dict[str, str], tmp_path: Path) -> None:
    run = train(samples["prompt_completion.jsonl"], tmp_path / "model", max_steps=3, packing=False)
    assert run.recorder.start["train_rows"] == 40
    assert run.result.steps_completed == 3 and all(math.isfinite(loss) for loss in run.recorder.losses)
    packed = train(samples["prompt_completion.jsonl"], tmp_path / "packed", max_steps=1)
    assert packed.recorder.start["train_rows"] == 5


# --- Weight initialisation -------------------------------------------------------------------------------------------

_FAN_IN, _FAN_OUT = 64, 256  # gpt2-tiny's MLP input projection, c_fc: 64 -> 256
_EXPECTED_STD = {
    "normal": 0.02,
    "xavier_uniform": math.sqrt(2 / (_FAN_IN + _FAN_OUT)),
    "xavier_normal": math.sqrt(2 / (_FAN_IN + _FAN_OUT)),
    "kaiming_uniform": math.sqrt(2 / _FAN_IN),
    "kaiming_normal": math.sqrt(2 / _FAN_IN),
}


@pytest.fixture(scope="module")
def init_runs(samples: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    folder = tmp_path_factory.mktemp("init")
    # One step at a negligible learning rate: the first step's loss is that of the initial weights, and the exported
    # weights are still (to 1e-6) the initial ones.
    runs = {
        name: train(samples["prompt_completion.jsonl"], folder / name, init=init, max_steps=1, learning_rate=1e-6)
        for name, init in [*((scheme, scheme) for scheme in INIT_SCHEMES), ("normal-again", "normal")]
    }
    return runs


def test_every_init_scheme_gives_its_own_initial_loss_deterministically(init_runs: dict[str, Run]) -> None:
    losses = {name: run.result.initial_train_loss for name, run in init_runs.items()}
    assert all(math.isfinite(loss) for loss in losses.values())
    assert losses["normal-again"] == losses["normal"]
    assert len({losses[scheme] for scheme in INIT_SCHEMES}) == len(INIT_SCHEMES), losses
    assert abs(losses["xavier_uniform"] - losses["normal"]) > 1e-3


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_the_init_scheme_shapes_the_exported_weights(init_runs: dict[str, Run], scheme: str) -> None:
    weights = load_file(str(Path(init_runs[scheme].config.output_dir) / "model.safetensors"))
    matrix = weights["transformer.h.0.mlp.c_fc.weight"]
    assert matrix.shape == (_FAN_IN, _FAN_OUT)  # Conv1D stores (in, out)
    assert matrix.std().item() == pytest.approx(_EXPECTED_STD[scheme], rel=0.05)
    bound = math.sqrt(3) * _EXPECTED_STD[scheme]
    if scheme.endswith("uniform"):
        assert matrix.abs().max().item() <= bound + 1e-4
    else:
        assert matrix.abs().max().item() > bound
    # Biases start at zero and norm gains at one (one step at 1e-6 moves them by about 1e-6).
    assert weights["transformer.h.0.mlp.c_fc.bias"].abs().max().item() < 1e-4
    assert weights["transformer.h.0.ln_1.weight"].sub(1).abs().max().item() < 1e-4


# --- Determinism -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "overrides"),
    [
        ("sentiment.csv", _bert()),
        ("translation.tsv", {"task": "seq2seq", "architecture": "t5", "generation_max_new_tokens": 4}),
    ],
    ids=["bert-wordpiece", "t5-unigram"],
)
def test_from_scratch_runs_that_train_their_own_tokenizer_repeat_exactly(
    samples: dict[str, str], tmp_path: Path, filename: str, overrides: dict[str, Any]
) -> None:
    """Each run trains its tokenizer on the data (WordPiece for bert, Unigram for t5) and builds its embeddings from
    it: the same seed must give the same vocabulary, hence the same losses (the Rust trainers alone did not)."""
    runs = [train(samples[filename], tmp_path / f"model-{index}", max_steps=4, **overrides) for index in range(2)]
    vocabularies = [(Path(run.config.output_dir) / "tokenizer.json").read_text() for run in runs]
    assert vocabularies[0] == vocabularies[1]
    assert len(runs[0].recorder.losses) == 4
    assert runs[0].recorder.losses == runs[1].recorder.losses


def test_the_same_seed_gives_the_same_losses_and_another_seed_other_ones(
    samples: dict[str, str], tmp_path: Path
) -> None:
    # gpt2 has dropout: the same losses mean the same initial weights, data order and dropout masks.
    runs = [
        train(samples["chat.jsonl"], tmp_path / f"model-{index}", max_steps=5, seed=seed)
        for index, seed in enumerate((0, 0, 1))
    ]
    same, again, other = (run.recorder for run in runs)
    assert len(same.losses) == 5
    assert same.losses == again.losses
    assert [data["grad_norm"] for data in same.metrics] == [data["grad_norm"] for data in again.metrics]
    assert all(abs(a - b) > 1e-6 for a, b in zip(same.losses, other.losses, strict=True))
    first = load_file(str(Path(runs[0].config.output_dir) / "model.safetensors"))
    second = load_file(str(Path(runs[1].config.output_dir) / "model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)


# --- Exact resumption ------------------------------------------------------------------------------------------------

_RESUME_STEPS = 12
_STOP_AT = 6


@dataclasses.dataclass(frozen=True)
class ResumeScenario:
    common: dict[str, Any]
    uninterrupted: Run
    stopped: Run
    resumed: Run
    checkpoints_after_stop: list[int]
    checkpoint_copy: Path
    """The checkpoint folder as the stopped run left it (the resumed run writes and prunes the original)."""


def _resume_scenario(train_file: str, folder: Path, **overrides: Any) -> ResumeScenario:
    common = {"max_steps": _RESUME_STEPS, "checkpoint_every_steps": 4, **overrides}
    uninterrupted = train(train_file, folder / "full", checkpoint_dir=str(folder / "full-checkpoints"), **common)
    checkpoint_dir = folder / "checkpoints"
    stopped = train(
        train_file,
        folder / "model",
        recorder=Recorder(stop_after_metrics=_STOP_AT),
        checkpoint_dir=str(checkpoint_dir),
        **common,
    )
    steps = [info.step for info in checkpoints.list_checkpoints(checkpoint_dir)]
    shutil.copytree(checkpoint_dir, folder / "checkpoints-at-stop")
    resumed = train(train_file, folder / "model", checkpoint_dir=str(checkpoint_dir), **common)
    return ResumeScenario(common, uninterrupted, stopped, resumed, steps, folder / "checkpoints-at-stop")


RESUME_CASES = ("gpt2-chat-packed-accumulated", "bert-classification-dropout")


@pytest.fixture(scope="module")
def resume_scenario(
    samples: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], ResumeScenario]:
    done: dict[str, ResumeScenario] = {}

    def get(case: str) -> ResumeScenario:
        if case not in done:
            folder = tmp_path_factory.mktemp(case)
            if case == "gpt2-chat-packed-accumulated":
                with dropout_free_models():
                    # max_length 256 packs two or three chats per row.
                    done[case] = _resume_scenario(
                        samples["chat.jsonl"], folder, gradient_accumulation_steps=2, max_length=256
                    )
            else:
                # bert has dropout: the resumed run must draw the very masks the uninterrupted one drew.
                done[case] = _resume_scenario(samples["sentiment.csv"], folder, **_bert())
        return done[case]

    return get


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_stopped_run_checkpoints_the_step_it_stopped_at(
    resume_scenario: Callable[[str], ResumeScenario], case: str
) -> None:
    scenario = resume_scenario(case)
    result, recorder = scenario.stopped.result, scenario.stopped.recorder
    assert result.stopped and not result.early_stopped
    assert result.output_dir is None
    assert result.steps_completed == _STOP_AT and result.total_steps == _RESUME_STEPS
    assert recorder.steps == list(range(1, _STOP_AT + 1))
    assert [event.data["checkpoint"]["step_number"] for event in recorder.with_data_key("checkpoint")] == [4, _STOP_AT]
    assert scenario.checkpoints_after_stop == [4, _STOP_AT]
    # Up to the stop, the interrupted run is the uninterrupted one (same seed, data order and dropout).
    assert recorder.losses == scenario.uninterrupted.recorder.losses[:_STOP_AT]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_resumed_run_continues_exactly_where_the_stopped_one_left(
    resume_scenario: Callable[[str], ResumeScenario], case: str
) -> None:
    scenario = resume_scenario(case)
    full, resumed = scenario.uninterrupted, scenario.resumed
    assert resumed.result.resumed_from_step == _STOP_AT
    assert [event.data["resumed_from_step"] for event in resumed.recorder.with_data_key("resumed_from_step")] == [
        _STOP_AT
    ]
    assert resumed.recorder.steps == list(range(_STOP_AT + 1, _RESUME_STEPS + 1))
    tail = full.recorder.metrics[_STOP_AT:]
    assert resumed.recorder.losses == pytest.approx([data["train_loss"] for data in tail], abs=1e-6, rel=0)
    assert resumed.recorder.learning_rates == pytest.approx([data["learning_rate"] for data in tail], abs=1e-12)
    assert [data["grad_norm"] for data in resumed.recorder.metrics] == pytest.approx(
        [data["grad_norm"] for data in tail], abs=1e-5
    )
    assert [data["epoch"] for data in resumed.recorder.metrics] == [data["epoch"] for data in tail]
    assert [event.data["checkpoint"]["step_number"] for event in resumed.recorder.with_data_key("checkpoint")] == [
        8,
        12,
    ]
    assert resumed.result.steps_completed == _RESUME_STEPS and not resumed.result.stopped
    assert resumed.result.initial_train_loss == full.result.initial_train_loss
    assert resumed.result.final_train_loss == pytest.approx(full.result.final_train_loss, abs=1e-6)
    assert resumed.result.train_tokens == full.result.train_tokens
    expected = load_file(str(Path(full.config.output_dir) / "model.safetensors"))
    actual = load_file(str(Path(resumed.config.output_dir) / "model.safetensors"))
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=1e-6, rtol=0), name


def test_without_its_random_state_a_resumed_run_with_dropout_would_diverge(
    resume_scenario: Callable[[str], ResumeScenario], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bert case above really depends on restoring the RNG (so it tests that the engine does)."""
    scenario = resume_scenario("bert-classification-dropout")
    checkpoint_dir = tmp_path / "checkpoints"
    shutil.copytree(scenario.checkpoint_copy, checkpoint_dir)
    monkeypatch.setattr(checkpoints, "restore_rng_state", lambda *args, **kwargs: None)
    run = train(
        scenario.uninterrupted.config.train_file,
        tmp_path / "model",
        checkpoint_dir=str(checkpoint_dir),
        **scenario.common,
    )
    assert run.result.resumed_from_step == _STOP_AT
    assert abs(run.recorder.losses[0] - scenario.uninterrupted.recorder.losses[_STOP_AT]) > 1e-5


@pytest.mark.parametrize(
    "change, resumes",
    [("nothing", True), ("learning_rate", False), ("seed", False), ("data", False), ("log_every_steps", True)],
)
def test_only_a_checkpoint_of_the_same_run_is_resumed(
    resume_scenario: Callable[[str], ResumeScenario], tmp_path: Path, change: str, resumes: bool
) -> None:
    scenario = resume_scenario("gpt2-chat-packed-accumulated")
    checkpoint_dir = tmp_path / "checkpoints"
    shutil.copytree(scenario.checkpoint_copy, checkpoint_dir)
    train_file = scenario.uninterrupted.config.train_file
    settings = dict(scenario.common)
    if change == "learning_rate":
        settings["learning_rate"] = 1e-3
    elif change == "seed":
        settings["seed"] = 1
    elif change == "log_every_steps":
        # Reporting settings do not change what is computed.
        settings["log_every_steps"] = 2
    elif change == "data":
        lines = Path(train_file).read_text(encoding="utf-8").splitlines(keepends=True)
        train_file = str(tmp_path / "chat.jsonl")
        Path(train_file).write_text("".join(lines[:-1]), encoding="utf-8")
    with dropout_free_models():
        run = train(train_file, tmp_path / "model", checkpoint_dir=str(checkpoint_dir), **settings)
    if resumes:
        assert run.result.resumed_from_step == _STOP_AT
        assert run.recorder.steps[0] > _STOP_AT
        assert not any("other settings" in warning for warning in run.recorder.warnings)
    else:
        assert run.result.resumed_from_step is None
        assert run.recorder.steps[0] == 1
        assert any("other settings or data" in warning for warning in run.recorder.warnings)
    assert run.result.steps_completed == _RESUME_STEPS


# --- Gradient accumulation -------------------------------------------------------------------------------------------


def test_accumulated_micro_batches_train_on_the_mean_over_every_target_of_the_step(
    samples: dict[str, str], tmp_path: Path
) -> None:
    """batch 4 x accumulation 2 takes the same rows as batch 8 x 1 and reports the same first-step loss: the sum of
    the cross-entropy over every trained target of both micro-batches, divided by their count (not the mean of the
    two micro-batch means, which differs because the micro-batches train different numbers of targets)."""
    # max_length 256 packs two or three chats per row.
    common = {"train_file": samples["chat.jsonl"], "max_length": 256, "max_steps": 1, "init": "kaiming_normal"}
    big_config = make_config(output_dir=tmp_path / "big", batch_size=8, gradient_accumulation_steps=1, **common)
    small_config = make_config(output_dir=tmp_path / "small", batch_size=4, gradient_accumulation_steps=2, **common)
    with dropout_free_models():
        torch.manual_seed(small_config.seed)  # as run_training does before preparing: the same initial weights
        setup = _prepare(small_config, NullCallback(), None)
        torch.manual_seed(big_config.seed)
        big_source = _prepare(big_config, NullCallback(), None).train_source
        big = train(output_dir=tmp_path / "big", batch_size=8, gradient_accumulation_steps=1, **common)
        small = train(output_dir=tmp_path / "small", batch_size=4, gradient_accumulation_steps=2, **common)
    assert setup.train_source.packed is not None and int(setup.train_source.packed.examples_per_row.max()) >= 2
    first, second = setup.train_source.batch(0), setup.train_source.batch(1)
    whole = big_source.batch(0)
    assert whole.input_ids.shape[0] == 8
    for name in ("input_ids", "position_ids", "targets"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(first, name), getattr(second, name)])), name
    assert first.trained_targets != second.trained_targets

    model = setup.model.eval()
    sums = []
    with torch.no_grad():
        for batch in (first, second):
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
            sums.append(
                functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
            )  # fmt: skip
    token_mean = sum(sums) / (first.trained_targets + second.trained_targets)
    mean_of_means = (sums[0] / first.trained_targets + sums[1] / second.trained_targets) / 2
    assert abs(token_mean - mean_of_means) > 1e-3
    assert small.result.initial_train_loss == pytest.approx(token_mean, abs=1e-5)
    assert big.result.initial_train_loss == pytest.approx(small.result.initial_train_loss, abs=1e-5)
    assert small.recorder.start["gradient_accumulation_steps"] == 2
    assert small.result.train_tokens == big.result.train_tokens


# --- Learning-rate schedules and optimizers --------------------------------------------------------------------------

_PEAK = 1e-3


def _cosine(step: int, total: int, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total))


@pytest.mark.parametrize(
    "settings, multipliers",
    [
        ({"scheduler": "step", "lr_step_size": 3, "lr_gamma": 0.5}, [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]),
        ({"scheduler": "constant"}, [1] * 9),
        ({"scheduler": "constant", "warmup_steps": 3}, [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1]),
        ({"scheduler": "linear"}, [1 - step / 9 for step in range(9)]),
        ({"scheduler": "cosine", "min_lr_ratio": 0.1}, [_cosine(step, 9, 0.1) for step in range(9)]),
    ],
    ids=["step", "constant", "constant-warmup", "linear", "cosine"],
)
def test_the_logged_learning_rate_follows_the_schedule(
    samples: dict[str, str], tmp_path: Path, settings: dict[str, Any], multipliers: list[float]
) -> None:
    run = train(samples["prompt_completion.jsonl"], tmp_path / "model", max_steps=9, learning_rate=_PEAK, **settings)
    rates = run.recorder.learning_rates
    assert rates == pytest.approx([_PEAK * multiplier for multiplier in multipliers], rel=1e-9)
    if settings["scheduler"] == "cosine":
        # Decays monotonically towards min_lr_ratio x peak, never below it.
        assert rates == sorted(rates, reverse=True)
        assert _PEAK * 0.1 < rates[-1] < _PEAK * 0.15


@pytest.mark.parametrize(
    "optimizer, class_name, state_key",
    [("sgd", "SGD", "momentum_buffer"), ("adafactor", "Adafactor", "exp_avg_sq_row"), ("adamw", "AdamW", "exp_avg")],
)
def test_each_optimizer_trains_a_tiny_model(
    samples: dict[str, str], tmp_path: Path, optimizer: str, class_name: str, state_key: str
) -> None:
    run = train(
        samples["chat.jsonl"],
        tmp_path / "model",
        optimizer=optimizer,
        max_steps=4,
        learning_rate=0.01,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        checkpoint_every_steps=4,
    )
    assert run.result.steps_completed == 4
    assert all(math.isfinite(loss) for loss in run.recorder.losses)
    assert run.recorder.losses[-1] < run.recorder.losses[0]
    latest = checkpoints.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.step == 4
    state = checkpoints.read_json(latest.path / checkpoints.OPTIMIZER_JSON_NAME)
    assert state["optimizer"] == class_name
    assert any(name == state_key for entry in state["state"] for name, _ in entry["values"])


# --- Early stopping --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric, patience, threshold, steps",
    [("valid_loss", 1, 1e6, 2), ("accuracy", 2, 1e6, 3), ("valid_loss", 1000, 0.0, 6)],
    ids=["loss-patience-1", "accuracy-patience-2", "never"],
)
def test_early_stopping_stops_when_the_metric_stops_improving(
    samples: dict[str, str], tmp_path: Path, metric: str, patience: int, threshold: float, steps: int
) -> None:
    """With a threshold of 1e6 no evaluation counts as an improvement on the first one: training stops after
    ``patience`` more evaluations, and still exports the model."""
    run = train(
        samples["sentiment.csv"],
        tmp_path / "model",
        max_steps=6,
        validation_fraction=0.3,
        eval_every_steps=1,
        early_stopping_metric=metric,
        early_stopping_patience=patience,
        early_stopping_threshold=threshold,
        **_bert(),
    )
    result = run.result
    stopped_early = steps < 6
    assert result.early_stopped is stopped_early and not result.stopped
    assert result.steps_completed == steps and result.total_steps == 6
    assert run.recorder.steps == list(range(1, steps + 1))
    assert len(run.recorder.with_data_key("early_stopping_metric")) == int(stopped_early)
    assert metric in result.final_metrics
    assert result.output_dir == run.config.output_dir
    report = json.loads((Path(run.config.output_dir) / REPORT_FILENAME).read_text())
    assert report["steps_completed"] == steps


# --- Packing ---------------------------------------------------------------------------------------------------------


def _examples(lengths: list[int], seed: int = 0) -> TokenizedSet:
    """Examples of the given lengths whose first third is context (IGNORE_INDEX labels), like a prompt."""
    chooser = random.Random(seed)
    input_ids = [[chooser.randint(1, 99) for _ in range(length)] for length in lengths]
    labels = [[IGNORE_INDEX] * (len(ids) // 3) + ids[len(ids) // 3 :] for ids in input_ids]
    empty = [""] * len(lengths)
    return TokenizedSet(input_ids, labels, None, empty, list(empty), 0)


def _segments(row_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(offset, length) of each run of positions counting up from 0."""
    starts = [index for index, position in enumerate(row_positions.tolist()) if position == 0]
    ends = [*starts[1:], len(row_positions)]
    return [(start, end - start) for start, end in zip(starts, ends, strict=True)]


def test_packing_keeps_examples_whole_and_never_predicts_across_them() -> None:
    chooser = random.Random(3)
    lengths = [chooser.randint(2, 20) for _ in range(300)]
    tokenized = _examples(lengths)
    max_length = 64
    packed = pack(tokenized, max_length=max_length, pad_token_id=0)
    rows = packed.input_ids.shape[0]
    assert packed.input_ids.shape == packed.position_ids.shape == packed.targets.shape == (rows, max_length)

    seen: list[tuple[int, ...]] = []
    for row in range(rows):
        segments = _segments(packed.position_ids[row])
        members = int(packed.examples_per_row[row])
        examples, tail = segments[:members], segments[members:]
        assert len(tail) <= 1
        for offset, length in examples:
            ids = tuple(packed.input_ids[row, offset : offset + length].tolist())
            index = tokenized.input_ids.index(list(ids))
            labels = tokenized.labels[index]
            assert packed.position_ids[row, offset : offset + length].tolist() == list(range(length))
            assert packed.targets[row, offset : offset + length - 1].tolist() == labels[1:]
            # The last token of an example predicts nothing: the next token belongs to another example.
            assert packed.targets[row, offset + length - 1].item() == IGNORE_INDEX
            seen.append(ids)
        for offset, length in tail:
            assert packed.input_ids[row, offset:].eq(0).all() and packed.targets[row, offset:].eq(IGNORE_INDEX).all()
            assert offset + length == max_length
    # Every example exactly once, whole.
    assert sorted(seen) == sorted(tuple(ids) for ids in tokenized.input_ids)
    # First-fit decreasing leaves almost no padding for many short examples.
    total = sum(lengths)
    assert rows <= math.ceil(total / max_length) + 1
    assert 1 - total / (rows * max_length) < 0.03


def test_packed_batches_count_trained_targets_and_useful_tokens_exactly() -> None:
    chooser = random.Random(5)
    lengths = [chooser.randint(2, 30) for _ in range(50)]
    tokenized = _examples(lengths, seed=5)
    source = BatchSource(tokenized, task="causal_lm", batch_size=3, seed=0, packing=True, max_length=64, pad_token_id=0)
    batches = [source.batch(index) for index in range(source.batches_per_epoch)]
    per_example = sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in tokenized.labels)
    assert sum(batch.trained_targets for batch in batches) == trained_target_count(tokenized, "causal_lm")
    assert trained_target_count(tokenized, "causal_lm") == per_example
    # Useful tokens are the examples' tokens: the padding at a row's tail is not counted.
    assert sum(batch.useful_tokens for batch in batches) == sum(lengths)
    # One epoch takes every row once; the order is a pure function of (seed, epoch).
    taken = torch.cat([batch.input_ids for batch in batches])
    assert sorted(map(tuple, taken.tolist())) == sorted(map(tuple, source.packed.input_ids.tolist()))
    again = BatchSource(tokenized, task="causal_lm", batch_size=3, seed=0, packing=True, max_length=64, pad_token_id=0)
    assert torch.equal(again.batch(4).input_ids, batches[4].input_ids)
    assert not torch.equal(source.batch(source.batches_per_epoch).input_ids, batches[0].input_ids)


def test_a_packed_row_computes_each_example_as_if_it_were_alone() -> None:
    """Restarting position ids (and no attention mask) make transformers attend block-diagonally."""
    torch.manual_seed(0)
    model = modeling.build_from_scratch(
        architecture="gpt2", size="tiny", task="causal_lm", vocab_size=100, max_length=32, init="normal",
        eos_token_id=0, pad_token_id=0,
    ).eval()  # fmt: skip
    tokenized = _examples([7, 5, 9, 4], seed=1)
    packed = pack(tokenized, max_length=32, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
        for row in range(packed.input_ids.shape[0]):
            for offset, length in _segments(packed.position_ids[row])[: int(packed.examples_per_row[row])]:
                alone = model(input_ids=packed.input_ids[row : row + 1, offset : offset + length]).logits[0]
                assert torch.allclose(logits[row, offset : offset + length], alone, atol=1e-5)


def test_a_packed_training_run_has_no_target_across_an_example_boundary(samples: dict[str, str]) -> None:
    config = make_config(samples["prompt_completion.jsonl"], "-", max_steps=1)
    torch.manual_seed(0)
    source = _prepare(config, NullCallback(), None).train_source
    assert source.packed is not None and source.row_count < 40
    assert int(source.packed.examples_per_row.sum()) == 40 and int(source.packed.examples_per_row.max()) > 1
    positions, targets = source.packed.position_ids, source.packed.targets
    before_a_start = positions[:, 1:] == 0
    assert targets[:, :-1][before_a_start].eq(IGNORE_INDEX).all()
    assert targets[:, -1].eq(IGNORE_INDEX).all()
    assert sum(source.batch(index).trained_targets for index in range(source.batches_per_epoch)) == (
        trained_target_count(source.tokenized, "causal_lm")
    )


# --- Configuration errors name the field -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, code, param",
    [
        ({"mode": "lora"}, MISSING_REQUIRED_PARAMETER, "base_model"),
        ({"mode": "full"}, MISSING_REQUIRED_PARAMETER, "base_model"),
        ({"base_model": "/models/x"}, INVALID_HYPERPARAMETER, "base_model"),
        ({"architecture": "bert", "task": "causal_lm"}, INVALID_HYPERPARAMETER, "architecture"),
        ({"architecture": "t5", "task": "classification"}, INVALID_HYPERPARAMETER, "architecture"),
        ({"scheduler": "foo"}, INVALID_HYPERPARAMETER, "scheduler"),
        ({"optimizer": "lion"}, INVALID_HYPERPARAMETER, "optimizer"),
        ({"init": "zeros"}, INVALID_HYPERPARAMETER, "init"),
        ({"lr_gamma": 0}, INVALID_HYPERPARAMETER, "lr_gamma"),
        ({"lr_gamma": 1.5}, INVALID_HYPERPARAMETER, "lr_gamma"),
        ({"learning_rate": 2.0}, INVALID_HYPERPARAMETER, "learning_rate"),
        ({"early_stopping_metric": "valid_loss"}, INVALID_HYPERPARAMETER, "early_stopping_metric"),
        ({"early_stopping_metric": "mse", "validation_fraction": 0.1}, INVALID_HYPERPARAMETER, "early_stopping_metric"),
        ({"checkpoint_every_steps": 5}, INVALID_HYPERPARAMETER, "checkpoint_every_steps"),
        ({"max_steps": 2, "warmup_steps": 3}, INVALID_HYPERPARAMETER, "warmup_steps"),
        ({"validation_fraction": 0.6}, INVALID_HYPERPARAMETER, "validation_fraction"),
        ({"max_steps": 3.0}, INVALID_HYPERPARAMETER, "max_steps"),
        ({"packing": "yes"}, INVALID_HYPERPARAMETER, "packing"),
        ({"device": "tpu"}, INVALID_HYPERPARAMETER, "device"),
        ({"epochs": 3}, INVALID_HYPERPARAMETER, "epochs"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(TrainingDataError) as raised:
        TrainingConfig.from_dict({"train_file": "train.jsonl", "output_dir": "out", **overrides})
    assert (raised.value.code, raised.value.param) == (code, param), raised.value.message


def test_a_config_without_a_train_file_names_it() -> None:
    with pytest.raises(TrainingDataError) as raised:
        TrainingConfig.from_dict({"output_dir": "out"})
    assert (raised.value.code, raised.value.param) == (MISSING_REQUIRED_PARAMETER, "train_file")


def _one_label_file(folder: Path) -> str:
    path = folder / "one-label.csv"
    path.write_text("text,label\n" + "".join(f"review number {index},positive\n" for index in range(10)))
    return str(path)


@pytest.mark.parametrize(
    "file, overrides, code, param",
    [
        ("sentiment.csv", {"task": "classification", "precision": "fp16"}, INVALID_HYPERPARAMETER, "precision"),
        ("sentiment.csv", {"task": "seq2seq", "architecture": "t5"}, WRONG_TASK, "training_file"),
        ("corpus.txt", {"task": "classification"}, WRONG_TASK, "training_file"),
        ("sentiment.csv", {"task": "classification", "max_steps": 0, "warmup_steps": 100}, INVALID_HYPERPARAMETER,
         "warmup_steps"),
        ("sentiment.csv", {"task": "classification", "validation_fraction": 0.2, "eval_every_steps": 1,
                           "early_stopping_metric": "bleu"}, INVALID_HYPERPARAMETER, "early_stopping_metric"),
        ("one-label", {"task": "classification"}, "too_few_labels", "training_file"),
    ],
    ids=["fp16-on-cpu", "seq2seq-on-labels", "classification-on-text", "warmup-beyond-epoch", "metric-not-measured",
         "one-label"],
)  # fmt: skip
def test_run_errors_name_the_field(
    samples: dict[str, str], tmp_path: Path, file: str, overrides: dict[str, Any], code: str, param: str
) -> None:
    train_file = _one_label_file(tmp_path) if file == "one-label" else samples[file]
    with pytest.raises(TrainingDataError) as raised:
        run_training(make_config(train_file, tmp_path / "model", **overrides), Recorder())
    assert (raised.value.code, raised.value.param) == (code, param), raised.value.message
    assert not (tmp_path / "model").exists()


def test_qlora_without_a_cuda_gpu_is_a_clear_error(samples: dict[str, str], tmp_path: Path) -> None:
    config = make_config(samples["chat.jsonl"], tmp_path / "model", mode="qlora", base_model=str(tmp_path))
    with pytest.raises(TrainingDataError) as raised:
        run_training(config, Recorder())
    assert (raised.value.code, raised.value.param) == (modeling.QLORA_UNAVAILABLE, "mode")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_one_names_the_device(samples: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError) as raised:
        run_training(make_config(samples["chat.jsonl"], tmp_path / "model", device="cuda"), Recorder())
    assert raised.value.param == "device"


# --- The command line ------------------------------------------------------------------------------------------------


def test_the_command_line_prints_json_lines_ending_with_the_result(samples: dict[str, str], tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config = {
        "train_file": samples["sentiment.csv"],
        "output_dir": str(tmp_path / "model"),
        **_bert(),
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 64,
        "device": "cpu",
        "log_every_steps": 1,
    }
    config_file.write_text(json.dumps(config))
    completed = subprocess.run(
        [sys.executable, "-m", "workers.ml.train", str(config_file)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["type"] for line in lines if line["type"] == "metrics"] == ["metrics", "metrics"]
    result = lines[-1]
    assert result["type"] == "result"
    assert result["steps_completed"] == 2 and result["early_stopped"] is False and result["stopped"] is False
    assert result["output_dir"] == str(tmp_path / "model")
    assert (tmp_path / "model" / REPORT_FILENAME).is_file()
    assert all(line["type"] in ("message", "metrics") for line in lines[:-1])


def test_the_command_line_reports_a_bad_config_as_one_error_line(
    samples: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process (the same `main` as `python -m workers.ml.train`): a second interpreter would only cost seconds.
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps({"train_file": samples["sentiment.csv"], "output_dir": "out", "scheduler": "foo"})
    )
    assert train_main([str(config_file)]) == 1
    (error,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert error["type"] == "message" and error["level"] == "error"
    assert error["data"]["code"] == INVALID_HYPERPARAMETER and error["data"]["param"] == "scheduler"


# --- The real offline models (slow) ----------------------------------------------------------------------------------

_SMOLLM2 = "smollm2-135m-instruct"
_MINILM = "minilm-l6-v2"


@pytest.fixture(scope="module")
def offline_models() -> dict[str, str]:
    # Idempotent: converted once into the shared cache, found there afterwards (a fresh clone converts here).
    return {model_id: str(prepare_offline_model(model_id, MODEL_CACHE_DIR)) for model_id in (_SMOLLM2, _MINILM)}


@pytest.mark.slow
def test_lora_on_smollm2_trains_adapters_only_and_exports_both_ways(
    offline_models: dict[str, str], samples: dict[str, str], tmp_path: Path
) -> None:
    settings = {"mode": "lora", "base_model": offline_models[_SMOLLM2], "max_steps": 3, "batch_size": 2}
    adapter = train(samples["chat.jsonl"], tmp_path / "adapter", lora_export="adapter", **settings)
    result = adapter.result
    assert result.steps_completed == 3 and all(math.isfinite(loss) for loss in adapter.recorder.losses)
    assert 0 < result.trainable_parameters < result.num_parameters / 50
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", modeling.ADAPTER_MARKER, REPORT_FILENAME} <= files
    assert "model.safetensors" not in files
    assert not [name for name in files if name.endswith(_PICKLE_SUFFIXES)]

    merged = train(samples["chat.jsonl"], tmp_path / "merged", lora_export="merged", **settings)
    assert merged.recorder.losses == pytest.approx(adapter.recorder.losses, abs=1e-5)
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert "adapter_config.json" not in files and not [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", **_LOAD).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged", **_LOAD)
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        logits = model(**tokenizer("The opposite of hot is", return_tensors="pt")).logits
    assert logits.shape[-1] >= len(tokenizer) - 1 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_full_fine_tuning_of_minilm_exports_a_labelled_classifier(
    offline_models: dict[str, str], samples: dict[str, str], tmp_path: Path
) -> None:
    run = train(
        samples["sentiment.csv"],
        tmp_path / "model",
        task="classification",
        mode="full",
        base_model=offline_models[_MINILM],
        max_steps=3,
    )
    assert run.result.steps_completed == 3 and all(math.isfinite(loss) for loss in run.recorder.losses)
    assert run.result.trainable_parameters == run.result.num_parameters > 10_000_000
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", **_LOAD).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model", **_LOAD)
    assert model.config.id2label == dict(enumerate(_LABELS))
    with torch.no_grad():
        logits = model(**tokenizer(["The film was wonderful."], return_tensors="pt")).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


# --- Compiling on a CPU -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_cpu_run_trains_like_the_eager_one(samples: dict[str, str], tmp_path: Path) -> None:
    """compile "on" on a CPU: the packed-row body compiled (blocked attention), the loss's chunks compiled. Without
    dropout (the compiled code draws its masks another way) the losses follow the eager run's to float rounding."""
    with dropout_free_models():
        eager, compiled = (
            train(samples["corpus.txt"], tmp_path / name, max_steps=4, compile=name, precision="fp32")
            for name in ("off", "on")
        )
    assert (eager.recorder.start["compiled"], compiled.recorder.start["compiled"]) == (False, True)
    assert len(compiled.recorder.losses) == 4
    assert compiled.recorder.losses == pytest.approx(eager.recorder.losses, rel=1e-3)
    assert compiled.recorder.losses[-1] < compiled.recorder.losses[0]


@pytest.mark.parametrize(
    ("device", "mode", "packed", "steps_left", "compiler", "wanted"),
    [
        ("cuda", "lora", True, 10, False, True),  # packed rows on a GPU: always
        ("cuda", "from_scratch", False, 10_000, True, False),  # padded batches: a new shape per batch, never
        ("cpu", "from_scratch", True, 10_000, True, True),  # a long packed run on a CPU with a compiler
        ("cpu", "from_scratch", True, 50, True, False),  # too short to win the compile time back
        ("cpu", "from_scratch", True, 10_000, False, False),  # the CPU kernels cannot be built here
        ("cpu", "lora", True, 10_000, True, False),  # a catalog model compiles for minutes on a CPU
    ],
)
def test_auto_compiles_where_it_pays(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    mode: str,
    packed: bool,
    steps_left: int,
    compiler: bool,
    wanted: bool,
) -> None:
    monkeypatch.setattr(engine, "cpu_compile_works", lambda: compiler)
    fine_tuning = {} if mode == "from_scratch" else {"base_model": "unused-base"}
    config = make_config("unused.txt", "unused", compile="auto", mode=mode, **fine_tuning)
    assert engine._compile_wanted(config, torch.device(device), packed=packed, steps_left=steps_left) is wanted
    for forced, expected in (("on", True), ("off", False)):
        forced_config = make_config("unused.txt", "unused", compile=forced)
        assert engine._compile_wanted(forced_config, torch.device(device), packed=packed, steps_left=1) is expected


@pytest.mark.parametrize(
    ("device", "compile_setting", "logits_left", "compiler", "wanted"),
    [
        ("cpu", "auto", 4e9, True, True),  # LoRA on SmolLM2 for 40 steps of 8 x 256 tokens
        ("cpu", "auto", 1e8, True, False),  # a tiny model's short run: compiling would cost more than it saves
        ("cpu", "auto", 4e9, False, False),  # the CPU kernels cannot be built here
        ("cpu", "off", 4e9, True, False),  # off compiles nothing
        ("cuda", "auto", 1, True, False),  # CUDA compiles the loss's chunks anyway, whatever this says
    ],
)
def test_an_eager_cpu_run_compiles_its_loss_where_that_pays(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    compile_setting: str,
    logits_left: float,
    compiler: bool,
    wanted: bool,
) -> None:
    monkeypatch.setattr(engine, "cpu_compile_works", lambda: compiler)
    config = make_config("unused.txt", "unused", compile=compile_setting, mode="lora", base_model="unused-base")
    assert engine._loss_compile_wanted(config, torch.device(device), logits_left=int(logits_left)) is wanted


@pytest.mark.parametrize(
    ("device", "compile_setting", "variable", "cuda_graphs"),
    [
        ("cuda", "auto", None, True),  # a compiled packed GPT-2 body on a GPU replays as CUDA graphs
        ("cuda", "auto", "0", False),  # unless the environment says no (benchmarks measure both)
        ("cuda", "off", None, False),  # nothing compiled, nothing recorded
        ("cpu", "on", None, False),  # no CUDA graphs on a CPU
    ],
)
def test_a_compiled_packed_body_runs_as_cuda_graphs_on_a_gpu(
    samples: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    compile_setting: str,
    variable: str | None,
    cuda_graphs: bool,
) -> None:
    """The decision alone (torch.compile wraps lazily: nothing is compiled or sent to a device here); the CUDA
    tests of tests/workers/ml/test_cuda_graphs.py train with it."""
    if variable is None:
        monkeypatch.delenv(engine.CUDA_GRAPHS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(engine.CUDA_GRAPHS_VARIABLE, variable)
    config = make_config(samples["corpus.txt"], tmp_path / "model", compile=compile_setting, max_length=64)
    torch.manual_seed(config.seed)
    setup = _prepare(config, NullCallback(), None)
    _, packed_forward, _, _ = engine._maybe_compile(
        setup.model, config, torch.device(device), packed=True, steps_left=1_000, rows_per_step=256
    )
    assert packed_forward is not None
    assert packed_forward.cuda_graphs is cuda_graphs
    assert engine._keeps_gradient_buffers(cuda_graphs, 2) is cuda_graphs
    assert engine._keeps_gradient_buffers(cuda_graphs, 1) is False


def test_gradient_buffers_kept_through_the_run_train_like_gradients_dropped_after_each_step(
    samples: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run with CUDA graphs and gradient accumulation does to its gradients (buffers allocated once, zeroed in
    place, every micro-batch adding into them), here on a CPU: the same losses, bit for bit, as gradients created by
    the first micro-batch of each step and dropped after it."""
    common = {"max_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2, "precision": "fp32"}
    with dropout_free_models():
        dropped = train(samples["corpus.txt"], tmp_path / "dropped", **common)
        monkeypatch.setattr(engine, "_keeps_gradient_buffers", lambda cuda_graphs, accumulation: True)
        kept = train(samples["corpus.txt"], tmp_path / "kept", **common)
    assert len(kept.recorder.losses) == 4
    assert kept.recorder.losses == dropped.recorder.losses
    assert kept.recorder.losses[-1] < kept.recorder.losses[0]


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_run_with_an_eager_model_and_a_compiled_loss_trains_like_the_eager_one(
    samples: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a long LoRA run on a CPU gets under compile "auto": the model eager, the loss's chunks compiled."""
    with dropout_free_models():
        eager = train(samples["corpus.txt"], tmp_path / "eager", max_steps=4, compile="off", precision="fp32")
        monkeypatch.setattr(engine, "_CPU_LOSS_COMPILE_MIN_LOGITS", 0)
        loss_only = train(samples["corpus.txt"], tmp_path / "loss", max_steps=4, compile="auto", precision="fp32")
    assert (eager.recorder.start["compiled_loss"], loss_only.recorder.start["compiled_loss"]) == (False, True)
    assert loss_only.recorder.start["compiled"] is False
    assert loss_only.recorder.losses == pytest.approx(eager.recorder.losses, rel=1e-4)


def test_a_machine_whose_compiler_fails_is_found_out_before_a_run_compiles() -> None:
    """A compiler that is there but cannot build (here: /bin/false) makes the probe say no, so auto keeps the run
    eager instead of failing at its first step."""
    import torch._inductor.config as inductor_config

    # The config's own patch, not monkeypatch: monkeypatch undoes a torch config value by deleting it, which leaves
    # the setting hidden, and every later compile in the process fails on it. fx_graph_cache off: a kernel cached
    # earlier would hide the failure, and so would dynamo's own cache of a probe that ran earlier in this process.
    engine.cpu_compile_works.cache_clear()
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.cxx": (None, "/bin/false"), "fx_graph_cache": False}):
            assert engine.cpu_compile_works() is False
    finally:
        engine.cpu_compile_works.cache_clear()
        torch._dynamo.reset()
