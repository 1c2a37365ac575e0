"""Helpers shared by the engine tests: a recording callback, config building, and reading runs back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.ml import modeling
from workers.ml.callbacks import TrainingEvent
from workers.ml.config import TrainingConfig
from workers.ml.engine import EngineResult, run_training

REPOSITORY_ROOT = Path(__file__).resolve().parents[3]
# The settings' default (TUNEHOUSE_MODEL_CACHE_DIR overrides both): conversions done once are reused by every run.
MODEL_CACHE_DIR = Path(os.environ.get("TUNEHOUSE_MODEL_CACHE_DIR", str(REPOSITORY_ROOT / "var" / "model-cache")))

# Small and quick: every from-scratch run of these tests is a tiny model on a few rows of 64 tokens.
FAST = {"max_length": 64, "batch_size": 4, "device": "cpu", "log_every_steps": 1}


class Recorder:
    """Keeps every event; asks to stop once ``stop_after_metrics`` metrics events have been seen."""

    def __init__(self, stop_after_metrics: int | None = None):
        self.events: list[TrainingEvent] = []
        self.stop_after_metrics = stop_after_metrics

    def on_event(self, event: TrainingEvent) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return self.stop_after_metrics is not None and len(self.metrics) >= self.stop_after_metrics

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [event.data for event in self.events if event.type == "metrics" and event.data is not None]

    @property
    def steps(self) -> list[int]:
        return [data["step"] for data in self.metrics]

    @property
    def losses(self) -> list[float]:
        return [data["train_loss"] for data in self.metrics]

    @property
    def learning_rates(self) -> list[float]:
        return [data["learning_rate"] for data in self.metrics]

    def with_data_key(self, key: str) -> list[TrainingEvent]:
        return [event for event in self.events if event.data and key in event.data]

    @property
    def warnings(self) -> list[str]:
        return [event.message for event in self.events if event.level == "warning"]

    @property
    def start(self) -> dict[str, Any]:
        """The data of the "Training a ... model" event."""
        return next(event.data for event in self.events if event.data and "train_rows" in event.data)


@dataclasses.dataclass(frozen=True)
class Run:
    config: TrainingConfig
    result: EngineResult
    recorder: Recorder


def make_config(train_file: str, output_dir: Path | str, **overrides: Any) -> TrainingConfig:
    return TrainingConfig.from_dict({"train_file": str(train_file), "output_dir": str(output_dir), **FAST, **overrides})


def train(train_file: str, output_dir: Path | str, *, recorder: Recorder | None = None, **overrides: Any) -> Run:
    config = make_config(train_file, output_dir, **overrides)
    recorder = recorder or Recorder()
    return Run(config, run_training(config, recorder), recorder)


@contextlib.contextmanager
def dropout_free_models() -> Iterator[None]:
    """From-scratch models built while this is active have every dropout at 0, so a step's loss depends only on
    the weights and the rows (not on how random masks are drawn)."""
    original = modeling.build_from_scratch

    def build(**kwargs: Any) -> Any:
        model = original(**kwargs)
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(model.config, name):
                setattr(model.config, name, 0.0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "build_from_scratch", build)
        yield
