import platform

from django.db import connection
from django.http import JsonResponse


def healthz(request):
    """Liveness for load balancers and `make up`; names the interpreter so tests can see stdlib `platform` works."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok", "python": platform.python_version(), "system": platform.system()})
