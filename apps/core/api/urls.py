"""The REST API under /v1/: OpenAI-compatible routes plus Tunehouse extensions, and their OpenAPI schema and docs."""

from django.urls import include, path
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

app_name = "api"


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells the schema how an API key is sent (the docs page's Authorize button uses it). Registered by being
    defined: this module is imported whenever the schema is built, since the schema walks these routes."""

    target_class = "apps.tenancy.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A tenant's API key (th-...), as `Authorization: Bearer <key>`, the way the openai SDK "
            "sends it.",
        }


urlpatterns = [
    path("", include("apps.datasets.api.urls")),
    path("", include("apps.jobs.api.urls")),
    path("", include("apps.catalog.api.urls")),
    path("", include("apps.webhooks.api.urls")),
    path("", include("apps.endpoints.api.urls")),
    path("", include("apps.tuning.api.urls")),
    path("", include("apps.audits.api.urls")),
    path("", include("apps.tenancy.api.urls")),
    # Public on purpose (settings.SPECTACULAR_SETTINGS says why); Swagger UI's files come from this server.
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:openapi-schema"), name="docs"),
]
