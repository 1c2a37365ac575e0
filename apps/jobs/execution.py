"""The executor of fine-tuning jobs: data preparation on a `cpu` worker, then a training attempt on a `gpu` worker
under a lease (heartbeat, attempt number as fencing token), with checkpoints recorded, stop requests (cancel, pause,
worker shutdown) honoured between steps, and the outcome recorded once. The Celery tasks in `workers/tasks` call
`job_prepare_data` and `job_run`; everything a user or the API does to a job lives in `services`."""

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import botocore.exceptions
import redis.exceptions
import torch
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from apps.catalog.selectors import catalog_get, catalog_training_base
from apps.core.storage import local_copy_of_prefix, object_store, tenant_key
from apps.datasets.services import file_local_path
from workers.ml.callbacks import TrainingEvent
from workers.ml.checkpoint import checkpoint_folder_name, list_checkpoints
from workers.ml.config import TrainingConfig
from workers.ml.errors import TrainingDataError

from .models import (
    FINISHED_STATUSES,
    EventLevel,
    EventType,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    JobPhase,
    JobStatus,
)
from .selectors import metrics_have_evaluation
from .serialization import fine_tuned_model_name
from .services import (
    _CANCEL_REQUESTED,
    SYSTEM_ACTOR,
    _dispatch_after_commit,
    _job_finished_hooks,
    _json_finite,
    _transition,
    fail_unstarted_job,
    file_engine_task,
    job_event_record,
)

logger = logging.getLogger(__name__)

# How often a running executor re-reads its row to notice a cancel, a pause or a newer attempt (fencing).
_CONTROL_POLL_SECONDS = 0.25
# Metrics events stored per job (what a chart draws), plus evaluations, the last step and one per this many seconds.
METRICS_POINTS_PER_JOB = 500
METRICS_MAX_SILENCE_SECONDS = 10.0


class _PreparationProgress:
    """The callback of data preparation: its messages become job events; a cancel or pause stops it."""

    def __init__(self, job: FineTuningJob):
        self.job = job

    def on_event(self, event: TrainingEvent) -> None:
        level = {"warning": EventLevel.WARN, "error": EventLevel.ERROR}.get(event.level, EventLevel.INFO)
        job_event_record(job=self.job, message=event.message, level=level, event_type=event.type, data=event.data)

    def should_stop(self) -> bool:
        return not FineTuningJob.objects.filter(pk=self.job.pk, status=JobStatus.QUEUED).exists()


def job_prepare_data(*, job_id: int) -> None:
    """Reads, splits and tokenizes a dispatched job's data on a `cpu` worker (training the tokenizer of a
    from-scratch model), stores the result, then hands the job back to dispatch, which sends it to the `gpu` queue.
    Data the model cannot train on fails the job here, before it takes an accelerator."""
    with transaction.atomic():
        job = (
            # of=("self",): PostgreSQL cannot lock the nullable side of the outer join that select_related makes.
            FineTuningJob.objects.select_for_update(of=("self",))
            .select_related("training_file", "validation_file", "tenant")
            .filter(pk=job_id, status=JobStatus.QUEUED, dispatched_at__isnull=False, prepared_data_prefix="")
            .first()
        )
        if job is None:
            return  # not queued any more, prepared already, or a stale duplicate message
        job.lease_owner = f"{socket.gethostname()}:{os.getpid()}"
        job.lease_heartbeat_at = timezone.now()
        job.save(update_fields=["lease_owner", "lease_heartbeat_at"])
    with _preparation_lease(job):
        _prepare_leased(job)


def _prepare_leased(job: FineTuningJob) -> None:
    started = time.monotonic()
    folder = Path(settings.WORK_DIR) / "jobs" / job.public_id / f"preparing-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        config = TrainingConfig.from_dict(
            _training_config(job, train_path=file_local_path(job.training_file), work_dir=folder)
        )
        from workers.ml.engine import prepare_training_data  # the engine loads on workers only

        manifest = prepare_training_data(config, folder / "prepared", _PreparationProgress(job))
        prefix = tenant_key(job.tenant_id, "jobs", job.public_id, "prepared")
        object_store().delete_prefix(prefix + "/")
        object_store().upload_dir(prefix, folder / "prepared")
    except TrainingDataError as exc:
        _fail_queued_job(job, {"code": exc.code, "message": exc.message, "param": exc.param})
        return
    except Exception as exc:
        # Preparation reads the tenant's files and the store; whatever breaks there ends the job with the reason,
        # rather than leaving it queued and holding its tenant's slot.
        logger.exception("job %s: data preparation crashed", job.public_id)
        _fail_queued_job(job, failure_of(exc)[1])
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sides = manifest["sides"]
    with transaction.atomic():
        current = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if current.status != JobStatus.QUEUED:
            return  # cancelled or paused meanwhile; a paused job keeps no half-done state
        # Back to dispatch, which sends a prepared job to `gpu` (the oldest queued job of its tenant takes the slot
        # it just gave back, normally this one) and handles a broker outage.
        current.prepared_data_prefix = prefix
        current.phase = JobPhase.WAITING_FOR_SLOT
        current.dispatched_at = None
        current.save(update_fields=["prepared_data_prefix", "phase", "dispatched_at"])
        validation = sides.get("validation", {}).get("examples", 0)
        job_event_record(
            job=current,
            message=f"Training data prepared in {time.monotonic() - started:.1f} s: {sides['train']['examples']:,} "
            f"training examples" + (f", {validation:,} for validation" if validation else "") + ".",
            data={"prepared": {name: side["examples"] for name, side in sides.items()}},
        )
        _dispatch_after_commit()


def _fail_queued_job(job: FineTuningJob, error: dict) -> None:
    with transaction.atomic():
        current = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if current.status == JobStatus.QUEUED:
            fail_unstarted_job(current, error)


class StopReason:
    FENCED = "fenced"  # a newer attempt owns the job: write nothing more
    CANCELLED = "cancelled"
    PAUSED = "paused"
    PREEMPTED = "preempted"  # the worker is shutting down: checkpoint, then queue the job again
    PRUNED = "pruned"  # a study's pruner judged this trial not worth finishing


class _JobProgress:
    """The ML library's callback: events become rows (and websocket pushes), checkpoints become JobCheckpoint rows
    with their files in the object store; it polls for cancel, pause, worker shutdown and fencing."""

    def __init__(
        self,
        job: FineTuningJob,
        attempt: int,
        *,
        checkpoint_dir: Path,
        worker_stopping: threading.Event,
        trial_reporter=None,
    ):
        self.job = job
        # Set when the job is a trial of a hyperparameter study: evaluations go to the study's pruner.
        self.trial_reporter = trial_reporter
        self.attempt = attempt
        self.checkpoint_dir = checkpoint_dir
        self.worker_stopping = worker_stopping
        self.stop_reason: str | None = None
        # The run's own setting, once its config is built: the checkpoint rows kept match the folders it keeps.
        self.checkpoints_kept = 1
        self._last_poll = 0.0
        self._next_metrics_step = 0
        self._last_metrics_stored = 0.0

    # -- events ------------------------------------------------------------------------------------------------
    def on_event(self, event: TrainingEvent) -> None:
        if self.stop_reason == StopReason.FENCED:
            return
        data = event.data
        if event.type == EventType.METRICS and data:
            self._record_progress(data)
            if self._pruned_by_study(data):
                self.stop_reason = StopReason.PRUNED
            if not self._metrics_worth_storing(data):
                return
            # A resumed job logs again the steps after its last checkpoint: the attempt tells a chart which to keep.
            data = {**data, "attempt": self.attempt}
        elif data and not self._record_checkpoint_named_in(data):
            return
        level = {"warning": EventLevel.WARN, "error": EventLevel.ERROR}.get(event.level, EventLevel.INFO)
        job_event_record(job=self.job, message=event.message, level=level, event_type=event.type, data=data)

    def _pruned_by_study(self, data: dict) -> bool:
        """A trial's evaluation goes to its study's pruner, which may judge the rest of the run not worth it."""
        if self.trial_reporter is None or self.stop_reason is not None or not metrics_have_evaluation(data):
            return False
        return self.trial_reporter.report(step=int(data.get("step") or 0), metrics=data)

    def _record_progress(self, data: dict) -> None:
        # Fenced update: only the current attempt may move the progress (the lease is the heartbeat thread's).
        progress: dict = {}
        for field, key in (
            ("steps_completed", "step"),
            ("total_steps", "total_steps"),
            ("latest_train_loss", "train_loss"),
        ):
            # An evaluation-only event may lack the training loss: keep the last one rather than blank it.
            if data.get(key) is not None:
                progress[field] = data[key]
        if progress and not FineTuningJob.objects.filter(pk=self.job.pk, attempt=self.attempt).update(**progress):
            self.stop_reason = StopReason.FENCED

    def _metrics_worth_storing(self, data: dict) -> bool:
        """Keeps about METRICS_POINTS_PER_JOB points over a run (plus every evaluation and the last step, and at
        least one every METRICS_MAX_SILENCE_SECONDS): what a chart draws, not one row per step of a long job."""
        step, total = data.get("step") or 0, data.get("total_steps") or 0
        now = time.monotonic()
        # The engine names evaluation metrics valid_loss, accuracy, bleu...: every number that is not a training key.
        has_evaluation = metrics_have_evaluation(data)
        keep = (
            step >= self._next_metrics_step
            or has_evaluation
            or (total and step >= total)
            or now - self._last_metrics_stored >= METRICS_MAX_SILENCE_SECONDS
        )
        if keep:
            self._next_metrics_step = step + max(1, total // METRICS_POINTS_PER_JOB)
            self._last_metrics_stored = now
        return bool(keep)

    def _record_checkpoint_named_in(self, data: dict) -> bool:
        """Records the checkpoint an event names (one just saved, or the one a resumed run started from); False when
        fenced, so that the event is not recorded either."""
        if "checkpoint" in data:
            return self._record_checkpoint(data["checkpoint"])
        if "resumed_from_step" in data:
            return self._record_resumed_checkpoint(int(data["resumed_from_step"]))
        return True

    def _record_checkpoint(self, checkpoint: dict) -> bool:
        """Copies a checkpoint the engine wrote into the object store and records it; False when fenced."""
        step = int(checkpoint["step_number"])
        folder = self.checkpoint_dir / checkpoint_folder_name(step)
        prefix = tenant_key(self.job.tenant_id, "checkpoints", self.job.public_id, checkpoint_folder_name(step))
        if not self.may_write():
            return False
        object_store().delete_prefix(prefix + "/")
        object_store().upload_dir(prefix, folder)
        with transaction.atomic():
            current = FineTuningJob.objects.select_for_update().filter(pk=self.job.pk, attempt=self.attempt).first()
            if current is None:
                self.stop_reason = StopReason.FENCED
                return False
            JobCheckpoint.objects.update_or_create(
                job=self.job,
                step_number=step,
                defaults={
                    "tenant_id": self.job.tenant_id,
                    "metrics": _json_finite(checkpoint.get("metrics") or {}),
                    "attempt": self.attempt,
                    "storage_prefix": prefix,
                },
            )
            stale = list(JobCheckpoint.objects.filter(job=self.job).order_by("-step_number")[self.checkpoints_kept :])
            for old in stale:
                transaction.on_commit(lambda prefix=old.storage_prefix: object_store().delete_prefix(prefix + "/"))
                old.delete()
        return True

    def _record_resumed_checkpoint(self, step: int) -> bool:
        """Records the checkpoint the engine resumed from when no row has it yet; False when fenced.

        A worker killed between writing a checkpoint and recording it leaves the checkpoint complete on disk, and the
        next attempt on this machine resumes from it: unrecorded, it would be missing from the job's checkpoint list
        (so not deployable) and an attempt on another machine would go back to the older recorded one."""
        if JobCheckpoint.objects.filter(job=self.job, step_number=step).exists():
            return True
        resumed = next((info for info in list_checkpoints(self.checkpoint_dir) if info.step == step), None)
        if resumed is None:
            # Its folder went away after the engine read it: there is nothing left to copy into the store.
            return True
        return self._record_checkpoint({"step_number": step, "metrics": resumed.metrics})

    # -- control -----------------------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.worker_stopping.is_set() and self.stop_reason is None:
            self.stop_reason = StopReason.PREEMPTED
        now = time.monotonic()
        if now - self._last_poll < _CONTROL_POLL_SECONDS:
            return self.stop_reason is not None
        self._last_poll = now
        self._poll()
        return self.stop_reason is not None

    def may_write(self) -> bool:
        """Asked by the engine right before it writes a checkpoint: a fenced executor writes nothing."""
        self._poll()
        return self.stop_reason != StopReason.FENCED

    def _poll(self) -> None:
        current = (
            FineTuningJob.objects.filter(pk=self.job.pk)
            .values("attempt", "status", "cancel_requested", "pause_requested")
            .first()
        )
        if current is None or current["attempt"] != self.attempt or current["status"] != JobStatus.RUNNING:
            self.stop_reason = StopReason.FENCED
        elif self.stop_reason is None and current["cancel_requested"]:
            self.stop_reason = StopReason.CANCELLED
        elif self.stop_reason is None and current["pause_requested"]:
            self.stop_reason = StopReason.PAUSED


class _Heartbeat:
    """Runs ``refresh`` every JOB_HEARTBEAT_SECONDS from a thread while the work runs, also through long silent
    stretches (loading a model, tokenizing); ``refresh`` returns False when the work lost its claim, and then
    ``on_lost`` is called once and the beat stops."""

    def __init__(self, name: str, refresh: Callable[[], bool], on_lost: Callable[[], None] = lambda: None):
        self._refresh, self._on_lost, self._name = refresh, on_lost, name
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._done.wait(settings.JOB_HEARTBEAT_SECONDS):
                try:
                    alive = self._refresh()
                except DatabaseError:
                    logger.warning("%s: heartbeat failed; retrying", self._name, exc_info=True)
                    continue
                if not alive:
                    self._on_lost()
                    return
        finally:
            connection.close()  # this thread's own connection


def _attempt_lease(job: FineTuningJob, attempt: int, progress: _JobProgress) -> _Heartbeat:
    """The lease of a training attempt; a refresh that finds a newer attempt marks the executor fenced."""

    def refresh() -> bool:
        return bool(
            FineTuningJob.objects.filter(pk=job.pk, attempt=attempt, status=JobStatus.RUNNING).update(
                lease_heartbeat_at=timezone.now()
            )
        )

    def fenced() -> None:
        progress.stop_reason = StopReason.FENCED

    return _Heartbeat(f"lease-{job.public_id}", refresh, fenced)


def _preparation_lease(job: FineTuningJob) -> _Heartbeat:
    """While a `cpu` worker prepares the job's data: a preparation whose heartbeat stops (the worker died) is sent
    again by the recovery loop after JOB_LEASE_SECONDS (`jobs_recover`)."""

    def refresh() -> bool:
        return bool(
            FineTuningJob.objects.filter(pk=job.pk, status=JobStatus.QUEUED, prepared_data_prefix="").update(
                lease_heartbeat_at=timezone.now()
            )
        )

    return _Heartbeat(f"preparation-{job.public_id}", refresh)


def _claim(job_id: int) -> FineTuningJob | None:
    """Takes the job's lease for a new attempt; None when there is nothing to run (finished, paused, taken)."""
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().filter(pk=job_id).first()
        # A job not dispatched is waiting for a slot of its tenant: a message for it is a stale duplicate (an old
        # redelivery), and running it would exceed the tenant's limit. Dispatch sends a fresh one when a slot frees.
        # Without prepared data, the message is a stale one too: dispatch sends such a job to a `cpu` worker first.
        if job is None or job.status != JobStatus.QUEUED or job.dispatched_at is None or not job.prepared_data_prefix:
            return None
        attempt = job.attempt + 1
        worker = f"{socket.gethostname()}:{os.getpid()}"
        _transition(
            job,
            to_status=JobStatus.RUNNING,
            phase=JobPhase.PREPARING,
            actor=f"worker:{worker}",
            attempt=attempt,
            lease_owner=worker,
            lease_heartbeat_at=timezone.now(),
            started_at=job.started_at or timezone.now(),
        )
        # Where the attempt resumes is the engine's to say ("Resumed from the checkpoint of step N"): on the same
        # machine it takes the newest complete checkpoint on disk, which a killed worker may have finished writing
        # without recording it, so the newest recorded one would be the wrong step to announce here.
        job_event_record(job=job, message=f"Fine-tuning job started (attempt {attempt})", data={"attempt": attempt})
    return job


def _finish(
    job: FineTuningJob,
    *,
    attempt: int,
    to_status: str,
    actor: str = SYSTEM_ACTOR,
    events: Sequence[tuple[str, str]] = (),
    **fields,
) -> bool:
    """Records the end of the attempt, with its ``(level, message)`` events in the same transaction (a client that
    sees the new status also sees why), unless a newer attempt owns the job (then this executor is stale)."""
    with transaction.atomic():
        current = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if current.attempt != attempt or current.is_finished or current.status != JobStatus.RUNNING:
            return False
        if to_status in FINISHED_STATUSES:
            fields = {"phase": JobPhase.DONE, "finished_at": timezone.now(), **fields}
        _transition(current, to_status=to_status, actor=actor, **fields)
        for level, message in events:
            job_event_record(job=current, level=level, message=message)
        if to_status in FINISHED_STATUSES:
            _job_finished_hooks(current)
        else:
            _dispatch_after_commit()
        job.refresh_from_db()
        return True


def _cancel_actor(job: FineTuningJob) -> str:
    """Who asked for the cancellation (the user who pressed cancel, not the worker that carried it out)."""
    request = JobEvent.objects.filter(job=job, message=_CANCEL_REQUESTED).order_by("-id").first()
    return (request.data or {}).get("requested_by", SYSTEM_ACTOR) if request is not None else SYSTEM_ACTOR


def _validation_config(job: FineTuningJob) -> dict:
    if not job.validation_file_id:
        return {}
    return {
        "validation_file": str(file_local_path(job.validation_file)),
        "validation_filename": job.validation_file.filename,
    }


def _training_config(job: FineTuningJob, *, train_path: Path, work_dir: Path, with_files: bool = True) -> dict:
    entry = catalog_get(model_id=job.model)
    if entry is None:
        raise TrainingDataError("model_not_found", f"The model {job.model} is no longer in the catalog.", "model")
    hyperparameters = dict(job.hyperparameters)
    mode = hyperparameters.pop("mode", None)
    if not hyperparameters.get("checkpoint_every_steps"):
        # Every job checkpoints: a crash, a pause or a worker shutdown then costs minutes, not the run.
        hyperparameters["checkpoint_every_steps"] = settings.JOB_DEFAULT_CHECKPOINT_EVERY_STEPS
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
        **(_validation_config(job) if with_files else {}),
    }
    if job.training_file.column_mapping:
        config["column_mapping"] = {key: value for key, value in job.training_file.column_mapping.items() if value}
    return config


def _checkpoint_dir(job: FineTuningJob) -> Path:
    return Path(settings.WORK_DIR) / "jobs" / job.public_id / "checkpoints"


def _prepared_data_dir(job: FineTuningJob) -> Path:
    return Path(settings.WORK_DIR) / "jobs" / job.public_id / "prepared"


def _restore_latest_checkpoint(job: FineTuningJob) -> None:
    """Puts the job's newest recorded checkpoint into the local checkpoint folder when this machine lacks it (the
    previous attempt ran elsewhere, or this machine's work folder was wiped): the engine resumes from local files."""
    latest = JobCheckpoint.objects.filter(job=job).order_by("-step_number").first()
    if latest is None or not latest.storage_prefix:
        return
    folder = _checkpoint_dir(job) / checkpoint_folder_name(latest.step_number)
    if (folder / "manifest.json").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    local_copy_of_prefix(latest.storage_prefix, folder)


def _final_metrics(result) -> dict:
    scalars = {name: value for name, value in result.final_metrics.items() if isinstance(value, int | float)}
    scalars["train_loss"] = result.final_train_loss
    scalars["steps"] = result.steps_completed
    # NaN (no step ran) is not JSON: such a metric is left out.
    return {name: value for name, value in _json_finite(scalars).items() if value is not None}


def job_run(*, job_id: int, worker_stopping: threading.Event | None = None) -> None:
    """Runs one training attempt for the job: download the data, train, store the model, record the outcome.

    ``worker_stopping`` is set by the worker when it is asked to shut down (SIGTERM): training stops after the
    current step, writes a checkpoint and the job goes back to the queue for the next worker.
    """
    job = _claim(job_id)
    if job is None:
        logger.info("job %s: nothing to run", job_id)
        return
    attempt = job.attempt
    work_dir = Path(settings.WORK_DIR) / "jobs" / job.public_id / f"attempt-{attempt}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    from apps.tuning.services import trial_reporter_for_job

    progress = _JobProgress(
        job,
        attempt,
        checkpoint_dir=_checkpoint_dir(job),
        worker_stopping=worker_stopping or threading.Event(),
        trial_reporter=trial_reporter_for_job(job),
    )
    try:
        with _attempt_lease(job, attempt, progress):
            _run_attempt(job, attempt, progress, work_dir)
    except TrainingDataError as exc:
        _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.FAILED,
            error={"code": exc.code, "message": exc.message, "param": exc.param},
            events=[(EventLevel.ERROR, exc.message)],
        )
    except Exception as exc:
        logger.exception("job %s attempt %s crashed", job.public_id, attempt)
        _record_crash(job, attempt, exc)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        # Local checkpoints serve a resumed attempt on this machine; once the job has an outcome the object store's
        # copies (listed by the checkpoints API, deployable) are the ones that count.
        if FineTuningJob.objects.filter(pk=job.pk, status__in=FINISHED_STATUSES).exists():
            shutil.rmtree(_checkpoint_dir(job), ignore_errors=True)
            shutil.rmtree(_prepared_data_dir(job), ignore_errors=True)


# Failures of the platform's own parts (database, broker, object store, network), not of the job: worth another
# attempt from the last checkpoint, up to JOB_MAX_ATTEMPTS attempts in all.
_INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    OperationalError,
    InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)


def failure_of(exc: BaseException) -> tuple[bool, dict]:
    """(retry?, the `{code, message, param}` error) for an exception that ended an attempt. Infrastructure
    failures are retried; the job's own problems (out of memory at the chosen batch size, bugs) fail once with an
    error that says what to change."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return False, {
            "code": "out_of_memory",
            "message": "Training ran out of memory at the chosen batch size or sequence length. Lower batch_size "
            "(raise gradient_accumulation_steps to keep the effective batch), lower max_length, turn packing on, "
            "or fine-tune with LoRA.",
            "param": "batch_size",
        }
    if isinstance(exc, _INFRASTRUCTURE_ERRORS):
        return True, {
            "code": "infrastructure_error",
            "message": f"Training stopped on an infrastructure failure ({type(exc).__name__}: {exc}).",
            "param": None,
        }
    return False, {"code": "internal_error", "message": f"Training stopped on an internal error: {exc}", "param": None}


def _record_crash(job: FineTuningJob, attempt: int, exc: BaseException) -> None:
    retry, error = failure_of(exc)
    if retry and attempt < settings.JOB_MAX_ATTEMPTS:
        retrying = (
            f"{error['message']} Trying again from the last checkpoint "
            f"(attempt {attempt + 1} of {settings.JOB_MAX_ATTEMPTS})."
        )
        _requeue(job, attempt, actor="system:retry", event=(EventLevel.WARN, retrying))
        return
    _finish(
        job, attempt=attempt, to_status=JobStatus.FAILED, error=error, events=[(EventLevel.ERROR, error["message"])]
    )


def _requeue(job: FineTuningJob, attempt: int, *, actor: str, event: tuple[str, str]) -> None:
    """Ends the attempt with the job back in the queue (it waits for a slot of its tenant, then resumes from its
    last checkpoint on whichever worker takes it)."""
    _finish(
        job,
        attempt=attempt,
        to_status=JobStatus.QUEUED,
        actor=actor,
        phase=JobPhase.WAITING_FOR_SLOT,
        dispatched_at=None,
        events=[event],
    )


def _run_attempt(job: FineTuningJob, attempt: int, progress: _JobProgress, work_dir: Path) -> None:
    prepared_data = local_copy_of_prefix(job.prepared_data_prefix, _prepared_data_dir(job))
    _restore_latest_checkpoint(job)
    FineTuningJob.objects.filter(pk=job.pk, attempt=attempt).update(phase=JobPhase.TRAINING)
    # The run reads its data from the prepared folder only: the data files are never downloaded here.
    config = TrainingConfig.from_dict(
        {
            **_training_config(job, train_path=prepared_data, work_dir=work_dir, with_files=False),
            "prepared_data": str(prepared_data),
        }
    )
    from workers.ml.engine import run_training  # the engine (peft, scikit-learn) loads on workers only

    progress.checkpoints_kept = config.checkpoints_kept
    result = run_training(config, progress)
    reason = progress.stop_reason
    if reason == StopReason.FENCED:
        logger.warning("job %s attempt %s: superseded by a newer attempt, stopping", job.public_id, attempt)
        return
    if reason == StopReason.CANCELLED:
        _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.CANCELLED,
            actor=_cancel_actor(job),
            events=[(EventLevel.INFO, f"Job cancelled at step {result.steps_completed:,}")],
        )
        return
    if reason == StopReason.PRUNED:
        from apps.tuning.services import PRUNED_ACTOR

        _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.CANCELLED,
            actor=PRUNED_ACTOR,
            events=[(EventLevel.INFO, f"Trial pruned at step {result.steps_completed:,}: {_pruned_reason(job)}")],
        )
        return
    if reason == StopReason.PAUSED:
        paused = f"Job paused at step {result.steps_completed:,}; resuming continues from here"
        _finish(
            job,
            attempt=attempt,
            to_status=JobStatus.PAUSED,
            phase=JobPhase.PAUSED,
            pause_requested=False,
            events=[(EventLevel.INFO, paused)],
        )
        return
    if reason == StopReason.PREEMPTED:
        handed_back = (
            f"The worker is shutting down: progress saved at step {result.steps_completed:,}; the job is queued "
            "again and continues on the next worker"
        )
        _requeue(job, attempt, actor="system:worker-shutdown", event=(EventLevel.INFO, handed_back))
        return
    FineTuningJob.objects.filter(pk=job.pk, attempt=attempt).update(phase=JobPhase.SAVING)
    prefix = tenant_key(job.tenant_id, "models", job.public_id)
    if not progress.may_write():
        return
    object_store().delete_prefix(prefix + "/")
    object_store().upload_dir(prefix, work_dir / "model")
    if progress.trial_reporter is not None:
        # A study's trial: its model is kept, and named (listed, deployable) only when the study promotes it.
        fine_tuned_model = ""
        created = f"Trial model saved; promote it from study {progress.trial_reporter.study.public_id} to use it"
    else:
        fine_tuned_model = fine_tuned_model_name(job)
        created = f"New fine-tuned model created: {fine_tuned_model}"
    _finish(
        job,
        attempt=attempt,
        to_status=JobStatus.SUCCEEDED,
        model_storage_prefix=prefix,
        fine_tuned_model=fine_tuned_model,
        trained_tokens=result.train_tokens,
        metrics=_final_metrics(result),
        events=[(EventLevel.INFO, created), (EventLevel.INFO, "The job has successfully completed")],
    )


def _pruned_reason(job: FineTuningJob) -> str:
    from apps.tuning.models import Trial

    return Trial.objects.filter(job=job).values_list("state_reason", flat=True).first() or "the study's pruner"
