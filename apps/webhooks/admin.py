from django.contrib import admin

from .models import WebhookDelivery, WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "url", "enabled", "created_at"]
    list_filter = ["enabled", "tenant"]
    search_fields = ["public_id", "url", "name"]
    # The signing secret stays out of the admin: staff can disable an endpoint without learning how to forge for it.
    exclude = ["secret"]
    # Endpoints are created through the API, which checks the URL; staff may switch one off or narrow its events.
    readonly_fields = ["public_id", "tenant", "url", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "endpoint", "event_type", "status", "attempts", "last_status_code"]
    list_filter = ["status", "event_type", "tenant"]
    search_fields = ["public_id", "endpoint__public_id"]
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    list_select_related = ["tenant", "endpoint"]
