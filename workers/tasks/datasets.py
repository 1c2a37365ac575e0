"""Queue `cpu`: checks on uploaded files. Thin: one service call each."""

from celery import shared_task


@shared_task(name="workers.tasks.datasets.validate_file", acks_late=True)
def validate_file(file_id: int) -> None:
    from apps.datasets.services import file_validate

    file_validate(file_id=file_id)
