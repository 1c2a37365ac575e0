"""The training engine: one function runs any task (causal LM, classification, seq2seq) in any mode (from scratch,
full fine-tuning, LoRA), with checkpoints it can resume from exactly, evaluation and early stopping.

`run_training(config, callback)` is what the ``gpu`` worker and ``python -m workers.ml.train CONFIG.json`` call. It
imports no Django: data comes from local paths, progress leaves through the callback.

Speed comes from doing no wasted work: causal-LM rows are packed with per-example attention (no padding, no
attention across examples), other tasks are padded per batch with length grouping, the loss is computed once in
fp32 over trained targets only (for causal LMs fused with the output projection, chunk by chunk: no full-vocabulary
logits, see ``fused_loss``), AdamW uses fused kernels on CUDA, bf16 autocast where the GPU supports it, and
``torch.compile`` on CUDA where shapes are fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional
from transformers import PreTrainedTokenizerBase

from workers.ml import checkpoint as checkpoints
from workers.ml import (
    cpu_activations,
    cpu_attention,
    cpu_memory,
    fused_loss,
    metrics,
    modeling,
    packed_gpt2,
    prepared,
    transfer,
)
from workers.ml.callbacks import NullCallback, TrainingCallback, TrainingEvent
from workers.ml.config import INVALID_HYPERPARAMETER, TrainingConfig
from workers.ml.data import templates
from workers.ml.data.examples import DatasetTask
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.data.training_sets import (
    NOTHING_TO_TRAIN,
    TOO_LITTLE_VALIDATION_DATA,
    TRAINING_FILE_PARAM,
    Batch,
    BatchSource,
    TokenizedSet,
    evaluation_batches,
    limit,
    read_example_sets,
    tokenize_causal_examples_cached,
    tokenize_like_config,
    tokenizer_texts,
    trained_target_count,
)
from workers.ml.errors import TrainingDataError
from workers.ml.optimization import build_optimizer, build_scheduler, learning_rate_at
from workers.ml.tokenizer_training import END_OF_TEXT, TokenizerSpec, train_byte_level_bpe, train_tokenizer

REPORT_FILENAME = "training_report.json"
_TRAINER_STATE = "trainer_state.json"
_MODEL_WEIGHTS = "trainable.safetensors"
_SCHEDULER_STATE = "scheduler.json"
_TOKENIZER_FOLDER = "tokenizer"
# Metrics that get better as they fall; every other evaluation metric gets better as it rises.
_MINIMISED_METRICS = ("valid_loss", "valid_perplexity")
_SAMPLE_PREDICTIONS = 10
# Fields that do not change what a run computes: a resumed attempt may differ in them and still continue.
_FINGERPRINT_IGNORES = (
    "train_file",
    "validation_file",
    "prepared_data",
    "output_dir",
    "checkpoint_dir",
    "tokenized_cache_dir",
    "device",
    "log_every_steps",
    "checkpoint_every_steps",
    "checkpoints_kept",
    "base_model",
    "tokenizer",
)


@dataclass(frozen=True)
class EngineResult:
    """What a finished, stopped or early-stopped run produced."""

    output_dir: str | None
    """Folder of the exported model; None when the run was stopped by the callback (its checkpoint holds it)."""
    steps_completed: int
    total_steps: int
    stopped: bool
    """True when the callback asked training to stop (cancel, pause, shutdown)."""
    early_stopped: bool
    """True when the early-stopping metric stopped improving."""
    initial_train_loss: float
    final_train_loss: float
    final_metrics: dict[str, Any]
    """The last evaluation's metrics (empty without validation data)."""
    num_parameters: int
    trainable_parameters: int
    train_tokens: int
    """Useful (non-padding) tokens the run trained on, summed over its steps."""
    resumed_from_step: int | None
    """The checkpoint step this run continued from, None for a fresh start."""


@dataclass
class _Setup:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    label_names: list[str] | None
    train_source: BatchSource
    validation: TokenizedSet | None
    num_parameters: int
    trainable_parameters: int


def run_training(config: TrainingConfig, callback: TrainingCallback | None = None) -> EngineResult:
    """Train as ``config`` says; raise TrainingDataError for anything the user must fix.

    With ``checkpoint_dir`` holding a checkpoint of the same run (same hyperparameters and data), training continues
    from the latest complete one: same tokenizer, weights, optimizer and scheduler state, random state, and the next
    batch the interrupted run would have taken, so the logged steps and losses equal an uninterrupted run's.
    """
    device = _resolve_device(config.device)
    if device.type != "cpu":
        return _run_training(config, callback, device)
    # A CPU step frees and allocates the same large tensors again: keep their memory for reuse (see cpu_memory).
    with cpu_memory.kept_for_reuse():
        return _run_training(config, callback, device)


def _run_training(config: TrainingConfig, callback: TrainingCallback | None, device: torch.device) -> EngineResult:
    callback = callback or NullCallback()
    if device.type == "cpu":
        _limit_cpu_threads()
    if config.mode == "qlora":
        modeling.require_qlora_support(device)
    fingerprint = _run_fingerprint(config)
    resume_from = _resumable_checkpoint(config, fingerprint, callback)

    torch.manual_seed(config.seed)
    setup = _prepare(config, callback, resume_from)
    model = setup.model.to(device)
    model.train()
    precision = _resolve_precision(config.precision, device)
    autocast = _autocast(precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    batch_size, accumulation = _fit_batch_size(config, model, setup.train_source, device, autocast, callback)
    setup.train_source.batch_size = batch_size
    setup.train_source.batches_per_epoch = math.ceil(setup.train_source.row_count / batch_size)
    steps_per_epoch = math.ceil(setup.train_source.batches_per_epoch / accumulation)
    total_steps = config.max_steps or steps_per_epoch * config.n_epochs
    if config.warmup_steps > total_steps:
        raise TrainingDataError(
            INVALID_HYPERPARAMETER,
            f"warmup_steps ({config.warmup_steps}) is more than the {total_steps} steps this run takes.",
            "warmup_steps",
        )
    optimizer = build_optimizer(
        model,
        name=config.optimizer,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        device=device,
        momentum=config.momentum,
    )
    scheduler = build_scheduler(
        optimizer,
        name=config.scheduler,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps,
        num_cycles=config.lr_num_cycles,
        step_size=config.lr_step_size or None,
        gamma=config.lr_gamma,
        power=config.lr_power,
        min_lr_ratio=config.min_lr_ratio,
    )
    state = _LoopState()
    if resume_from is not None:
        state = _restore(resume_from, model, optimizer, scheduler)
        callback.on_event(
            TrainingEvent(
                level="info",
                message=f"Resumed from the checkpoint of step {state.step:,}; continuing to step {total_steps:,}.",
                data={"resumed_from_step": state.step},
            )
        )
    packed = setup.train_source.packed is not None
    if device.type == "cpu" and packed and config.task == "causal_lm":
        # Packed rows of a Llama-family model on a CPU: attention in blocks of queries (see cpu_attention).
        cpu_attention.use_blocked_attention(model, rows=batch_size, length=config.max_length)
    forward_model, packed_forward, compiled, compiled_loss = _maybe_compile(
        model,
        config,
        device,
        packed=packed,
        steps_left=total_steps - state.step,
        rows_per_step=batch_size * accumulation * config.max_length,
    )

    cuda_graphs = packed_forward is not None and packed_forward.cuda_graphs
    # See _keeps_gradient_buffers: then gradients are zeroed in place between steps instead of dropped.
    gradient_buffers = _keeps_gradient_buffers(cuda_graphs, accumulation)
    if gradient_buffers:
        _allocate_gradient_buffers(model)
    _announce_start(
        config, setup, callback, device, precision, total_steps, batch_size, accumulation, compiled, compiled_loss,
        cuda_graphs,
    )  # fmt: skip
    evaluator = _Evaluator(config, setup, device, autocast, batch_size) if setup.validation is not None else None
    window = _MetricsWindow(device)
    resumed_from_step = state.step if resume_from is not None else None
    stopped = False
    early_stopped = False
    while state.step < total_steps:
        if callback.should_stop():
            stopped = True
            break
        step = state.step + 1
        micro_batches = [
            setup.train_source.batch(index) for index in range(state.micro_batch, state.micro_batch + accumulation)
        ]
        trained_in_step = sum(batch.trained_targets for batch in micro_batches)
        step_loss = torch.zeros((), device=device)
        for batch in micro_batches:
            if cuda_graphs:
                # Each forward pass starts a new iteration of the graphs: what the previous one left in their memory
                # pool (its gradients have been added into their buffers or consumed by the optimizer) may be reused.
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                summed = _summed_loss(
                    forward_model, batch, config.task, device, packed_forward, compiled_loss=compiled_loss
                )
            # Each micro-batch's summed loss is divided by the targets of the whole step: the step's loss is then the
            # mean over every trained target, however the targets fall into micro-batches.
            loss = summed / max(trained_in_step, 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach()
            window.tokens += batch.useful_tokens
            window.trained_targets += batch.trained_targets
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _clip(model, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        learning_rate = learning_rate_at(scheduler)
        scheduler.step()
        optimizer.zero_grad(set_to_none=not gradient_buffers)
        state.step = step
        state.micro_batch += accumulation
        state.tokens_trained += sum(batch.useful_tokens for batch in micro_batches)
        window.add(step_loss, grad_norm)
        if step == 1 and math.isnan(state.initial_loss):
            state.initial_loss = step_loss.item()

        evaluation: dict[str, Any] | None = None
        if evaluator is not None and (
            step == total_steps or (config.eval_every_steps and step % config.eval_every_steps == 0)
        ):
            evaluation = evaluator.evaluate(forward_model, step=step)
            state.last_metrics = evaluation
        if step % config.log_every_steps == 0 or step == total_steps or evaluation is not None:
            state.final_loss = _emit_metrics(
                callback,
                window,
                step=step,
                total_steps=total_steps,
                learning_rate=learning_rate,
                epoch=state.micro_batch / setup.train_source.batches_per_epoch,
                task=config.task,
                evaluation=evaluation,
            )
        if evaluation is not None:
            _emit_evaluation(callback, step, evaluation)
            if config.early_stopping_metric is not None and _early_stop(config, state, evaluation, callback, step):
                early_stopped = True
        if (
            config.checkpoint_dir
            and config.checkpoint_every_steps
            and step % config.checkpoint_every_steps == 0
            and _may_write(callback)
        ):
            _save_checkpoint(config, fingerprint, state, model, optimizer, scheduler, setup, callback)
        if early_stopped:
            break

    if stopped:
        if window.steps:
            state.final_loss = _emit_metrics(
                callback,
                window,
                step=state.step,
                total_steps=total_steps,
                learning_rate=learning_rate_at(scheduler),
                epoch=state.micro_batch / setup.train_source.batches_per_epoch,
                task=config.task,
            )
        if config.checkpoint_dir and state.step and state.step != state.last_checkpoint_step and _may_write(callback):
            _save_checkpoint(config, fingerprint, state, model, optimizer, scheduler, setup, callback)
        callback.on_event(
            TrainingEvent(
                level="info",
                message=f"Training stopped at step {state.step:,} of {total_steps:,} as requested"
                + ("; a checkpoint holds the progress." if config.checkpoint_dir else "."),
            )
        )
        return _result(
            config, state, setup, total_steps, None, stopped=True, early_stopped=False, resumed=resumed_from_step
        )

    if early_stopped and evaluator is not None and state.step != evaluator.last_step:
        state.last_metrics = evaluator.evaluate(forward_model, step=state.step)
    samples = evaluator.samples if evaluator is not None else []
    _export(config, model, setup, state, total_steps, samples)
    ending = "early-stopped" if early_stopped else "finished"
    message = f"Training {ending} after {state.step:,} steps with a training loss of {state.final_loss:.4f}"
    if state.last_metrics:
        message += ", " + _describe_metrics(state.last_metrics)
    callback.on_event(TrainingEvent(level="info", message=message + "."))
    return _result(
        config, state, setup, total_steps, config.output_dir, stopped=False, early_stopped=early_stopped,
        resumed=resumed_from_step,
    )  # fmt: skip


@dataclass
class _LoopState:
    step: int = 0
    micro_batch: int = 0
    tokens_trained: int = 0
    initial_loss: float = math.nan
    final_loss: float = math.nan
    best_metric: float | None = None
    evaluations_without_improvement: int = 0
    last_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_checkpoint_step: int = 0


# ---------------------------------------------------------------------------------------------------- preparing


def prepare_training_data(
    config: TrainingConfig, folder: str | Path, callback: TrainingCallback | None = None
) -> dict[str, Any]:
    """Reads, splits and tokenizes ``config``'s data (training the tokenizer of a from-scratch run) into ``folder``,
    raising TrainingDataError for anything the user must fix; returns the folder's manifest. A run whose config sets
    ``prepared_data`` to that folder starts training without touching the data files."""
    callback = callback or NullCallback()
    sources = _source_fingerprints(config)
    data = _prepare_data(config, callback, None)
    identity = {"data_fingerprint": _data_fingerprint(config, sources), "source_fingerprints": sources}
    return prepared.save_prepared(dataclasses.replace(data, **identity), folder)


def _prepare(
    config: TrainingConfig, callback: TrainingCallback, resume_from: checkpoints.CheckpointInfo | None
) -> _Setup:
    data = _load_prepared_data(config) if config.prepared_data else _prepare_data(config, callback, resume_from)
    tokenizer, label_names, tokenized_train, validation = data.tokenizer, data.label_names, data.train, data.validation
    model = _model_for(config, tokenizer, label_names)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    source = BatchSource(
        tokenized_train,
        task=config.task,
        batch_size=config.batch_size,
        seed=config.seed,
        packing=config.packing,
        max_length=config.max_length,
        pad_token_id=pad_token_id,
    )
    return _Setup(
        model=model,
        tokenizer=tokenizer,
        label_names=label_names,
        train_source=source,
        validation=validation,
        num_parameters=modeling.count_parameters(model),
        trainable_parameters=modeling.count_parameters(model, trainable_only=True),
    )


def _load_prepared_data(config: TrainingConfig) -> prepared.PreparedData:
    assert config.prepared_data is not None
    loaded = prepared.load_prepared(config.prepared_data, load_tokenizer=modeling.load_tokenizer)
    if loaded is None:
        raise FileNotFoundError(f"No complete prepared data in {config.prepared_data}.")
    if loaded.data_fingerprint != _data_fingerprint(config, loaded.source_fingerprints):
        # A platform bug, not the user's: the folder was prepared for other settings.
        raise ValueError("The prepared data was made for other data settings than this run's.")
    loaded.tokenizer.model_max_length = config.max_length
    return loaded


def _prepare_data(
    config: TrainingConfig, callback: TrainingCallback, resume_from: checkpoints.CheckpointInfo | None
) -> prepared.PreparedData:
    """The run's data made ready; its identity (``data_fingerprint``, ``source_fingerprints``) is left for
    `prepare_training_data` to fill in, since a run that prepares its own data does not need it."""
    sets = read_example_sets(config, callback)
    label_names = None
    label_ids = None
    if config.task == "classification":
        label_names = sorted({example.fields["label"] for example in sets.train})
        if len(label_names) < 2:
            raise TrainingDataError(
                "too_few_labels",
                f"Classification needs at least two labels; the training data has only {label_names!r}.",
                TRAINING_FILE_PARAM,
            )
        label_ids = {label: index for index, label in enumerate(label_names)}
        if sets.validation is not None:
            unseen = sorted({example.fields["label"] for example in sets.validation} - set(label_ids))
            if unseen:
                raise TrainingDataError(
                    "unknown_validation_labels",
                    f"The validation data has labels the training data never shows: {', '.join(unseen[:5])}. "
                    "A model cannot learn to predict them.",
                    "validation_file",
                )
    tokenizer = _tokenizer_for(config, sets, resume_from)
    if config.tokenized_cache_dir is not None and config.task == "causal_lm" and not sets.plain_text:
        tokenized_train, hit = tokenize_causal_examples_cached(
            sets.train,
            tokenizer,
            cache_dir=config.tokenized_cache_dir,
            examples_fingerprint=_examples_fingerprint(config),
            task=sets.task,
            max_length=config.max_length,
            chat_template=config.chat_template,
            train_on=config.train_on,
        )
        callback.on_event(
            TrainingEvent(
                level="info",
                message="Tokenized examples reused from the cache." if hit else "Tokenized examples cached for reuse.",
                data={"tokenized_cache_hit": hit},
            )
        )
    else:
        tokenized_train = tokenize_like_config(sets.train, tokenizer, config=config, sets=sets, label_ids=label_ids)
    if tokenized_train.truncated:
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"{tokenized_train.truncated:,} of {len(sets.train):,} examples are longer than max_length "
                f"({config.max_length} tokens) and were cut at the end; raise max_length to train on all of them.",
                data={"truncated_examples": tokenized_train.truncated},
            )
        )
    if trained_target_count(tokenized_train, config.task) == 0:
        advice = (
            'every assistant message has "weight": 0 or no completion is trained; set train_on to "all".'
            if sets.task in (DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION)
            else "the examples are too short to predict anything."
        )
        raise TrainingDataError(
            NOTHING_TO_TRAIN, f"No token of the training file is trained: {advice}", TRAINING_FILE_PARAM
        )
    validation = None
    if sets.validation is not None:
        tokenized_validation = tokenize_like_config(
            sets.validation[: config.max_eval_examples], tokenizer, config=config, sets=sets, label_ids=label_ids
        )
        validation = limit(tokenized_validation, config.max_eval_examples)
        if trained_target_count(validation, config.task) == 0:
            raise TrainingDataError(
                TOO_LITTLE_VALIDATION_DATA,
                "No token of the validation data is trained, so there is nothing to measure.",
                "validation_file" if sets.validation_from_file else "validation_fraction",
            )
    return prepared.PreparedData(
        tokenizer=tokenizer,
        label_names=label_names,
        train=tokenized_train,
        validation=validation,
        plain_text=sets.plain_text,
        dataset_task=str(sets.task),
        skipped_rows=sets.skipped_rows,
    )


def _tokenizer_for(
    config: TrainingConfig, sets, resume_from: checkpoints.CheckpointInfo | None
) -> PreTrainedTokenizerBase:
    if resume_from is not None:
        # The interrupted run's tokenizer, not a retrained one: the checkpoint's embeddings are indexed by its ids.
        tokenizer = modeling.load_tokenizer(str(resume_from.path / _TOKENIZER_FOLDER))
    elif config.mode != "from_scratch":
        assert config.base_model is not None
        tokenizer = modeling.load_tokenizer(config.base_model)
    elif config.tokenizer is not None:
        tokenizer = modeling.load_tokenizer(config.tokenizer)
    elif config.from_scratch_tokenizer_algorithm == "bpe":
        tokenizer = train_byte_level_bpe(
            tokenizer_texts(sets), vocab_size=config.vocab_size, special_tokens=(END_OF_TEXT,)
        )
    else:
        tokenizer = train_tokenizer(
            tokenizer_texts(sets),
            TokenizerSpec(
                algorithm=config.from_scratch_tokenizer_algorithm, vocab_size=config.vocab_size, min_frequency=1
            ),
        )
    if tokenizer.pad_token_id is None:
        # Batches of unequal examples need a pad id; which token it is does not matter, padding is never attended to
        # nor trained on.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if sets.task == DatasetTask.CHAT and resume_from is None:
        # Added before the model is built, so the embeddings cover the markers and they are saved with the tokenizer.
        templates.ensure_template_tokens(tokenizer, config.chat_template)
    tokenizer.model_max_length = config.max_length
    return tokenizer


def _model_for(
    config: TrainingConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None
) -> torch.nn.Module:
    id2label = dict(enumerate(label_names)) if label_names else None
    num_labels = len(label_names) if label_names else None
    if config.mode == "from_scratch":
        model = modeling.build_from_scratch(
            architecture=config.architecture,
            size=config.model_size,
            task=config.task,
            vocab_size=len(tokenizer),
            max_length=config.max_length,
            init=config.init,
            num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            id2label=id2label,
            dropout=config.dropout,
        )
        return model
    assert config.base_model is not None
    model = modeling.load_pretrained(config.base_model, task=config.task, num_labels=num_labels, id2label=id2label)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Template markers the base tokenizer lacked were just added; their rows start as the mean embedding.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if config.mode in ("lora", "qlora"):
        model = modeling.apply_lora(
            model,
            task=config.task,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    return model


# ---------------------------------------------------------------------------------------------------- one step


def _summed_loss(
    model: torch.nn.Module,
    batch: Batch,
    task: str,
    device: torch.device,
    packed_forward: _PackedForward | None = None,
    *,
    compiled_loss: bool = False,
) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's trained targets, computed in fp32 whatever the autocast dtype.
    ``compiled_loss``: the fused loss's chunk work runs compiled (as it always does on CUDA)."""
    if packed_forward is not None and batch.position_ids is not None and batch.attention_mask is None:
        return packed_forward.summed_loss(batch, device)
    input_ids = transfer.to_device(batch.input_ids, device)
    targets = transfer.to_device(batch.targets, device)
    attention_mask = transfer.to_device(batch.attention_mask, device) if batch.attention_mask is not None else None
    if task == "classification":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return functional.cross_entropy(logits.float(), targets, reduction="sum")
    if task == "seq2seq":
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=targets).logits
    else:
        position_ids = transfer.to_device(batch.position_ids, device) if batch.position_ids is not None else None
        fused = fused_loss.fused_parts(model)
        if fused is not None:
            body, projection = fused
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            trained_rows = transfer.to_device(fused_loss.trained_row_indices(batch.targets), device)
            return fused_loss.summed_linear_cross_entropy(
                hidden.last_hidden_state, projection, targets, trained_rows, compiled=compiled_loss
            )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _clip(model: torch.nn.Module, max_grad_norm: float) -> torch.Tensor:
    parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    # Still measured without clipping: the grad-norm chart is how a user sees a run becoming unstable.
    return torch.nn.utils.clip_grad_norm_(parameters, float("inf"))


def _fit_batch_size(
    config: TrainingConfig,
    model: torch.nn.Module,
    source: BatchSource,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[object],
    callback: TrainingCallback,
) -> tuple[int, int]:
    """(micro-batch, accumulation): as configured, or with auto_batch_size on a GPU the largest micro-batch up to
    ``batch_size`` whose forward and backward fit, accumulation raised to keep the effective batch."""
    batch_size, accumulation = config.batch_size, config.gradient_accumulation_steps
    if not config.auto_batch_size:
        return batch_size, accumulation
    if device.type != "cuda":
        callback.on_event(
            TrainingEvent(
                level="info",
                message=f"auto_batch_size probes GPU memory; on {device.type} the batch size {batch_size} is used.",
            )
        )
        return batch_size, accumulation
    effective = batch_size * accumulation
    while batch_size >= 1:
        try:
            # The longest rows are the worst case for memory; packed rows are all max_length long.
            if source.packed is not None:
                indices = torch.arange(min(batch_size, source.row_count))
            else:
                lengths = torch.tensor([len(ids) for ids in source.tokenized.input_ids])
                indices = torch.argsort(lengths, descending=True)[:batch_size]
            with autocast:
                loss = _summed_loss(model, source.collate(indices), config.task, device)
            loss.backward()
            model.zero_grad(set_to_none=True)
            break
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise TrainingDataError(
                    "out_of_memory",
                    "Even one row of max_length tokens does not fit in the GPU's memory: lower max_length, use LoRA, "
                    "or a smaller model.",
                    "max_length",
                ) from None
            batch_size //= 2
    accumulation = max(1, math.ceil(effective / batch_size))
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"auto_batch_size: micro-batch {batch_size} x {accumulation} accumulation steps fits on the GPU.",
            data={"batch_size": batch_size, "gradient_accumulation_steps": accumulation},
        )
    )
    return batch_size, accumulation


# ---------------------------------------------------------------------------------------------------- evaluating


class _Evaluator:
    """Loss-based metrics on the validation examples, plus the task's own metrics and sample predictions."""

    def __init__(
        self,
        config: TrainingConfig,
        setup: _Setup,
        device: torch.device,
        autocast: contextlib.AbstractContextManager[object],
        batch_size: int,
    ):
        assert setup.validation is not None
        self._config = config
        self._setup = setup
        self._device = device
        self._autocast = autocast
        pad = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
        self._batches = evaluation_batches(setup.validation, task=config.task, batch_size=batch_size, pad_token_id=pad)
        self.samples: list[dict[str, Any]] = []
        self.last_step: int | None = None

    def evaluate(self, model: torch.nn.Module, *, step: int) -> dict[str, Any]:
        model.eval()
        try:
            with torch.no_grad():
                results = self._measure(model)
        finally:
            model.train()
        self.last_step = step
        return results

    def _measure(self, model: torch.nn.Module) -> dict[str, Any]:
        task = self._config.task
        loss_sum = 0.0
        targets = 0
        correct = 0
        predictions: list[int] = []
        for batch in self._batches:
            input_ids = batch.input_ids.to(self._device)
            attention_mask = batch.attention_mask.to(self._device) if batch.attention_mask is not None else None
            batch_targets = batch.targets.to(self._device)
            with self._autocast:
                if task == "seq2seq":
                    logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=batch_targets).logits
                else:
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits.float()
            if task == "classification":
                loss_sum += functional.cross_entropy(logits, batch_targets, reduction="sum").item()
                predictions += logits.argmax(dim=-1).tolist()
                targets += batch_targets.numel()
                continue
            loss_sum += functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                batch_targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            batch_correct, counted = metrics.token_accuracy(logits, batch_targets, ignore_index=IGNORE_INDEX)
            correct += batch_correct
            targets += counted
        valid_loss = loss_sum / max(targets, 1)
        results: dict[str, Any] = {"valid_loss": valid_loss, "valid_perplexity": metrics.perplexity(valid_loss)}
        validation = self._setup.validation
        assert validation is not None
        if task == "classification":
            label_names = self._setup.label_names
            assert label_names is not None
            predicted = [label_names[index] for index in predictions]
            results.update(metrics.classification_metrics(validation.references, predicted, labels=label_names))
            self.samples = metrics.sample_predictions_table(
                validation.inputs_text, validation.references, predicted, limit=_SAMPLE_PREDICTIONS
            )
        else:
            results["valid_token_accuracy"] = correct / max(targets, 1)
        if task == "seq2seq":
            generated = self._generate(model)
            results.update(metrics.generation_metrics(validation.references, generated))
            self.samples = metrics.sample_predictions_table(
                validation.inputs_text, validation.references, generated, limit=_SAMPLE_PREDICTIONS
            )
        return results

    def _generate(self, model: torch.nn.Module) -> list[str]:
        tokenizer = self._setup.tokenizer
        generator = getattr(model, "_orig_mod", model)
        outputs: list[str] = []
        for batch in self._batches:
            with self._autocast:
                generated = generator.generate(
                    input_ids=batch.input_ids.to(self._device),
                    attention_mask=batch.attention_mask.to(self._device) if batch.attention_mask is not None else None,
                    max_new_tokens=self._config.generation_max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [text.strip() for text in outputs]


def _early_stop(
    config: TrainingConfig, state: _LoopState, evaluation: dict[str, Any], callback: TrainingCallback, step: int
) -> bool:
    name = config.early_stopping_metric
    assert name is not None
    if name not in evaluation:
        raise TrainingDataError(
            INVALID_HYPERPARAMETER,
            f"early_stopping_metric {name!r} is not measured for {config.task}; measured: "
            f"{', '.join(_scalar_names(evaluation))}.",
            "early_stopping_metric",
        )
    value = float(evaluation[name])
    sign = -1.0 if name in _MINIMISED_METRICS else 1.0
    if state.best_metric is None or sign * (value - state.best_metric) > config.early_stopping_threshold:
        state.best_metric = value
        state.evaluations_without_improvement = 0
        return False
    state.evaluations_without_improvement += 1
    if state.evaluations_without_improvement < config.early_stopping_patience:
        return False
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Early stopping at step {step:,}: {name} has not improved on {state.best_metric:.4f} for "
            f"{state.evaluations_without_improvement} evaluations.",
            data={"early_stopping_metric": name, "best": state.best_metric, "step": step},
        )
    )
    return True


def _scalar_names(evaluation: dict[str, Any]) -> list[str]:
    return [name for name, value in evaluation.items() if isinstance(value, int | float)]


# ---------------------------------------------------------------------------------------------------- reporting


class _MetricsWindow:
    """Losses, grad norms and tokens since the last metrics event; tensors stay on the device until reported."""

    def __init__(self, device: torch.device):
        self._device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self._device)
        self.grad_norm_sum = torch.zeros((), device=self._device)
        self.steps = 0
        self.tokens = 0
        self.trained_targets = 0
        self.started_at = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm.detach().float()
        self.steps += 1


def _emit_metrics(
    callback: TrainingCallback,
    window: _MetricsWindow,
    *,
    step: int,
    total_steps: int,
    learning_rate: float,
    epoch: float,
    task: str,
    evaluation: dict[str, Any] | None = None,
) -> float:
    # .item() waits for the accelerator: it happens once per metrics event, never per step.
    mean_loss = window.loss_sum.item() / window.steps
    if not math.isfinite(mean_loss):
        raise TrainingDataError(
            "training_diverged",
            f"The training loss became {mean_loss} by step {step}; lower learning_rate and try again.",
            "learning_rate",
        )
    elapsed = max(time.perf_counter() - window.started_at, 1e-9)
    seconds_per_step = elapsed / window.steps
    data: dict[str, Any] = {
        "step": step,
        "total_steps": total_steps,
        "train_loss": mean_loss,
        "learning_rate": learning_rate,
        "grad_norm": window.grad_norm_sum.item() / window.steps,
        "tokens_per_second": round(window.tokens / elapsed, 1),
        "epoch": round(epoch, 4),
        "eta_seconds": round(seconds_per_step * (total_steps - step), 1),
        "memory_mb": _memory_mb(window._device),
    }
    if task == "causal_lm":
        # The share of tokens the loss covers: below 1 when prompts or user turns are masked (train_on).
        data["trained_tokens_fraction"] = round(window.trained_targets / max(window.tokens, 1), 4)
    message = f"Step {step:,}/{total_steps:,}: training loss {mean_loss:.4f}"
    if evaluation is not None:
        data.update({name: value for name, value in evaluation.items() if isinstance(value, int | float)})
        message += ", " + _describe_metrics(evaluation)
    callback.on_event(TrainingEvent(level="info", type="metrics", message=message, data=data))
    window.reset()
    return mean_loss


def _emit_evaluation(callback: TrainingCallback, step: int, evaluation: dict[str, Any]) -> None:
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Evaluation at step {step:,}: {_describe_metrics(evaluation)}",
            data={"step": step, "evaluation": evaluation},
        )
    )


def _describe_metrics(evaluation: dict[str, Any]) -> str:
    shown = []
    for name in ("valid_loss", "valid_token_accuracy", "accuracy", "f1_macro", "bleu", "chrf", "rougeL"):
        if name in evaluation:
            shown.append(f"{name.replace('_', ' ')} {evaluation[name]:.4f}")
    return ", ".join(shown)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    # Peak resident memory of the process (Linux reports kilobytes).
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _announce_start(
    config: TrainingConfig,
    setup: _Setup,
    callback: TrainingCallback,
    device: torch.device,
    precision: str,
    total_steps: int,
    batch_size: int,
    accumulation: int,
    compiled: bool,
    compiled_loss: bool,
    cuda_graphs: bool,
) -> None:
    source = setup.train_source
    if config.mode == "from_scratch":
        what = f"a {setup.num_parameters:,}-parameter {config.architecture}-{config.model_size} model from scratch"
    else:
        base = os.path.basename((config.base_model or "").rstrip("/"))
        what = f"{base} ({config.mode}, {setup.trainable_parameters:,} of {setup.num_parameters:,} parameters trained)"
    layout = (
        f"{source.row_count:,} packed rows of {config.max_length} tokens"
        if source.packed is not None
        else f"{source.row_count:,} examples"
    )
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Training {what} for {config.task} on {layout}: {total_steps:,} steps of {batch_size} x "
            f"{accumulation} on {device.type} ({precision}{', compiled' if compiled else ''}"
            f"{' as CUDA graphs' if cuda_graphs else ''}).",
            data={
                "task": config.task,
                "mode": config.mode,
                "num_parameters": setup.num_parameters,
                "trainable_parameters": setup.trainable_parameters,
                "train_rows": source.row_count,
                "total_steps": total_steps,
                "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation,
                "vocab_size": len(setup.tokenizer),
                "labels": setup.label_names,
                "validation_examples": len(setup.validation.input_ids) if setup.validation is not None else 0,
                "precision": precision,
                "device": device.type,
                "compiled": compiled,
                "compiled_loss": compiled_loss,
                "cuda_graphs": cuda_graphs,
            },
        )
    )


# ---------------------------------------------------------------------------------------------------- checkpoints


def _source_fingerprints(config: TrainingConfig) -> dict[str, str]:
    """The data files' identity: their SHA-256, or, for a run on prepared data, what they were when prepared."""
    if config.prepared_data:
        manifest = prepared.read_manifest(config.prepared_data)
        if manifest is None:
            raise FileNotFoundError(f"No complete prepared data in {config.prepared_data}.")
        return dict(manifest["source_fingerprints"])
    sources = {"train_file_sha256": _sha256_of(config.train_file)}
    if config.validation_file is not None:
        sources["validation_file_sha256"] = _sha256_of(config.validation_file)
    return sources


# The settings that change what preparation produces (examples, split, tokenizer, tokens).
_DATA_SETTINGS = (
    "task",
    "mode",
    "architecture",
    "vocab_size",
    "column_mapping",
    "validation_fraction",
    "seed",
    "chat_template",
    "train_on",
    "max_length",
    "max_eval_examples",
)


def _data_fingerprint(config: TrainingConfig, sources: dict[str, str]) -> str:
    settings = {name: getattr(config, name) for name in _DATA_SETTINGS}
    for name in ("base_model", "tokenizer"):
        folder = getattr(config, name)
        if folder is not None:
            settings[f"{name}_sha256"] = _folder_fingerprint(folder)
    return hashlib.sha256(json.dumps({**settings, **sources}, sort_keys=True).encode()).hexdigest()


def _run_fingerprint(config: TrainingConfig) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the computation, and the data."""
    settings = {key: value for key, value in config.to_dict().items() if key not in _FINGERPRINT_IGNORES}
    settings.update(_source_fingerprints(config))
    for name in ("base_model", "tokenizer"):
        folder = getattr(config, name)
        if folder is not None:
            # A base model is identified by its weights, not the folder it happens to be unpacked in.
            settings[f"{name}_sha256"] = _folder_fingerprint(folder)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _examples_fingerprint(config: TrainingConfig) -> str:
    """The training examples' identity: the file, and when a share is held out, the split that picks them."""
    split = {"file": _sha256_of(config.train_file), "column_mapping": config.column_mapping}
    if config.validation_fraction:
        split.update(validation_fraction=config.validation_fraction, seed=config.seed)
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def _sha256_of(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _folder_fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.json")) + sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def _resumable_checkpoint(
    config: TrainingConfig, fingerprint: str, callback: TrainingCallback
) -> checkpoints.CheckpointInfo | None:
    if config.checkpoint_dir is None or not Path(config.checkpoint_dir).is_dir():
        return None
    latest = checkpoints.latest_checkpoint(config.checkpoint_dir)
    if latest is None:
        return None
    state = checkpoints.read_json(latest.path / _TRAINER_STATE)
    if state.get("fingerprint") != fingerprint:
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"The checkpoint of step {latest.step:,} belongs to a run with other settings or data; "
                "training starts from the beginning.",
            )
        )
        return None
    return latest


def _save_checkpoint(
    config: TrainingConfig,
    fingerprint: str,
    state: _LoopState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    setup: _Setup,
    callback: TrainingCallback,
) -> None:
    assert config.checkpoint_dir is not None

    def write_files(folder: Path) -> None:
        # Only what training changes: LoRA's checkpoints hold the adapters, not a copy of the frozen base model.
        trainable = {
            name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        checkpoints.save_tensors(folder / _MODEL_WEIGHTS, trainable)
        checkpoints.optimizer_state_to_files(optimizer, folder)
        checkpoints.write_json(folder / _SCHEDULER_STATE, scheduler.state_dict())
        checkpoints.rng_state_to_files(folder)
        setup.tokenizer.save_pretrained(folder / _TOKENIZER_FOLDER)
        checkpoints.write_json(
            folder / _TRAINER_STATE,
            {
                "fingerprint": fingerprint,
                **{key: value for key, value in dataclasses.asdict(state).items() if key != "last_metrics"},
                "last_metrics": _json_safe(state.last_metrics),
            },
        )

    info = checkpoints.write_checkpoint(
        config.checkpoint_dir,
        step=state.step,
        write_files=write_files,
        metrics=_scalar_metrics(state),
        keep=config.checkpoints_kept,
    )
    state.last_checkpoint_step = state.step
    callback.on_event(
        TrainingEvent(
            level="info",
            message=f"Checkpoint saved at step {state.step:,}.",
            # No local path: the event reaches tenants through the API, and the server's folders are not theirs to see.
            data={"checkpoint": {"step_number": state.step, "metrics": info.metrics}},
        )
    )


def _may_write(callback: TrainingCallback) -> bool:
    """The callback's optional ``may_write()``: False when this run must not write anything more (a newer attempt of
    the same job took over); callbacks without it always allow."""
    may_write = getattr(callback, "may_write", None)
    return bool(may_write()) if callable(may_write) else True


def _scalar_metrics(state: _LoopState) -> dict[str, float]:
    values = {"train_loss": state.final_loss} if math.isfinite(state.final_loss) else {}
    values.update({name: value for name, value in state.last_metrics.items() if isinstance(value, int | float)})
    return values


def _restore(
    info: checkpoints.CheckpointInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> _LoopState:
    saved = checkpoints.load_tensors(info.path / _MODEL_WEIGHTS)
    trainable = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            trainable[name].copy_(tensor)
    checkpoints.load_optimizer_state(optimizer, info.path)
    scheduler.load_state_dict(checkpoints.read_json(info.path / _SCHEDULER_STATE))
    checkpoints.restore_rng_state(info.path)
    stored = checkpoints.read_json(info.path / _TRAINER_STATE)
    stored.pop("fingerprint", None)
    return _LoopState(**stored)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, allow_nan=True))


# ---------------------------------------------------------------------------------------------------- the end


def _export(
    config: TrainingConfig,
    model: torch.nn.Module,
    setup: _Setup,
    state: _LoopState,
    total_steps: int,
    samples: list[dict[str, Any]],
) -> None:
    modeling.export_model(model, setup.tokenizer, config.output_dir, lora_export=config.lora_export)
    report = {
        "task": config.task,
        "mode": config.mode,
        "labels": setup.label_names,
        "steps_completed": state.step,
        "total_steps": total_steps,
        "final_train_loss": state.final_loss,
        "metrics": state.last_metrics,
        "sample_predictions": samples,
        "num_parameters": setup.num_parameters,
        "trainable_parameters": setup.trainable_parameters,
        "hyperparameters": {key: value for key, value in config.to_dict().items() if key not in _FINGERPRINT_IGNORES},
        # The base model by its folder's name (the catalog id): the report travels with the model, the path does not.
        "base_model": Path(config.base_model).name if config.base_model else None,
    }
    checkpoints.write_json(Path(config.output_dir) / REPORT_FILENAME, _json_safe(report))


def _result(
    config: TrainingConfig,
    state: _LoopState,
    setup: _Setup,
    total_steps: int,
    output_dir: str | None,
    *,
    stopped: bool,
    early_stopped: bool,
    resumed: int | None,
) -> EngineResult:
    return EngineResult(
        output_dir=output_dir,
        steps_completed=state.step,
        total_steps=total_steps,
        stopped=stopped,
        early_stopped=early_stopped,
        initial_train_loss=state.initial_loss,
        final_train_loss=state.final_loss,
        final_metrics=state.last_metrics,
        num_parameters=setup.num_parameters,
        trainable_parameters=setup.trainable_parameters,
        train_tokens=state.tokens_trained,
        resumed_from_step=resumed,
    )


# ---------------------------------------------------------------------------------------------------- devices


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError(INVALID_HYPERPARAMETER, "device is cuda but no CUDA device is available.", "device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingDataError(INVALID_HYPERPARAMETER, "device is mps but MPS is not available.", "device")
    return device


def _resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, "fp16 training needs a CUDA GPU; use bf16 or fp32.", "precision"
        )
    return requested


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        # TF32 matmuls for the fp32 parts (optimizer, loss): same range, far faster on Ampere and later.
        torch.set_float32_matmul_precision("high")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass(frozen=True)
class _PackedForward:
    """Packed causal-LM rows through ``packed_gpt2``'s body (per-document attention kernels) and the fused loss."""

    body: torch.nn.Module
    kernel: str
    projection: torch.nn.Parameter
    compiled_loss: bool
    cuda_graphs: bool = False

    def summed_loss(self, batch: Batch, device: torch.device) -> torch.Tensor:
        assert batch.position_ids is not None
        hidden = self.body(
            transfer.to_device(batch.input_ids, device),
            transfer.to_device(batch.position_ids, device),
            **packed_gpt2.segment_inputs(batch.position_ids, self.kernel, device),
        )
        trained_rows = transfer.to_device(fused_loss.trained_row_indices(batch.targets), device)
        targets = transfer.to_device(batch.targets, device)
        return fused_loss.summed_linear_cross_entropy(
            hidden, self.projection, targets, trained_rows, compiled=self.compiled_loss
        )


def _maybe_compile(
    model: torch.nn.Module,
    config: TrainingConfig,
    device: torch.device,
    *,
    packed: bool,
    steps_left: int,
    rows_per_step: int,
) -> tuple[torch.nn.Module, _PackedForward | None, bool, bool]:
    """The model to call (compiled where that pays), for packed GPT-2 rows the faster packed-row forward, whether
    the run compiles the model, and whether the fused loss compiles its chunk work. ``rows_per_step``: at most how
    many positions a step computes the loss of."""
    wanted = _compile_wanted(config, device, packed=packed, steps_left=steps_left)
    if wanted and device.type == "cpu":
        cpu_activations.use_sigmoid_form_gelu(model)
    fused = fused_loss.fused_parts(model) if config.task == "causal_lm" else None
    compiled_loss = wanted or (
        fused is not None
        and _loss_compile_wanted(config, device, logits_left=steps_left * rows_per_step * fused[1].size(0))
    )
    packed_forward = None
    if packed and fused is not None:
        kernel = packed_gpt2.choose_kernel(device)
        body = packed_gpt2.packed_body(model, kernel)
        if body is not None:
            cuda_graphs = wanted and _cuda_graphs_wanted(device)
            if cuda_graphs:
                body = torch.compile(body, mode="reduce-overhead")
            elif wanted:
                body = torch.compile(body)
            packed_forward = _PackedForward(body, kernel, fused[1], compiled_loss, cuda_graphs)
    if not wanted:
        return model, packed_forward, False, compiled_loss
    if fused is not None:
        if device.type == "cpu" and packed_forward is None:
            _prefer_compiled_eager_attention(fused[0])
        # The fused loss calls the body directly: compile the body in place (every call to it runs compiled).
        fused[0].compile()
        return model, packed_forward, True, compiled_loss
    return torch.compile(model), packed_forward, True, compiled_loss


CUDA_GRAPHS_VARIABLE = "TUNEHOUSE_CUDA_GRAPHS"
"""Environment variable: "0" compiles the packed body on CUDA without CUDA graphs (benchmarks compare the two)."""


def _cuda_graphs_wanted(device: torch.device) -> bool:
    """Whether a compiled packed body runs as CUDA graphs (``torch.compile`` mode "reduce-overhead"): on CUDA, unless
    ``TUNEHOUSE_CUDA_GRAPHS=0``. A step of GPT-2 124M (16 x 1024 on an H200) launches some 400 kernels from Python; the
    device sat idle about 8 ms of each 41 ms step waiting for the host, and replaying the body's forward and backward
    passes as graphs took the step to 35 ms (400k -> 467k tokens/s, 30.0% -> 35.1% MFU, one session, one card). The
    rows are max_length long and the batch size fixed, so the graphs are recorded once (a shorter last batch of an
    epoch records one more)."""
    return device.type == "cuda" and os.environ.get(CUDA_GRAPHS_VARIABLE, "").strip() != "0"


def _keeps_gradient_buffers(cuda_graphs: bool, accumulation: int) -> bool:
    """Whether parameters keep gradient buffers for the whole run, zeroed in place after each step, instead of being
    given a gradient by each backward pass and dropping it after the optimizer step. With CUDA graphs and gradient
    accumulation they must: a gradient the graphs' backward hands to a parameter lives in the graphs' memory pool,
    which the next micro-batch's replay overwrites before the step is complete (torch raises on the access). With
    one micro-batch per step the optimizer has read the gradient before the next replay, and nothing is kept."""
    return cuda_graphs and accumulation > 1


def _allocate_gradient_buffers(model: torch.nn.Module) -> None:
    """A zero gradient for every trained parameter, allocated outside the graphs: backward passes add into it."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def _prefer_compiled_eager_attention(body: torch.nn.Module) -> None:
    """GPT-2 on a CPU, compiled: the stock module's eager attention (two matmuls around a softmax, which the compiler
    fuses with the packed rows' mask and the scaling) instead of SDPA's CPU kernel, which the compiler calls as is.
    For 8 rows of 256 tokens, 4 heads of 64, forward and backward of one layer took 16 ms against 32 (an EPYC core),
    and a GPT-2 mini step 7% less. It is the stock module's own reference path, so the numbers are GPT-2's. ``body``
    is the transformer that fused_parts found (peft and compile wrappers already looked through); its config is the
    whole model's, so the switch holds for every layer."""
    if getattr(body.config, "model_type", None) == "gpt2":
        body.set_attn_implementation("eager")


# On a CPU, compiling a GPT-2 mini body and the fused loss takes a few seconds and then saves a fifth of every step
# (fused elementwise work: GELU, layer norms, the loss's softmax); from this many steps on it pays back many times.
_CPU_COMPILE_MIN_STEPS = 200
# The fused loss's chunk work alone compiles into one kernel for every model and row count, in about 15 s on a 2-core
# AMD EPYC with an empty compiler cache (2 s from the cache), and saves at least 5 ns per logit there (a chunk of 512
# rows of SmolLM2's 49,152-token vocabulary: 44 ms against 344 eager in bf16, 119 against 236 in fp32; a LoRA step of
# 2,048 rows wins about 1.2 s). It pays from about this many logits over the run on: a LoRA run of SmolLM2 in 30 steps
# of 8 x 256 tokens; a tiny from-scratch model's run only after thousands of steps.
_CPU_LOSS_COMPILE_MIN_LOGITS = 3e9


def _compile_wanted(config: TrainingConfig, device: torch.device, *, packed: bool, steps_left: int) -> bool:
    if config.compile != "auto":
        return config.compile == "on"
    # With per-batch padding every new batch shape would compile again: only packed rows (all max_length long) pay.
    if not packed:
        return False
    if device.type == "cuda":
        return True
    # On a CPU the compiler writes C++ and needs a compiler for it; a short run would spend more compiling than it
    # saves. Only the platform's own from-scratch architectures: they compile in seconds, while a catalog model
    # takes minutes (LoRA on SmolLM2-135M: over two minutes on this 2-core machine for the same losses), which a few
    # hundred CPU steps do not win back.
    return (
        device.type == "cpu"
        and config.mode == "from_scratch"
        and steps_left >= _CPU_COMPILE_MIN_STEPS
        and cpu_compile_works()
    )


def _loss_compile_wanted(config: TrainingConfig, device: torch.device, *, logits_left: int) -> bool:
    """Whether a run whose model stays eager compiles the fused loss's chunk work anyway (CUDA always does): on a CPU
    with compile "auto", when the run has logits enough (``logits_left``: positions x vocabulary over its remaining
    steps) to win the compile time back, whatever the model or batch layout (the chunk function takes any vocabulary
    and row count without compiling again)."""
    return (
        config.compile == "auto"
        and device.type == "cpu"
        and logits_left >= _CPU_LOSS_COMPILE_MIN_LOGITS
        and cpu_compile_works()
    )


def cpp_compiler_available() -> bool:
    """Whether a C++ compiler is installed (torch.compile builds its CPU kernels with one: ``CXX``, g++, c++ or
    clang++)."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(shutil.which(candidate) for candidate in candidates if candidate)


@functools.cache
def cpu_compile_works() -> bool:
    """Whether torch.compile builds and runs a CPU kernel here, tried once per process on a tiny function: an
    installed compiler can still fail (missing headers, a version torch refuses), and a run that auto chose to
    compile must then stay eager rather than fail at its first step. A cached kernel from an earlier run counts as
    working, since this machine built it."""
    if not cpp_compiler_available():
        return False
    try:
        probe = torch.compile(lambda values: functional.gelu(values) * 2.0, dynamic=False)
        probe(torch.ones(8))
    except Exception:  # noqa: BLE001 - any failure to build means: do not compile here
        return False
    return True


def _limit_cpu_threads() -> None:
    # The CPU worker shares the machine with another worker process; half the cores leaves it room. Only lowers the
    # count, so a caller that already chose fewer threads keeps its choice.
    wanted = max(1, (os.cpu_count() or 2) // 2)
    if torch.get_num_threads() > wanted:
        torch.set_num_threads(wanted)


# ---------------------------------------------------------------------------------------------------- on demand


def evaluate_saved_model(
    model_dir: str,
    data_file: str,
    *,
    data_filename: str | None = None,
    column_mapping: dict[str, str] | None = None,
    max_examples: int = 200,
    batch_size: int = 8,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a model this engine exported (merged, plain or a LoRA adapter folder) on any dataset of its task:
    the same metrics as the evaluations during training, plus sample predictions.

    The task, labels, maximum length, chat template and train_on come from the model's ``training_report.json``,
    so the numbers are comparable with the ones training reported.
    """
    folder = Path(model_dir)
    report_path = folder / REPORT_FILENAME
    if not report_path.is_file():
        raise TrainingDataError("not_a_trained_model", f"{model_dir} holds no {REPORT_FILENAME}.", "model")
    report = checkpoints.read_json(report_path)
    hyperparameters = report.get("hyperparameters", {})
    task = report["task"]
    label_names = report.get("labels")
    config = TrainingConfig.from_dict(
        {
            "train_file": data_file,
            "train_filename": data_filename,
            "output_dir": "-",
            "task": task,
            # Only the reading and tokenizing settings matter here: the model is the saved folder itself.
            "mode": "full",
            "base_model": str(folder),
            "max_length": hyperparameters.get("max_length", 128),
            "chat_template": hyperparameters.get("chat_template", "chatml"),
            "train_on": hyperparameters.get("train_on", "completions"),
            "column_mapping": column_mapping,
            "max_eval_examples": max_examples,
            "generation_max_new_tokens": hyperparameters.get("generation_max_new_tokens", 64),
            "device": device,
        }
    )
    resolved_device = _resolve_device(device)
    sets = read_example_sets(config, NullCallback())
    label_ids = {label: index for index, label in enumerate(label_names)} if label_names else None
    if label_ids is not None:
        unknown = sorted({example.fields["label"] for example in sets.train} - set(label_ids))
        if unknown:
            raise TrainingDataError(
                "unknown_labels",
                f"The dataset has labels the model was never trained on: {', '.join(unknown[:5])}.",
                "file",
            )
    tokenizer = modeling.load_tokenizer(folder)
    examples = tokenize_like_config(sets.train[:max_examples], tokenizer, config=config, sets=sets, label_ids=label_ids)
    model = _load_for_evaluation(folder, task, label_names)
    setup = _Setup(
        model=model,
        tokenizer=tokenizer,
        label_names=label_names,
        train_source=None,  # type: ignore[arg-type] - evaluation never trains
        validation=limit(examples, max_examples),
        num_parameters=modeling.count_parameters(model),
        trainable_parameters=0,
    )
    model.to(resolved_device)
    autocast = _autocast(_resolve_precision("auto", resolved_device), resolved_device)
    evaluator = _Evaluator(config, setup, resolved_device, autocast, batch_size)
    results = evaluator.evaluate(model, step=0)
    return {"task": task, "examples": len(setup.validation.input_ids), "metrics": results, "samples": evaluator.samples}


def _load_for_evaluation(folder: Path, task: str, label_names: list[str] | None) -> torch.nn.Module:
    id2label = dict(enumerate(label_names)) if label_names else None
    num_labels = len(label_names) if label_names else None
    marker = folder / modeling.ADAPTER_MARKER
    if marker.is_file():
        from peft import PeftModel

        base_path = checkpoints.read_json(marker)["base_model"]
        base = modeling.load_pretrained(base_path, task=task, num_labels=num_labels, id2label=id2label)
        return PeftModel.from_pretrained(base, str(folder))
    return modeling.load_pretrained(folder, task=task, num_labels=num_labels, id2label=id2label)


__all__ = ["EngineResult", "REPORT_FILENAME", "evaluate_saved_model", "run_training"]
