"""Training from scratch on chat and prompt/completion examples: the labels the loss sees are the preview's.

Real tokenizer, real model, real files; no Django. The platform stores uploads under a name of its own
(``train.txt``), so these tests pass the original name in ``train_filename`` the way a job does.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from workers.ml import train as train_module
from workers.ml.config import FromScratchCausalLMConfig
from workers.ml.data import templates
from workers.ml.data.examples import DatasetTask, Example
from workers.ml.data.formats import iter_examples
from workers.ml.data.templates import IGNORE_INDEX, preview_examples, tokenize_batch
from workers.ml.data.tokenized_cache import cache_hit
from workers.ml.errors import TrainingDataError
from workers.ml.generate import GenerationResult, generate_text
from workers.ml.train import TrainingResult, build_training_rows, next_token_loss, train_causal_lm_from_scratch

_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "grapes", "cherries"]

# Small enough to train in about a second on two CPU cores, big enough for the loss to fall clearly.
_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "context_length": 96, "batch_size": 8, "vocab_size": 400}


def _chat_row(chooser: random.Random, *, assistant_weight: int | None = None) -> dict:
    name, fruit = chooser.choice(_NAMES), chooser.choice(_FRUITS)
    count = chooser.randint(2, 30)

    def assistant(content: str) -> dict:
        message = {"role": "assistant", "content": content}
        if assistant_weight is not None:
            message["weight"] = assistant_weight
        return message

    return {
        "messages": [
            {"role": "system", "content": "You count fruit for the market stall."},
            {"role": "user", "content": f"{name} bought {count} {fruit}. How many is that?"},
            assistant(f"{name} has {count} {fruit}."),
            {"role": "user", "content": "And if they buy the same again?"},
            assistant(f"Then {name} has {2 * count} {fruit}."),
        ]
    }


def write_chat_jsonl(path: Path, *, rows: int = 60, seed: int = 3, assistant_weight: int | None = None) -> Path:
    chooser = random.Random(seed)
    lines = [json.dumps(_chat_row(chooser, assistant_weight=assistant_weight)) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_prompt_completion_jsonl(path: Path, *, rows: int = 80, seed: int = 5) -> Path:
    chooser = random.Random(seed)
    lines = []
    for _ in range(rows):
        name, fruit, count = chooser.choice(_NAMES), chooser.choice(_FRUITS), chooser.randint(2, 30)
        lines.append(json.dumps({"prompt": f"{name} sells {fruit}: ", "completion": f"{count} {fruit} a day."}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _examples(config: FromScratchCausalLMConfig) -> list[Example]:
    assert config.train_filename is not None
    items = iter_examples(config.train_file, filename=config.train_filename)
    return [item for item in items if isinstance(item, Example)]


class RecordingCallback:
    def __init__(self) -> None:
        self.events = []

    def on_event(self, event) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Run:
    config: FromScratchCausalLMConfig
    result: TrainingResult
    callback: RecordingCallback


@pytest.fixture(scope="module")
def chat_config(tmp_path_factory: pytest.TempPathFactory) -> FromScratchCausalLMConfig:
    folder = tmp_path_factory.mktemp("chat")
    train_file = write_chat_jsonl(folder / "train.txt")
    return FromScratchCausalLMConfig(
        train_file=str(train_file),
        train_filename="market-chats.jsonl",
        output_dir=str(folder / "model"),
        max_steps=40,
        log_every_steps=10,
        **_MODEL,
    )


@pytest.fixture(scope="module")
def chat_run(chat_config: FromScratchCausalLMConfig) -> Run:
    callback = RecordingCallback()
    return Run(chat_config, train_causal_lm_from_scratch(chat_config, callback), callback)


@pytest.fixture(scope="module")
def prompt_completion_config(tmp_path_factory: pytest.TempPathFactory) -> FromScratchCausalLMConfig:
    folder = tmp_path_factory.mktemp("prompt-completion")
    train_file = write_prompt_completion_jsonl(folder / "train.txt")
    return FromScratchCausalLMConfig(
        train_file=str(train_file),
        train_filename="sales.jsonl",
        output_dir=str(folder / "model"),
        max_steps=30,
        log_every_steps=10,
        **_MODEL,
    )


# --- Training on chat ------------------------------------------------------------------------------------------------


def test_chat_training_reduces_the_loss_and_saves_a_usable_model(chat_run: Run) -> None:
    result = chat_run.result
    assert result.steps_completed == chat_run.config.max_steps and not result.stopped
    assert result.final_train_loss < result.initial_train_loss * 0.6

    output = Path(result.output_dir)
    assert (output / "model.safetensors").is_file()
    assert (output / "tokenizer.json").is_file()
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt"))
    tokenizer = AutoTokenizer.from_pretrained(output, local_files_only=True)
    for marker in ("<|im_start|>", "<|im_end|>"):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(marker)], marker
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)

    prompt = "<|im_start|>user\nAda bought 3 figs. How many is that?<|im_end|>\n<|im_start|>assistant\n"
    generated = generate_text(result.output_dir, prompt, max_new_tokens=8, temperature=0)
    assert isinstance(generated, GenerationResult) and generated.completion_tokens >= 1


def test_events_say_how_many_tokens_are_trained_and_masked(chat_run: Run) -> None:
    start = next(event for event in chat_run.callback.events if event.type == "message" and event.level == "info")
    data = start.data
    assert data["task"] == "chat" and data["examples"] == 60 and data["skipped_rows"] == 0
    assert data["trained_tokens"] > 0 and data["masked_tokens"] > data["trained_tokens"]
    assert data["trained_tokens_fraction"] == pytest.approx(
        data["trained_tokens"] / (data["trained_tokens"] + data["masked_tokens"]), abs=1e-4
    )
    assert f"{data['trained_tokens']:,} are trained" in start.message
    assert f"{data['masked_tokens']:,} masked" in start.message
    metrics = [event.data for event in chat_run.callback.events if event.type == "metrics"]
    assert len(metrics) == 4
    for item in metrics:
        assert 0 < item["trained_tokens_fraction"] < 0.6


# --- THE labels: the trainer's are the preview's ----------------------------------------------------------------------


def test_the_trained_labels_are_exactly_the_previews(chat_config: FromScratchCausalLMConfig) -> None:
    rows = build_training_rows(chat_config)
    tokenizer, input_ids, labels, stats = rows
    row_length = chat_config.context_length + 1
    assert input_ids.shape == labels.shape and input_ids.shape[1] == row_length
    examples = _examples(chat_config)
    assert len(examples) == stats.examples == 60

    # Packing is end to end with no padding: unpacking by each example's length gives back tokenize_batch's output.
    expected = tokenize_batch(
        examples, tokenizer, template=chat_config.chat_template, train_on=chat_config.train_on, max_length=row_length
    )
    expected_ids = [token for item in expected for token in item.input_ids]
    expected_labels = [label for item in expected for label in item.labels]
    packed = input_ids.numel()
    assert stats.sequence_tokens == len(expected_ids) and packed == len(expected_ids) // row_length * row_length
    assert input_ids.flatten().tolist() == expected_ids[:packed]
    assert labels.flatten().tolist() == expected_labels[:packed]

    # The dashboard's preview of the first examples marks exactly the positions the loss trains.
    previews = preview_examples(
        examples, tokenizer, template=chat_config.chat_template, train_on=chat_config.train_on, max_length=row_length
    )
    offset = 0
    flat_ids, flat_labels = input_ids.flatten().tolist(), labels.flatten().tolist()
    for preview in previews:
        tokens = preview["tokens"]
        assert [token["id"] for token in tokens] == flat_ids[offset : offset + len(tokens)]
        assert [token["trained"] for token in tokens] == [
            label != IGNORE_INDEX for label in flat_labels[offset : offset + len(tokens)]
        ]
        offset += len(tokens)
    # The preview trains the assistant answers and their end marker, never the user's words.
    trained_text = "".join(token["text"] for token in previews[0]["tokens"] if token["trained"])
    assert "has" in trained_text and "<|im_end|>" in trained_text
    assert "How many" not in trained_text and "<|im_start|>" not in trained_text

    assert stats.trained_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert stats.masked_tokens == labels[:, 1:].numel() - stats.trained_tokens


def test_the_training_loop_trains_on_those_rows(
    chat_config: FromScratchCausalLMConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = build_training_rows(chat_config)
    packed = {tuple(row) for row in rows.labels.tolist()}
    seen: list[torch.Tensor] = []
    real_loss = train_module.next_token_loss

    def recording_loss(logits: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
        seen.append(row_labels.detach().cpu())
        return real_loss(logits, row_labels)

    monkeypatch.setattr(train_module, "next_token_loss", recording_loss)
    config = dataclasses.replace(chat_config, output_dir=str(tmp_path / "model"), max_steps=3, warmup_steps=1)
    train_causal_lm_from_scratch(config)
    assert len(seen) == 3
    for batch in seen:
        assert batch.shape == (config.batch_size, config.context_length + 1)
        assert all(tuple(row) in packed for row in batch.tolist())


# --- Masked targets get no gradient -----------------------------------------------------------------------------------


def test_masked_targets_add_no_loss_and_no_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator, requires_grad=True)
    row_labels = torch.randint(0, 11, (2, 6), generator=generator)
    row_labels[0, 1:4] = IGNORE_INDEX  # targets of positions 0..2 of row 0
    row_labels[1, 5] = IGNORE_INDEX  # target of position 4 of row 1
    loss = next_token_loss(logits, row_labels)
    loss.backward()

    targets = row_labels[:, 1:]
    trained = targets != IGNORE_INDEX
    log_probabilities = torch.log_softmax(logits.detach(), dim=-1)
    expected = -log_probabilities[trained].gather(1, targets[trained].unsqueeze(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.count_nonzero(logits.grad[~trained]) == 0
    assert bool((logits.grad[trained].abs().sum(dim=-1) > 0).all())


def test_data_where_nothing_is_trained_is_a_user_error(tmp_path: Path) -> None:
    """Every assistant turn has weight 0: the run would learn nothing, so it fails before building a model."""
    train_file = write_chat_jsonl(tmp_path / "train.txt", assistant_weight=0)
    config = FromScratchCausalLMConfig(
        train_file=str(train_file), train_filename="weights.jsonl", output_dir=str(tmp_path / "out"), **_MODEL
    )
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "nothing_to_train"
    assert raised.value.param == "training_file"
    assert '"weight": 0' in raised.value.message and "train_on" in raised.value.message
    assert not (tmp_path / "out").exists()

    # The same file with train_on="all" trains every token, weights notwithstanding.
    everything = build_training_rows(dataclasses.replace(config, train_on="all"))
    assert everything.stats.masked_tokens == 0


def test_rows_with_every_target_masked_are_never_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two thirds of the conversations have weight-0 answers: the rows made of them alone would teach nothing (and
    a batch of only such rows would divide zero by zero), so training samples only rows with a trained target."""
    silent = write_chat_jsonl(tmp_path / "silent.jsonl", rows=40, assistant_weight=0).read_text()
    spoken = write_chat_jsonl(tmp_path / "spoken.jsonl", rows=20, seed=11).read_text()
    train_file = tmp_path / "train.txt"
    train_file.write_text(silent + spoken)
    config = FromScratchCausalLMConfig(
        train_file=str(train_file),
        train_filename="mixed.jsonl",
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        warmup_steps=1,
        **_MODEL,
    )
    built = build_training_rows(config)
    row_count = built.input_ids.shape[0]
    assert 0 < built.stats.trainable_rows < row_count / 2

    seen: list[torch.Tensor] = []
    real_loss = train_module.next_token_loss

    def recording_loss(logits: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
        seen.append(row_labels.detach().cpu())
        return real_loss(logits, row_labels)

    monkeypatch.setattr(train_module, "next_token_loss", recording_loss)
    result = train_causal_lm_from_scratch(config)
    assert result.final_train_loss < result.initial_train_loss
    for batch in seen:
        assert bool(((batch[:, 1:] != IGNORE_INDEX).sum(dim=1) > 0).all())


def test_train_on_all_trains_more_tokens_than_completions(chat_config: FromScratchCausalLMConfig) -> None:
    completions = build_training_rows(chat_config)
    everything = build_training_rows(dataclasses.replace(chat_config, train_on="all"))
    assert torch.equal(completions.input_ids, everything.input_ids)
    assert everything.stats.trained_tokens > completions.stats.trained_tokens
    assert everything.stats.masked_tokens == 0 and completions.stats.masked_tokens > 0
    assert torch.equal(everything.labels, everything.input_ids)


# --- Prompt/completion ------------------------------------------------------------------------------------------------


def test_prompt_completion_trains_the_completion_only(prompt_completion_config: FromScratchCausalLMConfig) -> None:
    tokenizer, input_ids, labels, stats = build_training_rows(prompt_completion_config)
    assert stats.task == "prompt_completion" and stats.examples == 80
    examples = _examples(prompt_completion_config)
    row_length = prompt_completion_config.context_length + 1
    expected = tokenize_batch(examples, tokenizer, train_on="completions", max_length=row_length)
    expected_labels = [label for item in expected for label in item.labels]
    assert labels.flatten().tolist() == expected_labels[: labels.numel()]
    first = expected[0]
    prompt_length = len(tokenizer(examples[0].fields["prompt"], add_special_tokens=False)["input_ids"])
    assert first.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert first.labels[prompt_length:] == first.input_ids[prompt_length:]
    assert first.input_ids[-1] == tokenizer.eos_token_id
    # Chat markers are only added for chat data.
    assert "<|im_start|>" not in tokenizer.get_vocab()


def test_prompt_completion_training_reduces_the_loss(prompt_completion_config: FromScratchCausalLMConfig) -> None:
    result = train_causal_lm_from_scratch(prompt_completion_config)
    assert result.final_train_loss < result.initial_train_loss * 0.6
    assert (Path(result.output_dir) / "model.safetensors").is_file()


# --- Tokenized cache --------------------------------------------------------------------------------------------------


def test_a_second_run_reuses_the_tokenized_cache(
    chat_config: FromScratchCausalLMConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_tokenize_batch = templates.tokenize_batch

    def counting_tokenize_batch(*args, **kwargs):
        calls.append(len(args[0]))
        return real_tokenize_batch(*args, **kwargs)

    monkeypatch.setattr(templates, "tokenize_batch", counting_tokenize_batch)
    cache_dir = tmp_path / "cache"
    config = dataclasses.replace(
        chat_config,
        output_dir=str(tmp_path / "model"),
        max_steps=3,
        warmup_steps=1,
        tokenized_cache_dir=str(cache_dir),
    )

    first = build_training_rows(config)
    assert first.stats.cache_hit is False and sum(calls) == 60
    assert first.stats.cache_key is not None and cache_hit(str(cache_dir), first.stats.cache_key)
    first_run = train_causal_lm_from_scratch(config)

    calls.clear()
    second = build_training_rows(config)
    second_run = train_causal_lm_from_scratch(config)
    assert calls == []
    assert second.stats.cache_hit is True and second.stats.cache_key == first.stats.cache_key
    assert torch.equal(second.input_ids, first.input_ids) and torch.equal(second.labels, first.labels)
    assert second_run.initial_train_loss == first_run.initial_train_loss

    # The cache holds exactly what tokenizing in memory gives.
    in_memory = build_training_rows(chat_config)
    assert torch.equal(in_memory.input_ids, first.input_ids) and torch.equal(in_memory.labels, first.labels)
    # A different train_on is a different key, so a miss.
    other = build_training_rows(dataclasses.replace(config, train_on="all"))
    assert other.stats.cache_hit is False and other.stats.cache_key != first.stats.cache_key


# --- File names and formats -------------------------------------------------------------------------------------------


def test_gzipped_files_read_like_plain_ones(chat_config: FromScratchCausalLMConfig, tmp_path: Path) -> None:
    compressed = tmp_path / "upload"
    compressed.write_bytes(gzip.compress(Path(chat_config.train_file).read_bytes()))
    plain = build_training_rows(chat_config)
    gzipped = build_training_rows(
        dataclasses.replace(chat_config, train_file=str(compressed), train_filename="chats.jsonl.gz")
    )
    assert torch.equal(plain.labels, gzipped.labels)


def test_txt_gz_takes_the_plain_text_path(tmp_path: Path) -> None:
    text = "\n\n".join(f"Paragraph {index} talks about {_FRUITS[index % 8]} and more." for index in range(60))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    plain = build_training_rows(
        FromScratchCausalLMConfig(train_file=str(tmp_path / "corpus.txt"), output_dir="out", **_MODEL)
    )
    gzipped = build_training_rows(
        FromScratchCausalLMConfig(train_file=str(tmp_path / "corpus.txt.gz"), output_dir="out", **_MODEL)
    )
    assert plain.labels is plain.input_ids and plain.stats.masked_tokens == 0
    assert plain.stats.task == DatasetTask.CAUSAL_LM
    assert torch.equal(plain.input_ids, gzipped.input_ids)


def test_text_records_train_every_token(tmp_path: Path) -> None:
    rows = [{"text": f"{name} likes {fruit} very much."} for name in _NAMES for fruit in _FRUITS]
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    config = FromScratchCausalLMConfig(
        train_file=str(train_file), train_filename="notes.jsonl", output_dir="out", **_MODEL
    )
    built = build_training_rows(config)
    assert built.stats.task == "causal_lm" and built.stats.examples == len(rows)
    assert built.stats.masked_tokens == 0


def test_bad_rows_are_skipped_with_a_warning(tmp_path: Path) -> None:
    good = write_chat_jsonl(tmp_path / "good.jsonl").read_text().splitlines()
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join([*good[:30], "{not json", '{"messages": []}', *good[30:]]) + "\n")
    callback = RecordingCallback()
    config = FromScratchCausalLMConfig(
        train_file=str(train_file), train_filename="chats.jsonl", output_dir="out", **_MODEL
    )
    built = build_training_rows(config, callback)
    assert built.stats.examples == 60 and built.stats.skipped_rows == 2
    (warning,) = [event for event in callback.events if event.level == "warning"]
    assert "2 rows" in warning.message and warning.data["first_error"]["line"] == 31


def test_a_file_without_a_valid_example_is_a_user_error(tmp_path: Path) -> None:
    train_file = tmp_path / "train.txt"
    train_file.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 20)
    config = FromScratchCausalLMConfig(train_file=str(train_file), train_filename="chats.jsonl", output_dir="out")
    with pytest.raises(TrainingDataError) as raised:
        build_training_rows(config)
    assert raised.value.code == "too_little_data"
    assert "no assistant message" in raised.value.message


def test_classification_data_is_not_trained_yet(tmp_path: Path) -> None:
    train_file = tmp_path / "train.txt"
    lines = ["text,label"] + [f"I love {fruit},positive" for fruit in _FRUITS] * 5
    train_file.write_text("\n".join(lines) + "\n")
    config = FromScratchCausalLMConfig(
        train_file=str(train_file), train_filename="reviews.csv", output_dir=str(tmp_path / "out")
    )
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "unsupported_task"
    assert raised.value.param == "training_file"
    assert "classification" in raised.value.message and "later version" in raised.value.message


def test_an_unknown_file_type_is_a_user_error_when_the_name_is_given(tmp_path: Path) -> None:
    train_file = tmp_path / "train.txt"
    train_file.write_text("hello\n")
    config = FromScratchCausalLMConfig(train_file=str(train_file), train_filename="notes.docx", output_dir="out")
    with pytest.raises(TrainingDataError) as raised:
        build_training_rows(config)
    assert raised.value.code == "unsupported_file_type" and raised.value.param == "training_file"


# --- Config -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"chat_template": "alpaca"}, "chat_template"),
        ({"train_on": "prompts"}, "train_on"),
        ({"train_on": None}, "train_on"),
        ({"train_filename": ""}, "train_filename"),
        ({"train_filename": 3}, "train_filename"),
        ({"tokenized_cache_dir": "  "}, "tokenized_cache_dir"),
        ({"tokenized_cache_dir": True}, "tokenized_cache_dir"),
    ],
)
def test_new_config_fields_are_validated(overrides: dict, param: str) -> None:
    with pytest.raises(TrainingDataError) as raised:
        FromScratchCausalLMConfig.from_dict({"train_file": "f", "output_dir": "out", **overrides})
    assert raised.value.code == "invalid_hyperparameter" and raised.value.param == param


def test_new_config_fields_round_trip() -> None:
    defaults = FromScratchCausalLMConfig(train_file="f", output_dir="out")
    assert (defaults.train_filename, defaults.chat_template, defaults.train_on) == (None, "chatml", "completions")
    assert defaults.tokenized_cache_dir is None
    config = FromScratchCausalLMConfig.from_dict(
        {
            "train_file": "f",
            "output_dir": "out",
            "train_filename": "chat.jsonl.gz",
            "chat_template": "llama3",
            "train_on": "all",
            "tokenized_cache_dir": "/tmp/cache",
        }
    )
    assert FromScratchCausalLMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
