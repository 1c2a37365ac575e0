"""What a user of `workers.ml.engine.run_training` (and of ``python -m workers.ml.train``) sees on causal-LM data: the
errors that name what to fix, warnings, the validation split, and that the loss covers only the trained tokens.

Tiny gpt2 models on CPU, a step or two each; no Django. The engine's own mechanics (architectures, resuming,
schedules, packing, the command line) are in test_engine.py.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.workers.ml.engine_fixtures import REPOSITORY_ROOT, Recorder, make_config, train
from workers.ml.callbacks import JsonLinesCallback, NullCallback, TrainingCallback, TrainingEvent
from workers.ml.data import templates
from workers.ml.data.split import split_indices
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.data.training_sets import (
    NOTHING_TO_TRAIN,
    TOO_LITTLE_DATA,
    TOO_LITTLE_VALIDATION_DATA,
    VALIDATION_MISMATCH,
    read_example_sets,
    tokenizer_texts,
    trained_target_count,
)
from workers.ml.engine import _examples_fingerprint, _prepare
from workers.ml.errors import TrainingDataError

_SUBJECTS = [
    "The old sailor", "A young girl", "My neighbour", "Our teacher", "The quick fox", "A tired doctor",
    "The baker", "Every child", "The gardener", "A quiet student", "The mayor", "Her grandmother",
]  # fmt: skip
_VERBS = [
    "walks to", "looks at", "dreams about", "writes about", "runs past", "sings to", "paints", "remembers",
    "builds", "finds", "visits", "talks about",
]  # fmt: skip
_OBJECTS = [
    "the quiet harbour", "a red bicycle", "the tall mountain", "an empty garden", "the busy market",
    "a small wooden boat", "the library downtown", "a bright morning", "the winter forest", "an old letter",
    "the yellow house", "a long bridge",
]  # fmt: skip
_ENDINGS = [
    "slowly", "every morning", "before dinner", "with great care", "in the rain", "after school",
    "without a word", "on Sundays", "near the sea", "at night", "with a smile", "once a year",
]  # fmt: skip
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "grapes", "cherries"]
# A word no training document holds: the held-out documents carry it, so it shows where held-out text went.
HELD_OUT_WORD = "zorblaxquiv"


def write_training_corpus(path: Path, *, paragraphs: int = 80, seed: int = 7) -> Path:
    """A few hundred varied English sentences, blank lines between paragraphs (~20 KB)."""
    chooser = random.Random(seed)
    texts = []
    for _ in range(paragraphs):
        sentences = [
            " ".join(chooser.choice(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)) + "."
            for _ in range(chooser.randint(3, 6))
        ]
        texts.append(" ".join(sentences))
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


def write_chat_jsonl(path: Path, *, rows: int = 60, seed: int = 3, assistant_weight: int | None = None) -> Path:
    """Fruit-counting conversations: the user's turns say "bought" and "buy", the assistant's "has"."""
    chooser = random.Random(seed)
    weight = {} if assistant_weight is None else {"weight": assistant_weight}
    lines = []
    for _ in range(rows):
        name, fruit, count = chooser.choice(_NAMES), chooser.choice(_FRUITS), chooser.randint(2, 30)
        messages = [
            {"role": "system", "content": "You count fruit for the market stall."},
            {"role": "user", "content": f"{name} bought {count} {fruit}. How many is that?"},
            {"role": "assistant", "content": f"{name} has {count} {fruit}.", **weight},
            {"role": "user", "content": "And if they buy the same again?"},
            {"role": "assistant", "content": f"Then {name} has {2 * count} {fruit}.", **weight},
        ]
        lines.append(json.dumps({"messages": messages}))
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


def _raised(train_file: Path | str, output_dir: Path, **overrides) -> TrainingDataError:
    with pytest.raises(TrainingDataError) as raised:
        train(str(train_file), output_dir, max_steps=2, **overrides)
    # A user error is found before anything is written.
    assert not output_dir.exists()
    return raised.value


# --- Training-file errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "   \n\n \t \n"])
def test_an_empty_training_file_is_a_user_error(tmp_path: Path, content: str) -> None:
    train_file = tmp_path / "empty.txt"
    train_file.write_text(content)
    error = _raised(train_file, tmp_path / "out")
    assert (error.code, error.param) == ("empty_file", "training_file")


def test_a_file_that_is_not_utf8_is_a_user_error(tmp_path: Path) -> None:
    train_file = tmp_path / "latin1.txt"
    train_file.write_bytes("Café au lait, s'il vous plaît.\n".encode("latin-1") * 200)
    error = _raised(train_file, tmp_path / "out")
    assert (error.code, error.param) == ("binary_content", "training_file")
    assert "UTF-8" in error.message


def test_a_file_without_a_valid_example_is_a_user_error(tmp_path: Path) -> None:
    train_file = tmp_path / "train.txt"
    train_file.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 20)
    error = _raised(train_file, tmp_path / "out", train_filename="chats.jsonl")
    assert (error.code, error.param) == (TOO_LITTLE_DATA, "training_file")


def test_an_unknown_file_type_is_a_user_error_when_the_name_is_given(tmp_path: Path) -> None:
    train_file = tmp_path / "train.txt"
    train_file.write_text("hello\n")
    error = _raised(train_file, tmp_path / "out", train_filename="notes.docx")
    assert (error.code, error.param) == ("unsupported_file_type", "training_file")


def test_data_where_nothing_is_trained_is_a_user_error(tmp_path: Path) -> None:
    """Every assistant turn has weight 0: the run would learn nothing, so it fails before building a model."""
    train_file = write_chat_jsonl(tmp_path / "weights.jsonl", assistant_weight=0)
    error = _raised(train_file, tmp_path / "out")
    assert (error.code, error.param) == (NOTHING_TO_TRAIN, "training_file")
    assert '"weight": 0' in error.message and "train_on" in error.message
    # The same file with train_on="all" trains every token, weights notwithstanding.
    run = train(str(train_file), tmp_path / "all", max_steps=1, train_on="all")
    assert run.result.steps_completed == 1


def test_bad_rows_are_skipped_with_a_warning(tmp_path: Path) -> None:
    good = write_chat_jsonl(tmp_path / "good.jsonl").read_text().splitlines()
    train_file = tmp_path / "chats.jsonl"
    train_file.write_text("\n".join([*good[:30], "{not json", '{"messages": []}', *good[30:]]) + "\n")
    recorder = Recorder()
    sets = read_example_sets(make_config(str(train_file), "out"), recorder)
    assert len(sets.train) == 60 and sets.skipped_rows == 2
    (warning,) = [event for event in recorder.events if event.level == "warning"]
    assert "2 rows" in warning.message and warning.data["first_error"]["line"] == 31


def test_examples_longer_than_max_length_are_cut_with_a_warning(tmp_path: Path) -> None:
    train_file = tmp_path / "long.jsonl"
    rows = [{"prompt": f"Say {fruit} ", "completion": f"{fruit} " * 100} for fruit in _FRUITS * 2]
    train_file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    run = train(str(train_file), tmp_path / "out", max_steps=1)
    (event,) = run.recorder.with_data_key("truncated_examples")
    assert event.level == "warning" and event.data["truncated_examples"] == 16
    assert "max_length" in event.message


def test_stop_before_the_first_step(tmp_path: Path) -> None:
    corpus = write_training_corpus(tmp_path / "corpus.txt", paragraphs=20)
    run = train(str(corpus), tmp_path / "out", max_steps=5, recorder=Recorder(stop_after_metrics=0))
    assert run.result.stopped is True and run.result.steps_completed == 0
    assert math.isnan(run.result.initial_train_loss) and math.isnan(run.result.final_train_loss)
    assert run.result.output_dir is None and not (tmp_path / "out").exists()
    assert run.recorder.metrics == [] and "stopped" in run.recorder.events[-1].message


# --- The loss covers the trained tokens only -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "trained_words", "masked_words"),
    [
        (write_chat_jsonl, [" has", "<|im_end|>"], [" bought", "How many", " buy", "<|im_start|>"]),
        (write_prompt_completion_jsonl, [" a day"], [" sells"]),
    ],
    ids=["chat", "prompt-completion"],
)
def test_the_loss_targets_are_the_previews_trained_tokens(tmp_path: Path, writer, trained_words, masked_words) -> None:
    train_file = writer(tmp_path / "train.jsonl")
    config = make_config(str(train_file), tmp_path / "out", max_length=96)
    setup = _prepare(config, NullCallback(), None)
    tokenizer, source = setup.tokenizer, setup.train_source
    examples = read_example_sets(config, NullCallback()).train

    # The rows hold exactly the labels of templates.tokenize_batch, the function the dashboard's preview is built on.
    expected = templates.tokenize_batch(
        examples, tokenizer, template=config.chat_template, train_on=config.train_on, max_length=config.max_length
    )
    assert source.tokenized.labels == [item.labels for item in expected]
    previews = templates.preview_examples(
        examples[:3], tokenizer, template=config.chat_template, train_on=config.train_on, max_length=config.max_length
    )
    for preview, item in zip(previews, expected, strict=False):
        assert [token["trained"] for token in preview["tokens"]] == [label != IGNORE_INDEX for label in item.labels]

    # Every packed row's targets, decoded: the answers are trained, the user's (or prompt's) words never are.
    assert source.packed is not None
    targets = source.packed.targets
    trained = targets[targets != IGNORE_INDEX]
    assert trained.numel() == trained_target_count(source.tokenized, "causal_lm") > 0
    trained_text = tokenizer.decode(trained.tolist())
    assert all(word in trained_text for word in trained_words), trained_text[:300]
    assert not [word for word in masked_words if word in trained_text]

    # train_on="all" trains the same tokens and more.
    everything = _prepare(
        make_config(str(train_file), tmp_path / "all", max_length=96, train_on="all"), Recorder(), None
    )
    all_targets = everything.train_source.packed.targets
    assert torch.equal(everything.train_source.packed.input_ids, source.packed.input_ids)
    assert int((all_targets != IGNORE_INDEX).sum()) > trained.numel()


# --- Validation data --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train_kind", "validation_kind"),
    [("text", "chat"), ("chat", "text"), ("chat", "prompt_completion")],
)
def test_validation_data_of_another_kind_is_a_user_error(tmp_path: Path, train_kind: str, validation_kind: str) -> None:
    files = {
        "text": write_training_corpus(tmp_path / "corpus.txt", paragraphs=20),
        "chat": write_chat_jsonl(tmp_path / "chats.jsonl"),
        "prompt_completion": write_prompt_completion_jsonl(tmp_path / "sales.jsonl"),
    }
    error = _raised(files[train_kind], tmp_path / "out", validation_file=str(files[validation_kind]))
    assert (error.code, error.param) == (VALIDATION_MISMATCH, "validation_file")
    assert "same kind" in error.message


@pytest.mark.parametrize(("filename", "content"), [("valid.txt", ""), ("valid.txt", "  \n\n\t\n"), ("valid.jsonl", "")])
def test_an_empty_validation_file_names_the_file(tmp_path: Path, filename: str, content: str) -> None:
    validation_file = tmp_path / "upload"
    validation_file.write_text(content, encoding="utf-8")
    if filename.endswith(".jsonl"):
        train_file = write_chat_jsonl(tmp_path / "chats.jsonl")
    else:
        train_file = write_training_corpus(tmp_path / "corpus.txt", paragraphs=20)
    error = _raised(train_file, tmp_path / "out", validation_file=str(validation_file), validation_filename=filename)
    assert (error.code, error.param) == (TOO_LITTLE_VALIDATION_DATA, "validation_file")


def test_too_little_to_hold_out_names_the_fraction(tmp_path: Path) -> None:
    # One line in one document: nothing can be held out, by documents or by lines.
    train_file = tmp_path / "one.txt"
    train_file.write_text("A single long paragraph about boats and harbours. " * 200, encoding="utf-8")
    error = _raised(train_file, tmp_path / "out", validation_fraction=0.2)
    assert (error.code, error.param) == (TOO_LITTLE_VALIDATION_DATA, "validation_fraction")


def test_a_seeded_share_of_chat_examples_is_held_out(tmp_path: Path) -> None:
    train_file = write_chat_jsonl(tmp_path / "chats.jsonl")

    def held_out(seed: int) -> list[int]:
        sets = read_example_sets(make_config(str(train_file), "out", validation_fraction=0.25, seed=seed), Recorder())
        assert len(sets.train) == 45 and len(sets.validation) == 15
        assert not {example.line for example in sets.train} & {example.line for example in sets.validation}
        return [example.line for example in sets.validation]

    assert held_out(0) == held_out(0) != held_out(1)


def test_the_tokenizer_never_sees_held_out_text(tmp_path: Path) -> None:
    """The word is written only into the documents seed 0 holds out: they reach the validation set, never the text
    the tokenizer is trained on."""
    corpus = write_training_corpus(tmp_path / "corpus.txt")
    documents = [document for document in corpus.read_text(encoding="utf-8").split("\n\n") if document.strip()]
    _, held_out = split_indices(len(documents), validation_fraction=0.2, seed=0, stratify=False)
    for index in held_out:
        documents[index] += f" The {HELD_OUT_WORD} meets the {HELD_OUT_WORD}."
    corpus.write_text("\n\n".join(documents) + "\n", encoding="utf-8")

    sets = read_example_sets(make_config(str(corpus), "out", validation_fraction=0.2), Recorder())
    assert len(sets.train) == 64 and len(sets.validation) == 16
    assert not [text for text in tokenizer_texts(sets) if HELD_OUT_WORD in text]
    assert all(HELD_OUT_WORD in example.fields["text"] for example in sets.validation)


def test_the_tokenized_cache_knows_the_split(tmp_path: Path) -> None:
    train_file = write_chat_jsonl(tmp_path / "chats.jsonl")
    keys = {
        _examples_fingerprint(make_config(str(train_file), "out", validation_fraction=fraction, seed=seed))
        for fraction, seed in [(0.0, 0), (0.25, 0), (0.25, 1)]
    }
    assert len(keys) == 3


# --- Callbacks and the library's imports ------------------------------------------------------------------------------


def test_callbacks_follow_the_protocol() -> None:
    assert isinstance(NullCallback(), TrainingCallback)
    assert isinstance(Recorder(), TrainingCallback)
    assert NullCallback().should_stop() is False


def test_json_lines_callback_writes_valid_json(tmp_path: Path) -> None:
    stream_path = tmp_path / "events.jsonl"
    with stream_path.open("w") as stream:
        callback = JsonLinesCallback(stream)
        callback.on_event(TrainingEvent(level="info", message="Hello.", type="metrics", data={"loss": math.nan}))
        callback.on_event(TrainingEvent(level="warning", message="Étape."))
    lines = [json.loads(line) for line in stream_path.read_text().splitlines()]
    assert lines == [
        {"type": "metrics", "level": "info", "message": "Hello.", "data": {"loss": None}},
        {"type": "message", "level": "warning", "message": "Étape.", "data": None},
    ]


def test_the_ml_library_imports_no_django() -> None:
    code = (
        "import sys, workers.ml.train, workers.ml.engine, workers.ml.generate, workers.ml.tokenizer_training\n"
        "forbidden = [name for name in sys.modules if name.split('.')[0] in "
        "{'django', 'celery', 'channels', 'rest_framework', 'apps', 'tunehouse'} or name.startswith('workers.tasks')]\n"
        "assert not forbidden, forbidden\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
