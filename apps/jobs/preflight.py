"""The pre-flight estimate of a fine-tuning job: what it will train on, how many steps, whether it fits in memory,
how long it takes, and what to change when something looks wrong, before a single accelerator second is spent.

`POST /v1/fine_tuning/jobs/estimate` takes the create-job body (plus `target_device`) through the same checks as
`job_create`, so a body that estimates without a 400 is one that creates a job. The arithmetic is pure functions
of plain numbers (tested against hand-computed values); the reads it needs (the file's example lengths, the model's
shape, the measured throughput of earlier jobs) are the functions below them.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from django.conf import settings
from django.core.cache import cache

from apps.catalog.models import CatalogModel, EntryKind
from apps.catalog.selectors import catalog_model_folder, catalog_training_base
from apps.core.api.errors import ApiError
from apps.datasets.models import File, FileStatus
from apps.datasets.selectors import file_get
from apps.datasets.services import file_local_path
from apps.tenancy.models import Tenant
from workers.ml import modeling
from workers.ml.config import MAX_CONTEXT_LENGTH, MAX_GRADIENT_ACCUMULATION
from workers.ml.data.examples import DatasetFormat, DatasetTask, Example, example_text
from workers.ml.data.formats import ColumnMapping, ReadLimits, iter_examples
from workers.ml.data.templates import ensure_template_tokens, tokenize_batch
from workers.ml.tokenizer_training import load_tokenizer

from .models import EventType, FineTuningJob, JobEvent, JobStatus
from .openai_requests import engine_hyperparameters, parse_job_create_request
from .services import file_engine_task, resolve_hyperparameters, training_data_problem, validate_base_model

GB = 10**9
# The devices a job can be sized for. "cpu" is this machine's memory, read when asked.
TARGET_DEVICES = ("cpu", "nvidia-h100", "nvidia-h200")
GPU_MEMORY_BYTES = {"nvidia-h100": 80 * GB, "nvidia-h200": 141 * GB}
# Dense peak FLOP/s by the precision the matmuls run in (NVIDIA's datasheets; TF32 for fp32 autocast-free runs).
GPU_PEAK_FLOPS = {
    "nvidia-h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "nvidia-h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
}
# A CPU core with AVX2/AVX-512 FMA peaks near 100 GFLOP/s in fp32; the engine trains on half the cores.
CPU_PEAK_FLOPS_PER_CORE = 100e9
# The share of peak a training step reaches: DESIGN.md measured 26% MFU for the plain packed loop on an H200.
ASSUMED_UTILISATION = 0.25
# Values kept per token per layer for the backward pass of a transformer block with a fused attention kernel (no
# attention matrix stored): Korthikanti et al. 2022 count 34 bytes in 16-bit, i.e. 17 values.
ACTIVATION_VALUES_PER_TOKEN_PER_LAYER = 17
# What the process needs besides the model: the CUDA context and kernels, or Python + torch + transformers on a CPU.
RUNTIME_OVERHEAD_BYTES = {"cpu": int(0.8 * GB), "cuda": int(1.5 * GB)}
# Optimizer state bytes per trainable parameter: AdamW's two fp32 moments, SGD's momentum, and Adafactor's
# factored second moment (a row and a column per matrix: a small fraction of a byte per parameter, rounded up).
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "sgd": 4.0, "adafactor": 0.5}
# Weights stay fp32 under autocast (master weights); a QLoRA base is stored in 4 bits.
WEIGHT_BYTES = {"full": 4.0, "from_scratch": 4.0, "lora": 4.0, "qlora": 0.5}
# The engine sorts windows of this many batches by length before cutting batches (training_sets, group by length).
LENGTH_GROUPING_WINDOW_BATCHES = 50
# Padding above this share of the computed tokens is worth a warning when packing could remove it.
PADDING_WASTE_WORTH_PACKING = 0.10
# A full fine-tune of this many parameters or more is usually better done with LoRA: far less memory and time.
LARGE_FULL_FINE_TUNE_PARAMETERS = 100_000_000
# How many of the platform's latest succeeded jobs on the same model measure its throughput.
MEASURED_JOBS_CONSIDERED = 20
# Tokenizing a whole file is done once per file, model and template; the result (a length histogram) is small.
LENGTHS_CACHE_SECONDS = 7 * 24 * 3600
_TOKENIZE_BATCH = 1000
_TEXT_TASKS_WITH_TEMPLATES = (DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION)


# --- The arithmetic (pure) ----------------------------------------------------------------------------------------


def training_row_lengths(example_lengths: Counter[int], *, max_length: int, split_long: bool) -> Counter[int]:
    """Lengths of the rows training sees: plain text is cut into pieces of `max_length` (a one-token piece is
    dropped, as the engine drops it), every other example is truncated at the end."""
    rows: Counter[int] = Counter()
    for length, count in example_lengths.items():
        if not split_long:
            rows[min(length, max_length)] += count
            continue
        whole, rest = divmod(length, max_length)
        if whole:
            rows[max_length] += whole * count
        if rest > 1:
            rows[rest] += count
    return rows


def packed_row_count(row_lengths: Counter[int], *, max_length: int) -> int:
    """Rows of `max_length` tokens that hold these examples, longest first, each into the fullest row with room
    (best-fit decreasing). The engine packs first-fit decreasing, which lands within a row or two of this."""
    rows_by_room: Counter[int] = Counter()  # free tokens -> rows with that much room
    rows = 0
    for length in sorted(row_lengths, reverse=True):
        left = row_lengths[length]
        for room in sorted(room for room, count in rows_by_room.items() if count and room >= length):
            if not left:
                break
            # Identical examples fill one row of this room before any other: its room shrinks below the next.
            per_row = room // length
            full_rows = min(rows_by_room[room], left // per_row)
            if full_rows:
                rows_by_room[room] -= full_rows
                rows_by_room[room - per_row * length] += full_rows
                left -= full_rows * per_row
            if left and rows_by_room[room] and left < per_row:
                rows_by_room[room] -= 1
                rows_by_room[room - left * length] += 1
                left = 0
        if left:
            per_row = max_length // length
            full_rows, rest = divmod(left, per_row)
            rows += full_rows + (1 if rest else 0)
            rows_by_room[max_length - per_row * length] += full_rows
            if rest:
                rows_by_room[max_length - rest * length] += 1
    return rows


def padded_token_count(row_lengths: Counter[int], *, batch_size: int) -> int:
    """Tokens computed without packing: each batch is padded to its longest row. The engine sorts windows of
    50 batches by length before cutting them, so one window is simulated (exactly, when all rows fit in one; else
    at evenly spaced quantiles of the lengths) and its padding share applied to every row."""
    total_rows = sum(row_lengths.values())
    if not total_rows:
        return 0
    lengths = np.array(sorted(row_lengths), dtype=np.int64)
    cumulative = np.cumsum([row_lengths[length] for length in lengths])
    window = min(total_rows, batch_size * LENGTH_GROUPING_WINDOW_BATCHES)
    positions = ((np.arange(window) + 0.5) * total_rows / window).astype(np.int64)
    sample = lengths[np.searchsorted(cumulative, positions, side="right")][::-1]  # longest first, as the engine
    padded_in_window = sum(
        len(chunk) * int(chunk[0]) for chunk in np.array_split(sample, range(batch_size, window, batch_size))
    )
    useful_tokens = sum(length * count for length, count in row_lengths.items())
    return round(useful_tokens * padded_in_window / int(sample.sum()))


@dataclass(frozen=True)
class StepPlan:
    rows: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    """Passes over the data the steps amount to (fractional with max_steps)."""


def step_plan(*, rows: int, batch_size: int, accumulation: int, n_epochs: int, max_steps: int) -> StepPlan:
    """The engine's own count: ceil(rows / batch) micro-batches, ceil(that / accumulation) steps per epoch."""
    steps_per_epoch = max(1, math.ceil(math.ceil(rows / batch_size) / accumulation))
    total = max_steps or steps_per_epoch * n_epochs
    return StepPlan(rows=rows, steps_per_epoch=steps_per_epoch, total_steps=total, epochs=total / steps_per_epoch)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int
    lora_parameters_per_rank: int
    """LoRA adds rank x (fan_in + fan_out) per targeted matrix; this is the sum of fan_in + fan_out."""


def memory_estimate(
    *,
    shape: ModelShape,
    mode: str,
    task: str,
    optimizer: str,
    momentum: float,
    lora_r: int,
    batch_size: int,
    max_row_length: int,
    precision: str,
    device_kind: str,
    device_bytes: int,
) -> dict[str, Any]:
    """Peak training memory in bytes: weights + gradients + optimizer states of the trainable parameters +
    activations (batch x sequence x hidden x layers x 17 values) + the runtime, against the device's memory."""
    lora = mode in ("lora", "qlora")
    trainable = lora_r * shape.lora_parameters_per_rank if lora else shape.parameters
    activation_bytes = 4 if precision == "fp32" else 2
    state_bytes = OPTIMIZER_STATE_BYTES[optimizer] if optimizer != "sgd" or momentum else 0.0
    tokens_in_flight = batch_size * max_row_length
    activations = tokens_in_flight * shape.hidden_size * shape.layers * ACTIVATION_VALUES_PER_TOKEN_PER_LAYER
    activations *= activation_bytes
    if task == "seq2seq":
        # Causal LM losses are fused in chunks (no rows x vocabulary logits); seq2seq keeps its fp32 logits + grad.
        activations += tokens_in_flight * shape.vocab_size * 8
    parts = {
        "weights": round(shape.parameters * WEIGHT_BYTES.get(mode, 4.0) + (trainable * 4 if lora else 0)),
        "gradients": trainable * 4,
        "optimizer_states": round(trainable * state_bytes),
        "activations": round(activations),
        "runtime": RUNTIME_OVERHEAD_BYTES[device_kind],
    }
    total = sum(parts.values())
    return {
        "parameters": shape.parameters,
        "trainable_parameters": trainable,
        "precision": precision,
        "parts": parts,
        "total_bytes": total,
        "device_bytes": device_bytes,
        "fits": total <= device_bytes,
    }


def largest_fitting_batch(fits_with_batch, *, batch_size: int) -> int | None:
    """The largest power-of-two micro-batch below `batch_size` that fits, or None when even one row does not."""
    candidate = 1 << (max(batch_size - 1, 1).bit_length() - 1)
    while candidate >= 1:
        if candidate < batch_size and fits_with_batch(candidate):
            return candidate
        candidate //= 2
    return None


def flops_duration_seconds(
    *, parameters: int, processed_tokens: int, mode: str, peak_flops: float, utilisation: float = ASSUMED_UTILISATION
) -> float:
    """6 x parameters x tokens (forward 2, backward 4); LoRA skips the frozen weights' gradients: 4 x."""
    flops_per_token = (4 if mode in ("lora", "qlora") else 6) * parameters
    return flops_per_token * processed_tokens / (peak_flops * utilisation)


def fix(label: str, **changes: Any) -> dict[str, Any]:
    """A one-click fix: the form fields (engine hyperparameter names) and the values to set."""
    return {"label": label, "changes": [{"field": field, "value": value} for field, value in changes.items()]}


# --- The reads it needs -------------------------------------------------------------------------------------------


def measured_tokens_per_second(*, model: str, mode: str, device_type: str) -> tuple[float, int] | None:
    """The median training throughput (useful tokens/s, from metrics events) of the platform's latest succeeded jobs
    on `model` in `mode` on a `device_type` ("cpu" or "cuda") device, and how many jobs measured it; None without any.

    Platform-wide on purpose: throughput is a property of the model and the hardware, not of a tenant's data, and
    only the median and a count leave this function."""
    jobs = list(
        FineTuningJob.objects.filter(model=model, status=JobStatus.SUCCEEDED)
        .order_by("-finished_at", "-id")
        .values("id", "hyperparameters")[:MEASURED_JOBS_CONSIDERED]
    )
    job_ids = [job["id"] for job in jobs if (job["hyperparameters"] or {}).get("mode") == mode]
    if not job_ids:
        return None
    # The run's start event says where it ran; metrics events carry the throughput of their window.
    events = JobEvent.objects.filter(job_id__in=job_ids, data__isnull=False).values_list("job_id", "type", "data")
    devices: dict[int, str] = {}
    rates: dict[int, list[float]] = {}
    for job_id, event_type, data in events.iterator():
        if not isinstance(data, dict):
            continue
        if event_type == EventType.METRICS and isinstance(data.get("tokens_per_second"), int | float):
            rates.setdefault(job_id, []).append(float(data["tokens_per_second"]))
        elif isinstance(data.get("device"), str) and "num_parameters" in data:
            devices[job_id] = data["device"]
    per_job = [statistics.median(values) for job_id, values in rates.items() if devices.get(job_id) == device_type]
    per_job = [rate for rate in per_job if rate > 0]
    if not per_job:
        return None
    return statistics.median(per_job), len(per_job)


def device_memory_bytes(target_device: str) -> int:
    if target_device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPU_MEMORY_BYTES[target_device]


@functools.lru_cache(maxsize=64)
def model_shape(
    *, entry_id: str, kind: str, model_type: str, architecture: str, size: str, folder: str, task: str,
    vocab_size: int, max_length: int, lora_targets: tuple[str, ...] | None, parameter_count: int,
) -> ModelShape:  # fmt: skip
    """Dimensions of the model a job trains, from the model built on the meta device (shapes only, no memory): an
    architecture at the job's vocabulary and length, or a pretrained entry from its config.json."""
    num_labels = 2 if task == "classification" else None
    with torch.device("meta"):
        if kind == EntryKind.ARCHITECTURE:
            model = modeling.build_from_scratch(
                architecture=architecture, size=size, task=task, vocab_size=vocab_size, max_length=max_length,
                init="normal", num_labels=num_labels, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )  # fmt: skip
            parameters = modeling.count_parameters(model)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            if task == "classification":
                config.num_labels = 2
                model = AutoModelForSequenceClassification.from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
            parameters = parameter_count
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if layers is None:
        layers = config.num_layers + getattr(config, "num_decoder_layers", config.num_layers)
    targets = set(lora_targets or modeling.DEFAULT_LORA_TARGETS.get(model_type, ()))
    per_rank = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in targets and weight is not None and weight.dim() == 2:
            per_rank += weight.shape[0] + weight.shape[1]
    return ModelShape(parameters, int(hidden), int(layers), int(config.vocab_size), per_rank)


@dataclass(frozen=True)
class ExampleLengths:
    lengths: Counter[int]
    """Examples by length (tokens, or words where no tokenizer exists before the run)."""
    source: str
    """A sentence saying what the lengths count."""
    in_tokens: bool


def file_example_lengths(*, file: File, entry: CatalogModel, chat_template: str) -> ExampleLengths:
    """Each example's length. A pretrained model's tokenizer counts them (streaming the file once, then kept in the
    cache); a from-scratch model's tokenizer is trained when the run starts, so the validation report's lengths
    stand in (its histogram: exact for files whose lengths span at most 20 values)."""
    report = file.validation_report or {}
    if entry.kind == EntryKind.PRETRAINED:
        key = f"tenant:{file.tenant_id}:preflight-lengths:{file.public_id}:{entry.model_id}:{chat_template}"
        cached = cache.get(key)
        if cached is None:
            cached = _count_tokens_in_file(file, entry, chat_template)
            cache.set(key, cached, LENGTHS_CACHE_SECONDS)
        return ExampleLengths(
            Counter({int(length): count for length, count in cached.items()}),
            f"counted with the {entry.model_id} tokenizer",
            True,
        )
    stats = report.get("token_lengths") or {}
    lengths = _histogram_lengths(stats.get("histogram") or {}, rows=report.get("rows", 0), mean=stats.get("mean"))
    if stats.get("tokenizer_used"):
        return ExampleLengths(lengths, "token counts from the validation report", True)
    return ExampleLengths(
        lengths,
        "whitespace-separated word counts from the validation report: a from-scratch tokenizer is trained on the "
        "data when the job starts, and with a small vocabulary it splits words into several tokens, so expect more",
        False,
    )


def _histogram_lengths(histogram: dict, *, rows: int, mean: float | None) -> Counter[int]:
    """Examples by length from the report's histogram: each bin's examples at the mean of the integers it covers."""
    edges, counts = histogram.get("bins") or [], histogram.get("counts") or []
    lengths: Counter[int] = Counter()
    for low, high, count in zip(edges, edges[1:], counts, strict=False):
        if count:
            first, last = math.ceil(low), math.ceil(high) - 1
            lengths[max(1, round((first + max(first, last)) / 2))] += int(count)
    if not lengths and rows and mean:
        lengths[max(1, round(mean))] = rows
    return lengths


def _count_tokens_in_file(file: File, entry: CatalogModel, chat_template: str) -> dict[int, int]:
    """One streaming pass over the file, tokenizing a thousand examples at a time; only the histogram is kept."""
    tokenizer = load_tokenizer(catalog_model_folder(entry))
    ensure_template_tokens(tokenizer, chat_template)
    mapping = ColumnMapping.from_dict(file.column_mapping) if file.column_mapping else None
    limits = ReadLimits(max_decompressed_bytes=settings.DATASET_MAX_DECOMPRESSED_BYTES)
    rows = iter_examples(str(file_local_path(file)), filename=file.filename, column_mapping=mapping, limits=limits)
    lengths: Counter[int] = Counter()
    for batch in _batches((row for row in rows if isinstance(row, Example)), _TOKENIZE_BATCH):
        lengths.update(_token_lengths(batch, tokenizer, chat_template))
    return dict(lengths)


def _token_lengths(batch: list[Example], tokenizer, chat_template: str) -> list[int]:
    if batch[0].task in _TEXT_TASKS_WITH_TEMPLATES:
        # The engine's own rendering: template markers and the end token are counted as training sees them.
        tokenized = tokenize_batch(batch, tokenizer, template=chat_template, max_length=MAX_CONTEXT_LENGTH)
        return [len(example.input_ids) for example in tokenized]
    encoded = tokenizer([example_text(example) for example in batch], add_special_tokens=True, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def _batches(items: Iterable[Example], size: int) -> Iterable[list[Example]]:
    batch: list[Example] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- The door: an OpenAI-shaped body in, the estimate out ---------------------------------------------------------


def _tenant_file(tenant: Tenant, public_id: str, *, param: str) -> File:
    file = file_get(tenant=tenant, public_id=public_id)
    if file is None:
        raise ApiError(f"No such file: {public_id}.", code="not_found", param=param, status_code=404)
    return file


def job_estimate_from_openai_request(*, tenant: Tenant, body: object) -> dict[str, Any]:
    """POST /v1/fine_tuning/jobs/estimate: the create-job body (checked exactly as for creation) plus
    `target_device` ("cpu", "nvidia-h100", "nvidia-h200"; default "cpu")."""
    if hasattr(body, "dict") and callable(body.dict):
        body = body.dict()
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    body = dict(body)
    target_device = body.pop("target_device", None) or "cpu"
    if target_device not in TARGET_DEVICES:
        raise ApiError(
            f"target_device must be one of {', '.join(TARGET_DEVICES)}; got {target_device!r}.", param="target_device"
        )
    request = parse_job_create_request(body)
    entry = validate_base_model(request.model)
    training_file = _tenant_file(tenant, request.training_file, param="training_file")
    if request.validation_file:
        validation_file = _tenant_file(tenant, request.validation_file, param="validation_file")
        if validation_file.pk == training_file.pk:
            raise ApiError("The validation file must differ from the training file.", param="validation_file")
    if training_file.status != FileStatus.PROCESSED:
        detail = "is still being checked" if training_file.status == FileStatus.UPLOADED else "failed validation"
        raise ApiError(
            f"{training_file.public_id} {detail}; the estimate needs its validation report.",
            code="file_not_processed",
            param="training_file",
        )
    requested_mode = request.hyperparameters.get("mode")
    mode = catalog_training_base(entry, mode=requested_mode if isinstance(requested_mode, str) else None)["mode"]
    hyperparameters = engine_hyperparameters(request, mode=mode)
    if problem := training_data_problem(training_file, entry, hyperparameters):
        raise ApiError(problem, code="unsupported_training_data", param="training_file")
    resolved = resolve_hyperparameters(hyperparameters, entry=entry, task=file_engine_task(training_file))
    return job_estimate(entry=entry, training_file=training_file, config=resolved, target_device=target_device)


def job_estimate(
    *, entry: CatalogModel, training_file: File, config: dict[str, Any], target_device: str
) -> dict[str, Any]:
    """The estimate for a resolved hyperparameter set (as `resolve_hyperparameters` returns it)."""
    task, mode, max_length = config["task"], config["mode"], config["max_length"]
    batch_size, accumulation = config["batch_size"], config["gradient_accumulation_steps"]
    report = training_file.validation_report or {}
    measured = file_example_lengths(file=training_file, entry=entry, chat_template=config["chat_template"])
    example_lengths = measured.lengths
    if config.get("validation_fraction"):
        keep = 1 - config["validation_fraction"]
        example_lengths = Counter({length: round(count * keep) for length, count in example_lengths.items()})
    rows_of = training_row_lengths(
        example_lengths, max_length=max_length, split_long=report.get("format") == DatasetFormat.TEXT
    )
    tokens = sum(length * count for length, count in rows_of.items())
    padded_rows = sum(rows_of.values())
    packing_applies = task == "causal_lm"
    packed_rows = packed_row_count(rows_of, max_length=max_length) if packing_applies else None
    padded_tokens = padded_token_count(rows_of, batch_size=batch_size)
    packed = packing_applies and config["packing"]
    rows = packed_rows if packed else padded_rows
    computed_tokens = packed_rows * max_length if packed else padded_tokens
    plan = step_plan(
        rows=rows,
        batch_size=batch_size,
        accumulation=accumulation,
        n_epochs=config["n_epochs"],
        max_steps=config["max_steps"],
    )
    longest_row = max_length if packed else max(rows_of, default=1)

    device_kind = "cpu" if target_device == "cpu" else "cuda"
    precision = config["precision"]
    if precision == "auto":
        precision = "fp32" if device_kind == "cpu" else "bf16"
    shape = model_shape(
        entry_id=entry.model_id,
        kind=entry.kind,
        model_type=entry.model_type,
        architecture=entry.architecture,
        size=entry.size,
        folder=str(catalog_model_folder(entry)),
        task=task,
        vocab_size=config["vocab_size"],
        max_length=max_length,
        lora_targets=tuple(config["lora_target_modules"]) if config.get("lora_target_modules") else None,
        parameter_count=entry.parameter_count,
    )
    memory_inputs = {
        "shape": shape,
        "mode": mode,
        "task": task,
        "optimizer": config["optimizer"],
        "momentum": config["momentum"],
        "lora_r": config["lora_r"],
        "max_row_length": longest_row,
        "precision": precision,
        "device_kind": device_kind,
        "device_bytes": device_memory_bytes(target_device),
    }
    memory = memory_estimate(batch_size=batch_size, **memory_inputs)
    memory["target_device"] = target_device

    trained_tokens = round(tokens * plan.epochs)
    processed_tokens = round(computed_tokens * plan.epochs)
    duration = _duration(
        entry=entry,
        mode=mode,
        device_kind=device_kind,
        target_device=target_device,
        precision=precision,
        parameters=shape.parameters,
        trained_tokens=trained_tokens,
        processed_tokens=processed_tokens,
    )
    warnings = _warnings(
        entry=entry,
        config=config,
        packing_applies=packing_applies,
        packed=packed,
        tokens=tokens,
        padded_tokens=padded_tokens,
        packed_rows=packed_rows,
        memory=memory,
        memory_inputs=memory_inputs,
        device_kind=device_kind,
        shape=shape,
    )
    return {
        "object": "fine_tuning.job.estimate",
        "model": entry.model_id,
        "mode": mode,
        "task": task,
        "training_file": training_file.public_id,
        "data": {
            "examples": sum(example_lengths.values()),
            "tokens": tokens,
            "tokens_source": measured.source,
            "counted_in_tokens": measured.in_tokens,
            "max_length": max_length,
            "truncated_examples": sum(count for length, count in example_lengths.items() if length > max_length),
            "packing": packed,
            "rows": rows,
            "rows_with_padding": padded_rows,
            "rows_packed": packed_rows,
            "padding_waste_with_padding": _share(padded_tokens - tokens, padded_tokens),
            "padding_waste_packed": _share(packed_rows * max_length - tokens, packed_rows * max_length)
            if packed_rows
            else None,
        },
        "steps": {
            "total": plan.total_steps,
            "per_epoch": plan.steps_per_epoch,
            "epochs": round(plan.epochs, 3),
            "batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "effective_batch_size": batch_size * accumulation,
            "max_steps": config["max_steps"],
            "trained_tokens": trained_tokens,
        },
        "memory": memory,
        "duration": duration,
        "warnings": warnings,
    }


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def _duration(
    *,
    entry: CatalogModel,
    mode: str,
    device_kind: str,
    target_device: str,
    precision: str,
    parameters: int,
    trained_tokens: int,
    processed_tokens: int,
) -> dict[str, Any]:
    measured = measured_tokens_per_second(model=entry.model_id, mode=mode, device_type=device_kind)
    if measured is not None:
        rate, jobs = measured
        return {
            "seconds": round(trained_tokens / rate, 1),
            "source": "measured",
            "description": f"measured on {jobs} recent job{'s' if jobs != 1 else ''} of {entry.model_id} ({mode}) "
            f"on {device_kind}: median {rate:,.0f} tokens/s",
            "tokens_per_second": rate,
            "measured_jobs": jobs,
        }
    if device_kind == "cpu":
        cores = max(1, (os.cpu_count() or 2) // 2)
        peak = cores * CPU_PEAK_FLOPS_PER_CORE
        where = f"{cores} CPU cores at {CPU_PEAK_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s each"
    else:
        peak = GPU_PEAK_FLOPS[target_device][precision]
        where = f"{target_device} at {peak / 1e12:.0f} TFLOP/s ({precision})"
    seconds = flops_duration_seconds(
        parameters=parameters, processed_tokens=processed_tokens, mode=mode, peak_flops=peak
    )
    factor = 4 if mode in ("lora", "qlora") else 6
    return {
        "seconds": round(seconds, 1),
        "source": "flops",
        "description": f"estimated, no measured run yet: {factor} x parameters x tokens on {where}, assuming "
        f"{ASSUMED_UTILISATION:.0%} utilisation",
        "tokens_per_second": round(trained_tokens / seconds, 1) if seconds else None,
        "measured_jobs": 0,
        "assumed_utilisation": ASSUMED_UTILISATION,
    }


def _warnings(
    *,
    entry: CatalogModel,
    config: dict[str, Any],
    packing_applies: bool,
    packed: bool,
    tokens: int,
    padded_tokens: int,
    packed_rows: int | None,
    memory: dict[str, Any],
    memory_inputs: dict[str, Any],
    device_kind: str,
    shape: ModelShape,
) -> list[dict[str, Any]]:
    warnings = []
    max_length = config["max_length"]
    waste = _share(padded_tokens - tokens, padded_tokens)
    if packing_applies and not packed and waste >= PADDING_WASTE_WORTH_PACKING:
        packed_waste = _share(packed_rows * max_length - tokens, packed_rows * max_length) if packed_rows else 0
        warnings.append(
            {
                "code": "padding_waste",
                "message": f"Packing is off and {waste:.0%} of the computed tokens are padding (short texts of "
                f"varying length); packing several examples per row brings that to {packed_waste:.0%}.",
                "fixes": [fix("Turn packing on", packing=True)],
            }
        )
    if not memory["fits"]:
        batch_size, accumulation = config["batch_size"], config["gradient_accumulation_steps"]
        effective = batch_size * accumulation

        def fits(candidate: int) -> bool:
            return memory_estimate(batch_size=candidate, **memory_inputs)["fits"]

        fixes = []
        smaller = largest_fitting_batch(fits, batch_size=batch_size)
        if smaller is not None and math.ceil(effective / smaller) <= MAX_GRADIENT_ACCUMULATION:
            kept = math.ceil(effective / smaller)
            fixes.append(
                fix(
                    f"Micro-batch {smaller} x {kept} accumulation steps (same effective batch {effective})",
                    batch_size=smaller,
                    gradient_accumulation_steps=kept,
                    auto_batch_size=False,
                )
            )
        if device_kind == "cuda" and not config.get("auto_batch_size"):
            fixes.append(fix("Let the GPU run find the largest batch that fits", auto_batch_size=True))
        if entry.kind == EntryKind.PRETRAINED and config["mode"] == "full":
            fixes.append(fix("Train LoRA adapters instead of every weight", mode="lora"))
        needed, available = memory["total_bytes"] / GB, memory["device_bytes"] / GB
        warnings.append(
            {
                "code": "does_not_fit",
                "message": f"About {needed:,.1f} GB needed but the {memory['target_device']} has {available:,.1f} GB.",
                "fixes": fixes,
            }
        )
    if (
        entry.kind == EntryKind.PRETRAINED
        and config["mode"] == "full"
        and shape.parameters >= (LARGE_FULL_FINE_TUNE_PARAMETERS)
    ):
        warnings.append(
            {
                "code": "large_full_fine_tune",
                "message": f"A full fine-tune trains all {shape.parameters:,} parameters; LoRA trains "
                f"{config['lora_r'] * shape.lora_parameters_per_rank:,} and usually matches it on small datasets.",
                "fixes": [fix("Use LoRA", mode="lora")],
            }
        )
    # A pretrained model's position table is fixed; an architecture's is built at max_length, so only these clamp.
    if entry.kind == EntryKind.PRETRAINED and max_length > entry.context_length:
        warnings.append(
            {
                "code": "max_length_above_context",
                "message": f"max_length {max_length} is above {entry.model_id}'s context of {entry.context_length} "
                "tokens.",
                "fixes": [fix(f"Clamp max_length to {entry.context_length}", max_length=entry.context_length)],
            }
        )
    return warnings
