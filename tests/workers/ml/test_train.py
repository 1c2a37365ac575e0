"""Training a tiny GPT-2 from scratch: real tokenizer, real model, real files; no Django."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.ml.callbacks import JsonLinesCallback, NullCallback, TrainingCallback, TrainingEvent
from workers.ml.config import FromScratchCausalLMConfig
from workers.ml.errors import TrainingDataError
from workers.ml.train import TrainingResult, train_causal_lm_from_scratch

REPOSITORY_ROOT = Path(__file__).resolve().parents[3]

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


class RecordingCallback:
    """Keeps every event; asks to stop once should_stop has been polled ``stop_after_polls`` times."""

    def __init__(self, stop_after_polls: int | None = None):
        self.events: list[TrainingEvent] = []
        self.polls = 0
        self._stop_after_polls = stop_after_polls

    def on_event(self, event: TrainingEvent) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        self.polls += 1
        return self._stop_after_polls is not None and self.polls > self._stop_after_polls

    @property
    def metrics(self) -> list[dict]:
        return [event.data for event in self.events if event.type == "metrics"]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    config: FromScratchCausalLMConfig
    result: TrainingResult
    callback: RecordingCallback


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_training_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    assert 15_000 < path.stat().st_size < 30_000
    return path


@pytest.fixture(scope="module")
def trained(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    config = FromScratchCausalLMConfig(
        train_file=str(corpus_file), output_dir=str(tmp_path_factory.mktemp("runs") / "model")
    )
    callback = RecordingCallback()
    result = train_causal_lm_from_scratch(config, callback)
    return TrainedRun(config=config, result=result, callback=callback)


def test_training_reduces_the_loss(trained: TrainedRun) -> None:
    result = trained.result
    assert result.steps_completed == trained.config.max_steps
    assert result.stopped is False
    # A random model over ~500 tokens starts near ln(500) = 6.2.
    assert 5.0 < result.initial_train_loss < 7.0
    assert result.final_train_loss < result.initial_train_loss - 2.0
    assert result.num_parameters > 50_000
    assert result.train_tokens % (trained.config.context_length + 1) == 0
    assert result.train_tokens > trained.config.context_length * 20


def test_metrics_events_are_throttled_and_complete(trained: TrainedRun) -> None:
    metrics = trained.callback.metrics
    config = trained.config
    assert len(metrics) == math.ceil(config.max_steps / config.log_every_steps)
    steps = [data["step"] for data in metrics]
    assert steps == list(range(config.log_every_steps, config.max_steps + 1, config.log_every_steps))
    for data in metrics:
        assert set(data) == {"step", "total_steps", "train_loss", "learning_rate", "tokens_per_second", "epoch"}
        assert data["total_steps"] == config.max_steps
        assert data["tokens_per_second"] > 0
        assert 0 < data["learning_rate"] <= config.learning_rate
    epochs = [data["epoch"] for data in metrics]
    assert epochs == sorted(epochs) and epochs[0] > 0
    # The reported final loss is the last window's mean, and the windows trend down.
    assert metrics[-1]["train_loss"] == pytest.approx(trained.result.final_train_loss)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    # Warmup reaches the peak, then the cosine brings it down.
    learning_rates = [data["learning_rate"] for data in metrics]
    assert learning_rates[0] == pytest.approx(config.learning_rate)
    assert learning_rates[-1] < config.learning_rate / 2


def test_start_and_end_messages_tell_the_user_what_happened(trained: TrainedRun) -> None:
    messages = [event for event in trained.callback.events if event.type == "message"]
    assert len(messages) == 2
    start, end = messages
    assert f"{trained.result.num_parameters:,}" in start.message
    assert f"{trained.result.train_tokens:,}" in start.message
    assert start.level == end.level == "info"
    assert "finished" in end.message
    assert trained.callback.events[0] is start and trained.callback.events[-1] is end


def test_output_folder_holds_safetensors_and_tokenizer_only(trained: TrainedRun) -> None:
    output_dir = Path(trained.config.output_dir)
    names = {path.name for path in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    pickle_suffixes = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
    assert not [name for name in names if Path(name).suffix in pickle_suffixes]
    # The staging folder was renamed into place, not left behind.
    assert [path.name for path in output_dir.parent.iterdir()] == ["model"]
    tensors = load_file(str(output_dir / "model.safetensors"))
    assert any("wte" in name for name in tensors)


def test_saved_model_reloads_with_transformers(trained: TrainedRun) -> None:
    output_dir = trained.config.output_dir
    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=False, local_files_only=True)
    model.eval()
    assert model.config.n_positions == trained.config.context_length
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == model.config.eos_token_id
    text = "The old sailor walks to the quiet harbour every morning."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    # Text like the training data: far below the untrained model's loss.
    assert loss < trained.result.initial_train_loss - 2.0


def test_same_seed_gives_identical_losses_and_another_seed_does_not(trained: TrainedRun, tmp_path: Path) -> None:
    repeat = RecordingCallback()
    again = train_causal_lm_from_scratch(
        dataclasses.replace(trained.config, output_dir=str(tmp_path / "again")), repeat
    )
    assert again.final_train_loss == trained.result.final_train_loss
    assert again.initial_train_loss == trained.result.initial_train_loss
    assert [data["train_loss"] for data in repeat.metrics] == [data["train_loss"] for data in trained.callback.metrics]

    other_seed = train_causal_lm_from_scratch(
        dataclasses.replace(trained.config, output_dir=str(tmp_path / "other"), seed=1, max_steps=5)
    )
    assert other_seed.initial_train_loss != trained.result.initial_train_loss


def test_should_stop_ends_training_early_and_still_saves(trained: TrainedRun, tmp_path: Path) -> None:
    output_dir = tmp_path / "stopped"
    output_dir.mkdir()
    (output_dir / "stale.txt").write_text("from an earlier attempt")
    callback = RecordingCallback(stop_after_polls=7)
    result = train_causal_lm_from_scratch(dataclasses.replace(trained.config, output_dir=str(output_dir)), callback)
    assert result.stopped is True
    assert result.steps_completed == 7
    assert callback.polls == 8
    # The partial window since step 5 is still reported, so the chart shows where training ended.
    assert [data["step"] for data in callback.metrics] == [5, 7]
    assert result.final_train_loss == pytest.approx(callback.metrics[-1]["train_loss"])
    assert "stopped" in callback.events[-1].message
    names = {path.name for path in output_dir.iterdir()}
    assert "model.safetensors" in names and "stale.txt" not in names
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stopped"]


def test_stop_before_the_first_step(trained: TrainedRun, tmp_path: Path) -> None:
    result = train_causal_lm_from_scratch(
        dataclasses.replace(trained.config, output_dir=str(tmp_path / "out")), RecordingCallback(stop_after_polls=0)
    )
    assert result.stopped is True and result.steps_completed == 0
    assert math.isnan(result.initial_train_loss) and math.isnan(result.final_train_loss)


@pytest.mark.parametrize("content", ["", "   \n\n \t \n"])
def test_empty_training_file_is_a_user_error(tmp_path: Path, content: str) -> None:
    train_file = tmp_path / "empty.txt"
    train_file.write_text(content)
    config = FromScratchCausalLMConfig(train_file=str(train_file), output_dir=str(tmp_path / "out"))
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "empty_training_file"
    assert not (tmp_path / "out").exists()


def test_too_little_text_is_a_user_error(tmp_path: Path) -> None:
    train_file = tmp_path / "short.txt"
    train_file.write_text("Just a few words here.\n")
    config = FromScratchCausalLMConfig(train_file=str(train_file), output_dir=str(tmp_path / "out"))
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "too_little_data"
    assert "context_length" in raised.value.message


def test_invalid_utf8_is_a_user_error(tmp_path: Path) -> None:
    train_file = tmp_path / "latin1.txt"
    train_file.write_bytes("Café au lait, s'il vous plaît.\n".encode("latin-1") * 200)
    config = FromScratchCausalLMConfig(train_file=str(train_file), output_dir=str(tmp_path / "out"))
    with pytest.raises(TrainingDataError) as raised:
        train_causal_lm_from_scratch(config)
    assert raised.value.code == "invalid_file_encoding"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"learnin_rate": 0.01}, "learnin_rate"),
        ({"n_embd": 65, "n_head": 2}, "n_embd"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"max_steps": 100_001}, "max_steps"),
        ({"max_steps": 0}, "max_steps"),
        ({"vocab_size": 10}, "vocab_size"),
        ({"vocab_size": 70_000}, "vocab_size"),
        ({"n_layer": True}, "n_layer"),
        ({"batch_size": "8"}, "batch_size"),
        ({"context_length": 64.0}, "context_length"),
        ({"warmup_steps": 61}, "warmup_steps"),
        ({"log_every_steps": 0}, "log_every_steps"),
        ({"device": "gpu"}, "device"),
        ({"train_file": ""}, "train_file"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(overrides: dict, param: str) -> None:
    data = {"train_file": "corpus.txt", "output_dir": "out", **overrides}
    with pytest.raises(TrainingDataError) as raised:
        FromScratchCausalLMConfig.from_dict(data)
    assert raised.value.code == "invalid_hyperparameter"
    assert raised.value.param == param
    assert raised.value.message


def test_missing_required_parameter() -> None:
    with pytest.raises(TrainingDataError) as raised:
        FromScratchCausalLMConfig.from_dict({"train_file": "corpus.txt"})
    assert raised.value.param == "output_dir"


def test_config_round_trips_through_a_dict() -> None:
    config = FromScratchCausalLMConfig.from_dict({"train_file": "a.txt", "output_dir": "out", "learning_rate": 1})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert FromScratchCausalLMConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict()))["vocab_size"] == 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_steps = 5  # type: ignore[misc]


def test_callbacks_follow_the_protocol() -> None:
    assert isinstance(NullCallback(), TrainingCallback)
    assert isinstance(RecordingCallback(), TrainingCallback)
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


def _run_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.ml.train", str(config_path)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_json_lines_and_a_result(corpus_file: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    output_dir = tmp_path / "cli-model"
    config_path.write_text(json.dumps({"train_file": str(corpus_file), "output_dir": str(output_dir), "max_steps": 10}))
    completed = _run_cli(config_path)
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["message", "metrics", "metrics", "message", "result"]
    result = lines[-1]
    assert result["steps_completed"] == 10 and result["stopped"] is False
    assert result["output_dir"] == str(output_dir)
    assert result["final_train_loss"] < result["initial_train_loss"]
    assert (output_dir / "model.safetensors").is_file()


def test_cli_reports_user_errors_and_exits_1(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"train_file": "x.txt", "output_dir": "out", "n_head": 0}))
    completed = _run_cli(config_path)
    assert completed.returncode == 1
    (line,) = [json.loads(line) for line in completed.stdout.splitlines()]
    assert line["level"] == "error"
    assert line["data"]["code"] == "invalid_hyperparameter" and line["data"]["param"] == "n_head"


def test_the_ml_library_imports_no_django() -> None:
    code = (
        "import sys, workers.ml.train, workers.ml.generate, workers.ml.tokenizer_training\n"
        "forbidden = [name for name in sys.modules if name.split('.')[0] in "
        "{'django', 'celery', 'channels', 'rest_framework', 'apps', 'tunehouse'} or name.startswith('workers.tasks')]\n"
        "assert not forbidden, forbidden\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
