"""Configuration of the training runs the ML library knows how to do."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from workers.ml.data.templates import CHAT_TEMPLATES, TRAIN_ON
from workers.ml.errors import TrainingDataError

INVALID_HYPERPARAMETER = "invalid_hyperparameter"
MISSING_REQUIRED_PARAMETER = "missing_required_parameter"

MAX_STEPS_LIMIT = 100_000
MIN_VOCAB_SIZE = 64
MAX_VOCAB_SIZE = 65_536
# Upper bounds keep a typo (an extra zero) from asking a worker for terabytes of memory; they are far above what
# a from-scratch run on this platform needs.
MAX_LAYERS = 96
MAX_HEADS = 128
MAX_EMBEDDING_SIZE = 16_384
MAX_CONTEXT_LENGTH = 32_768
MAX_BATCH_SIZE = 4_096
MAX_LEARNING_RATE = 1.0
MAX_SEED = 2**32 - 1
# Holding out more than half of the data would leave less to train on than to measure with.
MAX_VALIDATION_FRACTION = 0.5
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class FromScratchCausalLMConfig:
    """A GPT-2 style causal language model trained from random weights, with its own byte-level BPE tokenizer."""

    train_file: str
    """Local path of the training data: a UTF-8 .txt file (blank lines separate documents), or a chat,
    prompt/completion or ``{"text": ...}`` JSONL/JSON file (see ``train_filename``)."""
    output_dir: str
    """Local folder the final model and tokenizer are written to (replaced atomically if it exists)."""
    vocab_size: int = 512
    """Size of the byte-level BPE vocabulary trained on ``train_file`` (never below 256 bytes + special tokens)."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 2
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 64
    """Width of the hidden states."""
    context_length: int = 64
    """Tokens per training row and the longest sequence the model can ever see (GPT-2 ``n_positions``)."""
    batch_size: int = 8
    """Rows per optimizer step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate, reached after the warmup and then decayed with a cosine."""
    max_steps: int = 60
    """Optimizer steps to run."""
    warmup_steps: int = 5
    """Steps of linear learning-rate warmup from zero; at most ``max_steps``."""
    seed: int = 0
    """Seeds weight initialisation and batch sampling: two runs with the same seed give the same losses."""
    log_every_steps: int = 5
    """Metrics events are throttled to one per this many steps (chart resolution, not one per step)."""
    device: str = "auto"
    """``"auto"`` picks cuda when available, else cpu; or ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``."""
    train_filename: str | None = None
    """The file's original name, whose ending decides how it is read (``.txt``, ``.jsonl``, ``.json``, ``.csv``,
    their ``.gz`` forms...); the platform stores uploads under names of its own. None: the name of ``train_file``
    (and a name with an ending no reader knows is then read as plain text, as before this field existed)."""
    chat_template: str = "chatml"
    """How chat examples are rendered into text: ``"chatml"`` (``<|im_start|>``/``<|im_end|>``), ``"llama3"`` or
    ``"plain"``; the template's markers become special tokens of the trained tokenizer. Ignored for plain text
    and prompt/completion data."""
    train_on: str = "completions"
    """``"completions"``: the loss covers only assistant turns (and their end marker) or completions, the rest is
    context; ``"all"``: every token of every example is trained. Plain text is always trained in full."""
    tokenized_cache_dir: str | None = None
    """Folder where the tokenized examples are stored and found again by a later run on the same file, tokenizer,
    template, train_on and context_length (a retry, a resumed job). None: tokenize in memory every time."""
    validation_file: str | None = None
    """Local path of held-out data to measure a validation loss on, in any format ``train_file`` accepts and of the
    same kind (plain text with plain text, chat with chat...). It is tokenized with the tokenizer trained on
    ``train_file`` and never trained on. None: no validation file (see ``validation_fraction``)."""
    validation_filename: str | None = None
    """The validation file's original name, whose ending decides how it is read, as ``train_filename`` does for the
    training file. None: the name of ``validation_file``. Only meaningful with ``validation_file``."""
    validation_fraction: float = 0.0
    """Without ``validation_file``: the share of the training documents (plain text) or examples held out, by a split
    seeded with ``seed``, to measure a validation loss on; they are left out of the tokenizer and of training.
    0 disables it; at most 0.5. Cannot be combined with ``validation_file``."""
    eval_every_steps: int = 0
    """With validation data: measure the validation loss every this many steps and at the end of the run (each
    evaluation also emits a metrics event); 0: only at the end. Ignored without validation data."""

    def __post_init__(self) -> None:
        # Validating here rather than only in from_dict means a config built in a notebook is checked too.
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), field.type)
        for path_field in (
            "train_file",
            "output_dir",
            "train_filename",
            "tokenized_cache_dir",
            "validation_file",
            "validation_filename",
        ):
            value = getattr(self, path_field)
            if value is not None and not value.strip():
                raise TrainingDataError(INVALID_HYPERPARAMETER, f"{path_field} must not be empty.", path_field)
        _check_choice("chat_template", self.chat_template, CHAT_TEMPLATES)
        _check_choice("train_on", self.train_on, TRAIN_ON)
        _check_int_range("vocab_size", self.vocab_size, MIN_VOCAB_SIZE, MAX_VOCAB_SIZE)
        _check_int_range("n_layer", self.n_layer, 1, MAX_LAYERS)
        _check_int_range("n_head", self.n_head, 1, MAX_HEADS)
        _check_int_range("n_embd", self.n_embd, 1, MAX_EMBEDDING_SIZE)
        if self.n_embd % self.n_head != 0:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).",
                "n_embd",
            )
        _check_int_range("context_length", self.context_length, 2, MAX_CONTEXT_LENGTH)
        _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= MAX_LEARNING_RATE):
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"learning_rate must be above 0 and at most {MAX_LEARNING_RATE}; got {self.learning_rate}.",
                "learning_rate",
            )
        _check_int_range("max_steps", self.max_steps, 1, MAX_STEPS_LIMIT)
        _check_int_range("warmup_steps", self.warmup_steps, 0, self.max_steps)
        _check_int_range("seed", self.seed, 0, MAX_SEED)
        _check_int_range("log_every_steps", self.log_every_steps, 1, MAX_STEPS_LIMIT)
        _check_int_range("eval_every_steps", self.eval_every_steps, 0, MAX_STEPS_LIMIT)
        self._check_validation()
        if not _DEVICE_PATTERN.match(self.device):
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f'device must be "auto", "cpu", "cuda", "cuda:N" or "mps"; got {self.device!r}.',
                "device",
            )

    def _check_validation(self) -> None:
        fraction = self.validation_fraction
        if not (math.isfinite(fraction) and 0 <= fraction <= MAX_VALIDATION_FRACTION):
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"validation_fraction must be between 0 and {MAX_VALIDATION_FRACTION}; got {fraction}.",
                "validation_fraction",
            )
        if self.validation_file is not None and fraction > 0:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                "Give either a validation file or a validation_fraction of the training data to hold out, not both.",
                "validation_fraction",
            )
        if self.validation_filename is not None and self.validation_file is None:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                "validation_filename is only meaningful with validation_file.",
                "validation_filename",
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FromScratchCausalLMConfig:
        """Build a config from JSON-like data, rejecting unknown keys and bad values with a TrainingDataError."""
        if not isinstance(data, dict):
            raise TrainingDataError(INVALID_HYPERPARAMETER, "The configuration must be a JSON object.")
        known_fields = {field.name: field for field in dataclasses.fields(cls)}
        for key in data:
            if key not in known_fields:
                raise TrainingDataError(
                    INVALID_HYPERPARAMETER,
                    f"Unknown parameter {key!r}; known parameters are: {', '.join(known_fields)}.",
                    str(key),
                )
        for name, field in known_fields.items():
            no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if no_default and name not in data:
                raise TrainingDataError(MISSING_REQUIRED_PARAMETER, f"The parameter {name!r} is required.", name)
        values = dict(data)
        # JSON has one number type: accept 3 for a float field, but never 3.0 for an int field.
        for name, value in values.items():
            if _annotation_name(known_fields[name].type) == "float" and type(value) is int:
                values[name] = float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _annotation_name(annotation: object) -> str:
    # With `from __future__ import annotations` field types are strings; without it they are classes.
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _check_type(name: str, value: object, annotation: object) -> None:
    type_name = _annotation_name(annotation)
    optional = type_name.endswith(" | None")
    type_name = type_name.removesuffix(" | None")
    expected = {"str": str, "int": int, "float": float}[type_name]
    if optional and value is None:
        return
    # bool is a subclass of int in Python, but `true` is never a meaningful layer count.
    if type(value) is not expected:
        readable = {"str": "a string", "int": "an integer", "float": "a number"}[type_name]
        if optional:
            readable += " or null"
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"{name} must be {readable}; got {type(value).__name__} {value!r}.", name
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"{name} must be one of {', '.join(choices)}; got {value!r}.", name
        )


def _check_int_range(name: str, value: int, minimum: int, maximum: int) -> None:
    if not minimum <= value <= maximum:
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"{name} must be between {minimum} and {maximum}; got {value}.", name
        )
