"""Queue `cpu`: advancing hyperparameter studies (settle ended trials, start new ones). Thin: one service call."""

from celery import shared_task


@shared_task(name="workers.tasks.tuning.advance_study", acks_late=True)
def advance_study(study_id: int) -> None:
    from apps.tuning.services import study_advance

    study_advance(study_id=study_id)
