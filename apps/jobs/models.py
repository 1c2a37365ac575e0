"""Fine-tuning jobs, their event log (one per job: REST, websocket and UI all read it) and status history."""

from django.conf import settings
from django.db import models

from apps.core.ids import new_public_id
from apps.datasets.models import File
from apps.tenancy.models import TenantOwnedModel


def _new_job_id() -> str:
    return new_public_id("ftjob")


def _new_event_id() -> str:
    return new_public_id("ftevent")


class JobStatus(models.TextChoices):
    # OpenAI's public statuses, plus `paused`.
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATUSES = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


class JobPhase(models.TextChoices):
    """Finer than the public status: what the job is doing right now."""

    WAITING_FOR_FILES = "waiting_for_files"
    WAITING_FOR_WORKER = "waiting_for_worker"
    # Queued but held back: the tenant already runs as many jobs as its limit allows.
    WAITING_FOR_SLOT = "waiting_for_slot"
    PREPARING = "preparing"
    TOKENIZING = "tokenizing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    # Stopping between steps to write a checkpoint (pause, worker shutdown).
    CHECKPOINTING = "checkpointing"
    PAUSED = "paused"
    AUDITING = "auditing"
    AWAITING_REVIEW = "awaiting_review"
    DONE = "done"


class FineTuningJob(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_job_id, editable=False)
    model = models.CharField(max_length=100, help_text="Catalog id of the base model or architecture.")
    training_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="training_jobs")
    validation_file = models.ForeignKey(
        File, on_delete=models.PROTECT, related_name="validation_jobs", null=True, blank=True
    )
    hyperparameters = models.JSONField(default=dict)
    suffix = models.CharField(max_length=64, blank=True, default="")
    seed = models.IntegerField(default=0)
    status = models.CharField(max_length=20, choices=JobStatus.choices, default=JobStatus.VALIDATING_FILES)
    phase = models.CharField(max_length=20, choices=JobPhase.choices, default=JobPhase.WAITING_FOR_FILES)
    error = models.JSONField(null=True, blank=True)
    fine_tuned_model = models.CharField(max_length=200, blank=True, default="")
    model_storage_prefix = models.CharField(max_length=300, blank=True, default="")
    # The job's training data read, split and tokenized by a `cpu` worker (workers.ml.prepared), in the object store;
    # empty until then. A `gpu` worker only ever starts on prepared data.
    prepared_data_prefix = models.CharField(max_length=300, blank=True, default="")
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    # The final evaluation (validation loss, accuracy/F1, BLEU...) and training loss of a succeeded job.
    metrics = models.JSONField(null=True, blank=True)
    # Latest progress, kept on the row so lists and pages render without scanning the event log.
    steps_completed = models.IntegerField(default=0)
    total_steps = models.IntegerField(default=0)
    latest_train_loss = models.FloatField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    pause_requested = models.BooleanField(default=False)
    # Up to 16 string pairs of the caller's own (OpenAI's `metadata`), echoed back and filterable.
    metadata = models.JSONField(default=dict, blank=True)
    # When a task was last sent to the broker for this job; None while it waits for a slot of its tenant.
    dispatched_at = models.DateTimeField(null=True, blank=True)
    # Lease: the attempt number is the fencing token. An executor whose attempt is no longer the job's stops.
    attempt = models.IntegerField(default=0)
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The dashboard at scale (benchmarks/dashboard_pages.py): a tenant's job list newest first, the same by
        # status (and its counts), and the jobs finished this month (usage), each read from an index, never sorted.
        indexes = [
            models.Index(fields=["tenant", "-created_at", "-id"], name="job_tenant_newest"),
            models.Index(fields=["tenant", "status", "-created_at", "-id"], name="job_tenant_status_newest"),
            models.Index(fields=["tenant", "finished_at"], name="job_tenant_finished"),
        ]

    def __str__(self) -> str:
        return self.public_id

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES


def _new_checkpoint_id() -> str:
    return new_public_id("ftckpt")


class JobCheckpoint(TenantOwnedModel):
    """A complete checkpoint of a job (OpenAI's `fine_tuning.job.checkpoint`): its step, the metrics at that step and
    where its files lie in the object store (weights, optimizer and data-order state: a job resumes from it on any
    machine, and it can be evaluated or deployed on its own)."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_checkpoint_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step_number = models.IntegerField()
    metrics = models.JSONField(default=dict, blank=True)
    attempt = models.IntegerField(default=0)
    storage_prefix = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-step_number", "-id"]
        constraints = [models.UniqueConstraint(fields=["job", "step_number"], name="one_checkpoint_per_job_step")]

    def __str__(self) -> str:
        return f"{self.public_id} (step {self.step_number})"


class IdempotencyKey(TenantOwnedModel):
    """An `Idempotency-Key` a client sent with a job creation: the same key again returns the same job."""

    key = models.CharField(max_length=255)
    # SHA-256 of the request body: the same key with another body is a client error, not a silent second job.
    request_fingerprint = models.CharField(max_length=64)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="one_idempotency_key_per_tenant")]

    def __str__(self) -> str:
        return self.key


class EventLevel(models.TextChoices):
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class EventType(models.TextChoices):
    MESSAGE = "message"
    METRICS = "metrics"


class JobEvent(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_event_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=10, choices=EventLevel.choices, default=EventLevel.INFO)
    message = models.TextField()
    type = models.CharField(max_length=10, choices=EventType.choices, default=EventType.MESSAGE)
    data = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        # (job, type, id): a job's metrics series without reading its message events.
        indexes = [
            models.Index(fields=["job", "id"]),
            models.Index(fields=["job", "type", "id"], name="jobevent_job_type_id"),
        ]

    def __str__(self) -> str:
        return f"{self.public_id}: {self.message}"


class JobStatusChange(models.Model):
    """Every transition with its time and actor; append-only."""

    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="status_changes")
    from_status = models.CharField(max_length=20, blank=True, default="")
    to_status = models.CharField(max_length=20)
    actor = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.job_id}: {self.from_status} -> {self.to_status} by {self.actor}"


def _new_evaluation_id() -> str:
    return new_public_id("fteval")


class EvaluationStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ModelEvaluation(TenantOwnedModel):
    """A succeeded job's model measured on a dataset of the tenant's choosing, on demand (a `gpu` worker runs it)."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_evaluation_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="evaluations")
    file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="evaluations")
    status = models.CharField(max_length=20, choices=EvaluationStatus.choices, default=EvaluationStatus.QUEUED)
    max_examples = models.IntegerField(default=200)
    examples = models.IntegerField(null=True, blank=True)
    metrics = models.JSONField(null=True, blank=True)
    samples = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.public_id
