"""Training a small GPT-2 style causal language model from scratch on a user's text file or examples.

Plain text (``.txt``) is packed token after token and trained in full. Chat, prompt/completion and ``{"text"}``
examples (JSONL, JSON, their ``.gz`` forms, or records from CSV/Parquet) are rendered and masked by
``templates.tokenize_batch`` — the very function the dashboard's token preview is built from, so what the preview
shows as trained is what the loss sees — then packed end to end the same way, and the loss covers only the
positions whose label is not ``IGNORE_INDEX``.

With a validation file, or a seeded share of the training documents or examples held out, a validation loss is
measured on rows tokenized and packed the same way, with the tokenizer trained on the training side only.

Also a command line: ``python -m workers.ml.train CONFIG.json`` prints events as JSON lines and a final result line.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as functional
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workers.ml.callbacks import JsonLinesCallback, NullCallback, TrainingCallback, TrainingEvent
from workers.ml.config import INVALID_HYPERPARAMETER, FromScratchCausalLMConfig, TrainingConfig
from workers.ml.data import formats, templates
from workers.ml.data.examples import DatasetFormat, DatasetTask, Example, RowError, example_text
from workers.ml.data.split import split_indices
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import END_OF_TEXT, train_byte_level_bpe

# A from-scratch run on this platform is a small model; 20 MB of text (~5M tokens) is more than it can use, and
# reading more would only cost memory and tokenizer-training time. Larger files are read up to this cap, streamed.
MAX_TRAINING_TEXT_BYTES = 20 * 1024 * 1024
_READ_CHUNK_BYTES = 1024 * 1024
_DOCUMENTS_PER_ENCODE_BATCH = 1024
# Decaying to a tenth of the peak rather than zero keeps the last steps of a short run still learning.
_MIN_LEARNING_RATE_RATIO = 0.1
_MAX_GRADIENT_NORM = 1.0
_WEIGHT_DECAY = 0.1
_ADAM_BETAS = (0.9, 0.95)
_DOCUMENT_SEPARATOR = re.compile(r"\n[ \t]*\n+")
# Below this many documents a held-out share is taken by lines, not documents (see _hold_out_lines).
_MIN_DOCUMENTS_TO_HOLD_OUT = 10
_PLAIN_TEXT_ENDINGS = (".txt", ".txt.gz")
# Tasks with causal language-model labels; classification and seq2seq need other model heads.
_CAUSAL_TASKS = (DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION, DatasetTask.CAUSAL_LM)
_EXAMPLES_PER_TOKENIZE_BATCH = 1000
# Data errors found in an example file name the job's public field, as OpenAI's fine-tuning errors do.
TRAINING_FILE_PARAM = "training_file"
UNSUPPORTED_TASK = "unsupported_task"
NOTHING_TO_TRAIN = "nothing_to_train"
TOO_LITTLE_DATA = "too_little_data"
TOO_LITTLE_VALIDATION_DATA = "too_little_validation_data"
VALIDATION_MISMATCH = "validation_file_mismatch"
VALIDATION_FILE_PARAM = "validation_file"
VALIDATION_FRACTION_PARAM = "validation_fraction"
# An evaluation runs the whole validation set through the model; capping it keeps each one to a few dozen forward
# passes however large the validation file is, so evaluating often stays cheap next to training. The first rows
# are kept, so every evaluation of a run measures the very same rows.
MAX_VALIDATION_ROWS = 200
# exp() of a loss above this overflows nothing but means nothing either; the perplexity is capped there.
_MAX_LOG_PERPLEXITY = 50.0
_Item = TypeVar("_Item", str, Example)


@dataclass(frozen=True)
class TrainingResult:
    """What a finished (or stopped) run produced."""

    output_dir: str
    """Folder holding model.safetensors, config.json and the tokenizer files."""
    steps_completed: int
    """Optimizer steps actually run (fewer than max_steps when stopped)."""
    final_train_loss: float
    """Mean training loss over the last metrics window (NaN when no step ran)."""
    initial_train_loss: float
    """Training loss of the first step (NaN when no step ran)."""
    num_parameters: int
    """Trainable parameters, tied embeddings counted once."""
    train_tokens: int
    """Tokens in the packed training rows."""
    stopped: bool
    """True when the callback asked training to stop before max_steps."""
    final_valid_loss: float | None = None
    """Validation loss measured at the last step run (NaN when no step ran); None when the run has no validation."""


@dataclass(frozen=True)
class TrainingRowsStats:
    """What went into the packed rows, for the start event and for tests."""

    task: str
    """``causal_lm`` for plain text, else the examples' task (``chat``, ``prompt_completion``, ``causal_lm``)."""
    examples: int
    """Documents (plain text) or examples read and used."""
    skipped_rows: int
    """Rows of the file that could not be read as an example and were left out (always 0 for plain text)."""
    truncated_examples: int
    """Examples longer than context_length + 1 tokens whose end was cut off."""
    sequence_tokens: int
    """Tokens of all documents or examples, end to end, before packing drops the incomplete last row."""
    packed_tokens: int
    """Tokens in the packed rows (rows x (context_length + 1))."""
    trained_tokens: int
    """Target positions (every row position but the first) whose label is trained."""
    masked_tokens: int
    """Target positions whose label is IGNORE_INDEX: they add nothing to the loss or the gradients."""
    trainable_rows: int
    """Rows with at least one trained target; only these are sampled (a fully masked row would teach nothing)."""
    cache_key: str | None = None
    """Key of the tokenized cache used, None when ``tokenized_cache_dir`` is not set or the data is plain text."""
    cache_hit: bool | None = None
    """Whether the tokenized rows came from the cache; None when no cache was used."""
    truncated_file: bool = False
    """True when only the first MAX_TRAINING_TEXT_BYTES of text of the file were used."""

    @property
    def trained_tokens_fraction(self) -> float:
        targets = self.trained_tokens + self.masked_tokens
        return self.trained_tokens / targets if targets else 0.0


class TrainingRows(NamedTuple):
    """The packed training data: row ``i`` is one sequence of context_length + 1 tokens (inputs and next tokens)."""

    tokenizer: PreTrainedTokenizerFast
    """The tokenizer trained on the data, template markers included; it is saved with the model."""
    input_ids: torch.Tensor
    """int64 [rows, context_length + 1]: examples (or documents) end to end, no padding."""
    labels: torch.Tensor
    """Same shape: the token id where it is trained, IGNORE_INDEX where masked; for plain text the very same tensor
    as ``input_ids``. Unshifted: the target of position t is ``labels[:, t + 1]``."""
    stats: TrainingRowsStats


class TrainingData(NamedTuple):
    """The packed training rows and, when the config asks for validation, the validation rows."""

    train: TrainingRows
    """The rows training samples from; the tokenizer was trained on their text only."""
    validation: TrainingRows | None
    """Rows of held-out documents or examples, tokenized, labelled and packed exactly like ``train`` with the same
    tokenizer, keeping only rows with a trained target and at most MAX_VALIDATION_ROWS of them (their stats count
    the rows kept; ``examples`` counts every held-out document or example). None without validation."""


def build_training_rows(config: FromScratchCausalLMConfig, callback: TrainingCallback | None = None) -> TrainingRows:
    """The training side of `build_training_data`: the rows the training loop samples from."""
    return build_training_data(config, callback).train


def build_training_data(config: FromScratchCausalLMConfig, callback: TrainingCallback | None = None) -> TrainingData:
    """Read ``config.train_file``, train the tokenizer on it and pack it into rows, as the training loop does.

    Plain text (``.txt``, ``.txt.gz``) is split into documents, each followed by an end-of-text token. Other files
    are read as examples (`formats.iter_examples`, unreadable rows skipped with a warning), tokenized and masked by
    `templates.tokenize_batch` (through the tokenized cache when ``tokenized_cache_dir`` is set), and packed end to
    end. Raises TrainingDataError for data the user must fix, including data where no token is trained (e.g. every
    assistant turn has weight 0): that run could only ever report a loss of nothing.

    With ``validation_fraction``, a seeded share of the documents (plain text) or examples is held out before the
    tokenizer is trained; with ``validation_file``, that file is read the same way. Either is tokenized and packed
    like the training data into ``validation`` rows (too few of them: ``too_little_validation_data``).
    """
    callback = callback or NullCallback()
    filename = config.train_filename or os.path.basename(config.train_file)
    plain_text = _is_plain_text(filename, name_given=config.train_filename is not None)
    if config.validation_file is not None:
        validation_filename = config.validation_filename or os.path.basename(config.validation_file)
        validation_plain_text = _is_plain_text(validation_filename, name_given=config.validation_filename is not None)
        if validation_plain_text != plain_text:
            kinds = {True: "plain text", False: "examples (JSONL, JSON, CSV or Parquet)"}
            raise TrainingDataError(
                VALIDATION_MISMATCH,
                f"The validation file {validation_filename!r} holds {kinds[validation_plain_text]} but the training "
                f"file {filename!r} holds {kinds[plain_text]}; the validation data must be of the same kind.",
                VALIDATION_FILE_PARAM,
            )
    if plain_text:
        return _plain_text_data(config, callback, compressed=filename.strip().lower().endswith(".gz"))
    return _example_data(config, callback, filename)


def _is_plain_text(filename: str, *, name_given: bool) -> bool:
    lowered = filename.strip().lower()
    # Files were always read as plain text before train_filename existed, whatever their name.
    legacy_name = not name_given and not lowered.endswith(formats.SUPPORTED_EXTENSIONS)
    return lowered.endswith(_PLAIN_TEXT_ENDINGS) or legacy_name


def next_token_loss(logits: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 from the prefix up to t, over trained targets only.

    ``logits`` [batch, length, vocab] are the model's outputs for ``input_ids[:, :-1]``; ``row_labels``
    [batch, length + 1] are the unshifted labels of the same rows. A target labelled IGNORE_INDEX gets no loss and
    no gradient; the mean is over the trained targets, so masking changes which tokens count, not their weight.
    """
    targets = row_labels[:, 1:]
    return functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def train_causal_lm_from_scratch(
    config: FromScratchCausalLMConfig, callback: TrainingCallback | None = None
) -> TrainingResult:
    """Train a byte-level BPE tokenizer and a GPT-2 model from random weights on ``config.train_file``.

    The data is read and packed by `build_training_rows` (plain text, or chat / prompt-completion / text examples
    labelled by ``templates.tokenize_batch``); each step trains on sampled rows with `next_token_loss`.
    Raises TrainingDataError for problems the user can fix (empty file, too little text, bad encoding, an unsupported
    task, nothing to train, a loss that diverges). The model, tokenizer and config appear in ``config.output_dir``
    all at once or not at all.

    With validation data (``validation_file`` or ``validation_fraction``) the validation loss is measured every
    ``eval_every_steps`` steps and at the end; the metrics event of each such step carries ``valid_loss`` and
    ``valid_perplexity``, and a message event tells it too.
    """
    callback = callback or NullCallback()
    device = _resolve_device(config.device)
    if device.type == "cpu":
        _limit_cpu_threads()

    training_data = build_training_data(config, callback)
    tokenizer, packed_rows, packed_labels, stats = training_data.train
    validation = training_data.validation
    # Plain text trains every position: its labels are its inputs, so nothing extra is copied to the device.
    labels_are_inputs = packed_labels is packed_rows
    row_count, row_length = packed_rows.shape
    train_tokens = packed_rows.numel()
    trained_per_row = (packed_labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    # A row whose targets are all masked would divide zero by zero in the loss; it is never sampled.
    trainable_rows = torch.nonzero(trained_per_row, as_tuple=True)[0]

    torch.manual_seed(config.seed)
    model = _build_model(config, tokenizer).to(device)
    model.train()
    num_parameters = model.num_parameters()
    optimizer = _build_optimizer(model, config, device)
    autocast = _autocast_for(device)
    sampler = _PackedRowSampler(trainable_rows.numel(), seed=config.seed)

    message = (
        f"Training a {num_parameters:,}-parameter GPT-2 model from scratch on {train_tokens:,} tokens "
        f"({row_count:,} rows of {row_length}) with a {len(tokenizer):,}-token vocabulary, "
        f"for {config.max_steps:,} steps on {device.type}."
    )
    start_data: dict[str, object] = {
        "num_parameters": num_parameters,
        "train_tokens": train_tokens,
        "vocab_size": len(tokenizer),
    }
    # Plain text trains every token: its events stay exactly what they were before examples could be trained.
    if not labels_are_inputs:
        message += (
            f" Of the {stats.trained_tokens + stats.masked_tokens:,} predicted positions, "
            f"{stats.trained_tokens:,} are trained and {stats.masked_tokens:,} masked "
            f"({stats.trained_tokens_fraction:.1%} trained; {stats.examples:,} {stats.task} examples, "
            f"train_on={config.train_on})."
        )
        start_data.update(
            task=stats.task,
            examples=stats.examples,
            skipped_rows=stats.skipped_rows,
            trained_tokens=stats.trained_tokens,
            masked_tokens=stats.masked_tokens,
            trained_tokens_fraction=round(stats.trained_tokens_fraction, 4),
            tokenized_cache_hit=stats.cache_hit,
        )
    if validation is not None:
        origin = "the validation file" if config.validation_file is not None else "held-out training data"
        message += (
            f" The validation loss is measured on {validation.input_ids.shape[0]:,} rows of {origin} "
            f"({validation.stats.examples:,} {'documents' if labels_are_inputs else 'examples'} held out)."
        )
        start_data.update(validation_rows=validation.input_ids.shape[0], validation_examples=validation.stats.examples)
    callback.on_event(TrainingEvent(level="info", message=message, data=start_data))
    evaluator = _Evaluator(validation, batch_size=config.batch_size, device=device) if validation is not None else None

    initial_loss = math.nan
    final_loss = math.nan
    final_valid_loss: float | None = None if evaluator is None else math.nan
    steps_completed = 0
    stopped = False
    window = _MetricsWindow(device, report_trained_fraction=not labels_are_inputs)
    learning_rate = 0.0
    for step in range(1, config.max_steps + 1):
        if callback.should_stop():
            stopped = True
            break
        learning_rate = _learning_rate_at(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        indices = trainable_rows[sampler.next_indices(config.batch_size)]
        batch = packed_rows[indices].to(device, non_blocking=True)
        batch_labels = batch if labels_are_inputs else packed_labels[indices].to(device, non_blocking=True)
        inputs = batch[:, :-1]
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = next_token_loss(logits, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRADIENT_NORM)
        optimizer.step()

        steps_completed = step
        # .item() waits for the accelerator, so it happens only on the first step and at metrics events.
        if step == 1:
            initial_loss = loss.item()
        window.add(loss.detach(), tokens=inputs.numel(), trained_tokens=int(trained_per_row[indices].sum()))
        valid_loss = None
        if evaluator is not None and _is_evaluation_step(step, config):
            valid_loss = final_valid_loss = evaluator.loss(model, autocast, step=step)
        # An evaluation always gets a metrics event, so every validation loss reaches the chart.
        if step % config.log_every_steps == 0 or step == config.max_steps or valid_loss is not None:
            final_loss = _emit_metrics(
                callback, window, step, config, learning_rate, sampler.epoch, valid_loss=valid_loss
            )
        if valid_loss is not None:
            _emit_validation_message(callback, step, valid_loss)

    if stopped:
        valid_loss = None
        if evaluator is not None and steps_completed and evaluator.last_step != steps_completed:
            valid_loss = final_valid_loss = evaluator.loss(model, autocast, step=steps_completed)
        # When the stop comes right after a metrics event, that event is the last one and the validation loss
        # measured now goes out in the message event and the result only.
        if window.steps:
            final_loss = _emit_metrics(
                callback, window, steps_completed, config, learning_rate, sampler.epoch, valid_loss=valid_loss
            )
        if valid_loss is not None:
            _emit_validation_message(callback, steps_completed, valid_loss)

    _save_atomically(model, tokenizer, config.output_dir)
    if stopped:
        message = (
            f"Training stopped at step {steps_completed:,} of {config.max_steps:,} as requested; "
            "the model trained so far was saved."
        )
    else:
        message = f"Training finished after {steps_completed:,} steps with a training loss of {final_loss:.4f}"
        message += "." if final_valid_loss is None else f" and a validation loss of {final_valid_loss:.4f}."
    callback.on_event(TrainingEvent(level="info", message=message))
    return TrainingResult(
        output_dir=str(config.output_dir),
        steps_completed=steps_completed,
        final_train_loss=final_loss,
        initial_train_loss=initial_loss,
        num_parameters=num_parameters,
        train_tokens=train_tokens,
        stopped=stopped,
        final_valid_loss=final_valid_loss,
    )


def _is_evaluation_step(step: int, config: FromScratchCausalLMConfig) -> bool:
    every = config.eval_every_steps
    return step == config.max_steps or (every > 0 and step % every == 0)


class _Evaluator:
    """Measures the mean next-token loss over the validation rows, kept on the device for the whole run."""

    def __init__(self, rows: TrainingRows, *, batch_size: int, device: torch.device):
        self._input_ids = rows.input_ids.to(device)
        self._labels = self._input_ids if rows.labels is rows.input_ids else rows.labels.to(device)
        self._trained_targets = int((rows.labels[:, 1:] != IGNORE_INDEX).sum())
        self._batch_size = batch_size
        self.last_step: int | None = None
        """The step of the latest evaluation."""

    def loss(self, model: torch.nn.Module, autocast: contextlib.AbstractContextManager[object], *, step: int) -> float:
        """Mean loss over every trained target of every row, so the batch size does not change the result."""
        model.eval()
        try:
            total = torch.zeros((), dtype=torch.float64, device=self._input_ids.device)
            with torch.no_grad():
                for start in range(0, self._input_ids.shape[0], self._batch_size):
                    batch = self._input_ids[start : start + self._batch_size]
                    batch_labels = self._labels[start : start + self._batch_size]
                    with autocast:
                        logits = model(input_ids=batch[:, :-1]).logits
                    # next_token_loss is a mean over the batch's trained targets: weighting it by their count
                    # turns the batches' means into the mean over all rows.
                    trained = (batch_labels[:, 1:] != IGNORE_INDEX).sum()
                    total += next_token_loss(logits, batch_labels).double() * trained
        finally:
            model.train()
        self.last_step = step
        return total.item() / self._trained_targets


def _emit_validation_message(callback: TrainingCallback, step: int, valid_loss: float) -> None:
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Validation loss at step {step:,}: {valid_loss:.4f}",
            data={"step": step, "valid_loss": valid_loss, "valid_perplexity": _perplexity(valid_loss)},
        )
    )


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


class _PackedRowSampler:
    """Yields row indices epoch by epoch in a seeded random order, so every row is seen once per epoch."""

    def __init__(self, row_count: int, *, seed: int):
        self._row_count = row_count
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(row_count, generator=self._generator)
        self._position = 0
        self._rows_consumed = 0

    @property
    def epoch(self) -> float:
        return self._rows_consumed / self._row_count

    def next_indices(self, count: int) -> torch.Tensor:
        pieces = []
        needed = count
        while needed:
            if self._position == self._row_count:
                self._order = torch.randperm(self._row_count, generator=self._generator)
                self._position = 0
            taken = self._order[self._position : self._position + needed]
            self._position += taken.numel()
            needed -= taken.numel()
            pieces.append(taken)
        self._rows_consumed += count
        return torch.cat(pieces)


class _MetricsWindow:
    """Losses and tokens since the previous metrics event; losses stay on the device until they are reported."""

    def __init__(self, device: torch.device, *, report_trained_fraction: bool = False):
        self._device = device
        # Plain text trains every position, so its metrics leave the share of trained positions out.
        self.report_trained_fraction = report_trained_fraction
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self._device)
        self.steps = 0
        self.tokens = 0
        self.trained_tokens = 0
        self.started_at = time.perf_counter()

    def add(self, loss: torch.Tensor, *, tokens: int, trained_tokens: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.trained_tokens += trained_tokens


def _emit_metrics(
    callback: TrainingCallback,
    window: _MetricsWindow,
    step: int,
    config: FromScratchCausalLMConfig,
    learning_rate: float,
    epoch: float,
    *,
    valid_loss: float | None = None,
) -> float:
    mean_loss = window.loss_sum.item() / window.steps
    elapsed = max(time.perf_counter() - window.started_at, 1e-9)
    if not math.isfinite(mean_loss):
        raise TrainingDataError(
            "training_diverged",
            f"The training loss became {mean_loss} by step {step}; lower learning_rate and try again.",
            "learning_rate",
        )
    data: dict[str, object] = {
        "step": step,
        "total_steps": config.max_steps,
        "train_loss": mean_loss,
        "learning_rate": learning_rate,
        "tokens_per_second": round(window.tokens / elapsed, 1),
        "epoch": round(epoch, 4),
    }
    if window.report_trained_fraction:
        data["trained_tokens_fraction"] = round(window.trained_tokens / max(window.tokens, 1), 4)
    message = f"Step {step:,}/{config.max_steps:,}: training loss {mean_loss:.4f}"
    if valid_loss is not None:
        data["valid_loss"] = valid_loss
        data["valid_perplexity"] = _perplexity(valid_loss)
        message += f", validation loss {valid_loss:.4f}"
    callback.on_event(TrainingEvent(level="info", type="metrics", message=message, data=data))
    window.reset()
    return mean_loss


def _learning_rate_at(step_index: int, config: FromScratchCausalLMConfig) -> float:
    """Linear warmup from zero, then cosine decay to a tenth of the peak at the end of the run."""
    peak = config.learning_rate
    if step_index < config.warmup_steps:
        return peak * (step_index + 1) / config.warmup_steps
    decay_progress = (step_index - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    minimum = peak * _MIN_LEARNING_RATE_RATIO
    return minimum + 0.5 * (1.0 + math.cos(math.pi * decay_progress)) * (peak - minimum)


def _read_training_text(
    path: str, *, compressed: bool = False, param: str = "train_file", label: str = "training file"
) -> tuple[str, bool]:
    """Return the file's text (at most MAX_TRAINING_TEXT_BYTES of it, decompressed) and whether it was cut short."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pieces: list[str] = []
    bytes_read = 0
    truncated = False
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as file:
            while True:
                chunk = file.read(min(_READ_CHUNK_BYTES, MAX_TRAINING_TEXT_BYTES - bytes_read))
                if not chunk:
                    truncated = bytes_read >= MAX_TRAINING_TEXT_BYTES and bool(file.read(1))
                    break
                pieces.append(decoder.decode(chunk, final=False))
                bytes_read += len(chunk)
            if not truncated:
                pieces.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError as error:
        raise TrainingDataError(
            "invalid_file_encoding",
            f"The {label} is not valid UTF-8 (bad bytes near byte {bytes_read + error.start:,}).",
            param,
        ) from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise TrainingDataError(
            "invalid_gzip",
            f"The {label} is named .gz but is not a complete gzip file ({error}); compress it again.",
            param,
        ) from error
    text = "".join(pieces).replace("\r\n", "\n")
    if truncated and "\n" in text:
        # Cut at a line end so the last document does not stop mid-word.
        text = text[: text.rindex("\n") + 1]
    return text, truncated


def _plain_text_data(
    config: FromScratchCausalLMConfig, callback: TrainingCallback, *, compressed: bool
) -> TrainingData:
    text, truncated = _read_training_text(config.train_file, compressed=compressed)
    if truncated:
        _warn_truncated_file(callback)
    documents = _split_documents(text)
    del text
    if not documents:
        raise TrainingDataError(
            "empty_training_file", "The training file is empty or holds only whitespace.", "train_file"
        )
    # Held out before the tokenizer is trained: the validation loss must measure text the run has never seen, and
    # a tokenizer that had merged the held-out words would have seen it.
    held_out: list[str] | None = None
    if config.validation_fraction > 0 and len(documents) >= _MIN_DOCUMENTS_TO_HOLD_OUT:
        documents, held_out = _hold_out(documents, config, unit="documents")
    elif config.validation_fraction > 0:
        # Few documents, typically a file of lines with no blank line between them: hold out lines instead, and
        # keep the remaining lines in their documents.
        documents, held_out = _hold_out_lines(documents, config)
    elif config.validation_file is not None:
        held_out = _read_validation_documents(config)

    tokenizer = train_byte_level_bpe(documents, vocab_size=config.vocab_size, special_tokens=(END_OF_TEXT,))
    tokenizer.model_max_length = config.context_length
    document_count = len(documents)
    token_ids = _encode_documents(tokenizer, documents)
    del documents
    row_length = config.context_length + 1
    if token_ids.numel() < row_length:
        raise TrainingDataError(
            TOO_LITTLE_DATA,
            f"The training file has {token_ids.numel()} tokens after tokenization, fewer than the "
            f"{row_length} one training row needs (context_length + 1). Add more text or lower context_length.",
            "train_file",
        )
    # Packing: contiguous rows with no padding, so every position of every row is a useful training token.
    row_count = token_ids.numel() // row_length
    packed_rows = token_ids[: row_count * row_length].view(row_count, row_length)
    stats = TrainingRowsStats(
        task=str(DatasetTask.CAUSAL_LM),
        examples=document_count,
        skipped_rows=0,
        truncated_examples=0,
        sequence_tokens=token_ids.numel(),
        packed_tokens=packed_rows.numel(),
        trained_tokens=row_count * config.context_length,
        masked_tokens=0,
        trainable_rows=row_count,
        truncated_file=truncated,
    )
    train = TrainingRows(tokenizer=tokenizer, input_ids=packed_rows, labels=packed_rows, stats=stats)
    if held_out is None:
        return TrainingData(train=train, validation=None)
    validation_ids = _encode_documents(tokenizer, held_out, max_tokens=MAX_VALIDATION_ROWS * row_length)
    validation = _validation_rows(
        config, tokenizer, validation_ids, validation_ids, task=DatasetTask.CAUSAL_LM, examples=len(held_out)
    )
    return TrainingData(train=train, validation=validation)


def _read_validation_documents(config: FromScratchCausalLMConfig) -> list[str]:
    assert config.validation_file is not None
    filename = config.validation_filename or os.path.basename(config.validation_file)
    # Cut at MAX_TRAINING_TEXT_BYTES like the training file, without a warning: an evaluation uses only its first
    # MAX_VALIDATION_ROWS rows anyway.
    text, _ = _read_training_text(
        config.validation_file,
        compressed=filename.strip().lower().endswith(".gz"),
        param=VALIDATION_FILE_PARAM,
        label="validation file",
    )
    documents = _split_documents(text)
    if not documents:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            "The validation file is empty or holds only whitespace; add held-out text to it or leave it out.",
            VALIDATION_FILE_PARAM,
        )
    return documents


def _hold_out_lines(documents: list[str], config: FromScratchCausalLMConfig) -> tuple[list[str], list[str]]:
    """(training documents, held-out lines): a seeded share of the non-empty lines, the rest left in place."""
    lines = [
        (number, line) for number, document in enumerate(documents) for line in document.split("\n") if line.strip()
    ]
    kept, held_out = _hold_out(lines, config, unit="lines")
    by_document: dict[int, list[str]] = {}
    for number, line in kept:
        by_document.setdefault(number, []).append(line)
    return ["\n".join(by_document[number]) for number in sorted(by_document)], [line for _, line in held_out]


def _hold_out(items: list[_Item], config: FromScratchCausalLMConfig, *, unit: str) -> tuple[list[_Item], list[_Item]]:
    """(training items, held-out items), split by `split_indices` seeded with ``config.seed``, each in file order."""
    train_indices, held_out_indices = split_indices(
        len(items), validation_fraction=config.validation_fraction, seed=config.seed, stratify=False
    )
    if not held_out_indices:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            f"validation_fraction holds out whole {unit}, and the training file has only {len(items)}, too few to "
            f"keep some for training and some for validation. Add more {unit}"
            + (" (blank lines separate documents)" if unit == "documents" else "")
            + ", or give a validation_file instead.",
            VALIDATION_FRACTION_PARAM,
        )
    return [items[index] for index in train_indices], [items[index] for index in held_out_indices]


def _validation_rows(
    config: FromScratchCausalLMConfig,
    tokenizer: PreTrainedTokenizerFast,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: DatasetTask,
    examples: int,
    skipped_rows: int = 0,
    truncated_examples: int = 0,
) -> TrainingRows:
    """Pack held-out tokens exactly like the training ones; keep the first MAX_VALIDATION_ROWS rows with a trained
    target (a row with none adds nothing to the loss)."""
    from_file = config.validation_file is not None
    param = VALIDATION_FILE_PARAM if from_file else VALIDATION_FRACTION_PARAM
    source = "The validation file's" if from_file else "The held-out"
    advice = "Add more to the validation file" if from_file else "Raise validation_fraction"
    row_length = config.context_length + 1
    row_count = input_ids.numel() // row_length
    if row_count == 0:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            f"{source} {examples:,} {'documents' if labels is input_ids else 'examples'} make {input_ids.numel()} "
            f"tokens, fewer than the {row_length} one validation row needs (context_length + 1). {advice} or lower "
            "context_length.",
            param,
        )
    packed_rows = input_ids[: row_count * row_length].view(row_count, row_length)
    packed_labels = packed_rows if labels is input_ids else labels[: row_count * row_length].view(row_count, row_length)
    trained_per_row = (packed_labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    kept = torch.nonzero(trained_per_row, as_tuple=True)[0][:MAX_VALIDATION_ROWS]
    if kept.numel() == 0:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            f"No token of the validation data is trained (as train_on={config.train_on!r} labels it), so there is "
            f"no loss to measure. {advice}.",
            param,
        )
    kept_rows = packed_rows[kept]
    kept_labels = kept_rows if labels is input_ids else packed_labels[kept]
    trained_tokens = int(trained_per_row[kept].sum())
    stats = TrainingRowsStats(
        task=str(task),
        examples=examples,
        skipped_rows=skipped_rows,
        truncated_examples=truncated_examples,
        sequence_tokens=input_ids.numel(),
        packed_tokens=kept_rows.numel(),
        trained_tokens=trained_tokens,
        masked_tokens=kept.numel() * config.context_length - trained_tokens,
        trainable_rows=kept.numel(),
    )
    return TrainingRows(tokenizer=tokenizer, input_ids=kept_rows, labels=kept_labels, stats=stats)


def _detect_examples(path: str, filename: str, *, param: str) -> tuple[DatasetFormat, DatasetTask]:
    try:
        data_format = formats.detect_format(path, filename=filename)
        _, _, task = formats.resolve_columns(path, filename=filename, fmt=data_format, column_mapping=None)
    except formats.UnsupportedFormat as error:
        if param == VALIDATION_FILE_PARAM and error.code == "empty_file":
            raise TrainingDataError(
                TOO_LITTLE_VALIDATION_DATA,
                "The validation file is empty; add held-out examples to it or leave it out.",
                param,
            ) from error
        raise TrainingDataError(error.code, error.message, param) from error
    return data_format, task


def _example_data(config: FromScratchCausalLMConfig, callback: TrainingCallback, filename: str) -> TrainingData:
    path = config.train_file
    data_format, task = _detect_examples(path, filename, param=TRAINING_FILE_PARAM)
    if task not in _CAUSAL_TASKS:
        raise TrainingDataError(
            UNSUPPORTED_TASK,
            f"This file holds {task} examples, which train a different kind of model; training on {task} data "
            "comes in a later version. Upload plain text, chat or prompt/completion data for this model.",
            TRAINING_FILE_PARAM,
        )
    validation_filename = None
    validation_format = None
    if config.validation_file is not None:
        # Checked before the training file is read, so a wrong validation file fails in a moment, not minutes.
        validation_filename = config.validation_filename or os.path.basename(config.validation_file)
        validation_format, validation_task = _detect_examples(
            config.validation_file, validation_filename, param=VALIDATION_FILE_PARAM
        )
        if validation_task != task:
            raise TrainingDataError(
                VALIDATION_MISMATCH,
                f"The validation file holds {validation_task} examples but the training file holds {task} examples; "
                "the validation data must be of the same kind.",
                VALIDATION_FILE_PARAM,
            )
    examples, skipped_rows, truncated_file = _read_examples(path, filename, data_format, callback)
    # Held out before the tokenizer is trained, as for plain text.
    held_out: list[Example] | None = None
    validation_skipped = 0
    if config.validation_fraction > 0:
        examples, held_out = _hold_out(examples, config, unit="examples")
    elif config.validation_file is not None:
        assert validation_filename is not None and validation_format is not None
        held_out, validation_skipped, _ = _read_examples(
            config.validation_file,
            validation_filename,
            validation_format,
            callback,
            param=VALIDATION_FILE_PARAM,
            label="validation file",
            too_little_code=TOO_LITTLE_VALIDATION_DATA,
        )

    tokenizer = train_byte_level_bpe(
        (example_text(example) for example in examples), vocab_size=config.vocab_size, special_tokens=(END_OF_TEXT,)
    )
    if task == DatasetTask.CHAT:
        # Added before the model is built, so the embeddings cover them and they are saved with the tokenizer.
        templates.ensure_template_tokens(tokenizer, config.chat_template)
    tokenizer.model_max_length = config.context_length
    row_length = config.context_length + 1

    cache_key = None
    cache_hit = None
    if config.tokenized_cache_dir is not None:
        cache_key, cache_hit, input_ids, labels, truncated_examples = _tokenize_through_cache(
            config, examples, tokenizer, task=task
        )
    else:
        input_ids, labels, truncated_examples = _tokenize_in_memory(config, examples, tokenizer)
    example_count = len(examples)
    del examples

    if truncated_examples:
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"{truncated_examples:,} of {example_count:,} examples are longer than {row_length} tokens "
                "(context_length + 1) and were cut at the end; raise context_length to train on all of them.",
                data={"truncated_examples": truncated_examples},
            )
        )
    if input_ids.numel() < row_length:
        raise TrainingDataError(
            TOO_LITTLE_DATA,
            f"The training file's {example_count:,} examples make {input_ids.numel()} tokens, fewer than the "
            f"{row_length} one training row needs (context_length + 1). Add more examples or lower context_length.",
            TRAINING_FILE_PARAM,
        )
    row_count = input_ids.numel() // row_length
    packed_rows = input_ids[: row_count * row_length].view(row_count, row_length)
    packed_labels = labels[: row_count * row_length].view(row_count, row_length)
    trained_per_row = (packed_labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    trained_tokens = int(trained_per_row.sum())
    if trained_tokens == 0:
        if task == DatasetTask.CHAT and config.train_on == "completions":
            advice = 'every assistant message has "weight": 0. Give some of them weight 1, or set train_on to "all".'
        else:
            advice = 'set train_on to "all" to train on every token.'
        raise TrainingDataError(
            NOTHING_TO_TRAIN,
            f"No token of the training file is trained, so there is nothing to learn: {advice}",
            TRAINING_FILE_PARAM,
        )
    stats = TrainingRowsStats(
        task=str(task),
        examples=example_count,
        skipped_rows=skipped_rows,
        truncated_examples=truncated_examples,
        sequence_tokens=input_ids.numel(),
        packed_tokens=packed_rows.numel(),
        trained_tokens=trained_tokens,
        masked_tokens=row_count * config.context_length - trained_tokens,
        trainable_rows=int((trained_per_row > 0).sum()),
        cache_key=cache_key,
        cache_hit=cache_hit,
        truncated_file=truncated_file,
    )
    train = TrainingRows(tokenizer=tokenizer, input_ids=packed_rows, labels=packed_labels, stats=stats)
    if held_out is None:
        return TrainingData(train=train, validation=None)
    # The same tokenize_batch, template and train_on as the training side: the validation loss covers the same kind
    # of positions the training loss does.
    validation_ids, validation_labels, validation_truncated = _tokenize_in_memory(
        config, held_out, tokenizer, max_trainable_rows=MAX_VALIDATION_ROWS
    )
    validation = _validation_rows(
        config,
        tokenizer,
        validation_ids,
        validation_labels,
        task=task,
        examples=len(held_out),
        skipped_rows=validation_skipped,
        truncated_examples=validation_truncated,
    )
    return TrainingData(train=train, validation=validation)


def _read_examples(
    path: str,
    filename: str,
    data_format: DatasetFormat,
    callback: TrainingCallback,
    *,
    param: str = TRAINING_FILE_PARAM,
    label: str = "training file",
    too_little_code: str = TOO_LITTLE_DATA,
) -> tuple[list[Example], int, bool]:
    """The file's examples (up to MAX_TRAINING_TEXT_BYTES of their text), the rows skipped, and whether it was cut."""
    examples: list[Example] = []
    skipped: list[RowError] = []
    text_bytes = 0
    truncated = False
    try:
        with contextlib.closing(formats.iter_examples(path, filename=filename, fmt=data_format)) as rows:
            for item in rows:
                if isinstance(item, RowError):
                    if item.line == 0:
                        # A whole-file problem (a damaged gzip stream, too many rows): the rest is unreadable.
                        raise TrainingDataError(item.code, item.message, param)
                    skipped.append(item)
                    continue
                examples.append(item)
                text_bytes += len(example_text(item).encode("utf-8"))
                if text_bytes >= MAX_TRAINING_TEXT_BYTES:
                    truncated = True
                    break
    except formats.UnsupportedFormat as error:
        raise TrainingDataError(error.code, error.message, param) from error
    # A validation file is cut without a warning: an evaluation uses only its first MAX_VALIDATION_ROWS rows.
    if truncated and param == TRAINING_FILE_PARAM:
        _warn_truncated_file(callback)
    if skipped:
        first = skipped[0]
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"{len(skipped):,} rows of the {label} could not be read and were skipped "
                f"(first: {first.message})",
                data={"skipped_rows": len(skipped), "first_error": first.to_dict()},
            )
        )
    if not examples:
        reason = f" The first problem: {skipped[0].message}" if skipped else ""
        purpose = "train on" if param == TRAINING_FILE_PARAM else "measure a validation loss on"
        raise TrainingDataError(too_little_code, f"The {label} has no valid example to {purpose}.{reason}", param)
    return examples, len(skipped), truncated


def _tokenize_in_memory(
    config: FromScratchCausalLMConfig,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    *,
    max_trainable_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All examples' input ids and labels end to end, and how many examples were truncated.

    With ``max_trainable_rows``, stops after the batch that completes that many packed rows with a trained target.
    """
    row_length = config.context_length + 1
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = 0
    for start in range(0, len(examples), _EXAMPLES_PER_TOKENIZE_BATCH):
        # Looked up on the module at call time, so a test can count the calls.
        for item in templates.tokenize_batch(
            examples[start : start + _EXAMPLES_PER_TOKENIZE_BATCH],
            tokenizer,
            template=config.chat_template,
            train_on=config.train_on,
            max_length=row_length,
        ):
            input_ids += item.input_ids
            labels += item.labels
            truncated += item.truncated
        if max_trainable_rows is not None and len(labels) >= max_trainable_rows * row_length:
            row_count = len(labels) // row_length
            packed = torch.tensor(labels[: row_count * row_length], dtype=torch.long).view(row_count, row_length)
            if int((packed[:, 1:] != IGNORE_INDEX).any(dim=1).sum()) >= max_trainable_rows:
                break
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), truncated


def _tokenize_through_cache(
    config: FromScratchCausalLMConfig,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    *,
    task: DatasetTask,
) -> tuple[str, bool, torch.Tensor, torch.Tensor, int]:
    """Like _tokenize_in_memory, through the tokenized cache; also returns the cache key and whether it was hit."""
    # Imported here: `datasets` takes a second to import, and plain-text runs and the CLI's error paths never use it.
    import pyarrow.compute as arrow_compute

    from workers.ml.data import tokenized_cache

    assert config.tokenized_cache_dir is not None
    max_length = config.context_length + 1
    key = tokenized_cache.cache_key(
        dataset_sha256=_training_examples_fingerprint(config),
        tokenizer_fingerprint=tokenized_cache.tokenizer_fingerprint(tokenizer),
        template=config.chat_template,
        train_on=config.train_on,
        max_length=max_length,
        task=str(task),
    )
    hit = tokenized_cache.cache_hit(config.tokenized_cache_dir, key)
    dataset = tokenized_cache.tokenize_to_cache(
        examples,
        tokenizer,
        cache_dir=config.tokenized_cache_dir,
        key=key,
        template=config.chat_template,
        train_on=config.train_on,
        max_length=max_length,
        batch_rows=_EXAMPLES_PER_TOKENIZE_BATCH,
    )
    table = dataset.data

    def flat(column: str) -> torch.Tensor:
        # The cache is memory-mapped and read-only; astype copies it into memory this process owns.
        values = arrow_compute.list_flatten(table.column(column)).to_numpy()
        return torch.from_numpy(values.astype("int64"))

    truncated = int(arrow_compute.sum(table.column("truncated").cast("int64")).as_py() or 0)
    return key, hit, flat("input_ids"), flat("labels"), truncated


def _training_examples_fingerprint(config: FromScratchCausalLMConfig) -> str:
    """The sha256 of the training file, or, when a share is held out, of the file and the split that picks it."""
    file_sha256 = _file_sha256(config.train_file)
    if config.validation_fraction == 0:
        return file_sha256
    # Another fraction or seed trains on other examples: they must not find each other's cached rows.
    split = json.dumps(
        {"file_sha256": file_sha256, "validation_fraction": config.validation_fraction, "seed": config.seed},
        sort_keys=True,
    )
    return hashlib.sha256(split.encode("utf-8")).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _warn_truncated_file(callback: TrainingCallback) -> None:
    callback.on_event(
        TrainingEvent(
            level="warning",
            message=f"The training file is larger than {MAX_TRAINING_TEXT_BYTES // (1024 * 1024)} MB; "
            "only its beginning is used.",
        )
    )


def _split_documents(text: str) -> list[str]:
    """Blank lines separate documents; an end-of-text token between them teaches the model where text ends."""
    return [document.strip() for document in _DOCUMENT_SEPARATOR.split(text) if document.strip()]


def _encode_documents(
    tokenizer: PreTrainedTokenizerFast, documents: list[str], *, max_tokens: int | None = None
) -> torch.Tensor:
    """The documents' token ids end to end, each followed by end-of-text; with ``max_tokens``, stops after the batch
    that reaches it."""
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    backend = tokenizer.backend_tokenizer
    pieces: list[torch.Tensor] = []
    token_count = 0
    for start in range(0, len(documents), _DOCUMENTS_PER_ENCODE_BATCH):
        batch = documents[start : start + _DOCUMENTS_PER_ENCODE_BATCH]
        # encode_batch_fast skips offsets, which training never needs and which cost memory on large files.
        for encoding in backend.encode_batch_fast(batch, add_special_tokens=False):
            pieces.append(torch.tensor([*encoding.ids, end_of_text_id], dtype=torch.long))
            token_count += pieces[-1].numel()
        if max_tokens is not None and token_count >= max_tokens:
            break
    return torch.cat(pieces)


def _build_model(config: FromScratchCausalLMConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.context_length,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        # Dropout is off, as in modern pretraining recipes: short runs underfit far more than they overfit.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=end_of_text_id,
        eos_token_id=end_of_text_id,
        # No pad id: packed rows have no padding, and the end-of-text tokens inside them must not look like it.
        pad_token_id=None,
    )
    return GPT2LMHeadModel(model_config)


def _build_optimizer(
    model: torch.nn.Module, config: FromScratchCausalLMConfig, device: torch.device
) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying biases and LayerNorm gains only hurts.
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decayed = [parameter for parameter in parameters if parameter.dim() >= 2]
    not_decayed = [parameter for parameter in parameters if parameter.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decayed, "weight_decay": _WEIGHT_DECAY}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=_ADAM_BETAS,
        fused=device.type == "cuda",
    )


def _autocast_for(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError(INVALID_HYPERPARAMETER, "device is cuda but no CUDA device is available.", "device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingDataError(INVALID_HYPERPARAMETER, "device is mps but MPS is not available.", "device")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


def _limit_cpu_threads() -> None:
    # The CPU worker shares the machine with another worker process; half the cores leaves it room. Only ever
    # lowers the count, so a caller that already chose fewer threads keeps its choice.
    wanted = max(1, (os.cpu_count() or 2) // 2)
    if torch.get_num_threads() > wanted:
        torch.set_num_threads(wanted)


def _save_atomically(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, output_dir: str) -> None:
    """Write everything into a hidden folder beside ``output_dir`` and rename it, so no half model ever appears."""
    target = Path(output_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        # transformers 5 writes safetensors only (there is no pickle option left to turn off).
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote no model.safetensors into {staging}")
        staging.chmod(0o755)  # mkdtemp makes the folder private; the serving process may run as another user
        if target.exists():
            previous = target.with_name(f".{target.name}.previous-{uuid.uuid4().hex}")
            os.replace(target, previous)
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Run one training (`workers.ml.engine.run_training`) from a JSON config file, printing events and a final
    result as JSON lines on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.ml.train",
        description="Train a model (any task and mode of the engine); events and the result go to stdout as JSON "
        "lines.",
    )
    parser.add_argument("config", help="JSON file with the fields of workers.ml.config.TrainingConfig")
    arguments = parser.parse_args(argv)
    output = JsonLinesCallback(sys.stdout)
    # Imported here: the engine pulls in peft and scikit-learn, which this module's own users never need.
    from workers.ml.engine import run_training

    try:
        config = TrainingConfig.from_dict(_read_config_file(arguments.config))
        result = run_training(config, output)
    except TrainingDataError as error:
        output.on_event(TrainingEvent(level="error", message=error.message, data=error.to_dict()))
        return 1
    output.write_line({"type": "result", **dataclasses.asdict(result)})
    return 0


def _read_config_file(path: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingDataError("invalid_config", f"Could not read the configuration file {path}: {error}") from error


if __name__ == "__main__":
    raise SystemExit(main())
