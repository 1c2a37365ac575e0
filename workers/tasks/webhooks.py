"""Queue `cpu`: webhook deliveries. Thin: the service makes one attempt and says when to try again."""

from celery import shared_task


# max_retries=None: the service counts attempts in the database (WEBHOOK_MAX_ATTEMPTS), which survives a
# redelivered message; Celery's own counter would not.
@shared_task(
    name="workers.tasks.webhooks.deliver_webhook",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def deliver_webhook(self, delivery_id: int) -> None:
    from apps.webhooks.services import webhook_delivery_attempt

    retry_in = webhook_delivery_attempt(delivery_id=delivery_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)
