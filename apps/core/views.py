import platform

from django.db import connection
from django.http import JsonResponse
from django.views.defaults import page_not_found
from django.views.defaults import server_error as default_server_error

from apps.core.api.errors import error_body


def healthz(request):
    """Liveness for load balancers and `make up`; names the interpreter so tests can see stdlib `platform` works."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok", "python": platform.python_version(), "system": platform.system()})


def _wants_api_error(request) -> bool:
    return request.path.startswith("/v1/")


def not_found(request, exception=None):
    """Unknown /v1/ paths answer in OpenAI's error shape; dashboard paths get the usual page."""
    if _wants_api_error(request):
        return JsonResponse(
            error_body(
                message=f"Unknown request URL: {request.method} {request.path}.",
                code="unknown_url",
                param=None,
                status_code=404,
            ),
            status=404,
        )
    return page_not_found(request, exception)


def server_error(request):
    if _wants_api_error(request):
        body = error_body(
            message="The server had an error processing your request.", code="server_error", param=None, status_code=500
        )
        body["error"]["type"] = "server_error"
        return JsonResponse(body, status=500)
    return default_server_error(request)
