from django.db.models import Q, QuerySet

from apps.datasets.models import File
from apps.tenancy.models import Tenant

from .models import FineTuningJob, JobCheckpoint, JobEvent, ModelEvaluation


def job_list(*, tenant: Tenant) -> QuerySet[FineTuningJob]:
    return FineTuningJob.objects.for_tenant(tenant).select_related("training_file", "validation_file", "tenant")


def job_get(*, tenant: Tenant, public_id: str) -> FineTuningJob | None:
    return job_list(tenant=tenant).filter(public_id=public_id).first()


def _job_events_beyond(job: FineTuningJob, event_id: str | None, *, newer: bool):
    """The job's events newer (or older) than `event_id`; all of them when the id is not one of this job's."""
    events = JobEvent.objects.for_tenant(job.tenant_id).filter(job=job)
    anchor = events.filter(public_id=event_id).values_list("id", flat=True).first() if event_id else None
    if anchor is None:
        return events
    return events.filter(id__gt=anchor) if newer else events.filter(id__lt=anchor)


def job_events_after(*, job: FineTuningJob, after_event_id: str | None = None, limit: int = 1000) -> list[JobEvent]:
    """Events in the order they were written, strictly after `after_event_id` (a reconnecting client's last one)."""
    return list(_job_events_beyond(job, after_event_id, newer=True).order_by("id")[:limit])


def job_events_newest_first(
    *, job: FineTuningJob, after_event_id: str | None = None, limit: int = 20
) -> list[JobEvent]:
    """OpenAI's paging: newest first; `after` is the last id of the previous page (so, older events)."""
    return list(_job_events_beyond(job, after_event_id, newer=False).order_by("-id")[:limit])


def file_is_used_by_jobs(*, tenant: Tenant, file: File) -> bool:
    return FineTuningJob.objects.for_tenant(tenant).filter(Q(training_file=file) | Q(validation_file=file)).exists()


def files_trainable(*, tenant: Tenant) -> QuerySet[File]:
    """Files a job can use: still being checked, or checked and holding examples of a task the engine trains."""
    files = File.objects.for_tenant(tenant)
    return files.filter(status__in=("uploaded", "processed")).exclude(status="processed", task="")


def job_evaluations(*, job: FineTuningJob) -> QuerySet[ModelEvaluation]:
    return ModelEvaluation.objects.filter(tenant_id=job.tenant_id, job=job).select_related("job", "file")


def job_evaluation_get(*, job: FineTuningJob, public_id: str) -> ModelEvaluation | None:
    return job_evaluations(job=job).filter(public_id=public_id).first()


def job_checkpoints(*, job: FineTuningJob) -> QuerySet[JobCheckpoint]:
    """The job's checkpoints, newest step first (OpenAI's order)."""
    return JobCheckpoint.objects.filter(tenant_id=job.tenant_id, job=job).select_related("job", "job__tenant")


def jobs_matching_metadata(
    *, jobs: QuerySet[FineTuningJob], pairs: tuple[tuple[str, str], ...] = (), without_metadata: bool = False
) -> QuerySet[FineTuningJob]:
    """OpenAI's list filter: jobs whose metadata holds every (key, value) pair, or, `without_metadata`, none."""
    # Imported here so that this block stays appended to the module (the top is edited in parallel).
    from django.db.models.fields.json import KeyTransform

    if without_metadata:
        return jobs.filter(metadata={})
    for index, (key, value) in enumerate(pairs):
        # A key transform, not `metadata__<key>`: a key may hold `__` or spell a lookup name.
        alias = f"metadata_value_{index}"
        jobs = jobs.alias(**{alias: KeyTransform(key, "metadata")}).filter(**{alias: value})
    return jobs


def job_checkpoint_get(*, job: FineTuningJob, public_id: str) -> JobCheckpoint | None:
    return job_checkpoints(job=job).filter(public_id=public_id).first()


def job_checkpoints_newest_first(
    *, job: FineTuningJob, after: JobCheckpoint | None = None, limit: int = 10
) -> list[JobCheckpoint]:
    """OpenAI's paging: the highest step first; `after` is the last checkpoint of the previous page."""
    checkpoints = job_checkpoints(job=job).order_by("-step_number", "-id")
    if after is not None:
        checkpoints = checkpoints.filter(step_number__lt=after.step_number)
    return list(checkpoints[:limit])


def fine_tuned_models(*, tenant: Tenant) -> QuerySet[FineTuningJob]:
    """The tenant's succeeded jobs: each one's `fine_tuned_model` is a model of this tenant (GET /v1/models)."""
    from .models import JobStatus

    return (
        job_list(tenant=tenant)
        .filter(status=JobStatus.SUCCEEDED)
        .exclude(fine_tuned_model="")
        .order_by("-finished_at", "-id")
    )


def fine_tuned_model_get(*, tenant: Tenant, model_id: str) -> FineTuningJob | None:
    return fine_tuned_models(tenant=tenant).filter(fine_tuned_model=model_id).first()


def tenant_events_after(*, tenant: Tenant, after_event_id: str | None = None, limit: int = 1000) -> list[JobEvent]:
    """Events of all the tenant's jobs in the order they were written, strictly after `after_event_id` (the last
    one a reconnecting tenant feed saw); from the first when the id is not one of this tenant's events."""
    events = JobEvent.objects.for_tenant(tenant)
    anchor = events.filter(public_id=after_event_id).values_list("id", flat=True).first() if after_event_id else None
    if anchor is not None:
        events = events.filter(id__gt=anchor)
    return list(events.select_related("job").order_by("id")[:limit])
