"""Webhook endpoints a tenant registers, and one delivery row per event sent to each of them."""

import base64
import secrets

from django.db import models

from apps.core.ids import new_public_id
from apps.tenancy.models import TenantOwnedModel


class WebhookEventType(models.TextChoices):
    # OpenAI's names for the fine-tuning events, so receivers written for OpenAI work unchanged.
    JOB_SUCCEEDED = "fine_tuning.job.succeeded"
    JOB_FAILED = "fine_tuning.job.failed"
    JOB_CANCELLED = "fine_tuning.job.cancelled"


def default_event_types() -> list[str]:
    return [event_type.value for event_type in WebhookEventType]


def _new_endpoint_id() -> str:
    return new_public_id("whep")


def _new_delivery_id() -> str:
    return new_public_id("whdel")


def new_signing_secret() -> str:
    """Standard Webhooks' form (what OpenAI's SDK verifies): `whsec_` and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class WebhookEndpoint(TenantOwnedModel):
    """A URL of the tenant's that receives signed POSTs when its jobs finish."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_endpoint_id, editable=False)
    name = models.CharField(max_length=100, blank=True, default="")
    url = models.URLField(max_length=2048)
    # Kept readable (not hashed): every delivery is signed with it. It is shown to the tenant once, at creation.
    secret = models.CharField(max_length=100, default=new_signing_secret, editable=False)
    event_types = models.JSONField(default=default_event_types)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.public_id} → {self.url}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(TenantOwnedModel):
    """One event for one endpoint. Its public id is the `webhook-id` header: the same on every retry, so a receiver
    that sees it twice knows it is a redelivery (Standard Webhooks asks receivers to deduplicate on it)."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_delivery_id, editable=False)
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event_type = models.CharField(max_length=64, choices=WebhookEventType.choices)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # When the next attempt is due; a task arriving well before it is a stale duplicate and does nothing.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["endpoint", "id"]),
            models.Index(fields=["status", "next_attempt_at"]),
        ]
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"{self.public_id} ({self.event_type}, {self.status})"
