"""Bias audits of trained models, each tenant's audit policy, and the review decisions platform staff record.

An audit measures a model (a job's, or one of its checkpoints) against a reference (its base model, or one the tenant
picks for a from-scratch model) and ends `passed` or `flagged` with its reasons, judged by the tenant's policy as it
stood then (kept on the audit). Decisions are append-only: a row is never changed or deleted, and each records the
audit version its reviewer saw.
"""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from apps.core.ids import new_public_id
from apps.datasets.models import File
from apps.jobs.models import FineTuningJob, JobCheckpoint
from apps.tenancy.models import TenantOwnedModel


def _new_audit_id() -> str:
    return new_public_id("audit")


class ApprovalRule(models.TextChoices):
    # A reviewer's approval is needed before deploy: always, only when the audit flags something, or never.
    ALWAYS = "always"
    WHEN_FLAGGED = "when_flagged"
    NEVER = "never"


class AuditPolicy(TenantOwnedModel):
    """A tenant's rules; a tenant without a row gets the defaults (`apps.audits.policy.DEFAULT_*`)."""

    audit_after_training = models.BooleanField(default=False)
    approval = models.CharField(max_length=20, choices=ApprovalRule.choices, default=ApprovalRule.WHEN_FLAGGED)
    # {measure family: the largest change against the reference (or absolute value without one) allowed}.
    thresholds = models.JSONField(default=dict, blank=True)
    # A threshold is crossed only when the change's 95% interval also excludes "no change" (its lower bound is above
    # zero): small prompt sets give wide intervals, and a noisy point estimate alone should not send every model to
    # review. Off: the point estimate alone decides.
    flag_only_significant = models.BooleanField(default=True)
    # Measure families and demographic categories audited; empty: all of them.
    measures = models.JSONField(default=list, blank=True)
    categories = models.JSONField(default=list, blank=True)
    # What a from-scratch model is compared with (a catalog id or a fine-tuned model name); blank: absolute values.
    reference_model = models.CharField(max_length=200, blank=True, default="")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant"], name="one_audit_policy_per_tenant")]
        verbose_name_plural = "audit policies"

    def __str__(self) -> str:
        return f"audit policy of {self.tenant_id}"


class AuditKind(models.TextChoices):
    GENERATIVE = "generative"
    CLASSIFIER = "classifier"


class AuditStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FLAGGED = "flagged"
    FAILED = "failed"


FINISHED_AUDIT_STATUSES = {AuditStatus.PASSED, AuditStatus.FLAGGED, AuditStatus.FAILED}


class AuditTrigger(models.TextChoices):
    AFTER_TRAINING = "after_training"
    ON_DEMAND = "on_demand"


class Audit(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_audit_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="audits")
    checkpoint = models.ForeignKey(JobCheckpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # 1, 2, 3... per job: a reviewer's decision names the version it saw, and a newer audit needs its own decision.
    version = models.IntegerField()
    kind = models.CharField(max_length=20, choices=AuditKind.choices)
    trigger = models.CharField(max_length=20, choices=AuditTrigger.choices, default=AuditTrigger.ON_DEMAND)
    # What the model is compared with: the base model's catalog id, a fine-tuned model name, or blank (absolute).
    reference_model = models.CharField(max_length=200, blank=True, default="")
    # Classifiers: a labelled file with a sensitive-attribute column named by the user.
    evaluation_file = models.ForeignKey(File, on_delete=models.PROTECT, null=True, blank=True, related_name="audits")
    sensitive_attribute = models.CharField(max_length=100, blank=True, default="")
    # How it was run: categories, prompts per group, new tokens, seed, bootstrap samples.
    options = models.JSONField(default=dict, blank=True)
    # The policy as it stood when the audit was judged: thresholds, measures, approval rule.
    policy = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=AuditStatus.choices, default=AuditStatus.QUEUED)
    results = models.JSONField(null=True, blank=True)
    # [{"measure", "value", "threshold", "message"}] for every threshold crossed.
    reasons = models.JSONField(default=list, blank=True)
    approval_required = models.BooleanField(default=False)
    error = models.JSONField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # When a message for it last went to the broker (the recovery loop re-sends one that seems lost).
    sent_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["job", "version"], name="one_audit_per_job_version")]
        indexes = [models.Index(fields=["status", "approval_required", "-finished_at"], name="audit_review_queue")]

    def __str__(self) -> str:
        return f"{self.public_id} (v{self.version})"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_AUDIT_STATUSES


class Decision(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"


class AppendOnlyError(ValidationError):
    pass


class _AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError("Review decisions are append-only: record a new decision instead.")

    def delete(self):
        raise AppendOnlyError("Review decisions are append-only and cannot be deleted.")


class ReviewDecision(models.Model):
    """A staff reviewer's verdict on one audit version. Append-only: saving an existing row or deleting one raises,
    querysets refuse update() and delete(), admin shows rows read-only, and the database itself refuses an UPDATE
    (and, on PostgreSQL, a DELETE) of a row (migration 0002)."""

    audit = models.ForeignKey(Audit, on_delete=models.PROTECT, related_name="decisions")
    audit_version = models.IntegerField()
    decision = models.CharField(max_length=10, choices=Decision.choices)
    comment = models.TextField()
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = _AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.decision} {self.audit_id} v{self.audit_version}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise AppendOnlyError("Review decisions are append-only: record a new decision instead.")
        if not (self.comment or "").strip():
            raise ValidationError("A review decision needs a comment.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("Review decisions are append-only and cannot be deleted.")
