"""Hyperparameter searches: a study (a base job configuration, a search space, an objective, a sampler and a pruner)
and its trials, each one a normal fine-tuning job. Optuna keeps the study's own state (distributions, intermediate
values, sampler attributes) in its tables of this same database; these rows are what the API and the dashboard read,
so a page never needs Optuna, and what tenancy scopes."""

from django.conf import settings
from django.db import models

from apps.core.ids import new_public_id
from apps.datasets.models import File
from apps.jobs.models import FineTuningJob
from apps.tenancy.models import TenantOwnedModel


def _new_study_id() -> str:
    return new_public_id("study")


def _new_trial_id() -> str:
    return new_public_id("trial")


class StudyStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    # Ended early on its GPU-time budget: the trials it finished stand.
    BUDGET_EXHAUSTED = "budget_exhausted"
    CANCELLED = "cancelled"
    FAILED = "failed"


FINISHED_STUDY_STATUSES = {
    StudyStatus.SUCCEEDED,
    StudyStatus.BUDGET_EXHAUSTED,
    StudyStatus.CANCELLED,
    StudyStatus.FAILED,
}


class SamplerKind(models.TextChoices):
    GRID = "grid"
    RANDOM = "random"
    TPE = "tpe"


class PrunerKind(models.TextChoices):
    NONE = "none"
    MEDIAN = "median"
    SUCCESSIVE_HALVING = "successive_halving"
    HYPERBAND = "hyperband"


class Direction(models.TextChoices):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class Study(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_study_id, editable=False)
    name = models.CharField(max_length=200, blank=True, default="")
    # The base job: every trial is this job with the sampled hyperparameters laid over `base_hyperparameters`.
    model = models.CharField(max_length=100)
    training_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="training_studies")
    validation_file = models.ForeignKey(
        File, on_delete=models.PROTECT, related_name="validation_studies", null=True, blank=True
    )
    base_hyperparameters = models.JSONField(default=dict)
    # {name: {"type": "float"|"int"|"categorical", ...}}, checked by apps.tuning.search_space.
    search_space = models.JSONField()
    objective_metric = models.CharField(max_length=40)
    direction = models.CharField(max_length=10, choices=Direction.choices)
    sampler = models.CharField(max_length=20, choices=SamplerKind.choices)
    pruner = models.CharField(max_length=20, choices=PrunerKind.choices)
    # The pruner's own settings (n_startup_trials, n_warmup_steps, min_resource...), defaults filled in.
    pruner_options = models.JSONField(default=dict, blank=True)
    # Parameter sets evaluated first, in order (the defaults, a known good recipe), then the sampler takes over.
    enqueued_trials = models.JSONField(default=list, blank=True)
    n_trials = models.IntegerField()
    max_parallel_trials = models.IntegerField(default=1)
    # Total accelerator time the trials may use (seconds of running training); None: no limit.
    gpu_time_budget_seconds = models.IntegerField(null=True, blank=True)
    seed = models.IntegerField(default=0)
    status = models.CharField(max_length=20, choices=StudyStatus.choices, default=StudyStatus.RUNNING)
    status_reason = models.TextField(blank=True, default="")
    # Optuna's name for it in its tables (the public id: unique and stable).
    optuna_study_name = models.CharField(max_length=100, unique=True)
    best_trial = models.ForeignKey("Trial", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # fANOVA importances of the parameters, recomputed when a trial completes ({name: share}).
    param_importances = models.JSONField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    metadata = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "-created_at", "-id"], name="study_tenant_newest")]
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return self.public_id

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STUDY_STATUSES


class TrialState(models.TextChoices):
    # Optuna's states, as the trial's job goes: RUNNING covers a job waiting in the queue too.
    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_TRIAL_STATES = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED, TrialState.CANCELLED}


class Trial(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_trial_id, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="trials")
    # Optuna's trial number in the study (0, 1, 2...) and its id in Optuna's tables.
    number = models.IntegerField()
    optuna_trial_id = models.IntegerField()
    # None only when the sampled parameters could not make a job (the platform refused them): a failed trial.
    job = models.OneToOneField(
        FineTuningJob, on_delete=models.PROTECT, related_name="study_trial", null=True, blank=True
    )
    params = models.JSONField(default=dict)
    state = models.CharField(max_length=20, choices=TrialState.choices, default=TrialState.RUNNING)
    value = models.FloatField(null=True, blank=True)
    # {step: objective value} as reported to the pruner while the job ran.
    intermediate_values = models.JSONField(default=dict, blank=True)
    # A trial whose job failed on the platform's side is run again with the same parameters: the trial it retries.
    retry_of = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="retries")
    state_reason = models.TextField(blank=True, default="")
    promoted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["number", "id"]
        constraints = [models.UniqueConstraint(fields=["study", "number"], name="one_trial_per_study_number")]

    def __str__(self) -> str:
        return f"{self.study_id} #{self.number}"

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_TRIAL_STATES
