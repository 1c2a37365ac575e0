"""URL map: the dashboard at /, the OpenAI-compatible REST API at /v1/, Django admin for platform staff."""

from django.contrib import admin
from django.urls import include, path

from apps.core.views import healthz
from apps.endpoints.metrics import metrics_view

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    # Prometheus: operator-only (METRICS_TOKEN, else loopback), see apps.endpoints.metrics.
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("v1/", include("apps.core.api.urls")),
    path("", include("apps.dashboard.urls")),
]

handler404 = "apps.core.views.not_found"
handler500 = "apps.core.views.server_error"
