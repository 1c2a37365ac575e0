"""Configuration of the training runs the ML library knows how to do."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from workers.ml.data.templates import CHAT_TEMPLATES, TRAIN_ON
from workers.ml.errors import TrainingDataError

INVALID_HYPERPARAMETER = "invalid_hyperparameter"
MISSING_REQUIRED_PARAMETER = "missing_required_parameter"

MAX_STEPS_LIMIT = 100_000
MIN_VOCAB_SIZE = 64
MAX_VOCAB_SIZE = 65_536
# Upper bounds keep a typo (an extra zero) from asking a worker for terabytes of memory; they are far above what
# a from-scratch run on this platform needs.
MAX_CONTEXT_LENGTH = 32_768
MAX_BATCH_SIZE = 4_096
MAX_LEARNING_RATE = 1.0
MAX_SEED = 2**32 - 1
# Holding out more than half of the data would leave less to train on than to measure with.
MAX_VALIDATION_FRACTION = 0.5
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


_Config = TypeVar("_Config")


def _config_from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
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
        if _annotation_name(known_fields[name].type).removesuffix(" | None") == "float" and type(value) is int:
            values[name] = float(value)
    return cls(**values)


def _annotation_name(annotation: object) -> str:
    # With `from __future__ import annotations` field types are strings; without it they are classes.
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _check_type(name: str, value: object, annotation: object) -> None:
    type_name = _annotation_name(annotation)
    optional = type_name.endswith(" | None")
    type_name = type_name.removesuffix(" | None")
    expected = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list, "dict[str, str]": dict}[
        type_name
    ]
    if optional and value is None:
        return
    # bool is a subclass of int in Python, but `true` is never a meaningful layer count.
    if type(value) is not expected or (
        expected in (list, dict) and not all(isinstance(item, str) for item in _strings_of(value))
    ):
        readable = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "list[str]": "a list of strings",
            "dict[str, str]": "an object of strings",
        }[type_name]
        if optional:
            readable += " or null"
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"{name} must be {readable}; got {type(value).__name__} {value!r}.", name
        )


def _strings_of(value: object) -> list[object]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return list(value) if isinstance(value, list) else []


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


TASKS = ("causal_lm", "classification", "seq2seq")
MODES = ("from_scratch", "full", "lora", "qlora")
ARCHITECTURES = ("gpt2", "bert", "t5")
MODEL_SIZES = ("tiny", "mini", "small", "base")
INIT_SCHEMES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "step", "polynomial")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")
LORA_EXPORTS = ("merged", "adapter")
EARLY_STOPPING_METRICS = (
    "valid_loss",
    "valid_perplexity",
    "valid_token_accuracy",
    "accuracy",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "bleu",
    "chrf",
    "rougeL",
)
MAX_EPOCHS = 1_000
MAX_GRADIENT_ACCUMULATION = 1_024
MAX_LORA_RANK = 1_024
# Learning rates by mode when the user gives none: random weights take large steps, pretrained weights small ones,
# and LoRA's freshly initialised low-rank matrices something in between (the common recipes of each).
DEFAULT_LEARNING_RATES = {"from_scratch": 3e-3, "full": 5e-5, "lora": 2e-4, "qlora": 2e-4}
_FROM_SCRATCH_TOKENIZERS = {"gpt2": "bpe", "bert": "wordpiece", "t5": "unigram"}


@dataclass(frozen=True)
class TrainingConfig:
    """One training run of the engine (`workers.ml.engine.run_training`): task, starting point, data and every
    hyperparameter. Built from JSON with `from_dict`; every value is checked on construction and a bad one raises a
    TrainingDataError that names the field."""

    train_file: str
    """Local path of the training data: plain text (``.txt``), chat / prompt-completion / ``{"text"}`` JSONL or
    JSON, CSV/TSV/Parquet with text+label or source+target columns, or their ``.gz`` forms."""
    output_dir: str
    """Local folder the final model, its tokenizer and ``training_report.json`` are written to (atomically)."""
    task: str = "causal_lm"
    """``"causal_lm"`` (text, chat, prompt/completion), ``"classification"`` (text + label: sentiment or any label
    set) or ``"seq2seq"`` (source + target: translation, summarisation)."""
    mode: str = "from_scratch"
    """``"from_scratch"``: random weights of ``architecture``/``model_size``; ``"full"``: every weight of
    ``base_model`` is trained; ``"lora"``: low-rank adapters on ``base_model`` (peft), the base frozen; ``"qlora"``:
    LoRA on a 4-bit base, only where bitsandbytes and a CUDA GPU exist (a clear error elsewhere)."""
    base_model: str | None = None
    """Local folder of an HF safetensors model (a catalog entry); required for full, lora and qlora, unused from
    scratch. Loaded with ``trust_remote_code=False``: no code from a model folder ever runs."""
    architecture: str = "gpt2"
    """From scratch: ``"gpt2"`` (causal LM or classification), ``"bert"`` (classification) or ``"t5"`` (seq2seq)."""
    model_size: str = "tiny"
    """From scratch: ``"tiny"`` (seconds on a CPU), ``"mini"``, ``"small"`` or ``"base"`` (~110-125M parameters)."""
    init: str = "normal"
    """From scratch: weight initialisation, ``"xavier_uniform"``, ``"xavier_normal"``, ``"kaiming_uniform"``,
    ``"kaiming_normal"`` or ``"normal"`` (N(0, 0.02), GPT-2's). Biases start at zero, norm gains at one."""
    dropout: float | None = None
    """From scratch: every dropout rate of the model. None: 0 for a GPT-2 language model (short runs underfit far
    more than they overfit, as modern pretraining recipes find, and it is faster) and the architecture's 0.1
    otherwise (classifiers and seq2seq on small datasets)."""
    tokenizer: str | None = None
    """From scratch: local folder of a trained tokenizer (a tenant's tokenizer asset). None: train one on the
    training data (byte-level BPE for gpt2, WordPiece for bert, Unigram for t5) of ``vocab_size``. Fine-tuning
    always uses the base model's own tokenizer."""
    vocab_size: int = 512
    """From scratch without ``tokenizer``: vocabulary size of the tokenizer trained on the data."""
    column_mapping: dict[str, str] | None = None
    """For CSV/TSV/Parquet/JSON records: which column holds ``text``, ``label``, ``source``, ``target`` (as the
    dataset's column mapping); None: detected from the column names."""
    train_filename: str | None = None
    """The file's original name, whose ending decides how it is read; None: the name of ``train_file``."""
    validation_file: str | None = None
    """Local path of held-out data of the same kind as ``train_file``, never trained on. None: see
    ``validation_fraction``."""
    validation_filename: str | None = None
    """The validation file's original name; only meaningful with ``validation_file``."""
    validation_fraction: float = 0.0
    """Without ``validation_file``: the share of the examples held out by a split seeded with ``seed`` (stratified
    by label for classification); 0 disables it, at most 0.5."""
    chat_template: str = "chatml"
    """How chat examples become text: ``"chatml"``, ``"llama3"`` or ``"plain"``; the base model's own markers are
    reused when its tokenizer has them."""
    train_on: str = "completions"
    """Causal LM on chat or prompt/completion data: ``"completions"`` trains only assistant turns / completions,
    ``"all"`` every token. Plain text is always trained in full."""
    max_length: int = 128
    """Longest sequence in tokens: longer examples are cut at the end (with a warning), plain text is cut into
    pieces of this length; packed rows hold this many tokens."""
    packing: bool = True
    """Causal LM: pack several examples into each row, each attending only to itself (position ids restart at every
    example, which selects a block-diagonal attention mask), so no compute is spent on padding. Off: one example per
    row, padded to the longest of its batch. Classification and seq2seq always use per-batch padding."""
    learning_rate: float | None = None
    """Peak learning rate; None: the mode's default (3e-3 from scratch, 5e-5 full, 2e-4 LoRA)."""
    n_epochs: int = 1
    """Passes over the training data; ignored when ``max_steps`` is above 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0: as many as ``n_epochs`` passes take."""
    batch_size: int = 8
    """Rows per forward pass (a micro-batch); an optimizer step sees ``batch_size x gradient_accumulation_steps``."""
    auto_batch_size: bool = False
    """On a GPU, lower the micro-batch (and raise gradient accumulation to keep the effective batch) until a
    forward and backward pass of the longest rows fits in memory. On a CPU memory is not probed: ``batch_size`` is
    used as given."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup; at most the total number of steps."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: ``"constant"``, ``"linear"``, ``"cosine"``, ``"cosine_with_restarts"``,
    ``"step"`` (step decay) or ``"polynomial"``."""
    min_lr_ratio: float = 0.0
    """Linear, cosine and polynomial decay end at this fraction of the peak learning rate."""
    lr_step_size: int = 0
    """Step decay: steps between two decays; 0: a third of the steps after warmup."""
    lr_gamma: float = 0.1
    """Step decay: the learning rate is multiplied by this at each decay."""
    lr_num_cycles: int = 1
    """Cosine with restarts: number of cosine cycles."""
    lr_power: float = 1.0
    """Polynomial decay: the power (1.0 is linear)."""
    optimizer: str = "adamw"
    """``"adamw"`` (fused kernels on CUDA), ``"sgd"`` (with ``momentum``) or ``"adafactor"`` (little memory)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (never on biases and norm gains)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm; 0 turns clipping off."""
    precision: str = "auto"
    """``"auto"``: bf16 autocast on GPUs that support it, fp32 on CPU; or ``"fp32"``, ``"bf16"``, ``"fp16"``
    (CUDA only, with loss scaling)."""
    compile: str = "auto"
    """``torch.compile`` the model: ``"on"``, ``"off"`` or ``"auto"``: packed rows on CUDA, and on a CPU packed
    from-scratch runs of at least 200 steps where a C++ compiler is installed (those compile in seconds, which short
    runs would not win back; catalog models take minutes); padded batches never (every new shape would compile
    again). Under "auto" a CPU causal-LM run whose model stays eager still compiles the loss's softmax work when the
    run is long enough to win its compile time back (a LoRA run of SmolLM2 from about 30 steps of 8 x 256 tokens);
    "off" compiles nothing."""
    seed: int = 0
    """Seeds initialisation, dropout, the split and the data order: same seed, config and data, same losses."""
    early_stopping_metric: str | None = None
    """Stop when this evaluation metric stops improving (``valid_loss``, ``accuracy``, ``f1_macro``, ``bleu``...);
    losses and perplexity are minimised, the rest maximised. Needs validation data and ``eval_every_steps``."""
    early_stopping_patience: int = 3
    """Evaluations without improvement before early stopping."""
    early_stopping_threshold: float = 0.0
    """Smallest change that counts as an improvement."""
    eval_every_steps: int = 0
    """With validation data: evaluate every this many steps and at the end; 0: only at the end."""
    max_eval_examples: int = 200
    """Evaluations use at most this many validation examples (the first ones, so every evaluation measures the same
    rows), which keeps evaluating often cheap."""
    generation_max_new_tokens: int = 64
    """Seq2seq evaluation: longest generated output for BLEU, chrF and ROUGE."""
    checkpoint_dir: str | None = None
    """Folder for checkpoints. When it already holds a complete checkpoint of this same run, training resumes from
    the latest one (same data order, no step repeated or skipped). None: no checkpoints."""
    checkpoint_every_steps: int = 0
    """Write a checkpoint every this many steps (needs ``checkpoint_dir``); 0: only when training is stopped."""
    checkpoints_kept: int = 2
    """The newest this many checkpoints are kept; older ones are deleted."""
    log_every_steps: int = 5
    """Metrics events are throttled to one per this many steps (chart resolution, not one per step)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] | None = None
    """Module names that get adapters (e.g. ``["q_proj", "v_proj"]``); None: the usual attention projections of the
    model's family."""
    lora_export: str = "merged"
    """``"merged"``: the adapters are folded into the weights and a plain model is saved; ``"adapter"``: only the
    adapter weights are saved, to be loaded on top of the base model."""
    tokenized_cache_dir: str | None = None
    """Folder where tokenized causal-LM examples are kept and reused by later runs on the same file, tokenizer,
    template and maximum length (retries, resumed jobs, search trials). None: tokenize in memory."""
    prepared_data: str | None = None
    """Folder written by ``engine.prepare_training_data`` for this config's data settings: the run loads its tokenizer
    and tokens from there and never reads ``train_file`` / ``validation_file``. None: prepare in the run."""
    device: str = "auto"
    """``"auto"`` picks CUDA when available, else the CPU; or ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), field.type)
        for path_field in ("train_file", "output_dir", "base_model", "tokenizer", "checkpoint_dir"):
            value = getattr(self, path_field)
            if value is not None and not value.strip():
                raise TrainingDataError(INVALID_HYPERPARAMETER, f"{path_field} must not be empty.", path_field)
        for name, choices in (
            ("task", TASKS),
            ("mode", MODES),
            ("architecture", ARCHITECTURES),
            ("model_size", MODEL_SIZES),
            ("init", INIT_SCHEMES),
            ("chat_template", CHAT_TEMPLATES),
            ("train_on", TRAIN_ON),
            ("scheduler", SCHEDULERS),
            ("optimizer", OPTIMIZERS),
            ("precision", PRECISIONS),
            ("compile", COMPILE_CHOICES),
            ("lora_export", LORA_EXPORTS),
        ):
            _check_choice(name, getattr(self, name), choices)
        if self.mode == "from_scratch":
            if self.base_model is not None:
                raise TrainingDataError(
                    INVALID_HYPERPARAMETER,
                    "base_model is only used to fine-tune; training from scratch starts from random weights.",
                    "base_model",
                )
            supported = {"gpt2": ("causal_lm", "classification"), "bert": ("classification",), "t5": ("seq2seq",)}
            if self.task not in supported[self.architecture]:
                raise TrainingDataError(
                    INVALID_HYPERPARAMETER,
                    f"The {self.architecture} architecture cannot be trained for {self.task}; it does "
                    f"{' and '.join(supported[self.architecture])}.",
                    "architecture",
                )
        elif self.base_model is None:
            raise TrainingDataError(
                MISSING_REQUIRED_PARAMETER, f"{self.mode} fine-tuning needs a base_model to start from.", "base_model"
            )
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES[self.mode])
        if self.dropout is None and self.mode == "from_scratch":
            object.__setattr__(self, "dropout", 0.0 if self.task == "causal_lm" else 0.1)
        if self.dropout is not None:
            _check_float_range("dropout", self.dropout, 0.0, 1.0, maximum_inclusive=False)
        assert self.learning_rate is not None
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= MAX_LEARNING_RATE):
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"learning_rate must be above 0 and at most {MAX_LEARNING_RATE}; got {self.learning_rate}.",
                "learning_rate",
            )
        _check_int_range("vocab_size", self.vocab_size, MIN_VOCAB_SIZE, MAX_VOCAB_SIZE)
        _check_int_range("max_length", self.max_length, 2, MAX_CONTEXT_LENGTH)
        _check_int_range("n_epochs", self.n_epochs, 1, MAX_EPOCHS)
        _check_int_range("max_steps", self.max_steps, 0, MAX_STEPS_LIMIT)
        _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, MAX_GRADIENT_ACCUMULATION)
        _check_int_range("warmup_steps", self.warmup_steps, 0, MAX_STEPS_LIMIT)
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"warmup_steps ({self.warmup_steps}) cannot exceed max_steps ({self.max_steps}).",
                "warmup_steps",
            )
        _check_float_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_int_range("lr_step_size", self.lr_step_size, 0, MAX_STEPS_LIMIT)
        _check_float_range("lr_gamma", self.lr_gamma, 0.0, 1.0, minimum_inclusive=False)
        _check_int_range("lr_num_cycles", self.lr_num_cycles, 1, 1_000)
        _check_float_range("lr_power", self.lr_power, 0.0, 100.0, minimum_inclusive=False)
        _check_float_range("momentum", self.momentum, 0.0, 1.0, maximum_inclusive=False)
        _check_float_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_float_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _check_int_range("seed", self.seed, 0, MAX_SEED)
        if self.early_stopping_metric is not None:
            _check_choice("early_stopping_metric", self.early_stopping_metric, EARLY_STOPPING_METRICS)
        _check_int_range("early_stopping_patience", self.early_stopping_patience, 1, 1_000)
        _check_float_range("early_stopping_threshold", self.early_stopping_threshold, 0.0, 1e6)
        _check_int_range("eval_every_steps", self.eval_every_steps, 0, MAX_STEPS_LIMIT)
        _check_int_range("max_eval_examples", self.max_eval_examples, 1, 100_000)
        _check_int_range("generation_max_new_tokens", self.generation_max_new_tokens, 1, 1_024)
        _check_int_range("checkpoint_every_steps", self.checkpoint_every_steps, 0, MAX_STEPS_LIMIT)
        if self.checkpoint_every_steps and self.checkpoint_dir is None:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER, "checkpoint_every_steps needs a checkpoint_dir.", "checkpoint_every_steps"
            )
        _check_int_range("checkpoints_kept", self.checkpoints_kept, 1, 100)
        _check_int_range("log_every_steps", self.log_every_steps, 1, MAX_STEPS_LIMIT)
        _check_int_range("lora_r", self.lora_r, 1, MAX_LORA_RANK)
        _check_int_range("lora_alpha", self.lora_alpha, 1, 100_000)
        _check_float_range("lora_dropout", self.lora_dropout, 0.0, 1.0, maximum_inclusive=False)
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER, "lora_target_modules must name at least one module, or be null.",
                "lora_target_modules",
            )  # fmt: skip
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
        if self.early_stopping_metric is not None and self.validation_file is None and fraction == 0:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                "Early stopping measures a validation metric: give a validation file or a validation_fraction.",
                "early_stopping_metric",
            )
        if not _DEVICE_PATTERN.match(self.device):
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f'device must be "auto", "cpu", "cuda", "cuda:N" or "mps"; got {self.device!r}.',
                "device",
            )

    @property
    def from_scratch_tokenizer_algorithm(self) -> str:
        """The tokenizer algorithm trained on the data for a from-scratch run without ``tokenizer``."""
        return _FROM_SCRATCH_TOKENIZERS[self.architecture]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build a config from JSON-like data, rejecting unknown keys and bad values with a TrainingDataError."""
        return _config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_float_range(
    name: str,
    value: float,
    minimum: float,
    maximum: float,
    *,
    minimum_inclusive: bool = True,
    maximum_inclusive: bool = True,
) -> None:
    above = value >= minimum if minimum_inclusive else value > minimum
    below = value <= maximum if maximum_inclusive else value < maximum
    if not (math.isfinite(value) and above and below):
        low = "[" if minimum_inclusive else "("
        high = "]" if maximum_inclusive else ")"
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"{name} must be in {low}{minimum}, {maximum}{high}; got {value}.", name
        )
