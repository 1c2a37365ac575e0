"""Queue `cpu`: a job's data read, split and tokenized before it reaches a `gpu` worker."""

from celery import shared_task


@shared_task(name="workers.tasks.preparation.prepare_job_data", acks_late=True, reject_on_worker_lost=True)
def prepare_job_data(job_id: int) -> None:
    from apps.jobs.execution import job_prepare_data

    job_prepare_data(job_id=job_id)
