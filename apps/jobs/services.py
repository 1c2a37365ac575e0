"""Writes for fine-tuning jobs: creation, the state machine, the event log, the executor and generation."""

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.catalog.models import CatalogModel, EntryKind
from apps.catalog.selectors import catalog_entry_ready, catalog_get, catalog_list, catalog_training_base
from apps.core.api.errors import ApiError
from apps.core.storage import local_copy_of_prefix, object_store, tenant_key
from apps.datasets.models import File, FileStatus
from apps.datasets.services import file_local_path
from apps.tenancy.models import Tenant
from workers.ml.callbacks import TrainingEvent
from workers.ml.config import TrainingConfig
from workers.ml.data.examples import DatasetTask
from workers.ml.data.training_sets import engine_task_of
from workers.ml.errors import TrainingDataError
from workers.ml.generate import GenerationResult, generate_text

from .models import (
    FINISHED_STATUSES,
    EvaluationStatus,
    EventLevel,
    EventType,
    FineTuningJob,
    JobEvent,
    JobPhase,
    JobStatus,
    JobStatusChange,
    ModelEvaluation,
)
from .realtime import publish_job_event, publish_job_update
from .serialization import event_to_json, job_to_json

logger = logging.getLogger(__name__)

SYSTEM_ACTOR = "system"
# Fields of the training config that the platform fills in; a caller may not set them.
_PLATFORM_OWNED_FIELDS = {
    "train_file",
    "output_dir",
    "device",
    "train_filename",
    "tokenized_cache_dir",
    "validation_file",  # given as the job's validation_file (a file id), not a path
    "validation_filename",
    "checkpoint_dir",
    "column_mapping",  # the training file's own column mapping
    "base_model",  # the job's `model` (a catalog id) decides these three
    "architecture",
    "model_size",
    "tokenizer",
}
# How often a running executor re-reads its row to notice a cancel or a newer attempt (fencing).
_CONTROL_POLL_SECONDS = 1.0


def _actor(user: AbstractBaseUser | None) -> str:
    return f"user:{user.get_username()}" if user is not None and user.is_authenticated else SYSTEM_ACTOR


def _transition(job: FineTuningJob, *, to_status: str, actor: str, phase: str | None = None, **fields) -> None:
    """Moves the job and records the change in the same transaction."""
    previous = job.status
    job.status = to_status
    if phase is not None:
        job.phase = phase
    for name, value in fields.items():
        setattr(job, name, value)
    job.save(update_fields=["status", "phase", *fields.keys()])
    JobStatusChange.objects.create(job=job, from_status=previous, to_status=to_status, actor=actor)
    snapshot = job_to_json(job)
    transaction.on_commit(
        lambda: publish_job_update(tenant_id=job.tenant_id, job_public_id=job.public_id, job=snapshot)
    )


def job_event_record(
    *, job: FineTuningJob, message: str, level: str = EventLevel.INFO, event_type: str = EventType.MESSAGE, data=None
) -> JobEvent:
    """Stores an event, then pushes the very same JSON to websocket subscribers once it is committed."""
    event = JobEvent.objects.create(
        tenant_id=job.tenant_id, job=job, level=level, message=message, type=event_type, data=data
    )
    payload = event_to_json(event, job_public_id=job.public_id)
    transaction.on_commit(
        lambda: publish_job_event(tenant_id=job.tenant_id, job_public_id=job.public_id, event=payload)
    )
    return event


def resolve_hyperparameters(hyperparameters: dict | None, *, entry: CatalogModel, task: str | None = None) -> dict:
    """Validates user hyperparameters against the training config and returns the full, explicit set used.

    ``task`` is the training file's task when it is already known; otherwise the job's own ``task`` hyperparameter
    or the entry's first task stands in until the file is checked (`training_data_problem` checks it again then).
    """
    hyperparameters = dict(hyperparameters or {})
    for name in hyperparameters:
        if name in _PLATFORM_OWNED_FIELDS:
            raise ApiError(f"'{name}' is set by the platform, not by the job.", param=f"hyperparameters.{name}")
    mode = hyperparameters.pop("mode", None)
    if mode is not None and not isinstance(mode, str):
        raise ApiError("hyperparameters.mode must be a string.", param="hyperparameters.mode")
    base = catalog_training_base(entry, mode=mode)
    if entry.kind == EntryKind.PRETRAINED and base["mode"] == "from_scratch":
        raise ApiError(
            f"{entry.model_id} is a pretrained model: fine-tune it with mode full, lora or qlora, or pick an "
            "architecture entry (such as gpt2-tiny) to train from scratch.",
            param="hyperparameters.mode",
        )
    if entry.kind == EntryKind.ARCHITECTURE and mode not in (None, "from_scratch"):
        raise ApiError(
            f"{entry.model_id} is an architecture trained from scratch; it has no weights to fine-tune with {mode}.",
            param="hyperparameters.mode",
        )
    candidate = {"task": task or hyperparameters.get("task") or entry.tasks[0], **hyperparameters}
    if task is not None:
        candidate["task"] = task
    try:
        config = TrainingConfig.from_dict({**candidate, **base, "train_file": "-", "output_dir": "-"})
    except TrainingDataError as exc:
        raise ApiError(exc.message, code=exc.code, param=f"hyperparameters.{exc.param}" if exc.param else None) from exc
    resolved = config.to_dict()
    for name in _PLATFORM_OWNED_FIELDS:
        resolved.pop(name, None)
    if "task" not in hyperparameters and task is None:
        # Not decided yet: the training file's task, once it is checked, decides it, and the defaults that follow
        # from the task (dropout) are left to the run.
        resolved.pop("task")
        if "dropout" not in hyperparameters:
            resolved.pop("dropout", None)
    return resolved


def validate_base_model(model: str) -> CatalogModel:
    entry = catalog_get(model_id=model)
    if entry is None:
        available = ", ".join(entry.model_id for entry in catalog_list())
        raise ApiError(
            f"The model '{model}' does not exist or you do not have access to it. Available: {available}.",
            code="model_not_found",
            param="model",
        )
    if not catalog_entry_ready(entry):
        raise ApiError(
            f"The model '{model}' is in the catalog but its weights are not on this server yet; an operator runs "
            "`manage.py prepare_catalog` once to convert them.",
            code="model_not_ready",
            param="model",
        )
    return entry


def file_engine_task(file: File) -> str | None:
    """The engine task a checked file trains (causal_lm, classification, seq2seq); None while unknown."""
    if not file.task:
        return None
    return engine_task_of(DatasetTask(file.task))


def training_data_problem(file: File, entry: CatalogModel, hyperparameters: dict) -> str | None:
    """Why this model cannot train on this file, or None."""
    task = file_engine_task(file)
    if task is None:
        return f"{file.public_id} holds no data a model can be trained on."
    wanted = hyperparameters.get("task")
    if wanted is not None and wanted != task:
        return f"The job asks for {wanted} but {file.public_id} holds {file.task} data, which trains {task}."
    if task not in entry.tasks:
        return (
            f"{entry.model_id} cannot be trained for {task} ({file.public_id} holds {file.task} data); it does "
            f"{', '.join(entry.tasks)}. Pick a model for {task} in the catalog."
        )
    return None


def _files_verdict(
    job_files: list[tuple[File, str]], entry: CatalogModel, hyperparameters: dict
) -> tuple[str, dict | None]:
    """("ready" | "waiting" | "failed", error) for a job's files: all checked and usable, some still being
    checked, or one unusable (with the OpenAI-shaped error naming which parameter)."""
    waiting = False
    for file, param in job_files:
        if file.status == FileStatus.ERROR:
            message = f"File {file.public_id} failed validation: {file.status_details}"
            return "failed", {"code": f"invalid_{param}", "message": message, "param": param}
        if file.status == FileStatus.UPLOADED:
            waiting = True
        elif problem := training_data_problem(file, entry, hyperparameters):
            return "failed", {"code": "unsupported_training_data", "message": problem, "param": param}
    return ("waiting" if waiting else "ready"), None


def _job_files(job: FineTuningJob) -> list[tuple[File, str]]:
    files = [(job.training_file, "training_file")]
    if job.validation_file_id:
        files.append((job.validation_file, "validation_file"))
    return files


@transaction.atomic
def job_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    training_file: File,
    model: str,
    hyperparameters: dict | None = None,
    suffix: str = "",
    validation_file: File | None = None,
) -> FineTuningJob:
    entry = validate_base_model(model)
    job_files = [(training_file, "training_file")] + ([(validation_file, "validation_file")] if validation_file else [])
    for file, param in job_files:
        if file.tenant_id != tenant.pk:
            raise ApiError("No such file.", code="not_found", param=param, status_code=404)
    if validation_file is not None and validation_file.pk == training_file.pk:
        raise ApiError("The validation file must differ from the training file.", param="validation_file")
    # Lock the file rows and read their status afresh: validation records its result under the same lock, so either
    # it sees this job waiting, or this job sees the result. Without it a job could wait forever.
    job_files = [(File.objects.select_for_update().get(pk=file.pk), param) for file, param in job_files]
    # The files first: "this model cannot learn this file" is the error to show, not what it implies for settings.
    verdict, error = _files_verdict(job_files, entry, hyperparameters or {})
    if verdict == "failed":
        raise ApiError(error["message"], code=error["code"], param=error["param"])
    resolved = resolve_hyperparameters(hyperparameters, entry=entry, task=file_engine_task(job_files[0][0]))
    if validation_file is not None and resolved.get("validation_fraction"):
        raise ApiError(
            "Give either a validation_file or hyperparameters.validation_fraction, not both.",
            param="hyperparameters.validation_fraction",
        )
    job = FineTuningJob.objects.create(
        tenant=tenant,
        model=model,
        training_file=job_files[0][0],
        validation_file=validation_file,
        hyperparameters=resolved,
        suffix=(suffix or "")[:64],
        seed=resolved.get("seed", 0),
        # Known once the data is tokenized (epochs x batches) unless max_steps fixes it; the first metrics say it.
        total_steps=resolved["max_steps"],
        created_by=user,
    )
    JobStatusChange.objects.create(job=job, from_status="", to_status=job.status, actor=_actor(user))
    job_event_record(job=job, message=f"Created fine-tuning job: {job.public_id}")
    if verdict == "ready":
        _enqueue(job, actor=_actor(user))
    else:
        pending = ", ".join(file.public_id for file, _ in job_files if file.status == FileStatus.UPLOADED)
        job_event_record(job=job, message=f"Validating training file: {pending}")
    return job


def _enqueue(job: FineTuningJob, *, actor: str) -> None:
    _transition(job, to_status=JobStatus.QUEUED, phase=JobPhase.WAITING_FOR_WORKER, actor=actor)
    job_event_record(job=job, message="Files validated, moving job to queued state")
    from workers.tasks.training import run_training_job

    job_id = job.pk
    transaction.on_commit(lambda: run_training_job.delay(job_id))


@transaction.atomic
def jobs_advance_after_file_validation(*, file: File) -> None:
    """Queues the jobs whose files are now all checked, and fails those with an unusable file."""
    waiting = (
        # of=("self",): PostgreSQL cannot lock the nullable side of the outer join that select_related makes.
        FineTuningJob.objects.select_for_update(of=("self",))
        .select_related("training_file", "validation_file")
        .filter(Q(training_file=file) | Q(validation_file=file), status=JobStatus.VALIDATING_FILES)
    )
    for job in waiting:
        entry = catalog_get(model_id=job.model)
        if entry is None:
            verdict, error = (
                "failed",
                {"code": "model_not_found", "message": f"{job.model} left the catalog.", "param": "model"},
            )
        else:
            verdict, error = _files_verdict(_job_files(job), entry, job.hyperparameters)
        if verdict == "ready":
            _enqueue(job, actor=SYSTEM_ACTOR)
        elif verdict == "failed":
            _transition(
                job,
                to_status=JobStatus.FAILED,
                phase=JobPhase.DONE,
                actor=SYSTEM_ACTOR,
                error=error,
                finished_at=timezone.now(),
            )
            job_event_record(job=job, level=EventLevel.ERROR, message=error["message"])


@transaction.atomic
def job_cancel(*, tenant: Tenant, job: FineTuningJob, user: AbstractBaseUser | None) -> FineTuningJob:
    job = FineTuningJob.objects.select_for_update().get(pk=job.pk, tenant=tenant)
    if job.is_finished:
        raise ApiError(f"Job {job.public_id} has already {job.status}; it cannot be cancelled.", code="job_finished")
    if job.status == JobStatus.RUNNING:
        # The executor notices within a second or so, stops between steps and records the cancellation.
        job.cancel_requested = True
        job.save(update_fields=["cancel_requested"])
        job_event_record(job=job, message="Cancellation requested; stopping after the current step")
    else:
        _transition(
            job,
            to_status=JobStatus.CANCELLED,
            phase=JobPhase.DONE,
            actor=_actor(user),
            finished_at=timezone.now(),
            cancel_requested=True,
        )
        job_event_record(job=job, message="Job cancelled")
    return job


class _JobProgress:
    """The ML library's callback: events become rows (and websocket pushes); polls cancel and fencing."""

    def __init__(self, job: FineTuningJob, attempt: int):
        self.job = job
        self.attempt = attempt
        self._last_poll = 0.0
        self.stop_reason: str | None = None

    def on_event(self, event: TrainingEvent) -> None:
        if self.stop_reason == "fenced":
            return
        level = {"warning": EventLevel.WARN, "error": EventLevel.ERROR}.get(event.level, EventLevel.INFO)
        job_event_record(job=self.job, message=event.message, level=level, event_type=event.type, data=event.data)
        if event.type == EventType.METRICS and event.data:
            # Fenced update: only the current attempt may move the progress.
            progress = {"lease_heartbeat_at": timezone.now()}
            for field, key in (
                ("steps_completed", "step"),
                ("total_steps", "total_steps"),
                ("latest_train_loss", "train_loss"),
            ):
                # An evaluation-only event may lack the training loss: keep the last one rather than blank it.
                if event.data.get(key) is not None:
                    progress[field] = event.data[key]
            FineTuningJob.objects.filter(pk=self.job.pk, attempt=self.attempt).update(**progress)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_poll < _CONTROL_POLL_SECONDS:
            return self.stop_reason is not None
        self._last_poll = now
        current = FineTuningJob.objects.filter(pk=self.job.pk).values("attempt", "cancel_requested", "status").first()
        if current is None or current["attempt"] != self.attempt:
            self.stop_reason = "fenced"
        elif current["cancel_requested"]:
            self.stop_reason = "cancelled"
        return self.stop_reason is not None


def _claim(job_id: int) -> FineTuningJob | None:
    """Takes the job's lease for a new attempt; None when there is nothing to run (finished, cancelled, taken)."""
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status != JobStatus.QUEUED:
            return None
        attempt = job.attempt + 1
        _transition(
            job,
            to_status=JobStatus.RUNNING,
            phase=JobPhase.PREPARING,
            actor=f"worker:{socket.gethostname()}:{os.getpid()}",
            attempt=attempt,
            lease_owner=f"{socket.gethostname()}:{os.getpid()}",
            lease_heartbeat_at=timezone.now(),
            started_at=job.started_at or timezone.now(),
        )
        job_event_record(job=job, message=f"Fine-tuning job started (attempt {attempt})")
    return job


def _finish(job: FineTuningJob, *, attempt: int, to_status: str, **fields) -> bool:
    """Records the end of the attempt unless a newer attempt owns the job (then this executor is stale)."""
    with transaction.atomic():
        current = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if current.attempt != attempt or current.is_finished:
            return False
        _transition(
            current, to_status=to_status, phase=JobPhase.DONE, actor=SYSTEM_ACTOR, finished_at=timezone.now(), **fields
        )
        job.refresh_from_db()
        return True


def _validation_config(job: FineTuningJob) -> dict:
    if not job.validation_file_id:
        return {}
    return {
        "validation_file": str(file_local_path(job.validation_file)),
        "validation_filename": job.validation_file.filename,
    }


def _training_config(job: FineTuningJob, *, train_path: Path, work_dir: Path) -> dict:
    entry = catalog_get(model_id=job.model)
    if entry is None:
        raise TrainingDataError("model_not_found", f"The model {job.model} is no longer in the catalog.", "model")
    hyperparameters = dict(job.hyperparameters)
    mode = hyperparameters.pop("mode", None)
    config = {
        "task": file_engine_task(job.training_file),
        **hyperparameters,
        **catalog_training_base(entry, mode=mode),
        "train_file": str(train_path),
        "train_filename": job.training_file.filename,
        "tokenized_cache_dir": str(Path(settings.WORK_DIR) / "tokenized"),
        "output_dir": str(work_dir / "model"),
        # Per job, not per attempt: a redelivered or restarted job finds the checkpoints of the attempt before it.
        "checkpoint_dir": str(_checkpoint_dir(job)),
        **_validation_config(job),
    }
    if job.training_file.column_mapping:
        config["column_mapping"] = {key: value for key, value in job.training_file.column_mapping.items() if value}
    return config


def _checkpoint_dir(job: FineTuningJob) -> Path:
    return Path(settings.WORK_DIR) / "jobs" / job.public_id / "checkpoints"


def _final_metrics(result) -> dict:
    scalars = {name: value for name, value in result.final_metrics.items() if isinstance(value, int | float)}
    scalars["train_loss"] = result.final_train_loss
    scalars["steps"] = result.steps_completed
    # NaN (no step ran) is not JSON: such a metric is left out.
    return {name: value for name, value in _json_finite(scalars).items() if value is not None}


def job_run(*, job_id: int) -> None:
    """Runs one training attempt for the job: download the data, train, store the model, record the outcome."""
    job = _claim(job_id)
    if job is None:
        logger.info("job %s: nothing to run", job_id)
        return
    attempt = job.attempt
    work_dir = Path(settings.WORK_DIR) / "jobs" / job.public_id / f"attempt-{attempt}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    progress = _JobProgress(job, attempt)
    try:
        # The shared local copy keeps the upload's suffix; the original name tells the trainer the format.
        train_path = file_local_path(job.training_file)
        FineTuningJob.objects.filter(pk=job.pk, attempt=attempt).update(phase=JobPhase.TRAINING)
        config = TrainingConfig.from_dict(_training_config(job, train_path=train_path, work_dir=work_dir))
        from workers.ml.engine import run_training  # the engine (peft, scikit-learn) loads on workers only

        result = run_training(config, progress)
        if progress.stop_reason == "fenced":
            logger.warning("job %s attempt %s: superseded by a newer attempt, stopping", job.public_id, attempt)
            return
        if progress.stop_reason == "cancelled":
            if _finish(job, attempt=attempt, to_status=JobStatus.CANCELLED):
                job_event_record(job=job, message=f"Job cancelled at step {result.steps_completed}")
            return
        FineTuningJob.objects.filter(pk=job.pk, attempt=attempt).update(phase=JobPhase.SAVING)
        prefix = tenant_key(job.tenant_id, "models", job.public_id)
        object_store().delete_prefix(prefix + "/")
        object_store().upload_dir(prefix, work_dir / "model")
        fine_tuned_model = (
            f"ft:{job.model}:{job.tenant.slug}:{job.suffix or 'model'}:{job.public_id.split('-', 1)[1][:8]}"
        )
        if _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.SUCCEEDED,
            model_storage_prefix=prefix,
            fine_tuned_model=fine_tuned_model,
            trained_tokens=result.train_tokens,
            metrics=_final_metrics(result),
        ):
            job_event_record(job=job, message=f"New fine-tuned model created: {fine_tuned_model}")
            job_event_record(job=job, message="The job has successfully completed")
    except TrainingDataError as exc:
        if _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.FAILED,
            error={"code": exc.code, "message": exc.message, "param": exc.param},
        ):
            job_event_record(job=job, level=EventLevel.ERROR, message=exc.message)
    except Exception as exc:
        logger.exception("job %s attempt %s crashed", job.public_id, attempt)
        error = {"code": "internal_error", "message": f"Training stopped on an internal error: {exc}", "param": None}
        if _finish(job, attempt=attempt, to_status=JobStatus.FAILED, error=error):
            job_event_record(job=job, level=EventLevel.ERROR, message=error["message"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        # Checkpoints serve a resumed attempt; once the job has an outcome they are of no further use here.
        if FineTuningJob.objects.filter(pk=job.pk, status__in=FINISHED_STATUSES).exists():
            shutil.rmtree(_checkpoint_dir(job), ignore_errors=True)


def _local_model_dir(job: FineTuningJob) -> Path:
    """The job's model unpacked on this machine (downloaded once)."""
    return local_copy_of_prefix(
        job.model_storage_prefix, Path(settings.WORK_DIR) / "models" / str(job.tenant_id) / job.public_id
    )


def job_generate(
    *, tenant: Tenant, job: FineTuningJob, prompt: str, max_tokens: int = 48, temperature: float = 0.8, seed=None
) -> GenerationResult:
    if job.tenant_id != tenant.pk:
        raise ApiError("No such job.", code="not_found", status_code=404)
    if job.status != JobStatus.SUCCEEDED or not job.model_storage_prefix:
        raise ApiError(f"Job {job.public_id} has no model yet (status: {job.status}).", code="model_not_ready")
    if not 1 <= max_tokens <= 512:
        raise ApiError("max_tokens must be between 1 and 512.", param="max_tokens")
    if not 0 <= temperature <= 2:
        raise ApiError("temperature must be between 0 and 2.", param="temperature")
    if (job.hyperparameters.get("task") or file_engine_task(job.training_file)) != "causal_lm":
        raise ApiError(
            f"Job {job.public_id} trained a {job.hyperparameters.get('task') or file_engine_task(job.training_file)} "
            "model, which does not generate text.",
            code="not_a_generative_model",
        )
    if len(prompt) > 4000:
        raise ApiError("The prompt is too long: keep it under 4000 characters.", param="prompt")
    return generate_text(
        str(_local_model_dir(job)), prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed
    )


MAX_EVALUATION_EXAMPLES = 2_000


@transaction.atomic
def evaluation_create(*, tenant: Tenant, job: FineTuningJob, file: File, max_examples: int = 200) -> ModelEvaluation:
    """Queue a measurement of a succeeded job's model on one of the tenant's datasets."""
    if job.tenant_id != tenant.pk or file.tenant_id != tenant.pk:
        raise ApiError("No such job or file.", code="not_found", status_code=404)
    if job.status != JobStatus.SUCCEEDED or not job.model_storage_prefix:
        raise ApiError(
            f"Job {job.public_id} has no model to evaluate yet (status: {job.status}).", code="model_not_ready"
        )
    if file.status == FileStatus.ERROR:
        raise ApiError(f"File {file.public_id} failed validation: {file.status_details}", param="file")
    if (
        isinstance(max_examples, bool)
        or not isinstance(max_examples, int)
        or not 1 <= max_examples <= MAX_EVALUATION_EXAMPLES
    ):
        raise ApiError(
            f"max_examples must be an integer between 1 and {MAX_EVALUATION_EXAMPLES}.", param="max_examples"
        )
    evaluation = ModelEvaluation.objects.create(tenant=tenant, job=job, file=file, max_examples=max_examples)
    from workers.tasks.training import run_model_evaluation

    evaluation_id = evaluation.pk
    transaction.on_commit(lambda: run_model_evaluation.delay(evaluation_id))
    return evaluation


def evaluation_run(*, evaluation_id: int) -> None:
    """Runs a queued evaluation once (a redelivered task finds it no longer queued and does nothing)."""
    with transaction.atomic():
        evaluation = (
            ModelEvaluation.objects.select_for_update().filter(pk=evaluation_id, status=EvaluationStatus.QUEUED).first()
        )
        if evaluation is None:
            return
        evaluation.status = EvaluationStatus.RUNNING
        evaluation.save(update_fields=["status"])
    job, file = evaluation.job, evaluation.file
    try:
        mapping = {key: value for key, value in (file.column_mapping or {}).items() if value} or None
        from workers.ml.engine import evaluate_saved_model  # on workers only, as in job_run

        result = evaluate_saved_model(
            str(_local_model_dir(job)),
            str(file_local_path(file)),
            data_filename=file.filename,
            column_mapping=mapping,
            max_examples=evaluation.max_examples,
        )
        evaluation.status = EvaluationStatus.SUCCEEDED
        evaluation.examples = result["examples"]
        evaluation.metrics = _json_finite(result["metrics"])
        evaluation.samples = result["samples"]
    except TrainingDataError as exc:
        evaluation.status = EvaluationStatus.FAILED
        evaluation.error = {"code": exc.code, "message": exc.message, "param": "file" if exc.param else None}
    except Exception as exc:
        logger.exception("evaluation %s crashed", evaluation.public_id)
        evaluation.status = EvaluationStatus.FAILED
        evaluation.error = {"code": "internal_error", "message": f"The evaluation stopped: {exc}", "param": None}
    evaluation.finished_at = timezone.now()
    evaluation.save(update_fields=["status", "examples", "metrics", "samples", "error", "finished_at"])


def _json_finite(value):
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {key: _json_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_finite(item) for item in value]
    return value
