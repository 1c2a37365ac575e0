"""A held-out validation loss, from a validation file or a seeded share of the training data: real tokenizer, real
model, real files; no Django."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.workers.ml.test_train import RecordingCallback, write_training_corpus
from tests.workers.ml.test_train_sft import _MODEL, write_chat_jsonl, write_prompt_completion_jsonl
from workers.ml.config import FromScratchCausalLMConfig
from workers.ml.data.examples import Example
from workers.ml.data.formats import iter_examples
from workers.ml.data.split import split_indices
from workers.ml.data.templates import IGNORE_INDEX, tokenize_batch
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import END_OF_TEXT, train_byte_level_bpe
from workers.ml.train import MAX_VALIDATION_ROWS, TrainingResult, build_training_data, train_causal_lm_from_scratch

# A word no training document holds: if the tokenizer had been trained on held-out text, this frequent a word would
# have become one token of its vocabulary.
HELD_OUT_WORD = "zorblaxquiv"
_HELD_OUT_SENTENCE = f" The {HELD_OUT_WORD} meets the {HELD_OUT_WORD} and the {HELD_OUT_WORD}."
_TRAINING_METRICS_KEYS = {"step", "total_steps", "train_loss", "learning_rate", "tokens_per_second", "epoch"}
_VALIDATION_METRICS_KEYS = _TRAINING_METRICS_KEYS | {"valid_loss", "valid_perplexity"}


@dataclasses.dataclass(frozen=True)
class Run:
    config: FromScratchCausalLMConfig
    result: TrainingResult
    callback: RecordingCallback

    @property
    def valid_losses(self) -> list[tuple[int, float]]:
        return [(data["step"], data["valid_loss"]) for data in self.callback.metrics if "valid_loss" in data]


def _train(config: FromScratchCausalLMConfig) -> Run:
    callback = RecordingCallback()
    return Run(config, train_causal_lm_from_scratch(config, callback), callback)


def _documents(path: Path) -> list[str]:
    return [document for document in path.read_text(encoding="utf-8").split("\n\n") if document.strip()]


def _is_one_token(tokenizer, word: str) -> bool:
    return len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1


# --- Plain text with a held-out fraction -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_corpus(tmp_path_factory.mktemp("plain") / "corpus.txt")


@pytest.fixture(scope="module")
def marked_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The usual corpus, with HELD_OUT_WORD written many times into the documents seed 0 holds out, and only there."""
    path = write_training_corpus(tmp_path_factory.mktemp("marked") / "corpus.txt")
    documents = _documents(path)
    _, held_out = split_indices(len(documents), validation_fraction=0.2, seed=0, stratify=False)
    for index in held_out:
        documents[index] += _HELD_OUT_SENTENCE * 3
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_config(plain_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> FromScratchCausalLMConfig:
    return FromScratchCausalLMConfig(
        train_file=str(plain_corpus),
        output_dir=str(tmp_path_factory.mktemp("runs") / "model"),
        validation_fraction=0.2,
        eval_every_steps=10,
    )


@pytest.fixture(scope="module")
def text_run(text_config: FromScratchCausalLMConfig) -> Run:
    return _train(text_config)


def test_metrics_on_evaluation_steps_carry_the_validation_loss(text_run: Run) -> None:
    config = text_run.config
    metrics = text_run.callback.metrics
    # Evaluations every 10 steps fall on log points, so the metrics events are the same as without validation.
    assert [data["step"] for data in metrics] == list(range(5, 61, 5))
    for data in metrics:
        evaluated = data["step"] % config.eval_every_steps == 0
        assert set(data) == (_VALIDATION_METRICS_KEYS if evaluated else _TRAINING_METRICS_KEYS)
        if evaluated:
            assert data["valid_perplexity"] == pytest.approx(math.exp(data["valid_loss"]))
    assert "valid_loss" in metrics[-1]
    assert math.isfinite(text_run.result.final_valid_loss)
    assert text_run.result.final_valid_loss == metrics[-1]["valid_loss"]


def test_the_validation_loss_falls_on_a_learnable_corpus(text_run: Run) -> None:
    losses = [loss for _, loss in text_run.valid_losses]
    assert len(losses) == 6
    # A random model starts near ln(512) = 6.2; the held-out sentences are made of the same words.
    assert losses[-1] < losses[0] - 1.5
    assert losses[-1] < 3.5


def test_each_evaluation_is_also_a_message(text_run: Run) -> None:
    messages = [event for event in text_run.callback.events if event.type == "message"]
    start, *evaluations, end = messages
    assert "validation loss is measured on" in start.message
    assert start.data["validation_rows"] > 0 and start.data["validation_examples"] == 16
    assert [event.message for event in evaluations] == [
        f"Validation loss at step {step}: {loss:.4f}" for step, loss in text_run.valid_losses
    ]
    assert f"validation loss of {text_run.result.final_valid_loss:.4f}" in end.message


def test_the_tokenizer_never_sees_held_out_text(text_config: FromScratchCausalLMConfig, marked_corpus: Path) -> None:
    """The word is only in the documents the split holds out: they reach the validation rows, never the tokenizer
    (the one `build_training_data` trains is the one a run saves) or the training rows."""
    train, validation = build_training_data(dataclasses.replace(text_config, train_file=str(marked_corpus)))
    assert validation is not None
    assert train.stats.examples == 64 and validation.stats.examples == 16
    tokenizer = train.tokenizer
    assert not _is_one_token(tokenizer, HELD_OUT_WORD)
    assert HELD_OUT_WORD not in tokenizer.decode(train.input_ids.flatten())
    assert HELD_OUT_WORD in tokenizer.decode(validation.input_ids.flatten())
    # The control: trained on every document, the same tokenizer learns the word as one token.
    everything = train_byte_level_bpe(
        _documents(marked_corpus), vocab_size=text_config.vocab_size, special_tokens=(END_OF_TEXT,)
    )
    assert _is_one_token(everything, HELD_OUT_WORD)


def test_validation_rows_are_packed_like_training_rows(text_config: FromScratchCausalLMConfig) -> None:
    train, validation = build_training_data(text_config)
    assert validation is not None
    # Packed like the training rows: plain text trains every position.
    assert validation.labels is validation.input_ids
    assert validation.input_ids.shape[1] == text_config.context_length + 1
    assert validation.stats.masked_tokens == 0


def test_the_split_is_seeded(text_run: Run, tmp_path: Path) -> None:
    again = _train(dataclasses.replace(text_run.config, output_dir=str(tmp_path / "again")))
    assert again.valid_losses == text_run.valid_losses

    def held_out_text(seed: int) -> str:
        config = dataclasses.replace(text_run.config, seed=seed)
        train, validation = build_training_data(config)
        return train.tokenizer.decode(validation.input_ids.flatten())

    assert held_out_text(0) == held_out_text(0)
    assert held_out_text(1) != held_out_text(0)


# --- Plain text with a validation file -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_run(plain_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    config = FromScratchCausalLMConfig(
        train_file=str(plain_corpus), output_dir=str(tmp_path_factory.mktemp("plain-run") / "model"), max_steps=20
    )
    return _train(config)


@pytest.fixture(scope="module")
def validation_file_run(plain_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("validation-file")
    validation_file = write_training_corpus(folder / "upload-2", paragraphs=20, seed=99)
    with validation_file.open("a", encoding="utf-8") as file:
        file.write("\n" + _HELD_OUT_SENTENCE * 40 + "\n")
    config = dataclasses.replace(
        plain_run.config,
        output_dir=str(folder / "model"),
        validation_file=str(validation_file),
        validation_filename="held-out.txt",
    )
    return _train(config)


def test_without_validation_nothing_changes(plain_run: Run) -> None:
    assert plain_run.result.final_valid_loss is None
    assert all(set(data) == _TRAINING_METRICS_KEYS for data in plain_run.callback.metrics)
    assert [event.type for event in plain_run.callback.events].count("message") == 2


def test_a_validation_file_is_measured_at_the_end_only_by_default(validation_file_run: Run) -> None:
    assert validation_file_run.config.eval_every_steps == 0
    metrics = validation_file_run.callback.metrics
    assert [data["step"] for data in metrics] == [5, 10, 15, 20]
    assert [set(data) for data in metrics] == [_TRAINING_METRICS_KEYS] * 3 + [_VALIDATION_METRICS_KEYS]
    assert validation_file_run.valid_losses == [(20, validation_file_run.result.final_valid_loss)]
    assert math.isfinite(validation_file_run.result.final_valid_loss)


def test_the_tokenizer_never_sees_the_validation_file(validation_file_run: Run) -> None:
    saved = AutoTokenizer.from_pretrained(validation_file_run.result.output_dir, local_files_only=True)
    assert not _is_one_token(saved, HELD_OUT_WORD)


def test_evaluating_does_not_change_training(plain_run: Run, validation_file_run: Run) -> None:
    """The same training file and seed: evaluating (eval mode, no grad, back to train mode) leaves the training
    losses bit for bit what they are without validation."""
    assert [data["train_loss"] for data in validation_file_run.callback.metrics] == [
        data["train_loss"] for data in plain_run.callback.metrics
    ]
    assert validation_file_run.result.initial_train_loss == plain_run.result.initial_train_loss


def test_evaluations_between_log_points_get_their_own_metrics_event(plain_run: Run, tmp_path: Path) -> None:
    config = dataclasses.replace(
        plain_run.config, output_dir=str(tmp_path / "model"), validation_fraction=0.2, eval_every_steps=7
    )
    run = _train(config)
    assert [data["step"] for data in run.callback.metrics] == [5, 7, 10, 14, 15, 20]
    assert [step for step, _ in run.valid_losses] == [7, 14, 20]


def test_a_stopped_run_measures_where_it_stopped(plain_run: Run, tmp_path: Path) -> None:
    config = dataclasses.replace(plain_run.config, output_dir=str(tmp_path / "model"), validation_fraction=0.2)
    callback = RecordingCallback(stop_after_polls=7)
    result = train_causal_lm_from_scratch(config, callback)
    assert result.stopped and result.steps_completed == 7
    assert [data["step"] for data in callback.metrics] == [5, 7]
    assert "valid_loss" in callback.metrics[-1]
    assert result.final_valid_loss == callback.metrics[-1]["valid_loss"]

    nothing_run = train_causal_lm_from_scratch(
        dataclasses.replace(config, output_dir=str(tmp_path / "none")), RecordingCallback(stop_after_polls=0)
    )
    assert nothing_run.steps_completed == 0 and math.isnan(nothing_run.final_valid_loss)


# --- Chat examples ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_config(tmp_path_factory: pytest.TempPathFactory) -> FromScratchCausalLMConfig:
    folder = tmp_path_factory.mktemp("chat")
    return FromScratchCausalLMConfig(
        train_file=str(write_chat_jsonl(folder / "train.txt")),
        train_filename="market-chats.jsonl",
        validation_file=str(write_chat_jsonl(folder / "valid.txt", rows=20, seed=17)),
        validation_filename="market-chats-valid.jsonl",
        output_dir=str(folder / "model"),
        max_steps=30,
        log_every_steps=10,
        eval_every_steps=10,
        **_MODEL,
    )


def test_chat_training_reports_a_validation_loss(chat_config: FromScratchCausalLMConfig) -> None:
    run = _train(chat_config)
    assert [step for step, _ in run.valid_losses] == [10, 20, 30]
    losses = [loss for _, loss in run.valid_losses]
    assert losses[-1] < losses[0]
    assert run.result.final_valid_loss == losses[-1]
    for data in run.callback.metrics:
        assert 0 < data["trained_tokens_fraction"] < 1


def test_chat_validation_rows_are_masked_like_the_training_rows(chat_config: FromScratchCausalLMConfig) -> None:
    train, validation = build_training_data(chat_config)
    assert validation is not None
    assert validation.stats.task == train.stats.task == "chat"
    assert validation.stats.examples == 20 and train.stats.examples == 60
    assert 0 < validation.stats.trained_tokens_fraction < 1
    assert validation.stats.trained_tokens == int((validation.labels[:, 1:] != IGNORE_INDEX).sum())

    # Exactly tokenize_batch's labels for the validation examples, with the tokenizer trained on the training file,
    # packed end to end; only rows with a trained target are kept.
    row_length = chat_config.context_length + 1
    examples = [
        item
        for item in iter_examples(chat_config.validation_file, filename=chat_config.validation_filename)
        if isinstance(item, Example)
    ]
    expected = tokenize_batch(
        examples, train.tokenizer, template=chat_config.chat_template, train_on="completions", max_length=row_length
    )
    ids = torch.tensor([token for item in expected for token in item.input_ids])
    labels = torch.tensor([label for item in expected for label in item.labels])
    rows = ids.numel() // row_length
    packed_ids = ids[: rows * row_length].view(rows, row_length)
    packed_labels = labels[: rows * row_length].view(rows, row_length)
    trainable = (packed_labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    assert torch.equal(validation.input_ids, packed_ids[trainable][:MAX_VALIDATION_ROWS])
    assert torch.equal(validation.labels, packed_labels[trainable][:MAX_VALIDATION_ROWS])


def test_a_held_out_share_of_chat_examples(chat_config: FromScratchCausalLMConfig) -> None:
    config = dataclasses.replace(chat_config, validation_file=None, validation_filename=None, validation_fraction=0.25)
    train, validation = build_training_data(config)
    assert train.stats.examples == 45 and validation.stats.examples == 15
    assert 0 < validation.stats.trained_tokens_fraction < 1


def test_the_tokenized_cache_knows_the_split(chat_config: FromScratchCausalLMConfig, tmp_path: Path) -> None:
    cached = dataclasses.replace(
        chat_config, validation_file=None, validation_filename=None, tokenized_cache_dir=str(tmp_path / "cache")
    )
    keys = {
        build_training_data(dataclasses.replace(cached, validation_fraction=fraction, seed=seed)).train.stats.cache_key
        for fraction, seed in [(0.0, 0), (0.25, 0), (0.25, 1)]
    }
    assert len(keys) == 3


# --- Errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"validation_file": "valid.txt", "validation_fraction": 0.1}, "validation_fraction"),
        ({"validation_fraction": 0.9}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"validation_fraction": float("nan")}, "validation_fraction"),
        ({"validation_fraction": "0.1"}, "validation_fraction"),
        ({"validation_file": " "}, "validation_file"),
        ({"validation_filename": "valid.jsonl"}, "validation_filename"),
        ({"eval_every_steps": -1}, "eval_every_steps"),
        ({"eval_every_steps": 2.0}, "eval_every_steps"),
    ],
)
def test_validation_settings_are_checked(overrides: dict, param: str) -> None:
    with pytest.raises(TrainingDataError) as raised:
        FromScratchCausalLMConfig.from_dict({"train_file": "corpus.txt", "output_dir": "out", **overrides})
    assert raised.value.code == "invalid_hyperparameter" and raised.value.param == param


def test_validation_settings_round_trip() -> None:
    defaults = FromScratchCausalLMConfig(train_file="f", output_dir="out")
    assert (defaults.validation_file, defaults.validation_filename) == (None, None)
    assert (defaults.validation_fraction, defaults.eval_every_steps) == (0.0, 0)
    config = FromScratchCausalLMConfig.from_dict(
        {"train_file": "f", "output_dir": "out", "validation_fraction": 0, "eval_every_steps": 10}
    )
    assert isinstance(config.validation_fraction, float)
    with_file = FromScratchCausalLMConfig.from_dict(
        {"train_file": "f", "output_dir": "o", "validation_file": "v", "validation_filename": "v.jsonl"}
    )
    assert FromScratchCausalLMConfig.from_dict(with_file.to_dict()) == with_file


@pytest.mark.parametrize(
    ("filename", "content"),
    [("valid.txt", ""), ("valid.txt", "  \n\n\t\n"), ("valid.jsonl", ""), ("valid.txt", "Too short.")],
)
def test_too_little_validation_data_names_the_file(
    plain_corpus: Path, tmp_path: Path, filename: str, content: str
) -> None:
    validation_file = tmp_path / "upload"
    validation_file.write_text(content, encoding="utf-8")
    train_file, train_filename = plain_corpus, "corpus.txt"
    if filename.endswith(".jsonl"):
        train_file, train_filename = write_chat_jsonl(tmp_path / "train"), "chats.jsonl"
    config = FromScratchCausalLMConfig(
        train_file=str(train_file),
        train_filename=train_filename,
        validation_file=str(validation_file),
        validation_filename=filename,
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "too_little_validation_data" and raised.value.param == "validation_file"
    assert not (tmp_path / "out").exists()


def test_too_little_held_out_data_names_the_fraction(tmp_path: Path) -> None:
    # One line in one document: nothing can be held out, by documents or by lines.
    train_file = tmp_path / "one.txt"
    train_file.write_text("A single long paragraph about boats and harbours. " * 200, encoding="utf-8")
    config = FromScratchCausalLMConfig(train_file=str(train_file), output_dir="out", validation_fraction=0.2)
    with pytest.raises(TrainingDataError) as raised:
        build_training_data(config)
    assert raised.value.code == "too_little_validation_data" and raised.value.param == "validation_fraction"
    assert "lines" in raised.value.message

    # Held-out documents too short for one row of context_length + 1 tokens.
    train_file.write_text("\n\n".join(["Short one."] * 9 + ["A long paragraph. " * 200]), encoding="utf-8")
    with pytest.raises(TrainingDataError) as raised:
        build_training_data(dataclasses.replace(config, validation_fraction=0.1, seed=3))
    assert raised.value.code == "too_little_validation_data" and raised.value.param == "validation_fraction"
    assert re.search(r"fewer than the \d+ one validation row needs", raised.value.message)


@pytest.mark.parametrize(
    ("train_filename", "validation_filename"),
    [("corpus.txt", "valid.jsonl"), ("chats.jsonl", "valid.txt"), ("chats.jsonl", "sales.jsonl")],
)
def test_validation_data_of_another_kind_is_a_user_error(
    tmp_path: Path, train_filename: str, validation_filename: str
) -> None:
    chats = write_chat_jsonl(tmp_path / "chats")
    sales = write_prompt_completion_jsonl(tmp_path / "sales")
    files = {"corpus.txt": chats, "chats.jsonl": chats, "valid.jsonl": chats, "valid.txt": chats, "sales.jsonl": sales}
    config = FromScratchCausalLMConfig(
        train_file=str(files[train_filename]),
        train_filename=train_filename,
        validation_file=str(files[validation_filename]),
        validation_filename=validation_filename,
        output_dir="out",
    )
    with pytest.raises(TrainingDataError) as raised:
        build_training_data(config)
    assert raised.value.code == "validation_file_mismatch" and raised.value.param == "validation_file"
    assert "same kind" in raised.value.message


def test_a_file_of_lines_without_blank_lines_holds_out_lines(tmp_path: Path) -> None:
    """A sentence-per-line corpus is one document; the held-out share is then taken by lines, seeded."""
    from tests.corpus import english_corpus

    train_file = tmp_path / "lines.txt"
    train_file.write_text(english_corpus(400), encoding="utf-8")
    config = FromScratchCausalLMConfig(
        train_file=str(train_file), output_dir=str(tmp_path / "out"), validation_fraction=0.2, max_steps=10
    )
    first = build_training_data(config)
    again = build_training_data(config)
    assert first.validation is not None and first.validation.input_ids.numel() > 0
    assert torch.equal(first.validation.input_ids, again.validation.input_ids)
    other_seed = build_training_data(dataclasses.replace(config, seed=1))
    assert not torch.equal(first.validation.input_ids, other_seed.validation.input_ids)
