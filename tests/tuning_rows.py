"""Trial rows for tests of pages and APIs that must not train: the session's real workers (started by earlier tests)
would otherwise pick up a trial's job, and its study's advance message, while the test looks at them."""

from django.db import transaction

from apps.jobs.models import FineTuningJob, JobStatus
from apps.jobs.services import job_create


def unreachable_job(study, *, hyperparameters: dict, suffix: str = "") -> FineTuningJob:
    """A job made by the jobs service for the study's data, moved back to `validating_files` in the same transaction,
    so the dispatch that follows its commit sends nothing (only queued jobs are sent)."""
    with transaction.atomic():
        job = job_create(
            tenant=study.tenant,
            user=None,
            training_file=study.training_file,
            model=study.model,
            hyperparameters=hyperparameters,
            suffix=suffix,
        )
        FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.VALIDATING_FILES)
    job.refresh_from_db()
    return job
