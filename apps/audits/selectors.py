"""Reads of audits: a tenant's own (every read takes the tenant first), and the staff review queue across tenants
(only ever shown to platform staff, who are checked by the caller with services.is_reviewer)."""

from django.db.models import Exists, OuterRef, QuerySet

from apps.jobs.models import FineTuningJob
from apps.tenancy.models import Tenant

from .models import Audit, AuditStatus, ReviewDecision


def audits_of_job(*, tenant: Tenant, job: FineTuningJob) -> QuerySet[Audit]:
    return Audit.objects.for_tenant(tenant).filter(job=job).order_by("-version")


def audit_get(*, tenant: Tenant, public_id: str) -> Audit | None:
    return (
        Audit.objects.for_tenant(tenant)
        .select_related("job", "checkpoint", "evaluation_file")
        .filter(public_id=public_id)
        .first()
    )


def latest_audit(*, job: FineTuningJob) -> Audit | None:
    return Audit.objects.filter(job=job).order_by("-version").first()


def _needing_approval() -> QuerySet[Audit]:
    return Audit.objects.filter(status__in=[AuditStatus.PASSED, AuditStatus.FLAGGED], approval_required=True)


def gating_audit(*, job: FineTuningJob, checkpoint_id: int | None = None) -> Audit | None:
    """The audit whose review decides whether this model (the job's final model, or one checkpoint) may be deployed:
    the newest finished audit of it that required approval. A later audit that passed, failed or looked at fewer
    categories does not replace it: only a reviewer's decision on this one (or on a newer one that also needs
    approval) does."""
    return _needing_approval().filter(job=job, checkpoint_id=checkpoint_id).order_by("-version").first()


def _superseded():
    """A newer audit of the same model that also needs approval: the older one's review no longer decides."""
    return _needing_approval().filter(
        job=OuterRef("job"), checkpoint=OuterRef("checkpoint"), version__gt=OuterRef("version")
    )


def review_queue(*, pending_only: bool = True) -> QuerySet[Audit]:
    """Audits awaiting a reviewer (the gating audit of its model, with no decision yet), oldest first; with
    ``pending_only=False`` every audit that needed or received a review, newest first."""
    if not pending_only:
        return _needing_approval().select_related("job", "tenant").order_by("-finished_at", "-id")
    decided = ReviewDecision.objects.filter(audit=OuterRef("pk"))
    return (
        _needing_approval()
        .annotate(decided=Exists(decided), superseded=Exists(_superseded()))
        .filter(decided=False, superseded=False)
        .select_related("job", "tenant")
        .order_by("finished_at", "id")
    )


def review_audit_get(*, public_id: str) -> Audit | None:
    """Any tenant's audit by id, for a staff reviewer."""
    return (
        Audit.objects.select_related("job", "tenant", "checkpoint", "evaluation_file")
        .filter(public_id=public_id)
        .first()
    )


def approval_state(audit: Audit | None) -> str:
    """not_audited | auditing | failed | not_required | pending | approved | rejected | superseded (a newer audit of
    the same model needs the review now, and this one was never decided)."""
    if audit is None:
        return "not_audited"
    if audit.status in (AuditStatus.QUEUED, AuditStatus.RUNNING):
        return "auditing"
    if audit.status == AuditStatus.FAILED:
        return "failed"
    if not audit.approval_required:
        return "not_required"
    decision = audit.decisions.order_by("-id").first()
    if decision is not None:
        return "approved" if decision.decision == "approve" else "rejected"
    if _superseded_filter(audit).exists():
        return "superseded"
    return "pending"


def _superseded_filter(audit: Audit) -> QuerySet[Audit]:
    return _needing_approval().filter(job_id=audit.job_id, checkpoint_id=audit.checkpoint_id, version__gt=audit.version)
