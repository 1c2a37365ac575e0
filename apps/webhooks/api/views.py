"""`/v1/webhooks`: the tenant's webhook endpoints and each one's delivery log."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.pagination import cursor_page
from apps.core.api.schema import ERROR_RESPONSES, ORDER_PARAMETER, PAGE_PARAMETERS, deleted, list_of

from ..models import WebhookEndpoint, WebhookEventType
from ..selectors import webhook_deliveries
from ..serialization import delivery_to_json, endpoint_to_json
from ..services import webhook_endpoint_create, webhook_endpoint_delete

_EVENT_TYPES = [event_type.value for event_type in WebhookEventType]

# --- Shapes for the OpenAPI schema ---------------------------------------------------------------------------------

_endpoint = inline_serializer(
    "WebhookEndpoint",
    {
        "object": serializers.CharField(default="webhook_endpoint"),
        "id": serializers.CharField(),
        "name": serializers.CharField(),
        "url": serializers.URLField(),
        "event_types": serializers.ListField(child=serializers.ChoiceField(choices=_EVENT_TYPES)),
        "enabled": serializers.BooleanField(),
        "created_at": serializers.IntegerField(),
        "signing_secret_hint": serializers.CharField(help_text="The secret's prefix and last 4 characters."),
        "signing_secret": serializers.CharField(
            required=False, help_text="Only in the answer to the create call: keep it, it is not shown again."
        ),
    },
)
_delivery = inline_serializer(
    "WebhookDelivery",
    {
        "object": serializers.CharField(default="webhook_endpoint.delivery"),
        "id": serializers.CharField(help_text="The webhook-id header: the same on every retry."),
        "endpoint_id": serializers.CharField(),
        "event_type": serializers.CharField(),
        "event": serializers.DictField(help_text="The payload sent."),
        "status": serializers.ChoiceField(choices=["pending", "delivered", "failed"]),
        "attempts": serializers.IntegerField(),
        "last_status_code": serializers.IntegerField(allow_null=True),
        "last_error": serializers.CharField(allow_null=True),
        "next_attempt_at": serializers.IntegerField(allow_null=True),
        "delivered_at": serializers.IntegerField(allow_null=True),
        "created_at": serializers.IntegerField(),
    },
)


class WebhookEndpointListCreateView(TenantAPIView):
    model = WebhookEndpoint

    @extend_schema(
        summary="List webhook endpoints (Tunehouse)",
        operation_id="listWebhookEndpoints",
        parameters=[*PAGE_PARAMETERS, ORDER_PARAMETER],
        responses={200: list_of("WebhookEndpointList", _endpoint), **ERROR_RESPONSES},
    )
    def get(self, request):
        return Response(cursor_page(self.get_queryset(), query_params=request.query_params, to_json=endpoint_to_json))

    @extend_schema(
        summary="Create a webhook endpoint (Tunehouse)",
        operation_id="createWebhookEndpoint",
        request=inline_serializer(
            "CreateWebhookEndpoint",
            {
                "url": serializers.URLField(help_text="A public http(s) URL that receives the events."),
                "event_types": serializers.ListField(
                    child=serializers.ChoiceField(choices=_EVENT_TYPES),
                    required=False,
                    help_text="Default: all of them.",
                ),
                "name": serializers.CharField(required=False, max_length=100),
            },
        ),
        responses={200: _endpoint, **ERROR_RESPONSES},
    )
    def post(self, request):
        data = request.data
        endpoint = webhook_endpoint_create(
            tenant=self.tenant,
            user=self.tenant_context.user,
            url=data.get("url"),
            event_types=data.get("event_types"),
            name=data.get("name") or "",
        )
        # The only response that carries the signing secret.
        return Response(endpoint_to_json(endpoint, include_secret=True))


class WebhookEndpointDetailView(TenantAPIView):
    model = WebhookEndpoint

    @extend_schema(
        summary="Retrieve a webhook endpoint (Tunehouse)",
        operation_id="retrieveWebhookEndpoint",
        responses={200: _endpoint, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(endpoint_to_json(self.get_object()))

    @extend_schema(
        summary="Delete a webhook endpoint and its delivery log (Tunehouse)",
        operation_id="deleteWebhookEndpoint",
        responses={200: deleted("WebhookEndpointDeleted", "webhook_endpoint.deleted"), **ERROR_RESPONSES},
    )
    def delete(self, request, public_id):
        endpoint = self.get_object()
        webhook_endpoint_delete(tenant=self.tenant, endpoint=endpoint)
        return Response({"id": public_id, "object": "webhook_endpoint.deleted", "deleted": True})


class WebhookDeliveryListView(TenantAPIView):
    model = WebhookEndpoint

    @extend_schema(
        summary="List an endpoint's deliveries (Tunehouse)",
        operation_id="listWebhookDeliveries",
        parameters=[*PAGE_PARAMETERS, ORDER_PARAMETER],
        responses={200: list_of("WebhookDeliveryList", _delivery), **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        deliveries = webhook_deliveries(endpoint=self.get_object())
        return Response(cursor_page(deliveries, query_params=request.query_params, to_json=delivery_to_json))
