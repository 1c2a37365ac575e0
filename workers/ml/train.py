"""Training a small GPT-2 style causal language model from scratch on a user's text file.

Also a command line: ``python -m workers.ml.train CONFIG.json`` prints events as JSON lines and a final result line.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as functional
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workers.ml.callbacks import JsonLinesCallback, NullCallback, TrainingCallback, TrainingEvent
from workers.ml.config import INVALID_HYPERPARAMETER, FromScratchCausalLMConfig
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


def train_causal_lm_from_scratch(
    config: FromScratchCausalLMConfig, callback: TrainingCallback | None = None
) -> TrainingResult:
    """Train a byte-level BPE tokenizer and a GPT-2 model from random weights on ``config.train_file``.

    Raises TrainingDataError for problems the user can fix (empty file, too little text, bad encoding, a loss that
    diverges). The model, tokenizer and config appear in ``config.output_dir`` all at once or not at all.
    """
    callback = callback or NullCallback()
    device = _resolve_device(config.device)
    if device.type == "cpu":
        _limit_cpu_threads()

    text, truncated = _read_training_text(config.train_file)
    if truncated:
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"The training file is larger than {MAX_TRAINING_TEXT_BYTES // (1024 * 1024)} MB; "
                "only its beginning is used.",
            )
        )
    documents = _split_documents(text)
    del text
    if not documents:
        raise TrainingDataError(
            "empty_training_file", "The training file is empty or holds only whitespace.", "train_file"
        )

    tokenizer = train_byte_level_bpe(documents, vocab_size=config.vocab_size, special_tokens=(END_OF_TEXT,))
    tokenizer.model_max_length = config.context_length
    token_ids = _encode_documents(tokenizer, documents)
    del documents
    row_length = config.context_length + 1
    if token_ids.numel() < row_length:
        raise TrainingDataError(
            "too_little_data",
            f"The training file has {token_ids.numel()} tokens after tokenization, fewer than the "
            f"{row_length} one training row needs (context_length + 1). Add more text or lower context_length.",
            "train_file",
        )
    # Packing: contiguous rows with no padding, so every position of every row is a useful training token.
    row_count = token_ids.numel() // row_length
    packed_rows = token_ids[: row_count * row_length].view(row_count, row_length)
    train_tokens = packed_rows.numel()

    torch.manual_seed(config.seed)
    model = _build_model(config, tokenizer).to(device)
    model.train()
    num_parameters = model.num_parameters()
    optimizer = _build_optimizer(model, config, device)
    autocast = _autocast_for(device)
    sampler = _PackedRowSampler(row_count, seed=config.seed)

    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Training a {num_parameters:,}-parameter GPT-2 model from scratch on {train_tokens:,} tokens "
            f"({row_count:,} rows of {row_length}) with a {len(tokenizer):,}-token vocabulary, "
            f"for {config.max_steps:,} steps on {device.type}.",
            data={"num_parameters": num_parameters, "train_tokens": train_tokens, "vocab_size": len(tokenizer)},
        )
    )

    initial_loss = math.nan
    final_loss = math.nan
    steps_completed = 0
    stopped = False
    window = _MetricsWindow(device)
    learning_rate = 0.0
    for step in range(1, config.max_steps + 1):
        if callback.should_stop():
            stopped = True
            break
        learning_rate = _learning_rate_at(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        batch = packed_rows[sampler.next_indices(config.batch_size)].to(device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRADIENT_NORM)
        optimizer.step()

        steps_completed = step
        # .item() waits for the accelerator, so it happens only on the first step and at metrics events.
        if step == 1:
            initial_loss = loss.item()
        window.add(loss.detach(), tokens=inputs.numel())
        if step % config.log_every_steps == 0 or step == config.max_steps:
            final_loss = _emit_metrics(callback, window, step, config, learning_rate, sampler.epoch)

    if stopped and window.steps:
        final_loss = _emit_metrics(callback, window, steps_completed, config, learning_rate, sampler.epoch)

    _save_atomically(model, tokenizer, config.output_dir)
    if stopped:
        message = (
            f"Training stopped at step {steps_completed:,} of {config.max_steps:,} as requested; "
            "the model trained so far was saved."
        )
    else:
        message = f"Training finished after {steps_completed:,} steps with a training loss of {final_loss:.4f}."
    callback.on_event(TrainingEvent(level="info", message=message))
    return TrainingResult(
        output_dir=str(config.output_dir),
        steps_completed=steps_completed,
        final_train_loss=final_loss,
        initial_train_loss=initial_loss,
        num_parameters=num_parameters,
        train_tokens=train_tokens,
        stopped=stopped,
    )


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

    def __init__(self, device: torch.device):
        self._device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self._device)
        self.steps = 0
        self.tokens = 0
        self.started_at = time.perf_counter()

    def add(self, loss: torch.Tensor, *, tokens: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens


def _emit_metrics(
    callback: TrainingCallback,
    window: _MetricsWindow,
    step: int,
    config: FromScratchCausalLMConfig,
    learning_rate: float,
    epoch: float,
) -> float:
    mean_loss = window.loss_sum.item() / window.steps
    elapsed = max(time.perf_counter() - window.started_at, 1e-9)
    if not math.isfinite(mean_loss):
        raise TrainingDataError(
            "training_diverged",
            f"The training loss became {mean_loss} by step {step}; lower learning_rate and try again.",
            "learning_rate",
        )
    callback.on_event(
        TrainingEvent(
            level="info",
            type="metrics",
            message=f"Step {step:,}/{config.max_steps:,}: training loss {mean_loss:.4f}",
            data={
                "step": step,
                "total_steps": config.max_steps,
                "train_loss": mean_loss,
                "learning_rate": learning_rate,
                "tokens_per_second": round(window.tokens / elapsed, 1),
                "epoch": round(epoch, 4),
            },
        )
    )
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


def _read_training_text(path: str) -> tuple[str, bool]:
    """Return the file's text (at most MAX_TRAINING_TEXT_BYTES of it) and whether it was cut short."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pieces: list[str] = []
    bytes_read = 0
    truncated = False
    try:
        with open(path, "rb") as file:
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
            f"The training file is not valid UTF-8 (bad bytes near byte {bytes_read + error.start:,}).",
            "train_file",
        ) from error
    text = "".join(pieces).replace("\r\n", "\n")
    if truncated and "\n" in text:
        # Cut at a line end so the last document does not stop mid-word.
        text = text[: text.rindex("\n") + 1]
    return text, truncated


def _split_documents(text: str) -> list[str]:
    """Blank lines separate documents; an end-of-text token between them teaches the model where text ends."""
    return [document.strip() for document in _DOCUMENT_SEPARATOR.split(text) if document.strip()]


def _encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    backend = tokenizer.backend_tokenizer
    pieces: list[torch.Tensor] = []
    for start in range(0, len(documents), _DOCUMENTS_PER_ENCODE_BATCH):
        batch = documents[start : start + _DOCUMENTS_PER_ENCODE_BATCH]
        # encode_batch_fast skips offsets, which training never needs and which cost memory on large files.
        for encoding in backend.encode_batch_fast(batch, add_special_tokens=False):
            pieces.append(torch.tensor([*encoding.ids, end_of_text_id], dtype=torch.long))
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
    """Run one training from a JSON config file, printing events and a final result as JSON lines on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.ml.train",
        description="Train a small GPT-2 style model from scratch. Events and the result go to stdout as JSON lines.",
    )
    parser.add_argument("config", help="JSON file with the fields of FromScratchCausalLMConfig")
    arguments = parser.parse_args(argv)
    output = JsonLinesCallback(sys.stdout)
    try:
        config = FromScratchCausalLMConfig.from_dict(_read_config_file(arguments.config))
        result = train_causal_lm_from_scratch(config, output)
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
