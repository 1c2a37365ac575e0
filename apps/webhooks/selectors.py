from django.db.models import QuerySet

from apps.tenancy.models import Tenant

from .models import WebhookDelivery, WebhookEndpoint


def webhook_endpoints(*, tenant: Tenant) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.for_tenant(tenant)


def webhook_endpoint_get(*, tenant: Tenant, public_id: str) -> WebhookEndpoint | None:
    return webhook_endpoints(tenant=tenant).filter(public_id=public_id).first()


def webhook_deliveries(*, endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    """The endpoint's deliveries; callers order them (the API lists newest first)."""
    return WebhookDelivery.objects.for_tenant(endpoint.tenant_id).filter(endpoint=endpoint).select_related("endpoint")
