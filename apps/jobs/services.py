"""Writes for fine-tuning jobs: creation, the state machine, the event log, dispatch and recovery, cancel / pause /
resume, generation and evaluations. Running a job (data preparation, training attempts) is in `execution`."""

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from apps.catalog.models import CatalogModel, EntryKind
from apps.catalog.selectors import catalog_entry_ready, catalog_get, catalog_list, catalog_training_base
from apps.core.api.errors import ApiError
from apps.core.storage import local_copy_of_prefix, object_store
from apps.datasets.models import File, FileStatus
from apps.datasets.services import file_local_path
from apps.tenancy.models import Tenant
from workers.ml.config import TrainingConfig
from workers.ml.data.examples import DatasetTask
from workers.ml.data.training_sets import engine_task_of
from workers.ml.errors import TrainingDataError
from workers.ml.generate import GenerationResult, generate_text

from .models import (
    EvaluationStatus,
    EventLevel,
    EventType,
    FineTuningJob,
    IdempotencyKey,
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
_CANCEL_REQUESTED = "Cancellation requested; stopping after the current step"


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
        # Placeholders for what the platform fills in at run time (every job gets a checkpoint folder).
        config = TrainingConfig.from_dict(
            {**candidate, **base, "train_file": "-", "output_dir": "-", "checkpoint_dir": "-"}
        )
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


def files_verdict(
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


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def validate_metadata(metadata: object) -> dict[str, str]:
    """OpenAI's rules for `metadata`: at most 16 pairs of strings, keys up to 64 and values up to 512 characters."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ApiError("metadata must be an object of string keys and string values.", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
            raise ApiError(f"metadata keys are strings of 1 to {MAX_METADATA_KEY_CHARS} characters.", param="metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS:
            raise ApiError(
                f"metadata.{key} must be a string of at most {MAX_METADATA_VALUE_CHARS} characters.",
                param=f"metadata.{key}",
            )
    return dict(metadata)


def _job_for_idempotency_key(tenant: Tenant, key: str, fingerprint: str) -> FineTuningJob | None:
    known = IdempotencyKey.objects.filter(tenant=tenant, key=key).select_related("job").first()
    if known is None:
        return None
    if known.request_fingerprint != fingerprint:
        raise ApiError(
            "This Idempotency-Key was already used with a different request; use a new key for a new job.",
            code="idempotency_key_reused",
            param="Idempotency-Key",
            status_code=409,
        )
    return known.job


def job_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    training_file: File,
    model: str,
    hyperparameters: dict | None = None,
    suffix: str = "",
    validation_file: File | None = None,
    metadata: dict | None = None,
    idempotency_key: str | None = None,
    request_fingerprint: str = "",
) -> FineTuningJob:
    """Creates a job (queued at once when its files are checked). With an ``idempotency_key`` the same key and
    request again return the first job instead of a second one, also when both requests race."""
    request = {
        "tenant": tenant,
        "user": user,
        "training_file": training_file,
        "model": model,
        "hyperparameters": hyperparameters,
        "suffix": suffix,
        "validation_file": validation_file,
        "metadata": metadata,
    }
    if idempotency_key is None:
        return _job_create(**request)
    if not 1 <= len(idempotency_key) <= 255:
        raise ApiError("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    known = _job_for_idempotency_key(tenant, idempotency_key, request_fingerprint)
    if known is not None:
        return known
    try:
        with transaction.atomic():
            job = _job_create(**request)
            # The unique (tenant, key) constraint decides a race: the loser's whole job creation rolls back.
            IdempotencyKey.objects.create(
                tenant=tenant, key=idempotency_key, request_fingerprint=request_fingerprint, job=job
            )
            return job
    except IntegrityError:
        known = _job_for_idempotency_key(tenant, idempotency_key, request_fingerprint)
        if known is None:
            raise
        return known


@transaction.atomic
def _job_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    training_file: File,
    model: str,
    hyperparameters: dict | None,
    suffix: str,
    validation_file: File | None,
    metadata: dict | None,
) -> FineTuningJob:
    metadata = validate_metadata(metadata)
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
    verdict, error = files_verdict(job_files, entry, hyperparameters or {})
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
        metadata=metadata,
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
    _transition(job, to_status=JobStatus.QUEUED, phase=JobPhase.WAITING_FOR_SLOT, actor=actor, dispatched_at=None)
    job_event_record(job=job, message="Files validated, moving job to queued state")
    _dispatch_after_commit()


def _dispatch_after_commit() -> None:
    # After the commit: a worker must find the job queued when the message reaches it, and a rolled-back
    # transaction must send nothing.
    # robust: the caller's change is committed by then; a broker outage must not turn it into an error for them.
    transaction.on_commit(jobs_dispatch, robust=True)


def _tenant_job_limit(tenant: Tenant) -> int:
    # 0 is a valid limit (the tenant's jobs wait until an operator raises it); None means the platform default.
    if tenant.max_running_jobs is not None:
        return tenant.max_running_jobs
    return settings.MAX_RUNNING_JOBS_PER_TENANT


def jobs_dispatch(*, send: Callable[[int], object] | None = None) -> list[str]:
    """Sends queued jobs to the `gpu` queue, at most each tenant's limit of running jobs at a time; returns the
    public ids sent.

    Fairness comes from the limit: a tenant never has more than its limit of jobs in the broker or running, so a
    tenant with 100 queued jobs holds a few places in the broker's FIFO queue and another tenant's first job goes in
    right behind them. Within a tenant, jobs go oldest first. The tenant row is locked while its slots are counted
    and taken, so concurrent dispatchers (web, workers, the recovery loop) never exceed a limit.
    """
    sent: list[tuple[FineTuningJob, str]] = []
    waiting_tenants = (
        FineTuningJob.objects.filter(status=JobStatus.QUEUED, dispatched_at__isnull=True)
        .values_list("tenant_id", flat=True)
        .distinct()
    )
    for tenant_id in list(waiting_tenants):
        with transaction.atomic():
            tenant = Tenant.objects.select_for_update().get(pk=tenant_id)
            tenant_jobs = FineTuningJob.objects.filter(tenant_id=tenant_id)
            taken = tenant_jobs.filter(
                Q(status=JobStatus.RUNNING) | Q(status=JobStatus.QUEUED, dispatched_at__isnull=False)
            ).count()
            free = _tenant_job_limit(tenant) - taken
            if free <= 0:
                continue
            now = timezone.now()
            for job in tenant_jobs.filter(status=JobStatus.QUEUED, dispatched_at__isnull=True).order_by(
                "created_at", "id"
            )[:free]:
                # Data first, on a `cpu` worker; a job with its data prepared (a resumed one) goes to `gpu`.
                job.dispatched_at = now
                job.phase = JobPhase.WAITING_FOR_WORKER if job.prepared_data_prefix else JobPhase.TOKENIZING
                job.save(update_fields=["dispatched_at", "phase"])
                sent.append((job, job.phase))
    delivered = []
    for job, phase in sent:
        try:
            _send(job.pk, prepare=phase == JobPhase.TOKENIZING, send=send)
        except Exception:
            # The broker is unreachable: the job gives its slot back and the next recovery tick sends it again.
            logger.warning("job %s: could not be sent to the broker; retrying shortly", job.public_id, exc_info=True)
            FineTuningJob.objects.filter(pk=job.pk, dispatched_at=job.dispatched_at).update(dispatched_at=None)
        else:
            delivered.append(job.public_id)
    return delivered


def _send(job_pk: int, *, prepare: bool, send: Callable[[int], object] | None) -> None:
    if send is not None:
        send(job_pk)
        return
    from workers.tasks.preparation import prepare_job_data
    from workers.tasks.training import run_training_job

    (prepare_job_data if prepare else run_training_job).delay(job_pk)


def jobs_recover(*, send: Callable[[int], object] | None = None) -> dict[str, list[str]]:
    """Repairs what crashed processes and lost messages leave behind; every worker runs it every few seconds.

    - A running job whose lease has not been refreshed for JOB_LEASE_SECONDS lost its worker (killed, machine
      gone): it is queued again (or paused / cancelled, if that was asked meanwhile) and resumes from its last
      checkpoint. The next attempt number fences the old executor off, should it still be alive.
    - A job sent to the broker JOB_REDISPATCH_SECONDS ago and still not picked up is sent again (its message may
      have died with a Redis restart); a duplicate message is harmless, the claim takes a job once. A data
      preparation whose heartbeat stopped for JOB_LEASE_SECONDS (its `cpu` worker died) is sent again too.
    - Then queued jobs are dispatched into the slots that freed up.
    """
    now = timezone.now()
    requeued: list[str] = []
    lost = FineTuningJob.objects.filter(
        status=JobStatus.RUNNING, lease_heartbeat_at__lt=now - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    )
    for job_pk in list(lost.values_list("pk", flat=True)):
        with transaction.atomic():
            # Checked again under the row lock: the lease may have been refreshed since the first look.
            job = lost.select_for_update(skip_locked=True).filter(pk=job_pk).first()
            if job is None:
                continue
            _release_lost_job(job)
            requeued.append(job.public_id)
    FineTuningJob.objects.filter(
        status=JobStatus.QUEUED,
        dispatched_at__lt=now - timedelta(seconds=settings.JOB_REDISPATCH_SECONDS),
    ).update(dispatched_at=None)
    # A preparation that started (its heartbeat is newer than the dispatch) and then fell silent lost its worker.
    FineTuningJob.objects.filter(
        status=JobStatus.QUEUED,
        phase=JobPhase.TOKENIZING,
        prepared_data_prefix="",
        dispatched_at__isnull=False,
        lease_heartbeat_at__gte=F("dispatched_at"),
        lease_heartbeat_at__lt=now - timedelta(seconds=settings.JOB_LEASE_SECONDS),
    ).update(dispatched_at=None)
    return {"requeued": requeued, "dispatched": jobs_dispatch(send=send)}


def _release_lost_job(job: FineTuningJob) -> None:
    actor = "system:lease-expired"
    lost = f"The worker of attempt {job.attempt} stopped answering"
    if job.cancel_requested:
        _transition(job, to_status=JobStatus.CANCELLED, phase=JobPhase.DONE, actor=actor, finished_at=timezone.now())
        job_event_record(job=job, message=f"{lost}; the job was being cancelled, so it is cancelled")
        _job_finished_hooks(job)
    elif job.pause_requested:
        _transition(job, to_status=JobStatus.PAUSED, phase=JobPhase.PAUSED, actor=actor, pause_requested=False)
        job_event_record(job=job, message=f"{lost}; the job is paused at its last checkpoint")
    else:
        _transition(job, to_status=JobStatus.QUEUED, phase=JobPhase.WAITING_FOR_SLOT, actor=actor, dispatched_at=None)
        job_event_record(
            job=job,
            level=EventLevel.WARN,
            message=f"{lost}; the job is queued again and resumes from its last checkpoint",
        )


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
            verdict, error = files_verdict(_job_files(job), entry, job.hyperparameters)
        if verdict == "ready":
            _enqueue(job, actor=SYSTEM_ACTOR)
        elif verdict == "failed":
            fail_unstarted_job(job, error)


def fail_unstarted_job(job: FineTuningJob, error: dict) -> None:
    """Ends a job that never trained (its files, or its data once read, cannot be used), with the reason. Call it
    inside the transaction that holds the job's row."""
    _transition(
        job,
        to_status=JobStatus.FAILED,
        phase=JobPhase.DONE,
        actor=SYSTEM_ACTOR,
        error=error,
        finished_at=timezone.now(),
    )
    job_event_record(job=job, level=EventLevel.ERROR, message=error["message"])
    _job_finished_hooks(job)


@transaction.atomic
def job_cancel(*, tenant: Tenant, job: FineTuningJob, user: AbstractBaseUser | None) -> FineTuningJob:
    job = FineTuningJob.objects.select_for_update().get(pk=job.pk, tenant=tenant)
    if job.is_finished:
        raise ApiError(f"Job {job.public_id} has already {job.status}; it cannot be cancelled.", code="job_finished")
    if job.status == JobStatus.RUNNING:
        # The executor notices within a second or so, stops between steps and records the cancellation.
        job.cancel_requested = True
        job.save(update_fields=["cancel_requested"])
        job_event_record(job=job, message=_CANCEL_REQUESTED, data={"requested_by": _actor(user)})
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
        _job_finished_hooks(job)
    return job


@transaction.atomic
def job_pause(*, tenant: Tenant, job: FineTuningJob, user: AbstractBaseUser | None) -> FineTuningJob:
    """Pauses a queued or running job. A running one stops after its current step and writes a checkpoint first;
    `job_resume` continues it from there, on any worker."""
    job = FineTuningJob.objects.select_for_update().get(pk=job.pk, tenant=tenant)
    if job.status == JobStatus.RUNNING:
        if not job.pause_requested:
            job.pause_requested = True
            job.phase = JobPhase.CHECKPOINTING
            job.save(update_fields=["pause_requested", "phase"])
            job_event_record(job=job, message="Pause requested; saving a checkpoint after the current step")
        return job
    if job.status != JobStatus.QUEUED:
        raise ApiError(
            f"Job {job.public_id} is {job.status}; only a queued or running job can be paused.", code="invalid_state"
        )
    _transition(job, to_status=JobStatus.PAUSED, phase=JobPhase.PAUSED, actor=_actor(user), dispatched_at=None)
    job_event_record(job=job, message="Job paused")
    _dispatch_after_commit()  # its slot, if it held one, goes to the next queued job
    return job


@transaction.atomic
def job_resume(*, tenant: Tenant, job: FineTuningJob, user: AbstractBaseUser | None) -> FineTuningJob:
    """Queues a paused job again; it continues from its last checkpoint."""
    job = FineTuningJob.objects.select_for_update().get(pk=job.pk, tenant=tenant)
    if job.status != JobStatus.PAUSED:
        raise ApiError(f"Job {job.public_id} is {job.status}, not paused.", code="invalid_state")
    _transition(
        job,
        to_status=JobStatus.QUEUED,
        phase=JobPhase.WAITING_FOR_SLOT,
        actor=_actor(user),
        pause_requested=False,
        dispatched_at=None,
    )
    job_event_record(job=job, message="Job resumed; it continues from its last checkpoint")
    _dispatch_after_commit()
    return job


def _job_finished_hooks(job: FineTuningJob) -> None:
    """Inside the transaction that records a final status: the tenant's webhooks are told (once it commits), a study
    whose trial it was advances, a bias audit is queued when the tenant's policy wants one after training, and its
    slot goes to the next queued job."""
    from apps.audits.services import audits_after_job_succeeded
    from apps.tuning.services import studies_after_job_finished
    from apps.webhooks.services import webhooks_job_finished

    webhooks_job_finished(job=job)
    studies_after_job_finished(job)
    if job.status == JobStatus.SUCCEEDED:
        audits_after_job_succeeded(job)
    if job.prepared_data_prefix:
        # The tokenized copy of the tenant's data serves only this job's attempts.
        prefix = job.prepared_data_prefix
        transaction.on_commit(lambda: object_store().delete_prefix(prefix + "/"))
    _dispatch_after_commit()


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
