"""ASGI entry point: HTTP goes to Django, websockets to the Channels consumers under /ws/."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunehouse.settings")
# Django must be set up before the routing imports models.
django_http_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from apps.tenancy.websocket_auth import TenantWebsocketAuthMiddleware  # noqa: E402
from tunehouse.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_http_application,
        "websocket": AllowedHostsOriginValidator(TenantWebsocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
    }
)
