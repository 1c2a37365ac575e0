"""The REST API under /v1/: OpenAI-compatible routes plus Tunehouse extensions."""

from django.urls import include, path

app_name = "api"

urlpatterns = [
    path("", include("apps.datasets.api.urls")),
    path("", include("apps.jobs.api.urls")),
    path("", include("apps.catalog.api.urls")),
]
