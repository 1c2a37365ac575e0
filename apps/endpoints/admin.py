from django.contrib import admin

from .models import Endpoint, EndpointRequest


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "name", "task", "status", "revision", "created_at"]
    list_filter = ["status", "task", "tenant"]
    search_fields = ["public_id", "name"]
    readonly_fields = ["public_id", "tenant", "job", "checkpoint", "revision", "created_at", "updated_at"]


@admin.register(EndpointRequest)
class EndpointRequestAdmin(admin.ModelAdmin):
    list_display = ["endpoint_public_id", "tenant", "kind", "status_code", "latency_ms", "created_at"]
    list_filter = ["kind", "status_code", "tenant"]
    readonly_fields = [f.name for f in EndpointRequest._meta.fields]
