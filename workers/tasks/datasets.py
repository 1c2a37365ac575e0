"""Queue `cpu`: checks on uploaded files and tokenizer training. Thin: one service call each."""

from celery import shared_task


@shared_task(name="workers.tasks.datasets.validate_file", acks_late=True)
def validate_file(
    file_id: int, tokenizer_id: int | None = None, max_length: int = 1024, validation_file_id: int | None = None
) -> None:
    from apps.datasets.services import file_validate

    file_validate(
        file_id=file_id, tokenizer_id=tokenizer_id, max_length=max_length, validation_file_id=validation_file_id
    )


@shared_task(name="workers.tasks.datasets.train_tokenizer_asset", acks_late=True)
def train_tokenizer_asset(tokenizer_id: int) -> None:
    from apps.datasets.services import tokenizer_train

    tokenizer_train(tokenizer_id=tokenizer_id)
