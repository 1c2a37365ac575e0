"""How a training run reports progress and learns it should stop, without knowing who is listening.

The seam mirrors HF's ``TrainerCallback``: the Celery task turns events into job events, the CLI prints them as
JSON lines, a notebook can collect them in a list.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, runtime_checkable


@dataclass(frozen=True)
class TrainingEvent:
    """One thing that happened during training, in the shape of a fine-tuning job event."""

    level: str
    """``"info"``, ``"warning"`` or ``"error"``."""
    message: str
    """A sentence a user reads."""
    type: str = "message"
    """``"message"`` or ``"metrics"``."""
    data: dict[str, Any] | None = None
    """For metrics: ``step``, ``total_steps``, ``train_loss``, ``learning_rate``, ``tokens_per_second``, ``epoch``."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "level": self.level, "message": self.message, "data": self.data}


@runtime_checkable
class TrainingCallback(Protocol):
    """Receives training events and is asked, between steps, whether training should stop (cancel)."""

    def on_event(self, event: TrainingEvent) -> None: ...

    def should_stop(self) -> bool: ...

    # Optional: ``may_write() -> bool``, asked right before a checkpoint is written; False means this run has been
    # superseded (fenced) and must write nothing more. Callbacks without it always allow.


class NullCallback:
    """Listens to nothing and never stops training."""

    def on_event(self, event: TrainingEvent) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class JsonLinesCallback:
    """Writes each event as one JSON line to a text stream and flushes it, so a reading process sees it at once."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lock = threading.Lock()

    def on_event(self, event: TrainingEvent) -> None:
        self.write_line(event.to_dict())

    def should_stop(self) -> bool:
        return False

    def write_line(self, payload: dict[str, Any]) -> None:
        """Write any JSON object as one line (the CLI uses it for its final result line)."""
        # allow_nan=False with the replacement below keeps every line valid JSON for strict readers.
        line = json.dumps(_without_non_finite_floats(payload), allow_nan=False, ensure_ascii=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _without_non_finite_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_non_finite_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_non_finite_floats(item) for item in value]
    return value
