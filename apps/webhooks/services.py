"""Writes for webhooks: endpoints, one delivery per finished job and endpoint, and each delivery attempt.

Delivery is at least once: a delivery is retried with exponential backoff on a network error, a timeout, a 408, a
429 or a 5xx, and given up at once on any other answer. Each attempt is signed afresh (the timestamp is part of the
signature and receivers refuse old ones), with the same `webhook-id`, so receivers can drop a redelivery.
"""

import http.client
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from apps.core.api.errors import ApiError
from apps.core.ids import new_public_id
from apps.tenancy.models import Tenant

from .models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEventType
from .signing import signature_headers
from .transport import UnsafeWebhookUrl, check_webhook_url, post_json

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 100
_MAX_RETRY_DELAY_SECONDS = 3600.0
# A task that arrives this much before its delivery is due is a stale duplicate: a newer retry is scheduled.
_EARLY_ARRIVAL_SLACK = timedelta(seconds=2)
_USER_AGENT = "Tunehouse-Webhooks/1.0"

_EVENT_TYPE_BY_JOB_STATUS = {
    "succeeded": WebhookEventType.JOB_SUCCEEDED,
    "failed": WebhookEventType.JOB_FAILED,
    "cancelled": WebhookEventType.JOB_CANCELLED,
}


def _setting(name: str, default):
    return getattr(settings, name, default)


def retry_delay_seconds(*, attempts_made: int) -> float:
    """Wait before the next attempt: base × 5^(attempts − 1) (5 s, 25 s, 2 min, 10 min, …), at most an hour."""
    base = float(_setting("WEBHOOK_RETRY_BASE_SECONDS", 5.0))
    return min(base * 5 ** max(attempts_made - 1, 0), _MAX_RETRY_DELAY_SECONDS)


def _validated_event_types(event_types) -> list[str]:
    if event_types is None:
        return [event_type.value for event_type in WebhookEventType]
    known = set(WebhookEventType.values)
    if not isinstance(event_types, list) or not event_types or not all(isinstance(name, str) for name in event_types):
        raise ApiError("event_types must be a non-empty list of event type names.", param="event_types")
    unknown = [name for name in event_types if name not in known]
    if unknown:
        raise ApiError(
            f"Unknown event type {unknown[0]!r}; choose from {', '.join(WebhookEventType.values)}.",
            param="event_types",
        )
    return list(dict.fromkeys(event_types))  # the caller's order, each type once


def webhook_endpoint_create(
    *, tenant: Tenant, url: str, event_types: list[str] | None = None, name: str = "", user: AbstractBaseUser | None
) -> WebhookEndpoint:
    """Registers a URL for the tenant's job events; the returned endpoint carries its new signing secret."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        raise ApiError(f"name must be a string of at most {MAX_NAME_LENGTH} characters.", param="name")
    try:
        check_webhook_url(url)
    except UnsafeWebhookUrl as exc:
        raise ApiError(str(exc), code="invalid_url", param="url") from None
    endpoint = WebhookEndpoint.objects.create(
        tenant=tenant, url=url.strip(), name=name, event_types=_validated_event_types(event_types)
    )
    logger.info("webhook endpoint %s created for tenant %s by %s", endpoint.public_id, tenant.pk, user or "an API key")
    return endpoint


def webhook_endpoint_delete(*, tenant: Tenant, endpoint: WebhookEndpoint) -> None:
    """Deletes the endpoint and its delivery log; deliveries still waiting to be sent are dropped with it."""
    if endpoint.tenant_id != tenant.pk:
        raise ApiError("No such webhook endpoint.", code="not_found", status_code=404)
    endpoint.delete()


def _new_event_id() -> str:
    return new_public_id("evt").replace("evt-", "evt_", 1)  # OpenAI's event ids are spelled `evt_…`


def webhooks_job_finished(*, job) -> None:
    """Queues one delivery per enabled endpoint of the job's tenant that subscribes to this outcome.

    Call it inside the transaction that records the job's terminal status: the deliveries are committed with it and
    sent only once it commits, so a rolled-back finish sends nothing. A status that is not terminal sends nothing.
    """
    event_type = _EVENT_TYPE_BY_JOB_STATUS.get(str(job.status))
    if event_type is None:
        logger.warning("webhooks_job_finished called for job %s in status %s; nothing sent", job.public_id, job.status)
        return
    endpoints = [
        endpoint
        for endpoint in WebhookEndpoint.objects.for_tenant(job.tenant_id).filter(enabled=True)
        if event_type in endpoint.event_types  # in Python: SQLite cannot filter inside a JSON list
    ]
    if not endpoints:
        return
    finished_at = job.finished_at or timezone.now()
    # One event, one id, whatever the number of endpoints it goes to (as OpenAI does).
    payload = {
        "id": _new_event_id(),
        "object": "event",
        "created_at": int(finished_at.timestamp()),
        "type": event_type.value,
        "data": {"id": job.public_id},
    }
    now = timezone.now()
    for endpoint in endpoints:
        delivery = WebhookDelivery.objects.create(
            tenant_id=job.tenant_id, endpoint=endpoint, event_type=event_type, payload=payload, next_attempt_at=now
        )
        _enqueue_after_commit(delivery.pk)


def _enqueue_after_commit(delivery_id: int) -> None:
    from workers.tasks.webhooks import deliver_webhook

    # robust: the job's outcome is already committed when this runs; a broker hiccup must not turn it into an
    # error for the caller. The delivery stays pending and `webhook_deliveries_redispatch_overdue` sends it again.
    transaction.on_commit(lambda: deliver_webhook.delay(delivery_id), robust=True)


@dataclass(frozen=True)
class _AttemptOutcome:
    status_code: int | None = None
    error: str = ""
    retryable: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _is_retryable_status(status_code: int) -> bool:
    return status_code in (408, 429) or status_code >= 500


def _send(delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> _AttemptOutcome:
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        **signature_headers(
            secret=endpoint.secret, message_id=delivery.public_id, timestamp=int(time.time()), body=body
        ),
    }
    timeout = float(_setting("WEBHOOK_TIMEOUT_SECONDS", 10.0))
    try:
        status_code = post_json(endpoint.url, body=body, headers=headers, timeout=timeout)
    except UnsafeWebhookUrl as exc:
        return _AttemptOutcome(error=str(exc))
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS, garbled answer
        return _AttemptOutcome(error=f"{type(exc).__name__}: {exc}"[:1000], retryable=True)
    if 200 <= status_code < 300:
        return _AttemptOutcome(status_code=status_code)
    if 300 <= status_code < 400:
        return _AttemptOutcome(
            status_code=status_code, error=f"HTTP {status_code}: redirects are not followed; register the final URL."
        )
    return _AttemptOutcome(
        status_code=status_code, error=f"HTTP {status_code}", retryable=_is_retryable_status(status_code)
    )


def webhook_delivery_attempt(*, delivery_id: int) -> float | None:
    """Makes one attempt at a delivery. Returns the seconds to wait before the next attempt, or None when there is
    nothing more to do (delivered, given up, deleted, or a duplicate task for a delivery that is not due yet)."""
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update(of=("self",))
            .select_related("endpoint")
            .filter(pk=delivery_id)
            .first()
        )
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            return None
        if delivery.next_attempt_at and delivery.next_attempt_at > timezone.now() + _EARLY_ARRIVAL_SLACK:
            return None
        endpoint = delivery.endpoint
        if not endpoint.enabled:
            delivery.status = DeliveryStatus.FAILED
            delivery.last_error = "The endpoint was disabled before this event could be delivered."
            delivery.next_attempt_at = None
            delivery.save(update_fields=["status", "last_error", "next_attempt_at"])
            return None
        delivery.attempts += 1
        delivery.save(update_fields=["attempts"])
    # Outside the transaction: no row lock is held across a network call of up to WEBHOOK_TIMEOUT_SECONDS.
    outcome = _send(delivery, endpoint)
    return _record_outcome(delivery_id, outcome)


@transaction.atomic
def _record_outcome(delivery_id: int, outcome: _AttemptOutcome) -> float | None:
    delivery = WebhookDelivery.objects.select_for_update().filter(pk=delivery_id).first()
    if delivery is None or delivery.status == DeliveryStatus.DELIVERED:
        return None  # deleted meanwhile, or a duplicate run already got it through
    now = timezone.now()
    delivery.last_status_code = outcome.status_code
    delivery.last_error = outcome.error
    delay = None
    if outcome.delivered:
        delivery.status = DeliveryStatus.DELIVERED
        delivery.delivered_at = now
        delivery.next_attempt_at = None
    elif outcome.retryable and delivery.attempts < int(_setting("WEBHOOK_MAX_ATTEMPTS", 8)):
        delay = retry_delay_seconds(attempts_made=delivery.attempts)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    else:
        delivery.status = DeliveryStatus.FAILED
        delivery.next_attempt_at = None
    delivery.save(update_fields=["status", "last_status_code", "last_error", "delivered_at", "next_attempt_at"])
    return delay


def webhook_deliveries_redispatch_overdue(*, grace_seconds: float = 300.0) -> int:
    """Sends again the pending deliveries whose attempt is overdue by more than `grace_seconds` (their task was lost
    with a broker restart, or could not be sent at all). Safe to run often: a duplicate task does nothing harmful."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    overdue = list(
        WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    from workers.tasks.webhooks import deliver_webhook

    for delivery_id in overdue:
        deliver_webhook.delay(delivery_id)
    return len(overdue)
