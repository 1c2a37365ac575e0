"""Queue `gpu`: training runs. The service claims a database lease first, so a redelivered task is harmless."""

from celery import shared_task


@shared_task(name="workers.tasks.training.run_training_job", acks_late=True, reject_on_worker_lost=True)
def run_training_job(job_id: int) -> None:
    from apps.jobs.services import job_run

    job_run(job_id=job_id)


@shared_task(name="workers.tasks.training.run_model_evaluation", acks_late=True, reject_on_worker_lost=True)
def run_model_evaluation(evaluation_id: int) -> None:
    from apps.jobs.services import evaluation_run

    evaluation_run(evaluation_id=evaluation_id)
