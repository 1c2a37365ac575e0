"""Websocket routes. Every group a consumer joins carries the tenant id (see apps/jobs/consumers.py)."""

from django.urls import path

from apps.jobs.consumers import JobEventsConsumer, TenantEventsConsumer

websocket_urlpatterns = [
    path("ws/fine_tuning/jobs/<str:job_id>/", JobEventsConsumer.as_asgi(), name="ws-job-events"),
    path("ws/events/", TenantEventsConsumer.as_asgi(), name="ws-tenant-events"),
]
