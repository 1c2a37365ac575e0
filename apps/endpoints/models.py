"""Inference endpoints (a succeeded job's model, or one of its checkpoints, served by `workers/serving`) and the
per-request usage rows that metering, charts and `/metrics` read."""

from django.conf import settings
from django.db import models

from apps.core.ids import new_public_id
from apps.jobs.models import FineTuningJob, JobCheckpoint
from apps.tenancy.models import ApiKey, TenantOwnedModel


def _new_endpoint_id() -> str:
    return new_public_id("ep")


class EndpointStatus(models.TextChoices):
    DEPLOYING = "deploying"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EndpointTask(models.TextChoices):
    CAUSAL_LM = "causal_lm"
    CLASSIFICATION = "classification"
    SEQ2SEQ = "seq2seq"


def default_generation_defaults() -> dict:
    return {"max_tokens": 128, "temperature": 0.7, "top_p": 1.0}


class Endpoint(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_endpoint_id, editable=False)
    # What callers put in `model`: a slug, unique in the tenant (apps.endpoints.services says which names are taken).
    name = models.SlugField(max_length=64)
    job = models.ForeignKey(FineTuningJob, on_delete=models.PROTECT, related_name="endpoints")
    checkpoint = models.ForeignKey(
        JobCheckpoint, on_delete=models.PROTECT, related_name="endpoints", null=True, blank=True
    )
    task = models.CharField(max_length=20, choices=EndpointTask.choices)
    status = models.CharField(max_length=20, choices=EndpointStatus.choices, default=EndpointStatus.DEPLOYING)
    error = models.JSONField(null=True, blank=True)
    # Bumped whenever the served weights change: serving swaps to the new revision, and a status report for an older
    # revision no longer counts.
    revision = models.PositiveIntegerField(default=1)
    generation_defaults = models.JSONField(default=default_generation_defaults)
    min_replicas = models.PositiveIntegerField(default=0)
    max_replicas = models.PositiveIntegerField(default=1)
    idle_unload_seconds = models.PositiveIntegerField(default=900)
    # Keys limited to some endpoints (blank on a key: every endpoint of its tenant). Reverse: `api_key.endpoints`.
    api_keys = models.ManyToManyField(ApiKey, related_name="endpoints", blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="one_endpoint_name_per_tenant")]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_id})"


class RequestKind(models.TextChoices):
    COMPLETION = "completion"
    CHAT = "chat"
    PREDICT = "predict"


class EndpointRequest(TenantOwnedModel):
    """One row per inference request, failed ones included: the metering source of truth."""

    # SET_NULL plus a copy of the id: deleting an endpoint must not delete what its tenant used.
    endpoint = models.ForeignKey(Endpoint, on_delete=models.SET_NULL, null=True, related_name="requests")
    endpoint_public_id = models.CharField(max_length=40)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    kind = models.CharField(max_length=20, choices=RequestKind.choices)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The usage charts read one endpoint's rows of a window; tenant figures read the tenant's.
        indexes = [
            models.Index(fields=["endpoint", "created_at"], name="eprequest_endpoint_time"),
            models.Index(fields=["tenant", "created_at"], name="eprequest_tenant_time"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_public_id} {self.kind} {self.status_code}"
